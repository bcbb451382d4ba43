"""The work items of a run and their attempts: each unit at `extract`, each chunk at
`transform` and `load`.

Kept in Redis beside the run, outside the task messages, because a message cannot count its
own deliveries: a task that kills its worker is redelivered with the same message (Celery's
`task_reject_on_worker_lost`). Per item: its state for the supervisor (queued, started, or
waiting for a retry at an ETA, each with a time) and its attempts. An attempt is a start that
did not end in a transient retry: it ended in a non-transient error, or never ended because
the process died. Past `max_attempts` the item becomes a dead letter.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import redis

from etl_tasks.runs.state import key

Stage = Literal["extract", "transform", "load"]


def field(stage: str, item: str) -> str:
    return f"{stage}|{item}"


def _set(r: redis.Redis, run_id: str, stage: str, item: str, state: str, at: float) -> None:
    r.hset(key(run_id, "items"), field(stage, item), json.dumps({"state": state, "at": at}))


def sent(r: redis.Redis, run_id: str, stage: Stage, item: str) -> None:
    """A message for the item was sent (first time, or again by the supervisor)."""
    _set(r, run_id, stage, item, "queued", time.time())


def retrying(r: redis.Redis, run_id: str, stage: Stage, item: str, eta: float) -> None:
    _set(r, run_id, stage, item, "retry", eta)


def settle(r: redis.Redis, run_id: str, stage: Stage, item: str) -> None:
    """The item's stage is over (done, or dead-lettered): the supervisor stops watching it."""
    with r.pipeline() as p:
        p.hdel(key(run_id, "items"), field(stage, item))
        p.hdel(key(run_id, "attempts"), field(stage, item))
        p.execute()


def pending(r: redis.Redis, run_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(stage, item) -> {"state", "at"} for every item not settled."""
    found = {}
    for name, value in r.hgetall(key(run_id, "items")).items():
        text = name.decode() if isinstance(name, bytes) else name
        stage, _, item = text.partition("|")
        found[(stage, item)] = json.loads(value)
    return found


def begin(r: redis.Redis, run_id: str, stage: Stage, item: str) -> int:
    """A worker starts the item: count the attempt and note the start; returns the count."""
    count = int(r.hincrby(key(run_id, "attempts"), field(stage, item), 1))
    _set(r, run_id, stage, item, "started", time.time())
    return count


def heartbeat(r: redis.Redis, run_id: str, stage: Stage, item: str) -> None:
    """A long step is alive (a big file, batch by batch): not overdue."""
    _set(r, run_id, stage, item, "started", time.time())


def forgive(r: redis.Redis, run_id: str, stage: Stage, item: str, eta: float) -> None:
    """A transient error: the attempt does not count, the item waits for its retry."""
    r.hincrby(key(run_id, "attempts"), field(stage, item), -1)
    retrying(r, run_id, stage, item, eta)


def note_failure(r: redis.Redis, run_id: str, stage: Stage, item: str, reason: str) -> None:
    r.hset(key(run_id, "reasons"), field(stage, item), reason)


def last_failure(r: redis.Redis, run_id: str, stage: Stage, item: str) -> str | None:
    value = r.hget(key(run_id, "reasons"), field(stage, item))
    return value.decode() if isinstance(value, bytes) else None
