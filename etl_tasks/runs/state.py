"""Run state in Redis: the plan of a run, the chunks its units became, what is committed.

Every update is idempotent (sets and hash fields keyed by id), because with `acks_late` any
task may run twice and the supervisor re-sends overdue work. Everything of a run lives under
`etl:run:<run_id>`, so two runs never share state. A run is complete when its plan is
recorded, every unit is split into chunks (or dead-lettered) and every chunk is committed in
the ledger (or dead-lettered); only the loader marks chunks committed, after its commit.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import redis

RunStatus = Literal["queued", "planning", "running", "finished", "partial", "failed"]
ENDED: frozenset[str] = frozenset({"finished", "partial", "failed"})
ACTIVE_RUNS = "etl:runs:active"  # run ids not ended yet: what the supervisor watches
UNRECORDED = "etl:runs:unrecorded"  # failed runs whose metrics row is not written yet
_KEEP_S = 30 * 24 * 3600  # run records are kept a month for `etl status` and dashboards
_PARTS = ("unit", "units", "split", "chunks", "chunk_unit", "transformed", "done", "ledger",
          "rejected",
          "recovered", "items", "attempts", "reasons", "dead", "dead_units", "dead_chunks")


@dataclass(frozen=True)
class Unit:
    """A planned piece of work: a key range of a table, a table without a key, or one inbox
    file."""

    unit_id: str
    kind: Literal["range", "updated", "file", "table"]
    lo: int = 0
    hi: int = 0
    path: str = ""
    sha256: str = ""
    since: str = ""  # "updated": rows of lo..hi whose UPDATED_AT is in (since, until]
    until: str = ""
    max_attempts: int = 0  # 0: the configured default; 1 for dead work tried again
    # A range of a key that is not an integer, cut at boundaries sampled from the table:
    # rows with text_lo < key <= text_hi ("" = no bound), instead of lo..hi. The bounds are
    # key values (an MRN is patient data), so they are sealed tokens (runs/bounds.py).
    sampled: bool = False
    text_lo: str = ""
    text_hi: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Unit:
        return cls(**json.loads(text))

    def pointer(self) -> str:
        """Where in the source this unit is, for people: a key range or a file name."""
        if self.kind == "file":
            return f"file {self.path.rsplit('/', 1)[-1]} (sha256 {self.sha256[:16]})"
        if self.kind == "table":
            return "every row of the table (it has no key)"
        window = f" updated in ({self.since}, {self.until}]" if self.kind == "updated" else ""
        if self.sampled:  # its bounds are key values: never shown
            return f"sampled key range {self.unit_id.rsplit(':', 1)[-1]}{window}"
        return f"keys {self.lo}-{self.hi}{window}"


@dataclass(frozen=True)
class RunOptions:
    """How a run was asked for (`etl run --path/--since/--full`, `etl retry`)."""

    path: str | None = None
    since: datetime | None = None
    full: bool = False
    retry: str | None = None  # a dead letter id: the run does exactly that work again

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "full": self.full, "retry": self.retry,
                           "since": self.since.isoformat() if self.since else None})

    @classmethod
    def from_json(cls, text: str) -> RunOptions:
        data = json.loads(text)
        since = datetime.fromisoformat(data["since"]) if data.get("since") else None
        return cls(path=data.get("path"), since=since, full=bool(data.get("full")),
                   retry=data.get("retry"))


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
    dead_lettered: int = 0
    duration_s: float = 0.0
    quality_score: float | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    # Seconds per stage, errors by class, error rate, source latency (`metrics()`).
    metrics: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["files"]:
            data.pop("files")
        return data


def new_run_id() -> str:
    return uuid.uuid4().hex


def key(run_id: str, part: str = "") -> str:
    return f"etl:run:{run_id}" + (f":{part}" if part else "")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _hash(r: redis.Redis, name: str) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in r.hgetall(name).items()}


def _members(r: redis.Redis, name: str) -> set[str]:
    return {_text(m) for m in r.smembers(name)}


def _keep(p: Any, run_id: str, *parts: str) -> None:
    for part in parts:
        p.expire(key(run_id, part), _KEEP_S)


def create(r: redis.Redis, run_id: str, source: str, options: RunOptions | None = None,
           *, origin: str = "api") -> None:
    """Record a run (idempotent: a redelivered plan keeps the first record)."""
    now = time.time()
    with r.pipeline() as p:
        p.hsetnx(key(run_id), "source", source)
        p.hsetnx(key(run_id), "options", (options or RunOptions()).to_json())
        p.hsetnx(key(run_id), "status", "queued")
        p.hsetnx(key(run_id), "origin", origin)
        p.hsetnx(key(run_id), "created_at", now)
        p.hsetnx(key(run_id), "last_progress_at", now)
        p.expire(key(run_id), _KEEP_S)
        p.sadd(ACTIVE_RUNS, run_id)
        p.execute()
    if r.hsetnx(key(run_id), "listed", 1):  # listed once, however often it is created
        r.lpush(f"etl:runs:{source}", run_id)
        r.ltrim(f"etl:runs:{source}", 0, 199)


def exists(r: redis.Redis, run_id: str) -> bool:
    """False when Redis has no record of the run (never made, expired, or Redis lost it)."""
    return r.hget(key(run_id), "source") is not None


def info(r: redis.Redis, run_id: str) -> dict[str, str]:
    return _hash(r, key(run_id))


def status(r: redis.Redis, run_id: str) -> str | None:
    value = r.hget(key(run_id), "status")
    return _text(value) if value is not None else None


def options(r: redis.Redis, run_id: str) -> RunOptions:
    text = r.hget(key(run_id), "options")
    return RunOptions.from_json(_text(text)) if text else RunOptions()


def begin_planning(r: redis.Redis, run_id: str) -> None:
    r.hset(key(run_id), mapping={"planning_at": time.time()})
    r.eval("if redis.call('hget', KEYS[1], 'status') == 'queued' then "
           "redis.call('hset', KEYS[1], 'status', 'planning') end return 0", 1, key(run_id))


def is_planned(r: redis.Redis, run_id: str) -> bool:
    return r.hget(key(run_id), "planned") is not None


def record_plan(r: redis.Redis, run_id: str, units: list[Unit], skipped: int,
                updated_to: str | None, table_schema: str | None = None) -> bool:
    """Record the plan once; False when another delivery of the plan recorded it first (a
    retried plan must never replace the units a run is already working on). A Firebird
    run's `table_schema` (the reflected columns, JSON) is what all its ranges read."""
    if not r.hsetnx(key(run_id), "planned", time.time()):
        return False
    with r.pipeline() as p:
        for u in units:
            p.hset(key(run_id, "unit"), u.unit_id, u.to_json())
        if units:
            p.rpush(key(run_id, "units"), *(u.unit_id for u in units))
            # Every unit waits for the run's window to admit it (runs/window.py).
            p.rpush(key(run_id, "held"), *(u.unit_id for u in units))
        mapping: dict[str, str | float | int] = {"status": "running", "units_total": len(units),
                                   "plan_skipped": skipped, "started_at": time.time(),
                                   "last_progress_at": time.time()}
        if updated_to:
            mapping["plan_updated_to"] = updated_to
        if table_schema:
            mapping["table_schema"] = table_schema
        p.hset(key(run_id), mapping=mapping)  # type: ignore[arg-type]
        _keep(p, run_id, *_PARTS, "held")
        p.execute()
    return True


def units(r: redis.Redis, run_id: str) -> list[Unit]:
    """The run's units in plan order."""
    found = _hash(r, key(run_id, "unit"))
    return [Unit.from_json(found[_text(u)]) for u in r.lrange(key(run_id, "units"), 0, -1)
            if _text(u) in found]


def unit(r: redis.Redis, run_id: str, unit_id: str) -> Unit:
    text = r.hget(key(run_id, "unit"), unit_id)
    if text is None:
        raise KeyError(f"run {run_id} has no unit {unit_id}")
    return Unit.from_json(text)


def register_chunks(r: redis.Redis, run_id: str, unit_id: str, rows: dict[str, int]) -> None:
    """A unit was extracted into these chunks (chunk id -> rows); mark the unit split."""
    with r.pipeline() as p:
        if rows:
            p.hset(key(run_id, "chunks"), mapping=dict(rows))  # type: ignore[arg-type]
            p.hset(key(run_id, "chunk_unit"), mapping=dict.fromkeys(rows, unit_id))
            p.sadd(key(run_id, "staged"), *rows)  # in the run's window until committed
        p.sadd(key(run_id, "split"), unit_id)
        if any(rows.values()):  # the source's latency: when its first rows arrived
            p.hsetnx(key(run_id), "first_row_at", time.time())
        _keep(p, run_id, "chunks", "chunk_unit", "split", "staged")
        p.execute()
    touch(r, run_id)


def is_split(r: redis.Redis, run_id: str, unit_id: str) -> bool:
    return bool(r.sismember(key(run_id, "split"), unit_id))


def unsplit(r: redis.Redis, run_id: str, unit_id: str) -> None:
    """Forget that a unit was extracted (its staged payloads are gone): extract it again."""
    chunks = [c for c, u in _hash(r, key(run_id, "chunk_unit")).items() if u == unit_id]
    with r.pipeline() as p:
        p.srem(key(run_id, "split"), unit_id)
        if chunks:
            p.srem(key(run_id, "transformed"), *chunks)
        p.execute()


def unit_of(r: redis.Redis, run_id: str, chunk_id: str) -> str | None:
    value = r.hget(key(run_id, "chunk_unit"), chunk_id)
    return _text(value) if value is not None else None


def chunk_units(r: redis.Redis, run_id: str) -> dict[str, str]:
    """chunk id -> the unit it came from."""
    return _hash(r, key(run_id, "chunk_unit"))


def reject_file(r: redis.Redis, run_id: str, unit_id: str, name: str, reason: str) -> None:
    """A whole file was refused: the unit is split into no chunks, with its reason."""
    r.hset(key(run_id, "rejected"), unit_id, json.dumps({"name": name, "reason": reason}))
    register_chunks(r, run_id, unit_id, {})


def rejected(r: redis.Redis, run_id: str) -> dict[str, dict[str, str]]:
    return {k: json.loads(v) for k, v in _hash(r, key(run_id, "rejected")).items()}


def recover_file(r: redis.Redis, run_id: str, unit_id: str, reason: str) -> None:
    """The upload was unreadable and its last good copy answered instead."""
    r.hset(key(run_id, "recovered"), unit_id, reason)


def recovered(r: redis.Redis, run_id: str) -> dict[str, str]:
    return _hash(r, key(run_id, "recovered"))


def chunk_rows(r: redis.Redis, run_id: str) -> dict[str, int]:
    return {k: int(v) for k, v in _hash(r, key(run_id, "chunks")).items()}


def mark_transformed(r: redis.Redis, run_id: str, chunk_id: str) -> None:
    r.sadd(key(run_id, "transformed"), chunk_id)
    touch(r, run_id)


def is_transformed(r: redis.Redis, run_id: str, chunk_id: str) -> bool:
    return bool(r.sismember(key(run_id, "transformed"), chunk_id))


def mark_done(r: redis.Redis, run_id: str, chunk_id: str, loaded: int, quarantined: int,
              unchanged: int = 0, store: str = "duckdb") -> None:
    """A chunk is committed (in `store`), with its ledger counts: the run's summary is made
    from these, whichever store holds the chunk."""
    with r.pipeline() as p:
        p.sadd(key(run_id, "done"), chunk_id)
        p.hset(key(run_id, "ledger"), chunk_id,
               json.dumps([loaded, quarantined, unchanged, store]))
        p.hincrby(key(run_id), "progress_loaded", loaded)
        p.hincrby(key(run_id), "progress_quarantined", quarantined)
        p.execute()
    touch(r, run_id)


def ledger(r: redis.Redis, run_id: str) -> dict[str, tuple[int, int, int, str]]:
    """chunk id -> (loaded, quarantined, unchanged, store) of every committed chunk."""
    found = {}
    for chunk, value in _hash(r, key(run_id, "ledger")).items():
        loaded, held, unchanged, store = json.loads(value)
        found[chunk] = (int(loaded), int(held), int(unchanged), str(store))
    return found


def is_done(r: redis.Redis, run_id: str, chunk_id: str) -> bool:
    return bool(r.sismember(key(run_id, "done"), chunk_id))


def done_chunks(r: redis.Redis, run_id: str) -> set[str]:
    return _members(r, key(run_id, "done"))


def dead_units(r: redis.Redis, run_id: str) -> set[str]:
    return _members(r, key(run_id, "dead_units"))


def dead_chunks(r: redis.Redis, run_id: str) -> set[str]:
    return _members(r, key(run_id, "dead_chunks"))


def is_complete(r: redis.Redis, run_id: str) -> bool:
    """Every unit split or dead, and every chunk committed or dead."""
    if status(r, run_id) != "running":
        return False
    unit_ids = {_text(u) for u in r.lrange(key(run_id, "units"), 0, -1)}
    if not unit_ids <= _members(r, key(run_id, "split")) | dead_units(r, run_id):
        return False
    settled = done_chunks(r, run_id) | dead_chunks(r, run_id)
    chunk_units = _hash(r, key(run_id, "chunk_unit"))
    dead = dead_units(r, run_id)
    # Chunks of a unit dead-lettered after it was split are settled with it.
    return all(c in settled or chunk_units.get(c) in dead for c in chunk_rows(r, run_id))


def note_stage_time(r: redis.Redis, run_id: str, stage: str, seconds: float) -> None:
    """Time spent in one step of a stage (any outcome): summed per stage for the run."""
    with r.pipeline() as p:
        p.hincrbyfloat(key(run_id, "stage_s"), stage, seconds)
        p.hincrby(key(run_id, "stage_n"), stage, 1)
        _keep(p, run_id, "stage_s", "stage_n")
        p.execute()


def note_error(r: redis.Redis, run_id: str, error_class: str) -> None:
    """One failure of a step, by its class (TransientError, FatalError, MemoryError, ...)."""
    r.hincrby(key(run_id, "errors"), error_class, 1)
    r.expire(key(run_id, "errors"), _KEEP_S)


def metrics(r: redis.Redis, run_id: str) -> dict[str, Any]:
    """What a run's metrics row adds to its summary: seconds per stage, errors by class and
    the source's latency (plan start to first rows extracted)."""
    data = info(r, run_id)
    stage_s = {k: round(float(v), 3) for k, v in _hash(r, key(run_id, "stage_s")).items()}
    if data.get("planning_at") and data.get("started_at"):  # the plan recorded its units
        stage_s["plan"] = round(float(data["started_at"]) - float(data["planning_at"]), 3)
    errors = {k: int(v) for k, v in _hash(r, key(run_id, "errors")).items()}
    began = data.get("planning_at") or data.get("created_at")
    first = data.get("first_row_at")
    steps = sum(int(v) for v in _hash(r, key(run_id, "stage_n")).values())
    failures = sum(errors.values())
    return {"stage_s": stage_s, "errors_by_class": errors,
            # Failed step attempts among all step attempts (a retried step counts each try).
            "error_rate": round(failures / max(steps, failures), 4) if failures else 0.0,
            "source_latency_s": round(float(first) - float(began), 3) if first and began
            else None}


def touch(r: redis.Redis, run_id: str) -> None:
    """The run made progress: note when (the supervisor and waiters read it)."""
    r.hset(key(run_id), "last_progress_at", time.time())


def progress(r: redis.Redis, run_id: str) -> dict[str, Any]:
    data = info(r, run_id)
    return {
        "status": data.get("status", "unknown"),
        "units_total": int(data.get("units_total", 0)),
        "units_split": int(r.scard(key(run_id, "split"))),
        "chunks_total": int(r.hlen(key(run_id, "chunks"))),
        "chunks_done": int(r.scard(key(run_id, "done"))),
        "dead_letters": int(r.hlen(key(run_id, "dead"))),
        "loaded": int(data.get("progress_loaded", 0)),
        "quarantined": int(data.get("progress_quarantined", 0)),
        "last_progress_at": float(data.get("last_progress_at") or data.get("created_at") or 0),
    }


def finish(r: redis.Redis, run_id: str, summary: Summary) -> None:
    r.hset(key(run_id), mapping={"status": summary.status, "finished_at": time.time(),
                                "summary": json.dumps(summary.public())})
    r.srem(ACTIVE_RUNS, run_id)


def fail(r: redis.Redis, run_id: str, reason: str, *, record: bool = True) -> None:
    """Mark a run failed with a reason an operator can act on (never patient data). Its
    metrics row is written by the loader (finalize); `record=False` for a run that never
    started (its source was busy with another run)."""
    if not exists(r, run_id) or status(r, run_id) in ENDED:
        return  # a record Redis lost is not re-created as a stub
    with r.pipeline() as p:
        p.hset(key(run_id), mapping={"status": "failed", "finished_at": time.time(),
                                    "error": reason})
        p.srem(ACTIVE_RUNS, run_id)
        if record:
            p.sadd(UNRECORDED, run_id)
        p.execute()


def unrecorded(r: redis.Redis) -> list[str]:
    return sorted(_members(r, UNRECORDED))


def active_runs(r: redis.Redis) -> list[str]:
    return sorted(_members(r, ACTIVE_RUNS))
