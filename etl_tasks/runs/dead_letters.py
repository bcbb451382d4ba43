"""Dead letters: work that failed or killed its worker more than `max_attempts` times.

Redis has no dead-letter queue (a rejected message is simply dropped), so the pipeline keeps
its own. A dead letter names the run, the source, the stage, the source pointer (key range or
file) and the reason, never a row. It is kept with the run (so the run can end `partial`),
in an open list per source (so later runs try that work again, once, and `etl retry` can send
it), and durably in DuckDB's `etl_dead_letters` when the run is finalized.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis

from etl_tasks.runs import items
from etl_tasks.runs.state import Unit, key


def _open_key(source: str) -> str:
    return f"etl:dead_letters:{source}"


def dead_letter_id(run_id: str, stage: str, item: str) -> str:
    return hashlib.sha256(f"{run_id}|{stage}|{item}".encode()).hexdigest()[:16]


def record(r: redis.Redis, run_id: str, source: str, stage: items.Stage, item: str,
           unit: Unit, reason: str, attempts: int) -> dict[str, Any]:
    """Dead-letter one item of a run; the run goes on without it."""
    numbered = unit.kind in ("range", "updated") and not unit.sampled
    entry = {
        "dead_letter_id": dead_letter_id(run_id, stage, item), "run_id": run_id,
        "source": source, "stage": stage, "item": item, "unit_id": unit.unit_id,
        "kind": unit.kind, "key_lo": unit.lo if numbered else None,
        "key_hi": unit.hi if numbered else None, "since": unit.since or None,
        "until": unit.until or None, "path": unit.path or None, "sha256": unit.sha256 or None,
        # A sampled range's bounds as the unit holds them: sealed tokens, no key in clear.
        "sampled": unit.sampled, "text_lo": unit.text_lo or None,
        "text_hi": unit.text_hi or None,
        "pointer": unit.pointer() + ("" if item == unit.unit_id else f", chunk {item}"),
        "reason": reason, "attempts": attempts, "created_at": time.time(),
    }
    text = json.dumps(entry)
    with r.pipeline() as p:
        p.hset(key(run_id, "dead"), items.field(stage, item), text)
        p.sadd(key(run_id, "dead_units" if stage == "extract" else "dead_chunks"), item)
        p.hset(_open_key(source), entry["dead_letter_id"], text)
        p.execute()
    items.settle(r, run_id, stage, item)
    return entry


def of_run(r: redis.Redis, run_id: str) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in r.hvals(key(run_id, "dead"))),
                  key=lambda e: e["created_at"])


def open_letters(r: redis.Redis, source: str) -> list[dict[str, Any]]:
    """Open dead letters of a source (not yet loaded by a later run)."""
    return [json.loads(v) for v in r.hvals(_open_key(source))]


def find(r: redis.Redis, sources: list[str], dead_letter_id: str) -> dict[str, Any] | None:
    for source in sources:
        value = r.hget(_open_key(source), dead_letter_id)
        if value is not None:
            return json.loads(value)  # type: ignore[no-any-return]
    return None


def resolve(r: redis.Redis, source: str, ids: list[str]) -> None:
    if ids:
        r.hdel(_open_key(source), *ids)


def restore(r: redis.Redis, source: str, entries: list[dict[str, Any]]) -> None:
    """Put back the open list from DuckDB after Redis lost its data."""
    with r.pipeline() as p:
        p.delete(_open_key(source))
        for entry in entries:
            p.hset(_open_key(source), entry["dead_letter_id"], json.dumps(entry))
        p.execute()


def covers(entry: dict[str, Any], unit: Unit) -> bool:
    """Does loading `unit` redo the dead work of `entry`?"""
    if entry["kind"] == "file":
        return unit.kind == "file" and unit.sha256 == entry["sha256"]
    if entry["kind"] == "updated":
        return False  # resolved when a run advances the updated mark (finalize)
    if entry["kind"] == "table":
        return unit.kind == "table"
    if entry.get("sampled"):
        return False  # resolved when a run's sampled ranges all commit (finalize)
    return (unit.kind == "range" and not unit.sampled and unit.lo <= entry["key_lo"]
            and unit.hi >= entry["key_hi"])


def overlaps(entry: dict[str, Any], unit: Unit) -> bool:
    """Does `unit` include dead work of `entry` (so it gets one attempt, not the default)?"""
    if entry["kind"] == "file":
        return unit.kind == "file" and unit.sha256 == entry["sha256"]
    if entry["kind"] == "table" or unit.kind == "table":
        return bool(entry["kind"] == unit.kind)
    if entry.get("sampled") or unit.sampled:
        # Sampled bounds of two plans are not comparable without opening and ordering them
        # as Firebird does: the new range gets its full attempts.
        return False
    return unit.kind != "file" and unit.lo <= entry["key_hi"] and unit.hi >= entry["key_lo"]
