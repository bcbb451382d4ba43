"""Degrade, don't stop (issue 8): a source that is down is left alone by its circuit breaker,
a slow loader holds extraction back instead of filling Redis, and work that runs out of
memory is split in halves. Real processes in a world of their own per test
(fault_stack.py), ending with the shared oracle.
"""

from __future__ import annotations

import time

import pytest

from etl_tasks import checkpoints
from etl_tasks.api import run_source
from etl_tasks.local_services import free_port
from tests.integration import oracle
from tests.integration.fault_stack import FaultStack, wait_until
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


def _chunks_staged(stack: FaultStack, run_id: str) -> int:
    """Chunks of the run with any payload staged in Redis (raw, valid or quarantine)."""
    return len({name.rsplit(":", 1)[0] for name in stack.stage_keys(run_id)})


def test_a_stopped_loader_holds_extraction_back(world):
    """With the loader stopped, a run of 12 ranges and a window of 2 stages at most 2 chunks
    (the supervisor, which re-sends a stalled run's steps, sends no held unit either); with
    the loader back the run finishes with every row, once."""
    stack: FaultStack = world(env={"ETL_STAGE_WINDOW": "2"}, chunk_size=1_000)
    # An empty ledger: what the loader's rebuild of a fresh Redis would find (the loader is
    # stopped, so mark the checkpoints intact instead of waiting for it).
    checkpoints.mark_intact(stack.redis)
    stack.start_fleet(wait=False)
    stack.start_beat()
    stack.wait_for("fleet-")
    handle = run_source("billing")
    wait_until(lambda: _chunks_staged(stack, handle.run_id) >= 2, 60,
               "two staged chunks", 0.05)
    most, until = 0, time.monotonic() + 12  # longer than ETL_OVERDUE_S: the run stalls
    while time.monotonic() < until:
        most = max(most, _chunks_staged(stack, handle.run_id))
        time.sleep(0.05)
    held = stack.redis.llen(f"etl:run:{handle.run_id}:held")
    memory = int(stack.redis.info("memory")["used_memory"])
    print(f"loader stopped: at most {most} chunks staged, {held} of 12 units held, "
          f"redis used_memory {memory >> 10} KiB")
    assert most == 2, f"{most} chunks staged with a window of 2"
    assert held == 10
    stack.start_loader()
    summary = wait_end(stack, handle, 90)
    assert summary.status == "finished", summary
    [(chunks,)] = stack.query("SELECT count(*) FROM etl_load_ledger WHERE run_id = ?",
                              [handle.run_id])
    assert chunks == 12
    assert stack.stage_keys(handle.run_id) == []
    oracle.check(stack, "loader stopped, window of 2")


@pytest.mark.parametrize("stage", ["extract", "transform"])
def test_a_range_out_of_memory_is_split_in_halves_and_loads(world, stage):
    """A 2,000-key range whose extract (or transform) raises MemoryError at that size is
    split into two 1,000-key ranges that load: the run finishes with no dead letter, the
    halves are in the ledger in its place, the key mark passes them, every row once."""
    stack: FaultStack = world()
    stack.start_all(fleet_env={"ETL_FAULT_POINT": f"{stage}@billing:keys:4001-6000",
                               "ETL_FAULT_ACTION": "memory"})
    stack.mark_fault()
    handle = run_source("billing")
    summary = wait_end(stack, handle, 120)
    assert summary.status == "finished", summary
    assert summary.dead_letters == []
    ledger = {c for (c,) in stack.query(
        "SELECT chunk_id FROM etl_load_ledger WHERE run_id = ?", [handle.run_id])}
    assert {"billing:keys:4001-5000", "billing:keys:5001-6000"} <= ledger, ledger
    assert "billing:keys:4001-6000" not in ledger
    assert len(ledger) == 7
    assert int(stack.redis.hget("etl:checkpoint:billing", "key") or 0) == 12_000
    assert "split into billing:keys:4001-5000 and billing:keys:5001-6000" in (
        stack.root / "logs" / "fleet.log").read_text()
    oracle.check(stack, f"MemoryError at {stage}, range split", fault_at=stack.fault_at,
                 ended_at=stack.ended_at)
