"""Thin Celery tasks over the run steps: ids in, small JSON out, never rows or patient data.

`EtlTask` owns what happens around a step: transient errors are retried by Celery with
backoff and do not count as attempts; any other failure, or a start that never ended because
the process died, counts as an attempt (kept in Redis, outside the message); past the limit
the step becomes a dead letter and the rest of the run goes on. A key range that runs out of
memory (or kills its worker past the limit) is split in halves first (`runs/split.py`).
It also binds the log fields of the work (run, source, stage, unit or chunk) and hands Celery
only sanitized exceptions (`errors.sanitized`), since Celery logs, stores and broadcasts them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import Any

import duckdb
import pyarrow as pa
import redis
from celery import Task
from celery.exceptions import Retry
from celery.signals import celeryd_init, task_postrun, worker_process_init
from structlog.contextvars import bind_contextvars

from etl_tasks import checkpoints, pipeline, single_writer
from etl_tasks.celery import app
from etl_tasks.errors import DataQualityError, FencedOut, TransientError, safe_reason, sanitized
from etl_tasks.load import duckdb as store
from etl_tasks.load import quarantine, replay
from etl_tasks.load.fence import WriterFence
from etl_tasks.load.kept import KeptConnection
from etl_tasks.load.writer import StoreChain
from etl_tasks.monitoring import alerts, health, logs, webhook
from etl_tasks.monitoring.sentry import init_sentry
from etl_tasks.resources import Resources, get_resources, reset_resources
from etl_tasks.runs import dead_letters, items, lease, recovery, split, state, supervisor
from etl_tasks.runs.finalize import finalize_run, record_failed
from etl_tasks.runs.plan import middle_token, plan_run, replay_spec

log = logging.getLogger(__name__)
REBUILD_PENDING = "etl:rebuild:pending"
HAND_OVER_S = 1.0  # a fenced-out loader's message is sent back for the writer after this


class EtlTask(Task):  # type: ignore[misc]
    """Base of every task: what is retried, how, and when work becomes a dead letter."""

    # A broker/stage store blip is transient by nature, whoever hits it.
    autoretry_for = (TransientError, redis.ConnectionError, redis.TimeoutError)
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 8
    throws = (DataQualityError,)
    stage: items.Stage | None = None  # the run step this task performs, if any
    log_stage: str | None = None  # what the log lines of a task that is no step call it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        logs.bind(task=self.name, task_id=self.request.id,
                  **logs.step_fields(self.stage or self.log_stage, args))
        try:
            return self._call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below, sanitized
            failure = exc
        # Raised out here, so Python chains nothing to it: Celery logs this exception with its
        # traceback, stores both in the result backend and sends them to Flower.
        raise sanitized(failure, self.name)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self.stage is None:
            try:
                return super().__call__(*args, **kwargs)
            except FencedOut as exc:
                # Back to the queue for the writer; Celery's retry keeps a chain's next step.
                raise self.retry(exc=exc, countdown=HAND_OVER_S) from None
        run_id, item = args
        res = get_resources()
        r, stage = res.redis, self.stage
        if _settled(r, run_id, stage, item):
            return None
        count = items.begin(r, run_id, stage, item)
        limit = _limit(res, run_id, stage, item)
        if count > limit:  # the earlier starts never ended: they killed their worker
            state.note_error(r, run_id, "WorkerLost")
            reason = items.last_failure(r, run_id, stage, item) or (
                f"killed its worker {count - 1} times (out of memory, a crash in a native "
                "library, or the hard time limit)")
            if not _split(res, run_id, stage, item, reason):  # smaller work may fit
                _dead_letter(res, run_id, stage, item, reason, count - 1)
            return None
        began = time.monotonic()
        try:
            result = super().__call__(*args, **kwargs)
        except Retry as exc:
            _note_time(res, run_id, stage, began)
            state.note_error(r, run_id, type(exc.exc or exc).__name__)
            items.forgive(r, run_id, stage, item, _eta(exc.when))
            raise
        except FencedOut as exc:
            # This loader is not the writer and wrote nothing: no attempt of the work.
            items.forgive(r, run_id, stage, item, time.time() + HAND_OVER_S)
            raise self.retry(exc=exc, countdown=HAND_OVER_S) from None
        except Exception as exc:  # every failure is counted, then handled
            _note_time(res, run_id, stage, began)
            state.note_error(r, run_id, type(exc).__name__)
            reason = safe_reason(exc, self.name)
            if isinstance(exc, MemoryError) and _split(res, run_id, stage, item, reason):
                return None
            # The traceback shows where it was raised; the log formatter withholds any
            # message but our own (monitoring/logs.py).
            log.warning("%s %s of run %s failed (attempt %d of %d): %s", stage, item, run_id,
                        count, limit, reason, exc_info=exc)
            items.note_failure(r, run_id, stage, item, reason)
            if count >= limit:
                _dead_letter(res, run_id, stage, item, reason, count)
                return None
            countdown = min(2 ** count, 60)
            items.retrying(r, run_id, stage, item, time.time() + countdown)
            self.apply_async(args, countdown=countdown)
            return None
        _note_time(res, run_id, stage, began)
        items.settle(r, run_id, stage, item)
        return result


def _note_time(res: Resources, run_id: str, stage: items.Stage, began: float) -> None:
    if res.settings.resilience:  # run metrics are off with ETL_RESILIENCE=off (benchmarks)
        state.note_stage_time(res.redis, run_id, stage, time.monotonic() - began)


class PlanTask(EtlTask):
    """The plan's failure is the run's: it is marked failed and its lease released."""

    log_stage = "plan"

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        run_id = (args[0] if args else None) or run_id_of(task_id)
        res = get_resources()
        source = state.info(res.redis, run_id).get("source")
        state.note_error(res.redis, run_id, type(exc).__name__)
        state.fail(res.redis, run_id, safe_reason(exc, self.name))
        if source:
            lease.release(res.redis, source, run_id)
        CELERY.finalize(run_id)  # the loader records the failed run and alerts


def run_id_of(task_id: str) -> str:
    """A beat-started run's id, derived from its plan task's id: a redelivered or retried
    plan keeps the same run (and so its own lease)."""
    try:
        return uuid.UUID(task_id).hex
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_URL, task_id).hex


def _settled(r: redis.Redis, run_id: str, stage: str, item: str) -> bool:
    """A message for work that no longer needs doing (lost run, ended run, dead work)."""
    status = state.status(r, run_id)
    if status is None:
        log.warning("run %s is unknown (its state was lost); %s of %s dropped", run_id,
                    stage, item)
        return True
    if split.is_replaced(r, run_id, item):
        return True  # split into parts (a range's chunk has the unit's id): they do the work
    if stage == "extract":
        return item in state.dead_units(r, run_id) or status in state.ENDED
    return item in state.dead_chunks(r, run_id) or (stage != "load" and status in state.ENDED)


def _limit(res: Resources, run_id: str, stage: str, item: str) -> int:
    r = res.redis
    unit_id = item if stage == "extract" else (state.unit_of(r, run_id, item) or item)
    try:
        return state.unit(r, run_id, unit_id).max_attempts or res.settings.max_attempts
    except KeyError:
        return res.settings.max_attempts


def _split(res: Resources, run_id: str, stage: items.Stage, item: str, reason: str) -> bool:
    """Out of memory, or killed again and again: a key range is split in halves and tried
    again; False when it cannot be (a file, a range at the floor, the load stage)."""
    r = res.redis
    unit_id = item if stage == "extract" else state.unit_of(r, run_id, item)
    if stage == "load" or unit_id is None:
        return False
    floor = res.settings.min_split_keys
    parts = split.split_unit(r, run_id, unit_id, floor, stage, reason,
                             lambda unit: middle_token(res, run_id, unit, floor))
    if parts is None:
        return False
    log.warning("run %s: %s of %s ran out of memory or killed its worker (%s); split into %s",
                run_id, stage, unit_id, reason, " and ".join(p.unit_id for p in parts))
    state.touch(r, run_id)
    pipeline.admit_next(res, run_id, CELERY)
    return True


def _dead_letter(res: Resources, run_id: str, stage: items.Stage, item: str, reason: str,
                 attempts: int) -> None:
    r = res.redis
    source = state.info(r, run_id)["source"]
    unit_id = item if stage == "extract" else (state.unit_of(r, run_id, item) or item)
    entry = dead_letters.record(r, run_id, source, stage, item, state.unit(r, run_id, unit_id),
                                reason, attempts)
    log.error("run %s: %s of %s dead-lettered after %d attempts (%s): %s", run_id, stage, item,
              attempts, entry["dead_letter_id"], reason)
    state.touch(r, run_id)
    CELERY.finalize(run_id)
    pipeline.admit_next(res, run_id, CELERY)  # the dead work's slot in the window is free


def _eta(when: Any) -> float:
    if isinstance(when, datetime):
        return when.timestamp()
    return time.time() + (float(when) if isinstance(when, int | float) else 0.0)


_KEPT: KeptConnection | None = None


def _kept() -> KeptConnection:
    """This loader process's DuckDB connection, kept between its tasks (load/kept.py)."""
    global _KEPT
    settings = get_resources().settings
    if _KEPT is None or _KEPT.path != settings.duckdb_path:
        _KEPT = KeptConnection(settings.duckdb_path,
                               partial(store.connect, memory_mb=settings.loader_memory_mb))
    return _KEPT


@contextmanager
def _duckdb() -> Iterator[tuple[duckdb.DuckDBPyConnection, WriterFence]]:
    """The loader's DuckDB connection for one task, with its writer fence. It is closed
    when the loader idles (and regularly while it is busy), so readers get the file: DuckDB
    lets one process write, and no other open it meanwhile."""
    fence = single_writer.fence()  # refused before opening the file unless this loader writes
    kept = _kept()
    con = kept.acquire()
    failed = True
    try:
        yield con, fence
        failed = False
    finally:
        kept.release(failed=failed, linger=False)


def _stores(linger: bool = False) -> StoreChain:
    """The loader's stores for one task: DuckDB, else SQLite, else the spool; every write
    sealed with its writer fence (refused at once unless this loader holds the lease).
    `linger`: DuckDB stays open for the next task (a chunk's load: more may follow)."""
    res = get_resources()
    return StoreChain(res.settings, res.redis, single_writer.fence(), _kept(), linger)


@worker_process_init.connect
def _fresh_process(**_: Any) -> None:
    global _KEPT
    reset_resources()  # connections never cross a fork
    _KEPT = None
    # Arrow's default allocator (mimalloc) keeps the pages of freed chunks: a worker's peak
    # grew with every chunk's buffers. The system allocator gives them back (measured in
    # benchmarks/README.md: RSS peak and speed).
    pa.set_memory_pool(pa.system_memory_pool())


def _libc() -> Any:
    name = ctypes.util.find_library("c") if sys.platform == "linux" else None
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


@task_postrun.connect
def _give_memory_back(**_: Any) -> None:
    # A chunk's buffers, once freed, stayed in glibc's heap between Python's objects: a
    # worker's footprint crept up chunk after chunk (297 MB at 1,000,000 claims, 313 MB at
    # 5,000,000). Trimming after each task keeps it flat (benchmarks/README.md).
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@celeryd_init.connect
def _sentry(**_: Any) -> None:
    # In the worker's main process before it forks its pool: the Celery integration patches
    # the task tracers there (Sentry's documented place); the children inherit it.
    init_sentry(get_resources().settings)


@app.task(base=PlanTask, bind=True, name="etl.plan.run_source")
def plan_source(self: Task, run_id: str | None, source: str) -> str:
    """Plan a run of `source` and fan its units out to the fleet; returns the run id."""
    res = get_resources()
    if run_id is None:  # from beat: the run's id comes from this task's id
        run_id = run_id_of(self.request.id)
        bind_contextvars(run_id=run_id)
        state.create(res.redis, run_id, source, origin="beat")
    if not checkpoints.intact(res.redis):
        # Redis lost its data: the loader rebuilds the checkpoints first, then plans again.
        # One rebuild at a time: other plans wait for the supervisor to send them again.
        if res.redis.set(REBUILD_PENDING, run_id, nx=True, ex=int(res.settings.overdue_s * 5)):
            log.warning("checkpoints missing in Redis; rebuilding them from the ledger first")
            (rebuild_state.si() | plan_source.si(run_id, source)).apply_async()
            return run_id
        # Another plan sent the rebuild: retry shortly (backoff), planning once it is done.
        raise TransientError("the loader is rebuilding the checkpoints from the ledger; "
                             "planning waits for it", source=source)
    plan_run(res, run_id, source, CELERY.extract, CELERY.finalize)
    return run_id


@app.task(base=EtlTask, name="etl.extract.unit", stage="extract")
def extract_task(run_id: str, unit_id: str) -> int:
    """Read one key range or one file into staged chunks; returns rows read."""
    return pipeline.extract_unit(get_resources(), run_id, unit_id, CELERY)


@app.task(base=EtlTask, name="etl.transform.chunk", stage="transform")
def transform_task(run_id: str, chunk_id: str) -> int:
    """Validate one staged chunk into valid and quarantined rows; returns rows."""
    return pipeline.transform_staged(get_resources(), run_id, chunk_id, CELERY)


@app.task(base=EtlTask, name="etl.load.chunk", stage="load")
def load_task(run_id: str, chunk_id: str) -> dict[str, Any] | None:
    """Commit one chunk to DuckDB (the single writer); returns its counts."""
    with _stores(linger=True) as chain:
        result = pipeline.load_staged(get_resources(), chain, run_id, chunk_id, CELERY)
    if result is None:
        return None
    return {"loaded": result.loaded, "quarantined": result.quarantined,
            "already_loaded": result.already_loaded}


@app.task(base=EtlTask, name="etl.load.finalize", log_stage="finalize")
def finalize_task(run_id: str) -> str | None:
    """Finalize a run whose every chunk is settled; returns its status, None if not yet."""
    res = get_resources()
    if state.status(res.redis, run_id) == "failed":  # its plan failed: record, alert
        with _stores() as chain:
            failed = record_failed(res, chain, run_id)
        return failed.status if failed else None
    if not state.is_complete(res.redis, run_id):
        return None
    with _stores() as chain:
        summary = finalize_run(res, chain, run_id)
    return summary.status if summary else None


@app.task(base=EtlTask, name="etl.load.rebuild_state")
def rebuild_state() -> dict[str, int]:
    """Rebuild checkpoints from the ledger after Redis lost its data; returns key marks."""
    with _duckdb() as (con, fence):
        marks = recovery.rebuild_state(get_resources(), con, fence)
    get_resources().redis.delete(REBUILD_PENDING)
    return marks


@app.task(base=EtlTask, name="etl.load.replay")
def replay_task() -> dict[str, Any]:
    """Drain the SQLite and spool fallbacks into DuckDB when it is healthy; what it moved."""
    with _stores() as chain:
        done = replay.replay(chain)
    return {"chunks": done.chunks, "rows": done.rows, "records": done.records,
            "skipped": done.skipped}


@app.task(base=EtlTask, name="etl.load.purge_quarantine_raw")
def purge_quarantine_raw_task(older_than_days: float | None = None) -> int:
    """Drop raw values of quarantined rows past their retention; returns rows purged."""
    days = get_resources().settings.quarantine_raw_days if older_than_days is None else (
        older_than_days)
    with _duckdb() as (con, fence), store.transaction(con, fence):
        return store.purge_quarantine_raw(con, days)


@app.task(base=EtlTask, name="etl.load.replay_quarantine")
def replay_quarantine_task(source: str | None = None) -> dict[str, dict[str, Any]]:
    """Validate the quarantined rows of `source` (None: every source) again by the current
    rules and load those that pass; counts and an `error` (None: replayed) per source, a
    source that fails not stopping the others. DuckDB only: while it is unavailable the task
    is retried with backoff, never written to a fallback store."""
    res = get_resources()
    chosen = [res.pipeline.source(source)] if source else res.pipeline.sources
    with _duckdb() as (con, fence):
        return quarantine.replay_sources(con, chosen, lambda src: replay_spec(res, src), fence)


@app.task(base=EtlTask, name="etl.control.notify", max_retries=10)
def notify_task(payload: dict[str, Any]) -> int | None:
    """POST one alert (ids, counts, durations: no patient data) to the webhook; its status."""
    url = get_resources().settings.alert_webhook_url
    return webhook.post(url.get_secret_value(), payload) if url else None


def _notify(payload: dict[str, Any]) -> None:
    if get_resources().settings.alert_webhook_url:
        notify_task.apply_async((payload,), retry=False)  # never wait on a broker for it


alerts.set_notifier(_notify)


@app.task(base=EtlTask, name="etl.control.check_health")
def check_health_task() -> dict[str, list[str]]:
    """Staleness of every source and stuck runs, on beat's schedule; the sources alerted."""
    res = get_resources()
    return health.check_sources(res.redis, res.pipeline, res.settings.stall_s)


@app.task(base=EtlTask, name="etl.control.supervise")
def supervise_task() -> dict[str, Any]:
    """Send again what is overdue in every active run; returns what it did (ids only)."""
    report = supervisor.supervise(get_resources(), CELERY)
    return {"runs": report.runs, "resent": report.resent, "finalized": report.finalized}


class CeleryDispatch(supervisor.Sender):
    """Sends the next step as a task message, noting it for the supervisor first."""

    def extract(self, run_id: str, unit_id: str) -> None:
        self.step("extract", run_id, unit_id)

    def transform(self, run_id: str, chunk_id: str) -> None:
        self.step("transform", run_id, chunk_id)

    def load(self, run_id: str, chunk_id: str) -> None:
        self.step("load", run_id, chunk_id)

    def step(self, stage: str, run_id: str, item: str) -> None:
        items.sent(get_resources().redis, run_id, stage, item)  # type: ignore[arg-type]
        STEP_TASKS[stage].apply_async((run_id, item))

    def finalize(self, run_id: str) -> None:
        finalize_task.apply_async((run_id,))

    def plan(self, run_id: str, source: str) -> None:
        plan_source.apply_async((run_id, source))


STEP_TASKS = {"extract": extract_task, "transform": transform_task, "load": load_task}
CELERY = CeleryDispatch()
