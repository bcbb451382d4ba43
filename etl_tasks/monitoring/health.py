"""Thresholds checked against what runs did and what sources are doing (`[thresholds]` in the
pipeline config): a breaching run raises one alert listing every threshold it broke, with the
worst severity among them; a stale source and a stuck run each raise one alert until the
condition ends, checked on beat's schedule even when nothing runs.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from etl_tasks.config import PipelineConfig, Thresholds
from etl_tasks.monitoring import alerts
from etl_tasks.monitoring.alerts import Severity
from etl_tasks.runs import state

LAST_COMMIT = "etl:sources:last_commit"  # source -> epoch of its last finished/partial run
FIRST_SEEN = "etl:sources:first_seen"  # source -> epoch the health check first saw it


def breaches(summary: dict[str, Any], limits: Thresholds) -> list[dict[str, Any]]:
    """The thresholds a run's summary (with its `metrics`) broke, each with its severity."""
    found: list[dict[str, Any]] = []

    def over(name: str, value: Any, limit: float | None, severity: Severity,
             below: bool = False) -> None:
        if limit is None or value is None:
            return
        if (value < limit) if below else (value > limit):
            found.append({"threshold": name, "limit": limit, "value": value,
                          "severity": severity})

    metrics = summary.get("metrics") or {}
    if summary["status"] == "failed":
        found.append({"threshold": "status", "limit": "finished", "value": "failed",
                      "severity": "critical"})
    over("max_duration_s", summary.get("duration_s"), limits.max_duration_s, "warning")
    over("min_quality_score", summary.get("quality_score"), limits.min_quality_score,
         "warning", below=True)
    over("max_error_rate", metrics.get("error_rate"), limits.max_error_rate, "warning")
    over("max_dead_letters", len(summary.get("dead_letters") or []), limits.max_dead_letters,
         "critical")
    return found


def _describe(b: dict[str, Any]) -> str:
    if b["threshold"] == "status":
        return "the run failed"
    value, limit = b["value"], b["limit"]
    if isinstance(value, float):
        value = round(value, 3)
    return f"{b['threshold']} {value} (limit {limit})"


def check_run(r: redis.Redis, pipeline: PipelineConfig, summary: dict[str, Any]) -> bool:
    """After a run ends: one alert if it broke thresholds, else its source's run alert is
    cleared. True when an alert was raised."""
    source = summary["source"]
    found = breaches(summary, pipeline.thresholds_of(source))
    if not found:
        alerts.clear(r, source, "run")
        return False
    what = "; ".join(_describe(b) for b in found)
    next_step = (f" ({summary['error']})" if summary.get("error") else "") + (
        "; see `etl status` and `etl dead-letters`")
    return alerts.raise_open(
        r, alerts.worst([b["severity"] for b in found]),
        f"run {summary['run_id']} of {source} ended {summary['status']}: {what}{next_step}",
        source=source, check="run", again=True,
        details={"run_id": summary["run_id"], "breaches": found})


def note_commit(r: redis.Redis, source: str, at: float) -> None:
    """A run of `source` committed (finished or partial): the staleness clock restarts."""
    r.hset(LAST_COMMIT, source, at)


def check_sources(r: redis.Redis, pipeline: PipelineConfig, stall_s: float,
                  now: float | None = None) -> dict[str, list[str]]:
    """Staleness of every source and stuck runs; returns the alerts open by check."""
    now = time.time() if now is None else now
    opened: dict[str, list[str]] = {"staleness": [], "stuck": []}
    for src in pipeline.sources:
        limit = pipeline.thresholds_of(src.name).max_staleness_s
        r.hsetnx(FIRST_SEEN, src.name, now)
        last = r.hget(LAST_COMMIT, src.name)
        since = float(last if last is not None else r.hget(FIRST_SEEN, src.name) or now)
        age = now - since
        if limit is None or age <= limit:
            alerts.clear(r, src.name, "staleness")
            continue
        what = ("has not committed a run" if last is not None else
                "has committed no run since monitoring began")
        alerts.raise_open(
            r, "warning", f"source {src.name} {what} for {age:.0f}s (limit {limit:.0f}s): "
            "check that beat runs its schedule and that its runs end (`etl status`)",
            source=src.name, check="staleness",
            details={"staleness_s": round(age, 1), "limit": limit})
        opened["staleness"].append(src.name)
    stuck: dict[str, list[str]] = {}
    for run_id in state.active_runs(r):
        data = state.info(r, run_id)
        last_progress = float(data.get("last_progress_at") or data.get("created_at") or now)
        if "source" in data and now - last_progress > stall_s:
            stuck.setdefault(data["source"], []).append(run_id)
    for src in pipeline.sources:
        if src.name not in stuck:
            alerts.clear(r, src.name, "stuck")
            continue
        ids = stuck[src.name]
        alerts.raise_open(
            r, "critical", f"run {ids[0]} of {src.name} has made no progress for over "
            f"{stall_s:.0f}s although the supervisor re-sends its work: check the workers "
            "(`etl status`) and the worker logs", source=src.name, check="stuck",
            details={"run_ids": ids})
        opened["stuck"].append(src.name)
    return opened
