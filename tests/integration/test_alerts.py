"""Thresholds and alerts with real parts: workers and beat, a webhook receiver on loopback.

A run that breaks a threshold sends exactly one alert to the webhook (even when the receiver
fails the first try: Celery retries it); a source that has not committed for longer than its
limit raises one alert on beat's schedule while nothing runs, not one per check; both show in
`etl status --json` as open alerts, and the run's metrics row holds its stage times.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from etl_tasks.api import run_source
from tests.integration.fault_stack import wait_until
from tests.integration.receivers import http_receiver
from tests.integration.test_faults import wait_end

# A quiet feed that never runs: stale 2 s after monitoring first sees it. The billing demo
# data plants defects, so no billing run reaches a quality score of 0.9999.
EXTRA = """
[[sources]]
name = "quiet_feed"
kind = "xml"
location = "{data_dir}/quiet"
schedule = "manual"
thresholds = { max_staleness_s = 2 }

[thresholds]
min_quality_score = 0.9999
"""


def _alerts(bodies: list[bytes]) -> list[dict]:
    return [json.loads(b) for b in bodies]


def test_a_breach_and_a_stale_source_each_send_one_alert(world):
    with http_receiver(statuses=(500,)) as hook:  # the first POST fails: it must be retried
        stack = world(pipeline_extra=EXTRA, env={
            "ETL_ALERT_WEBHOOK_URL": hook.url + "/alerts", "ETL_HEALTH_CHECK_EVERY_S": "0.5"})
        (stack.root / "data" / "quiet").mkdir()
        stack.start_all()

        # Staleness: raised on beat's schedule with no run at all, then not again.
        stale = wait_until(lambda: [a for a in _alerts(hook.bodies)
                                    if a["check"] == "staleness"], 30, "the staleness alert")
        assert stale[0]["source"] == "quiet_feed"
        assert stale[0]["severity"] == "warning"

        summary = wait_end(stack, run_source("billing"), 120)
        assert summary.status == "finished", summary
        assert summary.quality_score < 0.9999

        def run_alerts() -> list[dict]:
            return [a for a, status in zip(_alerts(hook.bodies), hook.answered, strict=True)
                    if a["check"] == "run" and status == 200]

        delivered = wait_until(run_alerts, 60, "the breach alert delivered to the webhook")
        time.sleep(3)  # six more health checks and supervisor passes: nothing more is sent

    breach = [a for a in _alerts(hook.bodies) if a["check"] == "run"]
    assert {a["alert_id"] for a in breach} == {delivered[0]["alert_id"]}  # one alert
    alert = delivered[0]
    assert alert["details"]["run_id"] == summary.run_id
    assert [b["threshold"] for b in alert["details"]["breaches"]] == ["min_quality_score"]
    assert alert["severity"] == "warning"
    assert "min_quality_score" in alert["message"]
    # The first POST (whichever alert it carried) got HTTP 500 and was retried: every alert
    # reached the receiver with a 200 in the end.
    assert hook.answered.count(500) == 1
    assert {a["alert_id"] for a, status in zip(_alerts(hook.bodies), hook.answered,
                                               strict=True) if status == 200} == {
        a["alert_id"] for a in _alerts(hook.bodies)}
    staleness = {a["alert_id"] for a in _alerts(hook.bodies) if a["check"] == "staleness"}
    assert len(staleness) == 1, "a source that stays stale raises one alert, not one per check"

    shown = json.loads(subprocess.run(
        [sys.executable, "-m", "etl_tasks.cli", "status", "--json"], env=stack.env,
        capture_output=True, text=True, timeout=120, check=True).stdout)
    open_checks = {(a["source"], a["check"]) for a in shown["open_alerts"]}
    assert open_checks == {("billing", "run"), ("quiet_feed", "staleness")}
    last = shown["sources"]["billing"]["last_run"]
    assert last["run_id"] == summary.run_id
    assert last["extract_s"] > 0
    assert last["load_s"] > 0
    assert last["transform_s"] > 0
    assert last["source_latency_s"] is not None
    assert last["source_latency_s"] >= 0
    assert last["error_rate"] == 0.0
    stored = stack.query("SELECT extract_s, load_s, errors_by_class FROM etl_runs "
                         "WHERE run_id = ?", [summary.run_id])
    assert stored[0][0] > 0
    assert stored[0][1] > 0
    assert json.loads(stored[0][2]) == {}


def test_a_failed_run_is_recorded_with_its_errors_and_alerts_critical(world):
    """A plan that fails (its table does not exist) still gets its metrics row, with the
    error's class, and raises a critical alert."""
    with http_receiver() as hook:
        stack = world(location="NO_SUCH_TABLE",
                      env={"ETL_ALERT_WEBHOOK_URL": hook.url + "/alerts"})
        stack.start_all()
        failed = wait_end(stack, run_source("billing"), 60)
        assert failed.status == "failed", failed
        alerts = wait_until(lambda: [a for a in _alerts(hook.bodies)
                                     if a["check"] == "run"], 60, "the failed run's alert")
        rows = wait_until(lambda: stack.query(
            "SELECT status, errors_by_class, error FROM etl_runs WHERE run_id = ?",
            [failed.run_id]), 30, "the failed run's metrics row")
    assert alerts[0]["severity"] == "critical"
    assert alerts[0]["details"]["run_id"] == failed.run_id
    status, errors, error = rows[0]
    assert status == "failed"
    assert json.loads(errors) == {"FatalError": 1}
    assert "NO_SUCH_TABLE" in error
