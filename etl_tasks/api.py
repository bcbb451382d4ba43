"""The operator API: start runs and follow them, from the CLI or a Python shell.

    >>> from etl_tasks.api import run_source
    >>> run_source("billing").wait()          # with workers and beat running
    >>> follow_run("3f2a...").wait()          # a run started elsewhere, by its id
    >>> read_data("SELECT count(*) FROM billing_claims").store   # 'duckdb', 'cache' or 'sqlite'
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from etl_tasks.errors import FatalError
from etl_tasks.load import reads, writer
from etl_tasks.load.reads import Answer
from etl_tasks.resources import get_resources
from etl_tasks.runs import dead_letters, state
from etl_tasks.runs.recovery import LOST

log = logging.getLogger(__name__)


class RunStalled(FatalError):
    """A followed run has made no progress for `ETL_STALL_S`; it may still finish later."""


@dataclass(frozen=True)
class RunHandle:
    """A run in flight; `wait()` blocks until it ends and returns its summary."""

    run_id: str
    source: str

    def status(self) -> str:
        return state.status(get_resources().redis, self.run_id) or "unknown"

    def progress(self) -> dict[str, Any]:
        return state.progress(get_resources().redis, self.run_id)

    def summary(self) -> state.Summary | None:
        return summary_of(get_resources().redis, self.run_id)

    def poll(self) -> tuple[state.Summary | None, dict[str, Any] | None]:
        """(summary once ended, progress while running); (None, None) while Redis is
        unreachable. Never raises for a Redis blip: a follower outlives a restart."""
        try:
            return self.summary(), self.progress()
        except (redis.ConnectionError, redis.TimeoutError):
            return None, None

    def wait(self, timeout: float | None = None, poll_s: float = 0.25) -> state.Summary:
        """Block until the run ends. Raises TimeoutError past `timeout` and RunStalled when
        the run made no progress for ETL_STALL_S (or Redis stayed unreachable that long)."""
        stall_s = get_resources().settings.stall_s
        started = time.monotonic()
        last_contact = started
        while True:
            summary, progress = self.poll()
            now = time.monotonic()
            if summary is not None:
                return summary
            if progress is not None:
                last_contact = now
                idle = time.time() - progress["last_progress_at"]
                if idle > stall_s:
                    raise RunStalled(
                        f"run {self.run_id} of {self.source} has made no progress for "
                        f"{idle:.0f}s ({progress['status']}, {progress['chunks_done']} of "
                        f"{progress['chunks_total']} chunks); check that the fleet, the loader "
                        f"and beat are running, then follow it with `etl wait {self.run_id}`")
            elif now - last_contact > stall_s:
                raise RunStalled(f"Redis unreachable for {now - last_contact:.0f}s while "
                                 f"following run {self.run_id}; follow it again with "
                                 f"`etl wait {self.run_id}`")
            if timeout is not None and now - started > timeout:
                raise TimeoutError(f"run {self.run_id} of {self.source} has not ended after "
                                   f"{timeout}s; follow it with `etl wait {self.run_id}`")
            time.sleep(poll_s)


def summary_of(r: redis.Redis, run_id: str) -> state.Summary | None:
    """The summary of an ended run, None while it is in flight. A run Redis has no record of
    has ended: its state was lost (the ledger keeps what it committed)."""
    data = state.info(r, run_id)
    if "source" not in data:
        return state.Summary(source="?", run_id=run_id, status="failed", error=LOST)
    if data.get("status") in ("finished", "partial"):
        return state.Summary(**json.loads(data["summary"]))
    if data.get("status") == "failed":
        created = float(data.get("created_at", time.time()))
        return state.Summary(source=data["source"], run_id=run_id, status="failed",
                             duration_s=round(float(data.get("finished_at", created)) - created,
                                              3), error=data.get("error"))
    return None


def run_source(source: str, *, path: str | None = None, since: datetime | None = None,
               full: bool = False, retry: str | None = None) -> RunHandle:
    """Enqueue a run of `source` on the fleet and return a handle to wait on.

    path: read the files of this folder once, leaving them in place (file sources);
    since: also re-read rows updated since then (Firebird backfill); full: re-read everything
    (rows already stored in the same version are counted as skipped, never doubled);
    retry: a dead letter id: the run does exactly that dead work again.
    """
    from etl_tasks.tasks import CELERY

    res = get_resources()
    res.pipeline.source(source)  # an unknown name fails here, with the known names
    run_id = state.new_run_id()
    try:
        state.create(res.redis, run_id, source, state.RunOptions(
            path=str(Path(path).resolve()) if path else None, since=since, full=full,
            retry=retry))
        CELERY.plan(run_id, source)
    except redis.ConnectionError as exc:
        # The address without credentials; a refused password or a failed TLS handshake
        # names its setting instead.
        raise FatalError(res.redis_conn.explain(exc) or f"cannot reach Redis at "
                         f"{res.redis_conn.where}; start it or set ETL_REDIS_URL") from exc
    return RunHandle(run_id, source)


def follow_run(run_id: str) -> RunHandle:
    """A handle on a run started elsewhere (beat, another shell), by its id."""
    data = state.info(get_resources().redis, run_id)
    if "source" not in data:
        raise FatalError(f"no run {run_id} in Redis (wrong id, older than a month, or Redis "
                         "lost its data); `etl dead-letters` and DuckDB's etl_runs keep history")
    return RunHandle(run_id, data["source"])


def retry_dead_letter(dead_letter_id: str) -> RunHandle:
    """Send one dead letter's work again, as a run of its own."""
    res = get_resources()
    entry = dead_letters.find(res.redis, [s.name for s in res.pipeline.sources],
                              dead_letter_id)
    if entry is None:
        raise FatalError(f"no open dead letter {dead_letter_id}; list them with "
                         "`etl dead-letters`")
    return run_source(entry["source"], retry=dead_letter_id)


def read_data(sql: str) -> Answer:
    """Answer a read-only query: from DuckDB, else a fresh cached answer, else the SQLite
    fallback; `answer.store` and `answer.as_of` say which and how fresh."""
    return reads.read_data(get_resources().settings, sql)


def fallbacks_waiting() -> dict[str, dict[str, int]]:
    """Chunks and rows waiting in each fallback store for the replay into DuckDB."""
    return writer.waiting(get_resources().settings)
