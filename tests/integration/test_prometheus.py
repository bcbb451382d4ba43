"""A real Prometheus scrapes the exporter: its figures are `etl status --json`'s, every panel
query of the Grafana dashboard answers, and a scrape answers even when a store does not.

Nothing is skipped: without Debian's `prometheus` (which ships `promtool`) the tests fail
saying what to install (`make test` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from etl_tasks.api import run_source
from etl_tasks.celery import QUEUES, app
from etl_tasks.demo_data import generate_claims
from etl_tasks.local_services import RedisServer, free_port
from etl_tasks.monitoring.exporter import queue_depths
from etl_tasks.resources import get_resources

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "etl.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# workers_by_queue waits its whole second for the workers' replies, so a scrape takes a
# little over 1 s; the scrape's timeout may not exceed the interval: 3 s leaves room.
SCRAPE_S = 3
# Grafana's built-in variables, as Grafana would fill them in at this scrape interval.
BUILTINS = {"__rate_interval": f"{4 * SCRAPE_S}s", "__interval": f"{SCRAPE_S}s",
            "__range": "5m"}


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `sudo apt-get install "
                    "--no-install-recommends prometheus` (make test installs it)")
    return found


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


@contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None,
             ready_url: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped (then killed) when the block ends; waits for `ready_url`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while ready_url:
            try:
                _get(ready_url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{args[0]} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _exporter(env: dict[str, str], log: Path, timeout_s: float) -> tuple[Any, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    args = [sys.executable, "-m", "workers.exporter", "--port", str(port), "--timeout",
            str(timeout_s)]
    return _process(args, log, env, url), url


def _scrape(url: str, within_s: float = 5.0) -> dict[str, float]:
    """`name{labels}` -> value of the /metrics page, which must answer within `within_s`."""
    began = time.monotonic()
    text = _get(url, timeout=within_s + 5).decode()
    assert time.monotonic() - began < within_s
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


class Prometheus:
    """The HTTP API, queried at one moment (`at`): the samples of one scrape."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.at: float | None = None

    def query(self, expr: str) -> list[dict[str, Any]]:
        params = {"query": expr, **({} if self.at is None else {"time": str(self.at)})}
        body = json.loads(_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params)))
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def values(self, expr: str, label: str = "source") -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def scrape_after(self, moment: float, timeout_s: float = 30) -> None:
        """Wait for a scrape that began after `moment` (epoch seconds) and read every store,
        and query at its moment from then on."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            scraped = self.values('timestamp(etl_exporter_up == 1) and on() up{job="etl"} == 1',
                                  "job")
            later = [at for at in scraped.values() if at > moment]
            if later:
                self.at = later[0]
                return
            time.sleep(0.5)
        pytest.fail("Prometheus did not scrape the exporter successfully in time")


@contextmanager
def _prometheus(target: str, tmp_path: Path) -> Iterator[Prometheus]:
    """The deploy config, scraping `target` every SCRAPE_S seconds, on a free loopback port."""
    binary = _binary("prometheus")
    config = PROMETHEUS_CONFIG.read_text()
    config = re.sub(r"(scrape_interval|scrape_timeout|evaluation_interval): \S+",
                    rf"\1: {SCRAPE_S}s", config).replace("exporter:9808", target)
    assert target in config
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _process([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{port}"],
                  tmp_path / "prometheus.log", ready_url=f"{url}/-/ready"):
        yield Prometheus(url)


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, Grafana's variables filled in: the
    dashboard's own variables with their `All` value."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {**BUILTINS, **{v["name"]: v.get("allValue") or ".+"
                             for v in dashboard["templating"]["list"]}}
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
                expr = (expr.replace("${" + name + "}", value).replace(f"[[{name}]]", value)
                        .replace(f"${name}", value))
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_the_deploy_prometheus_config_is_valid():
    """promtool accepts deploy/prometheus/prometheus.yml as docker-compose mounts it."""
    done = subprocess.run([_binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_figures_match_etl_status_and_every_panel_answers(env, tmp_path):
    """After a billing run, Prometheus holds the figures `etl status --json` prints, and each
    of the dashboard's panel queries returns data."""
    [(top,)] = env.firebird("SELECT MAX(CLAIM_ID) FROM BILLING_CLAIMS")
    generate_claims(get_resources().firebird_target, int(top or 0) + 1, 3000)
    summary = run_source("billing").wait(timeout=180)
    assert summary.status == "finished", summary.error
    exporter, metrics_url = _exporter(env.env, tmp_path / "exporter.log", timeout_s=2.5)
    target = metrics_url.split("/")[2]
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    with exporter, _prometheus(target, tmp_path) as prom:
        before = time.time()
        done = subprocess.run([etl, "status", "--json"], env=env.env, capture_output=True,
                              text=True, timeout=60, check=True)
        after = time.time()
        status = json.loads(done.stdout)
        prom.scrape_after(after)

        billing = status["sources"]["billing"]
        assert billing["last_run"]["run_id"] == summary.run_id
        for name, figures in status["sources"].items():
            expected = {
                "etl_source_runs": len(figures["quality_trend"]),
                "etl_source_success_rate": figures["success_rate"],
                "etl_source_average_duration_seconds": figures["average_duration_s"],
                "etl_source_quality_score": (figures["quality_trend"] or [None])[-1],
                "etl_source_dead_letters": figures["dead_letters"],
                "etl_source_last_run_loaded_rows": (figures["last_run"] or {}).get("loaded"),
                "etl_source_last_run_quarantined_rows":
                    (figures["last_run"] or {}).get("quarantined"),
            }
            for metric, value in expected.items():
                got = prom.values(f'{metric}{{source="{name}"}}').get(name)
                assert got == (None if value is None else float(value)), (name, metric)
            for key, value in (figures["last_run"] or {}).items():  # the run's metrics
                if isinstance(value, int | float) and key not in ("loaded", "quarantined"):
                    metric = "etl_source_last_run_" + (f"{key[:-2]}_seconds"
                                                       if key.endswith("_s") else key)
                    assert prom.values(f'{metric}{{source="{name}"}}') == {name: value}
                elif key == "errors_by_class":
                    assert prom.values(f'etl_source_last_run_errors_by_class{{source="{name}"}}',
                                       "error_class") == value
            status_now = prom.values(f'etl_source_last_run_status{{source="{name}"}} == 1',
                                     "status")
            assert list(status_now) == ([figures["last_run"]["status"]]
                                        if figures["last_run"] else [])
            if figures["staleness_s"] is not None:
                # Both measure from the source's last commit: the implied moments agree.
                stale = f'etl_source_staleness_seconds{{source="{name}"}}'
                committed = prom.values(f"timestamp({stale}) - {stale}")[name]
                assert before - 1.5 - figures["staleness_s"] <= committed
                assert committed <= after + 1.5 - figures["staleness_s"]
        assert billing["success_rate"] is not None
        assert {"extract_s", "load_s", "errors_by_class"} <= billing["last_run"].keys()
        assert prom.values("etl_status_runs_from == 1", "store") == {status["runs_from"]: 1}
        assert prom.values("etl_source_last_run_loaded_rows")["billing"] == summary.loaded

        overall = status["overall"]
        assert prom.values("etl_overall_dead_letters", "") == {"": overall["dead_letters"]}
        assert prom.values("etl_overall_success_rate", "") == {"": overall["success_rate"]}
        waiting = overall["waiting_in_fallbacks"]
        assert prom.values("etl_fallback_waiting_rows", "fallback") == {
            k: v["rows"] for k, v in waiting.items()}
        assert prom.values("etl_fallback_waiting_chunks", "fallback") == {
            k: v["chunks"] for k, v in waiting.items()}
        assert prom.values("etl_workers_online", "queue") == {
            q: len(status["workers"].get(q, [])) for q in QUEUES}
        assert all(prom.values("etl_workers_online", "queue").values())
        alerts = prom.values("etl_open_alerts", "severity")
        assert set(alerts) >= {"info", "warning", "critical"}
        assert sum(alerts.values()) == len(status["open_alerts"])
        with app.connection_for_read() as conn:  # kombu's own count of each queue
            depths = {q: conn.default_channel.queue_declare(q).message_count
                      for q in QUEUES}
        assert prom.values("etl_queue_depth", "queue") == depths

        for title, expr in _dashboard_queries():
            assert prom.query(expr), f"panel {title!r}: {expr} returned nothing"


def test_queue_depth_counts_every_priority_sub_list(env):
    """Messages kombu puts in a queue at any priority are counted, as kombu counts them."""
    url = env.env["ETL_REDIS_URL"].rsplit("/", 1)[0] + "/7"  # a database no worker reads
    client = redis.Redis.from_url(url)
    client.flushdb()
    queue = Queue("load", Exchange("load", type="direct"), routing_key="load")
    try:
        with Connection(url) as conn:
            producer = Producer(conn.default_channel)
            for priority in (None, 0, 4, 9):
                producer.publish({"id": 1}, exchange=queue.exchange, routing_key="load",
                                 declare=[queue], priority=priority)
            kombu_count = conn.default_channel.queue_declare("load").message_count
        assert len(client.keys("load*")) > 1  # the priorities really went to sub-lists
        assert queue_depths(client, ["load", "extract"], {}) == {"load": 4, "extract": 0}
        assert kombu_count == 4
    finally:
        client.flushdb()
        client.close()


def test_a_scrape_answers_while_duckdb_is_held_or_redis_hangs(env, tmp_path):
    """With the DuckDB file held by another writer a scrape answers within its timeout with
    the run figures from Redis, and from DuckDB once it is released. With a Redis that stopped
    answering (SIGSTOP) scrapes still answer within the timeout, with etl_exporter_up 0."""
    store = tmp_path / "held.duckdb"
    holder = duckdb.connect(str(store))  # a writer: read-only opens wait for it
    exporter, url = _exporter({**env.env, "ETL_DUCKDB_PATH": str(store)},
                              tmp_path / "exporter-held.log", timeout_s=2.5)
    try:
        with exporter:
            held = _scrape(url)
            assert held["etl_exporter_up"] == 1
            assert held['etl_status_runs_from{store="redis"}'] == 1
            assert 'etl_queue_depth{queue="load"}' in held
            holder.close()
            deadline = time.monotonic() + 30
            while _scrape(url)['etl_status_runs_from{store="duckdb"}'] != 1:
                assert time.monotonic() < deadline, "figures did not come from DuckDB again"
                time.sleep(0.5)
    finally:
        holder.close()
    stalled = RedisServer(tmp_path / "redis", appendonly=False).start()
    assert stalled.process is not None
    exporter, url = _exporter({**env.env, "ETL_REDIS_URL": stalled.url},
                              tmp_path / "exporter-stalled.log", timeout_s=2.5)
    try:
        with exporter:
            stalled.process.send_signal(signal.SIGSTOP)
            for _ in range(2):  # the second finds the first's reads still stuck
                samples = _scrape(url)
                assert samples["etl_exporter_up"] == 0
                assert samples['etl_exporter_part_up{part="queues"}'] == 0
                assert samples['etl_exporter_part_up{part="status"}'] == 0
    finally:
        stalled.process.send_signal(signal.SIGCONT)
        stalled.stop()
