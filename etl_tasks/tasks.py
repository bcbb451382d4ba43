"""Thin Celery tasks over `pipeline`: ids in, small JSON out, never rows or patient data.

Retries come from `EtlTask` (transient errors only, exponential backoff with jitter, bounded);
a failure that is not transient marks the run failed with a reason and is not retried.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb
import redis
from celery import Task
from celery.signals import worker_process_init

from etl_tasks import pipeline, runs
from etl_tasks.celery import app
from etl_tasks.errors import DataQualityError, EtlError, TransientError
from etl_tasks.load import duckdb as store
from etl_tasks.resources import get_resources, reset_resources


class EtlTask(Task):  # type: ignore[misc]
    """Base of every task: what is retried, how, and what a final failure does to the run."""

    # A broker/stage store blip is transient by nature, whoever hits it.
    autoretry_for = (TransientError, redis.ConnectionError, redis.TimeoutError)
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 8
    throws = (DataQualityError,)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        run_id = args[0] if args else kwargs.get("run_id")
        if not run_id:
            return
        # EtlError messages are written to be safe to show; anything else shows its type only,
        # because a library's message may quote a patient value.
        reason = str(exc) if isinstance(exc, EtlError) else (
            f"{type(exc).__name__} in {self.name} (see the worker log for the task id "
            f"{task_id})")
        res = get_resources()
        runs.fail(res.redis, run_id, reason)
        source = runs.info(res.redis, run_id).get("source")
        if source:
            runs.release_lock(res.redis, source, run_id)


@contextmanager
def _duckdb() -> Iterator[duckdb.DuckDBPyConnection]:
    """The loader's connection for one task. Closing it between tasks frees the file for
    readers (DuckDB lets one process write, and no other open it meanwhile)."""
    con = store.connect(get_resources().settings.duckdb_path)
    try:
        yield con
    finally:
        con.close()


@worker_process_init.connect
def _fresh_process(**_: Any) -> None:
    reset_resources()  # connections never cross a fork


@app.task(base=EtlTask, name="etl.plan.run_source")
def run_source(run_id: str | None, source: str) -> str:
    """Plan a run of `source` and fan its units out to the fleet; returns the run id."""
    res = get_resources()
    if run_id is None:  # from beat: the run gets its id here
        run_id = runs.new_run_id()
    runs.create(res.redis, run_id, source)
    pipeline.plan_run(res, run_id, source, _send_extract, _send_finalize)
    return run_id


@app.task(base=EtlTask, name="etl.extract.unit")
def extract_unit(run_id: str, unit_id: str) -> int:
    """Read one key range or one file into staged chunks; returns rows read."""
    return pipeline.extract_unit(get_resources(), run_id, unit_id, _send_chunk, _send_finalize)


@app.task(base=EtlTask, name="etl.transform.chunk")
def transform_chunk(run_id: str, chunk_id: str) -> list[int]:
    """Validate one staged chunk; returns [valid rows, quarantined rows]."""
    return list(pipeline.transform_staged(get_resources(), run_id, chunk_id))


@app.task(base=EtlTask, name="etl.load.chunk")
def load_chunk(run_id: str, chunk_id: str) -> dict[str, Any]:
    """Commit one chunk to DuckDB (the single writer); returns its counts."""
    with _duckdb() as con:
        result = pipeline.load_staged(get_resources(), con, run_id, chunk_id)
    return {"loaded": result.loaded, "quarantined": result.quarantined,
            "already_loaded": result.already_loaded}


@app.task(base=EtlTask, name="etl.load.finalize")
def finalize_run(run_id: str) -> bool:
    """Finalize a run whose every chunk is in the ledger; returns whether it did."""
    res = get_resources()
    if not runs.is_complete(res.redis, run_id):
        return False
    with _duckdb() as con:
        pipeline.finalize_run(res, con, run_id)
    return True


def _send_extract(run_id: str, unit_id: str) -> None:
    extract_unit.apply_async((run_id, unit_id))


def _send_chunk(run_id: str, chunk_id: str) -> None:
    (transform_chunk.si(run_id, chunk_id) | load_chunk.si(run_id, chunk_id)).apply_async()


def _send_finalize(run_id: str) -> None:
    finalize_run.apply_async((run_id,))
