"""Run state in Redis: which units a run planned, which chunks they became, which are done.

Every update is idempotent (sets and hash fields keyed by id), because with `acks_late` any
task may run twice. A run is complete when every planned unit has been split into chunks and
every chunk is committed in the ledger; the loader, the only writer, decides that.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import redis

RunStatus = Literal["queued", "running", "finished", "failed"]
_KEEP_S = 30 * 24 * 3600  # run records are kept a month for `etl status` and dashboards


@dataclass(frozen=True)
class Unit:
    """A planned piece of work: a key range of a table, or one inbox file."""

    unit_id: str
    kind: Literal["range", "updated", "file"]
    lo: int = 0
    hi: int = 0
    path: str = ""
    sha256: str = ""
    since: str = ""  # "updated": rows of lo..hi whose UPDATED_AT is in (since, until]
    until: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Unit:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class RunOptions:
    """How a run was asked for (`etl run --path/--since/--full`); kept in the run record."""

    path: str | None = None
    since: datetime | None = None
    full: bool = False

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "full": self.full,
                           "since": self.since.isoformat() if self.since else None})

    @classmethod
    def from_json(cls, text: str) -> RunOptions:
        data = json.loads(text)
        since = datetime.fromisoformat(data["since"]) if data.get("since") else None
        return cls(path=data.get("path"), since=since, full=bool(data.get("full")))


@dataclass
class Summary:
    """What a run did; the shape of `etl run --json` and `etl demo --json`."""

    source: str
    run_id: str
    status: RunStatus
    extracted: int = 0
    loaded: int = 0
    quarantined: int = 0
    skipped: int = 0
    duration_s: float = 0.0
    quality_score: float | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["files"]:
            data.pop("files")
        return data


def new_run_id() -> str:
    return uuid.uuid4().hex


def key(run_id: str, part: str = "") -> str:
    return f"etl:run:{run_id}" + (f":{part}" if part else "")



def create(r: redis.Redis, run_id: str, source: str,
           options: RunOptions | None = None) -> None:
    now = time.time()
    with r.pipeline() as p:
        p.hsetnx(key(run_id), "source", source)
        p.hsetnx(key(run_id), "options", (options or RunOptions()).to_json())
        p.hsetnx(key(run_id), "status", "queued")
        p.hsetnx(key(run_id), "created_at", now)
        p.expire(key(run_id), _KEEP_S)
        p.lpush(f"etl:runs:{source}", run_id)
        p.ltrim(f"etl:runs:{source}", 0, 199)
        p.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _hash(r: redis.Redis, key: str) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in r.hgetall(key).items()}


def info(r: redis.Redis, run_id: str) -> dict[str, str]:
    return _hash(r, key(run_id))


def options(r: redis.Redis, run_id: str) -> RunOptions:
    text = r.hget(key(run_id), "options")
    return RunOptions.from_json(_text(text)) if text else RunOptions()


def start(r: redis.Redis, run_id: str, units: list[Unit], skipped: int) -> None:
    """Record the plan: the ordered units and the rows skipped as already loaded."""
    with r.pipeline() as p:
        p.delete(key(run_id, "units"))
        if units:
            p.rpush(key(run_id, "units"), *(u.to_json() for u in units))
        p.hset(key(run_id), mapping={"status": "running", "units_total": len(units),
                                    "plan_skipped": skipped, "started_at": time.time()})
        for part in ("units", "split", "chunks", "done", "rejected"):
            p.expire(key(run_id, part), _KEEP_S)
        p.execute()


def units(r: redis.Redis, run_id: str) -> list[Unit]:
    return [Unit.from_json(u) for u in r.lrange(key(run_id, "units"), 0, -1)]


def unit(r: redis.Redis, run_id: str, unit_id: str) -> Unit:
    for u in units(r, run_id):
        if u.unit_id == unit_id:
            return u
    raise KeyError(f"run {run_id} has no unit {unit_id}")


def register_chunks(r: redis.Redis, run_id: str, unit_id: str, rows: dict[str, int]) -> None:
    """A unit was extracted into these chunks (chunk id -> rows); mark the unit split."""
    with r.pipeline() as p:
        if rows:
            p.hset(key(run_id, "chunks"), mapping=dict(rows))  # type: ignore[arg-type]
        p.sadd(key(run_id, "split"), unit_id)
        for part in ("chunks", "split"):
            p.expire(key(run_id, part), _KEEP_S)
        p.execute()


def reject_file(r: redis.Redis, run_id: str, unit_id: str, name: str, reason: str) -> None:
    """A whole file was refused: the unit is split into no chunks, with its reason."""
    r.hset(key(run_id, "rejected"), unit_id, json.dumps({"name": name, "reason": reason}))
    register_chunks(r, run_id, unit_id, {})


def rejected(r: redis.Redis, run_id: str) -> dict[str, dict[str, str]]:
    return {k: json.loads(v) for k, v in _hash(r, key(run_id, "rejected")).items()}


def chunk_rows(r: redis.Redis, run_id: str) -> dict[str, int]:
    return {k: int(v) for k, v in _hash(r, key(run_id, "chunks")).items()}


def mark_done(r: redis.Redis, run_id: str, chunk_id: str, loaded: int, quarantined: int) -> None:
    """A chunk is committed (or was already); counters feed progress displays only."""
    with r.pipeline() as p:
        p.sadd(key(run_id, "done"), chunk_id)
        p.expire(key(run_id, "done"), _KEEP_S)
        p.hincrby(key(run_id), "progress_loaded", loaded)
        p.hincrby(key(run_id), "progress_quarantined", quarantined)
        p.execute()


def done_chunks(r: redis.Redis, run_id: str) -> set[str]:
    return {_text(c) for c in r.smembers(key(run_id, "done"))}


def is_complete(r: redis.Redis, run_id: str) -> bool:
    data = info(r, run_id)
    if data.get("status") != "running":
        return False
    if r.scard(key(run_id, "split")) < int(data.get("units_total", "0")):
        return False
    return set(chunk_rows(r, run_id)) <= done_chunks(r, run_id)


def progress(r: redis.Redis, run_id: str) -> dict[str, int]:
    data = info(r, run_id)
    return {
        "units_total": int(data.get("units_total", 0)),
        "units_split": int(r.scard(key(run_id, "split"))),
        "chunks_total": int(r.hlen(key(run_id, "chunks"))),
        "chunks_done": int(r.scard(key(run_id, "done"))),
        "loaded": int(data.get("progress_loaded", 0)),
        "quarantined": int(data.get("progress_quarantined", 0)),
    }


def finish(r: redis.Redis, run_id: str, summary: Summary) -> None:
    r.hset(key(run_id), mapping={"status": summary.status, "finished_at": time.time(),
                                "summary": json.dumps(summary.public())})


def fail(r: redis.Redis, run_id: str, reason: str) -> None:
    """Mark a run failed with a reason an operator can act on (never patient data)."""
    if info(r, run_id).get("status") in ("finished", "failed"):
        return
    r.hset(key(run_id), mapping={"status": "failed", "finished_at": time.time(),
                                "error": reason})


def acquire_lock(r: redis.Redis, source: str, run_id: str, ttl_s: int) -> str | None:
    """Take the source's run lock; return the run holding it when someone else does."""
    if r.set(f"etl:lock:{source}", run_id, nx=True, ex=ttl_s):
        return None
    holder = r.get(f"etl:lock:{source}")
    return holder.decode() if isinstance(holder, bytes) else None


def release_lock(r: redis.Redis, source: str, run_id: str) -> None:
    # Only the holder releases; compare-and-delete in one round trip.
    r.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
           "end return 0", 1, f"etl:lock:{source}", run_id)
