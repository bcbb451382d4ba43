"""The pipeline's health at a glance (`etl status`): run figures over the last N runs per
source from DuckDB's `etl_runs`, dead letters, rows waiting in the fallbacks and the workers
online per queue. Plain functions: the CLI prints what `collect()` returns."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import duckdb

from etl_tasks.config import Settings
from etl_tasks.errors import TransientError
from etl_tasks.load import duckdb as store
from etl_tasks.load import writer
from etl_tasks.monitoring import alerts, health
from etl_tasks.runs import dead_letters, state

# Counted as successes; `partial` runs are not (they do count for staleness).
SUCCESS = "finished"
_STAGES = ("plan", "extract", "transform", "load")
_METRICS = ("error_rate", "source_latency_s", "errors_by_class",
            *(f"{stage}_s" for stage in _STAGES))
# Run, chunk and unit ids (uuid or hex with a digit), then any number: so that errors differing
# only by an id, a key range or a count fall into one pattern.
_HEX_ID = re.compile(r"\b(?=[0-9a-fA-F-]*\d)[0-9a-fA-F]{6,}(?:-[0-9a-fA-F]{2,})*\b")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def normalize_error(text: str) -> str:
    """An error message with its ids and numbers replaced by `N` (whitespace collapsed)."""
    text = _NUMBER.sub("N", _HEX_ID.sub("N", text))
    return " ".join(text.split())


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def summarize(runs: list[dict[str, Any]], last_committed: datetime | None = None,
              now: float | None = None) -> dict[str, Any]:
    """The run figures of a list of `etl_runs` rows (any order); staleness counts from
    `last_committed` (the source's last finished or partial run, however old)."""
    now = time.time() if now is None else now
    ordered = sorted(runs, key=lambda r: (_epoch(r["started_at"]) or _epoch(r["finished_at"])
                                          or 0.0))
    durations = [float(r["duration_s"]) for r in ordered if r["duration_s"] is not None]
    patterns = Counter(normalize_error(str(r["error"])) for r in ordered if r["error"])
    last = ordered[-1] if ordered else None
    return {
        "success_rate": (sum(r["status"] == SUCCESS for r in ordered) / len(ordered)
                         if ordered else None),
        "average_duration_s": sum(durations) / len(durations) if durations else None,
        "quality_trend": [r["quality_score"] for r in ordered],
        "error_patterns": dict(patterns.most_common()),
        "last_run": None if last is None else {
            "run_id": last["run_id"], "status": last["status"],
            "finished_at": _iso(last["finished_at"]), "loaded": last["loaded"],
            "quarantined": last["quarantined"],
            # Run metrics, when the row has them (runs recorded before they existed do not).
            **{k: last[k] for k in _METRICS if last.get(k) is not None}},
        "staleness_s": None if last_committed is None else now - last_committed.timestamp(),
    }


def recent_runs(con: duckdb.DuckDBPyConnection, last: int) -> list[dict[str, Any]]:
    """The last `last` runs of each source, as dicts."""
    if con.execute("SELECT count(*) FROM information_schema.tables "
                   "WHERE table_name = 'etl_runs'").fetchone() == (0,):
        return []
    cur = con.execute(
        "SELECT * FROM etl_runs QUALIFY row_number() OVER ("
        "PARTITION BY source ORDER BY coalesce(started_at, finished_at) DESC) <= ?", [last])
    names = [d[0] for d in cur.description]
    runs = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    for run in runs:
        text = run.get("errors_by_class")
        run["errors_by_class"] = json.loads(text) if text else None
    return runs


def redis_runs(r: Any, sources: list[str], last: int) -> list[dict[str, Any]]:
    """The same rows from the run records in Redis (kept a month): what `etl status` shows
    while DuckDB is held or down. Only ended runs with a summary count."""
    runs = []
    for source in sources:
        for raw_id in r.lrange(f"etl:runs:{source}", 0, -1):
            run_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            data = state.info(r, run_id)
            if data.get("status") not in state.ENDED:
                continue
            summary: dict[str, Any] = json.loads(data["summary"]) if "summary" in data else {
                "run_id": run_id, "source": source, "status": "failed", "loaded": 0,
                "quarantined": 0, "duration_s": None, "quality_score": None,
                "error": data.get("error")}
            metrics: dict[str, Any] = summary.get("metrics") or {}
            stage_s: dict[str, Any] = metrics.get("stage_s") or {}
            runs.append({
                **{k: summary.get(k) for k in ("run_id", "source", "status", "loaded",
                                               "quarantined", "duration_s", "quality_score",
                                               "error")},
                "started_at": _when(data.get("started_at") or data.get("created_at")),
                "finished_at": _when(data.get("finished_at")),
                **{f"{stage}_s": stage_s.get(stage) for stage in _STAGES},
                "source_latency_s": metrics.get("source_latency_s"),
                "error_rate": metrics.get("error_rate"),
                "errors_by_class": metrics.get("errors_by_class")})
            if sum(run["source"] == source for run in runs) >= last:
                break
    return runs


def _when(epoch: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(epoch), UTC) if epoch else None


def last_commits(con: duckdb.DuckDBPyConnection) -> dict[str, datetime]:
    """Each source's last finished or partial run's end."""
    if con.execute("SELECT count(*) FROM information_schema.tables "
                   "WHERE table_name = 'etl_runs'").fetchone() == (0,):
        return {}
    return dict(con.execute(
        "SELECT source, max(finished_at) FROM etl_runs WHERE status IN ('finished', 'partial') "
        "AND finished_at IS NOT NULL GROUP BY source").fetchall())


def stored_open_letters(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    if con.execute("SELECT count(*) FROM information_schema.tables "
                   "WHERE table_name = 'etl_dead_letters'").fetchone() == (0,):
        return []
    return store.dead_letters(con, None, "open")


def workers_by_queue(control: Any, timeout: float = 1.0) -> dict[str, list[str]]:
    """{queue: [worker names]} from the workers that answer within `timeout`; {} for none."""
    try:
        replies = control.inspect(timeout=timeout).active_queues() or {}
    except OSError:  # the broker is unreachable: no worker can be seen
        return {}
    queues: dict[str, set[str]] = {}
    for worker, consumed in replies.items():
        for queue in consumed or []:
            queues.setdefault(str(queue["name"]), set()).add(str(worker))
    return {q: sorted(names) for q, names in sorted(queues.items())}


def collect(settings: Settings, sources: list[str], redis_client: Any, control: Any,
            last: int = 20, now: float | None = None,
            store_wait_s: float = 3.0) -> dict[str, Any]:
    """The whole status: `overall`, `sources`, `workers`, `open_alerts`."""
    runs: list[dict[str, Any]] = []
    letters: dict[str, str] = {}  # dead letter id -> source
    commits: dict[str, datetime] = {}
    runs_from = "duckdb"
    try:
        if settings.duckdb_path.exists():
            with store.read_only(settings.duckdb_path, wait_s=store_wait_s) as con:
                runs = recent_runs(con, last)
                commits = last_commits(con)
                letters = {str(e["dead_letter_id"]): str(e["source"])
                           for e in stored_open_letters(con)}
    except TransientError:  # held by its writer (or another process) past the wait
        runs_from = "redis"
        runs = redis_runs(redis_client, sources, last)
        commits = {source: datetime.fromtimestamp(float(at), UTC) for source, at in (
            (k.decode() if isinstance(k, bytes) else k, v)
            for k, v in redis_client.hgetall(health.LAST_COMMIT).items())}
    names = list(dict.fromkeys([*sources, *sorted({str(r["source"]) for r in runs})]))
    for name in names:  # letters of runs still in flight are in Redis only
        for entry in dead_letters.open_letters(redis_client, name):
            letters.setdefault(str(entry["dead_letter_id"]), name)
    waiting = writer.waiting(settings)
    per_source: dict[str, dict[str, Any]] = {}
    for name in names:
        figures = summarize([r for r in runs if r["source"] == name], commits.get(name),
                            now)
        figures["dead_letters"] = sum(s == name for s in letters.values())
        # The fallbacks are not kept per source: each source shows the store-wide figure.
        figures["waiting_in_fallbacks"] = waiting
        per_source[name] = figures
    overall = summarize(runs, None, now)
    stale = [f["staleness_s"] for f in per_source.values() if f["staleness_s"] is not None]
    overall["staleness_s"] = max(stale) if stale else None  # the stalest source
    overall["dead_letters"] = len(letters)
    overall["waiting_in_fallbacks"] = waiting
    return {
        "overall": overall,
        "sources": per_source,
        "workers": workers_by_queue(control),
        "open_alerts": alerts.open_alerts(redis_client),
        # Where the run figures come from: DuckDB, or Redis's run records while it is held.
        "runs_from": runs_from,
    }
