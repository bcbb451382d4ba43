"""Prometheus figures computed at scrape time: what `etl status --json` prints (the same
`status.collect`, so the two agree by construction) and the depth of each Celery queue.

Labels are source, queue, fallback, severity, run status and error class names only, never a
value read from the data. A scrape never hangs: the reads run in worker threads and a read not
done within `timeout_s` (Redis gone or not answering) is reported as `etl_exporter_up 0` with
the parts that did answer. A DuckDB file held by its writer is waited for a part of the
timeout only: `collect` then reads the run figures from Redis's run records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, get_args

from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from etl_tasks import status
from etl_tasks.celery import QUEUES, app
from etl_tasks.errors import EtlError
from etl_tasks.monitoring.alerts import Severity
from etl_tasks.resources import get_resources
from etl_tasks.runs.state import RunStatus

log = logging.getLogger("etl.exporter")

# Figures whose name alone would not say what they are; any other number `collect` returns
# (figures added later) is exported as etl_source_<key> / etl_overall_<key>, `_s` -> `_seconds`.
HELP = {
    "runs": "Runs looked at (the last N per source, as etl status --last).",
    "success_rate": "Finished runs / runs looked at (partial is not a success).",
    "average_duration_s": "Average run duration over the runs looked at.",
    "quality_score": "Data quality score of the last run.",
    "staleness_s": "Seconds since the last finished or partial run (overall: stalest source).",
    "dead_letters": "Open dead letters.",
    "last_run_loaded": "Rows the last run loaded.",
    "last_run_quarantined": "Rows the last run quarantined.",
}
RENAMED = {"last_run_loaded": "last_run_loaded_rows",
           "last_run_quarantined": "last_run_quarantined_rows"}
_METRIC_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
# An error class is a Python class name; anything else is counted as `other` so that no text
# (which could quote a value) ever becomes a label.
_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$")


def _number(value: Any) -> float | None:
    if isinstance(value, int | float):  # bool included: exported as 0/1
        return float(value)
    return None


def _metric_name(prefix: str, key: str) -> str:
    key = RENAMED.get(key, key)
    return f"{prefix}_{key[:-2]}_seconds" if key.endswith("_s") else f"{prefix}_{key}"


def queue_keys(queue: str, transport_options: dict[str, Any]) -> list[str]:
    """The Redis lists kombu's Redis transport keeps a queue in: the queue's name for priority
    0 and `<name><sep><step>` for each other priority step (kombu `Channel._q_for_pri`)."""
    steps = transport_options.get("priority_steps", PRIORITY_STEPS)
    sep = transport_options.get("sep", Channel.sep)
    prefix = transport_options.get("global_keyprefix", "")
    return [f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}" for step in steps]


def queue_depths(redis_client: Any, queues: Iterable[str],
                 transport_options: dict[str, Any]) -> dict[str, int]:
    """Messages waiting in each queue (every priority sub-list), one round trip."""
    queues = list(queues)
    keys = [queue_keys(q, transport_options) for q in queues]
    with redis_client.pipeline(transaction=False) as pipe:
        for names in keys:
            for name in names:
                pipe.llen(name)
        lengths = iter(pipe.execute())
    return {q: sum(int(next(lengths)) for _ in names) for q, names in zip(queues, keys,
                                                                            strict=True)}


class Figures:
    """Gauge families by name, made on first use, so a figure no source has is not exported."""

    def __init__(self) -> None:
        self.families: dict[str, GaugeMetricFamily] = {}

    def add(self, name: str, documentation: str, value: float, **labels: str) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = GaugeMetricFamily(name, documentation,
                                                                labels=list(labels))
        family.add_metric(list(labels.values()), value)

    def numbers(self, prefix: str, figures: dict[str, Any], **labels: str) -> None:
        """Every number in `figures` (and in its `last_run`), as `<prefix>_<key>`."""
        last = figures.get("last_run") or {}
        flat = {**figures, **{f"last_run_{k}": v for k, v in last.items()}}
        trend = figures.get("quality_trend")
        if isinstance(trend, list):
            flat["runs"] = len(trend)
            flat["quality_score"] = trend[-1] if trend else None
        for key, value in flat.items():
            number = _number(value)
            if number is not None and _METRIC_KEY.match(key):
                self.add(_metric_name(prefix, key),
                         HELP.get(key, f"etl status figure {key}."), number, **labels)
        for key, counts in (("errors_by_class", figures.get("errors_by_class")),
                            ("last_run_errors_by_class", last.get("errors_by_class"))):
            if isinstance(counts, str):  # etl_runs keeps it as JSON text
                with contextlib.suppress(ValueError):
                    counts = json.loads(counts)
            if isinstance(counts, dict):
                self.errors(f"{prefix}_{key}", counts, **labels)

    def errors(self, name: str, counts: dict[str, Any], **labels: str) -> None:
        merged: dict[str, float] = {}
        for cls, count in counts.items():
            number = _number(count)
            if number is not None:
                label = cls if _CLASS_NAME.match(str(cls)) else "other"
                merged[label] = merged.get(label, 0.0) + number
        for cls, number in sorted(merged.items()):
            self.add(name, "Errors by exception class.", number, **labels, error_class=cls)


def status_figures(figures: Figures, collected: dict[str, Any]) -> None:
    """What `status.collect` returned, as gauges."""
    for source, per_source in collected["sources"].items():
        figures.numbers("etl_source", per_source, source=source)
        current = (per_source.get("last_run") or {}).get("status")
        statuses = list(get_args(RunStatus))
        if current is not None and current not in statuses:
            current = "other"
            statuses.append(current)
        for name in statuses:
            figures.add("etl_source_last_run_status", "1 for the last run's status, else 0.",
                        float(name == current), source=source, status=name)
    for store in dict.fromkeys(["duckdb", "redis", str(collected.get("runs_from", "duckdb"))]):
        figures.add("etl_status_runs_from", "1 for the store the run figures were read from "
                    "(redis: DuckDB was held, figures from the run records).",
                    float(store == collected.get("runs_from", "duckdb")), store=store)
    overall = collected["overall"]
    figures.numbers("etl_overall", overall)
    for fallback, counts in (overall.get("waiting_in_fallbacks") or {}).items():
        for what in ("chunks", "rows"):
            figures.add(f"etl_fallback_waiting_{what}",
                        f"{what.capitalize()} waiting in a fallback store for the replay.",
                        float(counts[what]), fallback=fallback)
    workers = collected.get("workers") or {}
    for queue in dict.fromkeys([*QUEUES, *workers]):
        figures.add("etl_workers_online", "Workers consuming the queue (answering within 1 s).",
                    float(len(workers.get(queue, []))), queue=queue)
    alerts: dict[str, int] = dict.fromkeys(get_args(Severity), 0)
    for entry in collected.get("open_alerts") or []:
        severity = str(entry.get("severity"))
        severity = severity if severity in alerts else "other"
        alerts[severity] = alerts.get(severity, 0) + 1
    for severity, count in alerts.items():
        figures.add("etl_open_alerts", "Open alerts by severity.", float(count),
                    severity=severity)


class EtlCollector(Collector):
    """Reads `status_reader()` and `depth_reader()` at each scrape, each bounded by
    `timeout_s`. One read of each kind is in flight at a time: a scrape that finds one still
    running (a slow DuckDB) waits for it instead of starting another."""

    def __init__(self, status_reader: Callable[[], dict[str, Any]],
                 depth_reader: Callable[[], dict[str, int]], timeout_s: float = 5.0) -> None:
        self.readers = {"status": status_reader, "queues": depth_reader}
        self.timeout_s = timeout_s
        self._pending: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()

    def _start(self, part: str) -> Future[Any]:
        with self._lock:
            future = self._pending.get(part)
            if future is None or future.done():
                future = self._pending[part] = Future()
                # A daemon thread, not a pool: a read stuck on a held DuckDB file must not
                # keep the process from exiting when it is told to stop.
                threading.Thread(target=self._run, args=(self.readers[part], future),
                                 name=f"etl-exporter-{part}", daemon=True).start()
            return future

    @staticmethod
    def _run(reader: Callable[[], Any], future: Future[Any]) -> None:
        try:
            future.set_result(reader())
        except Exception as exc:  # noqa: BLE001 - handed to the scrape that waits for it
            future.set_exception(exc)

    def _read(self, part: str, future: Future[Any], deadline: float) -> Any:
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("exporter: %s not read within %.1fs", part, self.timeout_s)
        except EtlError as exc:  # our messages never quote a value
            log.warning("exporter: %s not read: %s", part, exc)
        except Exception as exc:  # noqa: BLE001 - any failure is a 0 gauge, never a failed scrape
            log.warning("exporter: %s not read: %s", part, type(exc).__name__)
        return None

    def collect(self) -> Iterator[Metric]:
        began = time.monotonic()
        deadline = began + self.timeout_s
        futures = {part: self._start(part) for part in self.readers}
        results = {part: self._read(part, future, deadline) for part, future in futures.items()}
        figures = Figures()
        if results["status"] is not None:
            try:
                status_figures(figures, results["status"])
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                # A shape this exporter does not know yet: say so, never fail the scrape.
                log.warning("exporter: status not understood: %s", type(exc).__name__)
                figures = Figures()
                results["status"] = None
        if results["queues"] is not None:
            for queue, depth in results["queues"].items():
                figures.add("etl_queue_depth", "Messages waiting in the Celery queue.",
                            float(depth), queue=queue)
        for part, result in results.items():
            figures.add("etl_exporter_part_up", "1 if this part was read at this scrape.",
                        float(result is not None), part=part)
        figures.add("etl_exporter_up", "1 if every part was read at this scrape.",
                    float(all(r is not None for r in results.values())))
        figures.add("etl_exporter_scrape_duration_seconds", "Time this scrape took.",
                    time.monotonic() - began)
        yield from figures.families.values()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # figures appear with the data: nothing to check at registration


def collector(last: int = 20, timeout_s: float = 5.0) -> EtlCollector:
    """The collector over this process's settings: the stores `etl status` reads, a Redis
    client whose socket calls time out, and the Celery app's control."""
    res = get_resources()
    sources = [s.name for s in res.pipeline.sources]
    # Not res.redis: its calls wait for ever on a Redis that stopped answering.
    client = res.redis_conn.client(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    options = dict(app.conf.broker_transport_options or {})
    # DuckDB held past this wait: the run figures come from Redis's run records, leaving the
    # rest of the timeout for them and for the workers' 1 s to answer.
    store_wait_s = max(0.2, timeout_s - 2.0)
    return EtlCollector(
        lambda: status.collect(res.settings, sources, client, app.control, last=last,
                               store_wait_s=store_wait_s),
        lambda: queue_depths(client, QUEUES, options), timeout_s)
