"""Degrade, don't stop (issue 8): a source that is down is left alone by its circuit breaker,
a slow loader holds extraction back instead of filling Redis, and work that runs out of
memory is split in halves. Real processes in a world of their own per test
(fault_stack.py), ending with the shared oracle.
"""

from __future__ import annotations

import time

import pytest

from etl_tasks.api import run_source
from etl_tasks.local_services import free_port
from tests.integration import oracle
from tests.integration.fault_stack import FaultStack
from tests.integration.test_faults import wait_end

pytestmark = pytest.mark.integration


def test_source_down_opens_its_circuit_and_planned_runs_are_skipped(world):
    """Firebird unreachable: the plan's failures open the billing circuit, the run is
    recorded failed with the reason and frees the source, a run planned meanwhile is skipped
    at once; with the source back and the cool-down over, the next run (the probe) closes
    the circuit and loads everything."""
    down = f"127.0.0.1/{free_port()}:/srv/firebird/billing.fdb"  # nothing listens there
    stack: FaultStack = world(env={"ETL_FIREBIRD_DSN": down, "ETL_BREAKER_FAILURES": "2",
                                   "ETL_BREAKER_RESET_S": "10"})
    good = str(stack.root / "data" / "billing.fdb")
    stack.start_all(beat=False)
    stack.mark_fault()
    first = wait_end(stack, run_source("billing"), 60)
    assert first.status == "failed", first
    assert first.error, first
    assert "source billing unavailable: circuit open after 2 failures until" in first.error
    assert first.error.endswith("the next run catches up from the checkpoint"), first.error
    assert stack.redis.get("etl:lock:billing") is None, "the skipped run kept the lease"
    assert "ALERT warning: source billing unavailable" in (
        stack.root / "logs" / "fleet.log").read_text()

    asked = time.monotonic()
    skipped = wait_end(stack, run_source("billing"), 10)
    took = time.monotonic() - asked
    assert skipped.status == "failed", skipped
    assert "circuit open after 2 failures" in (skipped.error or ""), skipped
    assert stack.redis.get("etl:lock:billing") is None
    print(f"run planned while the circuit is open: failed after {took:.1f}s: {skipped.error}")

    stack.env["ETL_FIREBIRD_DSN"] = good  # the source is back
    stack.start_fleet()
    opened = float(stack.redis.get("etl:breaker:billing:pybreaker:opened_at") or 0)
    time.sleep(max(0.0, opened + 10 + 1 - time.time()))
    again = wait_end(stack, run_source("billing"), 90)
    assert again.status == "finished", again
    assert stack.redis.get("etl:breaker:billing:pybreaker:state") == "closed"
    oracle.check(stack, "source down, circuit opened, closed by the next run")
