"""The operator API: start runs and follow them, from the CLI or a Python shell.

    >>> from etl_tasks.api import run_source
    >>> run_source("billing").wait()          # with workers running
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import redis

from etl_tasks import runs
from etl_tasks.errors import FatalError
from etl_tasks.resources import get_resources


@dataclass(frozen=True)
class RunHandle:
    """A run in flight; `wait()` blocks until it finishes and returns its summary."""

    run_id: str
    source: str

    def status(self) -> str:
        return runs.info(get_resources().redis, self.run_id).get("status", "unknown")

    def progress(self) -> dict[str, int]:
        return runs.progress(get_resources().redis, self.run_id)

    def summary(self) -> runs.Summary | None:
        return summary_of(get_resources().redis, self.run_id)

    def wait(self, timeout: float | None = None, poll_s: float = 0.25) -> runs.Summary:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            summary = self.summary()
            if summary is not None:
                return summary
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id} of {self.source} is not finished after "
                                   f"{timeout}s; follow it with `etl status {self.run_id}`")
            time.sleep(poll_s)


def summary_of(r: redis.Redis, run_id: str) -> runs.Summary | None:
    """The summary of a finished or failed run, None while it is in flight."""
    data = runs.info(r, run_id)
    if data.get("status") == "finished":
        return runs.Summary(**json.loads(data["summary"]))
    if data.get("status") == "failed":
        started = float(data.get("created_at", time.time()))
        return runs.Summary(source=data.get("source", "?"), run_id=run_id, status="failed",
                            duration_s=round(float(data.get("finished_at", started)) - started,
                                             3), error=data.get("error"))
    return None


def run_source(source: str, *, path: str | None = None, since: datetime | None = None,
               full: bool = False) -> RunHandle:
    """Enqueue a run of `source` on the fleet and return a handle to wait on.

    path: read the files of this folder once, leaving them in place (file sources);
    since: also re-read rows updated since then (Firebird backfill); full: re-read everything
    (rows already stored in the same version are counted as skipped, never doubled).
    """
    from etl_tasks.tasks import run_source as plan_task

    res = get_resources()
    res.pipeline.source(source)  # an unknown name fails here, with the known names
    run_id = runs.new_run_id()
    try:
        runs.create(res.redis, run_id, source, runs.RunOptions(
            path=str(Path(path).resolve()) if path else None, since=since, full=full))
        plan_task.apply_async((run_id, source))
    except redis.ConnectionError as exc:
        raise FatalError(f"cannot reach Redis at {res.settings.redis_url}; start it or set "
                         "ETL_REDIS_URL") from exc
    return RunHandle(run_id, source)
