"""The ways people use it: beat, a Python shell, several fleet hosts, the CLI and Flower."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from etl_tasks.api import run_source
from etl_tasks.celery import BEAT_KEY_PREFIX, app
from etl_tasks.demo_data import generate_claims
from etl_tasks.local_services import free_port
from etl_tasks.resources import get_resources
from etl_tasks.runs import state as runs
from tests.integration.conftest import PIPELINE
from tests.integration.fault_stack import wait_until

pytestmark = pytest.mark.integration


def _claims_max(stack):
    [(value,)] = stack.firebird("SELECT MAX(CLAIM_ID) FROM BILLING_CLAIMS")
    return int(value or 0)


def test_beat_runs_the_schedule_from_the_pipeline_config(env, tmp_path):
    """`celery -A etl_tasks beat` with a 2-second schedule really enqueues runs that finish;
    the session's beat, started again with its own config, removes that schedule."""
    config = tmp_path / "pipeline.toml"
    config.write_text(PIPELINE.format(billing_schedule=2))
    r = get_resources().redis
    before = set(r.lrange("etl:runs:billing", 0, -1))
    # The schedule lives in Redis and one beat leads: the session's beat hands over.
    env.workers["beat"].stop()
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "etl_tasks", "beat", "--loglevel", "INFO"],
        env={**env.env, "ETL_PIPELINE_CONFIG": str(config)}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        finished: list[bytes] = []
        while time.monotonic() < deadline and len(finished) < 2:
            new = set(r.lrange("etl:runs:billing", 0, -1)) - before
            finished = [run for run in new
                        if runs.info(r, run.decode()).get("status") == "finished"]
            time.sleep(0.5)
    finally:
        beat.terminate()
        beat.wait(timeout=30)
        env.start_worker("beat")  # the session's config again: billing manual
    assert len(finished) >= 2, "beat did not run billing twice within a minute"
    wait_until(lambda: not r.exists(f"{BEAT_KEY_PREFIX}run-billing"), 30,
               "the session's beat to remove billing's 2-second schedule")


def test_python_shell_one_liner_runs_a_source(env):
    """The README's one-liner enqueues a run and returns a handle whose wait() gives a summary."""
    code = ("from etl_tasks.api import run_source; s = run_source('billing').wait(timeout=90); "
            "print(s.status, s.source)")
    done = subprocess.run([sys.executable, "-c", code], env=env.env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.split() == ["finished", "billing"]


def test_a_second_fleet_host_shares_the_work(env):
    """A second fleet process against the same Redis takes part of a run's extract tasks."""
    second = env.start_worker("fleet", "fleet-second", "--concurrency", "1")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = {n for reply in (app.control.ping(timeout=0.5) or []) for n in reply}
            if f"fleet-{second.pid}@" in " ".join(names):
                break
        generate_claims(get_resources().firebird_target, _claims_max(env) + 1, 48_000)
        summary = run_source("billing").wait(timeout=180)
        assert summary.status == "finished", summary.error
        assert summary.loaded + summary.quarantined == 48_000
        stats = app.control.inspect(timeout=2).stats() or {}
        second_name = next(n for n in stats if n.startswith(f"fleet-{second.pid}@"))
        assert stats[second_name]["total"].get("etl.extract.unit", 0) > 0
    finally:
        second.stop()
        env.workers.pop("fleet-second", None)


def test_etl_run_all_wait_json_prints_one_summary_per_source(env):
    """`etl run --all --wait --json` follows every source to the end and prints the summaries."""
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, "run", "--all", "--wait", "--json"], env=env.env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    summaries = json.loads(done.stdout)
    assert [s["source"] for s in summaries] == ["billing", "lab_results", "registrations"]
    for s in summaries:
        assert {"source", "extracted", "loaded", "quarantined", "skipped", "duration_s",
                "quality_score"} <= s.keys()


def test_flower_shows_workers_and_id_only_task_arguments(env, tmp_path):
    """Flower lists the fleet and the loader, and the tasks of a run carry only ids."""
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "etl_tasks", "flower", f"--port={port}",
         "--address=127.0.0.1", "--basic-auth=ops:secret", f"--db={tmp_path / 'flower'}"],
        env=env.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = {"Authorization": "Basic " + b64encode(b"ops:secret").decode()}

    def get(path):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=auth)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    try:
        deadline = time.monotonic() + 60
        workers = {}
        while time.monotonic() < deadline:
            try:
                workers = get("/api/workers?refresh=1")
                if any(w.startswith("loader-") for w in workers):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert any(w.startswith("fleet-") for w in workers)
        assert any(w.startswith("loader-") for w in workers)
        generate_claims(get_resources().firebird_target, _claims_max(env) + 1, 100)
        run_source("billing").wait(timeout=90)
        time.sleep(1)  # let Flower take in the last events
        tasks = get("/api/tasks").values()
        names = {t["name"] for t in tasks}
        # A Firebird range is validated in its extract step: no transform task of its own.
        assert {"etl.plan.run_source", "etl.extract.unit", "etl.load.chunk"} <= names
        for task in tasks:
            # Arguments are a run id and a source/unit/chunk id: nothing like a patient id.
            assert not re.search(r"P\d{6}", task["args"]), task["args"]
            assert len(task["args"]) < 200
    finally:
        flower.terminate()
        flower.wait(timeout=30)


def test_etl_demo_runs_end_to_end_and_a_second_run_loads_nothing(tmp_path):
    """`etl demo` with no ETL_REDIS_URL starts its own Redis and workers, loads, and stops."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ETL_")}
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    first = subprocess.run([etl, "demo", "--claims", "5000", "--fleet", "1", "--json"],
                           env=clean, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "data" / "demo" / "manifest.json").read_text())
    summary = {s["source"]: s for s in json.loads(first.stdout)}
    assert summary["billing"]["loaded"] + summary["billing"]["quarantined"] == 5000
    assert summary["billing"]["quarantined"] == manifest["billing"]["defective_rows"]
    # The second lab partner, declared in the packaged config, runs too: exactly its defects.
    partner = manifest["partner_feeds"]
    assert summary["partner_labs"]["quarantined"] == sum(sum(f["defects"].values())
                                                         for f in partner)
    assert summary["partner_labs"]["loaded"] + summary["partner_labs"]["quarantined"] == sum(
        f["rows"] for f in partner)
    # The second Firebird table (PATIENT_VISITS, text key, WIN1252), configuration only.
    assert (summary["visits"]["loaded"], summary["visits"]["quarantined"]) == (
        manifest["visits"]["rows"], 0)
    second = subprocess.run([etl, "demo", "--fleet", "1", "--json"], env=clean, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert all(s["loaded"] == 0 for s in json.loads(second.stdout))
    assert (tmp_path / "data" / "warehouse.duckdb").exists()
    # Everything it started is stopped: no worker of this demo is left running.
    leftover = subprocess.run(["pgrep", "-f", f"{tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_etl_wait_follows_a_run_started_elsewhere_by_its_id(env):
    """`etl wait RUN_ID --json` re-attaches to a run started from a Python shell."""
    handle = run_source("billing")
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, "wait", handle.run_id, "--json"], env=env.env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    [summary] = json.loads(done.stdout)
    assert (summary["run_id"], summary["status"]) == (handle.run_id, "finished")


def test_etl_reconcile_accounts_for_every_billing_row(env):
    """`etl reconcile billing --json` counts the Firebird table itself and finds every row
    loaded, quarantined or not yet run, with nothing unexplained."""
    run_source("billing").wait(timeout=180)
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, "reconcile", "billing", "--json"], env=env.env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    [balance] = json.loads(done.stdout)
    [(source_rows,)] = env.firebird("SELECT COUNT(*) FROM BILLING_CLAIMS")
    assert balance["source_rows"] == source_rows
    assert balance["unexplained"] == 0
    assert balance["loaded"] + balance["quarantined"] + balance["not_yet_run"] == source_rows
    assert balance["runs"]
    assert not any(r["difference"] for r in balance["runs"])


def test_etl_run_wait_reports_a_run_that_makes_no_progress(env, tmp_path):
    """With Redis up and no worker running, `etl run --wait` does not wait forever: after
    ETL_STALL_S without progress it says what to check and how to follow the run, exit 3."""
    from etl_tasks.local_services import RedisServer

    server = RedisServer(tmp_path / "redis").start()  # a Redis no worker listens to
    try:
        etl = os.path.join(os.path.dirname(sys.executable), "etl")
        done = subprocess.run([etl, "run", "billing", "--wait"], capture_output=True,
                              text=True, timeout=120,
                              env={**env.env, "ETL_REDIS_URL": server.url, "ETL_STALL_S": "3"})
    finally:
        server.stop()
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no progress" in done.stderr
    assert "etl wait" in done.stderr


STATUS_KEYS = {"success_rate", "average_duration_s", "quality_trend", "error_patterns",
               "last_run", "staleness_s", "dead_letters", "waiting_in_fallbacks"}


def test_etl_status_json_shows_runs_dead_letters_and_workers_per_queue(env):
    """After a billing run, `etl status --json` has exactly the documented keys, billing's
    last run is that run, and the fleet and the loader are online on their queues."""
    summary = run_source("billing").wait(timeout=180)
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, "status", "--json", "--last", "5"], env=env.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert set(status) == {"overall", "sources", "workers", "open_alerts", "runs_from"}
    assert status["runs_from"] == "duckdb"
    assert set(status["overall"]) == STATUS_KEYS
    assert set(status["sources"]) >= {"billing", "lab_results", "registrations"}
    for figures in status["sources"].values():
        assert set(figures) == STATUS_KEYS
    billing = status["sources"]["billing"]
    assert billing["success_rate"] > 0
    assert billing["last_run"]["run_id"] == summary.run_id
    assert billing["last_run"]["status"] == summary.status
    assert 1 <= len(billing["quality_trend"]) <= 5
    assert billing["staleness_s"] is not None
    assert billing["staleness_s"] >= 0
    assert any(w.startswith("fleet-") for w in status["workers"]["extract"])
    assert any(w.startswith("fleet-") for w in status["workers"]["transform"])
    # One loader, the writer, consumes `load` (a standby would consume only `control`).
    assert [w.split("-")[0] for w in status["workers"]["load"]] == ["loader"]
    # Other tests of the session may have left alerts open (a run with dead letters): each
    # is complete, and this run, within the default thresholds, raised none.
    for alert in status["open_alerts"]:
        assert set(alert) == {"alert_id", "severity", "source", "check", "message", "details",
                              "raised_at"}
        assert alert["details"].get("run_id") != summary.run_id
    table = subprocess.run([etl, "status"], env=env.env, capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0, table.stderr
    assert "billing" in table.stdout
    assert "load workers: loader-" in table.stdout


def test_etl_run_require_workers_refuses_a_queue_nobody_consumes(env, tmp_path):
    """With Redis up and no worker, `etl run billing --require-workers` says within seconds
    which queue has no consumer and what to start, and enqueues nothing (exit 2)."""
    from etl_tasks.local_services import RedisServer

    server = RedisServer(tmp_path / "redis").start()  # a Redis no worker listens to
    try:
        etl = os.path.join(os.path.dirname(sys.executable), "etl")
        started = time.monotonic()
        done = subprocess.run([etl, "run", "billing", "--require-workers"],
                              capture_output=True, text=True, timeout=60,
                              env={**env.env, "ETL_REDIS_URL": server.url})
        elapsed = time.monotonic() - started
        import redis

        queued = redis.Redis.from_url(server.url).llen("extract")
    finally:
        server.stop()
    assert done.returncode == 2, done.stdout + done.stderr
    assert elapsed < 15, elapsed
    message = " ".join(done.stderr.split())
    assert "no worker consumes the load queue: start `python -m workers.loader`" in message
    assert "no worker consumes the extract queue" in message
    assert "enqueued" not in done.stdout
    assert queued == 0


def test_flower_refuses_to_listen_beyond_loopback_without_authentication(env):
    """`python -m workers.flower --address=0.0.0.0` without credentials exits at once saying
    what to pass; with them on loopback a request without credentials is refused."""
    refused = subprocess.run([sys.executable, "-m", "workers.flower", "--address=0.0.0.0",
                              f"--port={free_port()}"], env=env.env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2
    assert "--basic-auth" in refused.stderr
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "workers.flower", f"--port={port}", "--basic-auth=ops:secret"],
        env=env.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers", timeout=5)
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.3)
        assert status == 401
    finally:
        flower.terminate()
        flower.wait(timeout=30)
