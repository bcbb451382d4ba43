"""The billing source against a real Firebird server (issue 8, FAULTS.md F9): Debian's
firebird3.0-server started privately on a free loopback port (local_services.FirebirdServer),
reached over TCP with `ETL_FIREBIRD_DSN=127.0.0.1/<port>:<path>`, then killed mid-run and
started again. No mocks: the errors are the ones a client sees when its server goes away.
"""

from __future__ import annotations

import time

import pytest

from etl_tasks.api import run_source
from etl_tasks.demo_data import expected_defective_claims, generate_claims
from etl_tasks.errors import TransientError
from etl_tasks.sources import firebird
from tests.integration import oracle
from tests.integration.fault_stack import CLAIMS, FaultStack, wait_until
from tests.integration.test_faults import chunks_done, wait_end

pytestmark = pytest.mark.integration

BREAKER = "etl:breaker:billing:pybreaker:state"  # runs/breakers.py: pybreaker's Redis storage
DOWN_S = 5.0  # how long the server stays down
RESET_S = 5  # the breaker's cool-down in this test (ETL_BREAKER_RESET_S)


def test_billing_run_against_a_firebird_server(world):
    """A whole billing run over TCP against a Firebird 3 server, then rows the demo generator
    adds through the server: every claim loaded or quarantined once, as planted."""
    stack: FaultStack = world(firebird_server=True)
    assert stack.firebird_server is not None
    assert stack.env["ETL_FIREBIRD_DSN"].startswith(f"127.0.0.1/{stack.firebird_server.port}:")
    [(version, protocol)] = stack.firebird(
        "SELECT rdb$get_context('SYSTEM', 'ENGINE_VERSION'), mon$remote_protocol "
        "FROM mon$attachments WHERE mon$attachment_id = CURRENT_CONNECTION")
    assert version.startswith("3."), version
    assert protocol.startswith("TCP"), protocol
    stack.start_all(beat=False)
    summary = wait_end(stack, run_source("billing"), 90)
    assert summary.status == "finished", summary
    tally = oracle.check(stack, "billing over a Firebird server")
    assert tally.quarantined == expected_defective_claims(1, CLAIMS)
    assert tally.loaded + tally.quarantined == CLAIMS
    assert tally.dead_lettered == 0

    generate_claims(stack.firebird_target, CLAIMS + 1, 500)
    again = wait_end(stack, run_source("billing"), 60)
    assert again.status == "finished", again
    tally = oracle.check(stack, "new rows over a Firebird server")
    assert tally.source == CLAIMS + 500
    assert tally.loaded + tally.quarantined == CLAIMS + 500


def _max_key(pool: firebird.ConnectionPool) -> tuple[int, int] | None:
    """A read through the pool, its errors classified as the pipeline's steps do."""
    with pool.connection() as con:
        try:
            return firebird.key_bounds(con, "BILLING_CLAIMS", "CLAIM_ID", 0)
        except Exception as exc:
            raise firebird.classify(exc, "table BILLING_CLAIMS") from exc


def test_server_gone_is_transient_and_the_pool_drops_its_connections(world):
    """A server killed and started again: a read on a connection to the old server process
    and a connect while it is down are transient errors, and one such error drops every
    idle connection of the pool, so the next read succeeds."""
    stack: FaultStack = world(firebird_server=True)
    server = stack.firebird_server
    assert server is not None
    pool = firebird.ConnectionPool(stack.firebird_target, size=2, timeout=5)
    try:
        with pool.connection(), pool.connection():
            pass  # two connections, both idle in the pool now
        server.kill()
        server.start()
        with pytest.raises(TransientError, match="unreachable or connection lost"):
            _max_key(pool)  # a connection to the killed process
        assert _max_key(pool) == (1, CLAIMS), "a stale idle connection was reused"

        server.kill()
        for case in ("connection to the killed server", "connect while it is down"):
            with pytest.raises(TransientError, match="unreachable or connection lost"):
                _max_key(pool)
            print(f"{case}: transient")
        server.start()
        assert _max_key(pool) == (1, CLAIMS)
    finally:
        pool.close()


def test_firebird_server_killed_mid_run_and_started_again(world):
    """The Firebird server killed in the middle of a run and started again a few seconds
    later: extracts fail transiently and are retried with backoff, the billing circuit opens
    while it is down and closes after, and the run loads everything exactly once."""
    stack: FaultStack = world(firebird_server=True, env={
        "ETL_BREAKER_FAILURES": "3", "ETL_BREAKER_RESET_S": str(RESET_S)})
    server = stack.firebird_server
    assert server is not None
    # Each extract waits a second before it reads, so the kill lands with units left to read.
    stack.start_all(fleet_env={"ETL_FAULT_POINT": "extract", "ETL_FAULT_ACTION": "delay:1"})
    handle = run_source("billing")
    wait_until(lambda: chunks_done(handle) >= 1, 60, "the first committed chunk", 0.01)
    assert handle.summary() is None, "the run ended before the fault"
    server.kill()
    killed_at = stack.mark_fault()
    wait_until(lambda: stack.redis.get(BREAKER) == "open", 30,
               "the billing circuit to open while the server is down")
    opened_after = time.monotonic() - killed_at
    time.sleep(max(0.0, killed_at + DOWN_S - time.monotonic()))
    assert handle.summary() is None, "the run ended while its source was down"
    server.start()
    restarted_at = time.monotonic()

    summary = wait_end(stack, handle, 90)
    took = time.monotonic() - restarted_at
    print(f"circuit open {opened_after:.1f}s after the kill; server down "
          f"{restarted_at - killed_at:.1f}s; run ended {took:.1f}s after the restart "
          f"({summary.status})")
    if summary.status != "finished":  # the run gave work up; the next one loads it
        assert summary.status == "partial", summary
        again = wait_end(stack, run_source("billing"), 60)
        assert again.status == "finished", again
    assert took < 60, f"the run ended {took:.0f}s after the server came back"
    tally = oracle.check(stack, "Firebird server killed mid-run, started again",
                         fault_at=stack.fault_at, ended_at=stack.ended_at)
    assert tally.loaded + tally.quarantined == CLAIMS
    assert tally.dead_lettered == 0
    assert stack.redis.get(BREAKER) == "closed"

    fleet_log = (stack.root / "logs" / "fleet.log").read_text()
    retried = [line for line in fleet_log.splitlines()
               if "retry: Retry in" in line and "Firebird server unreachable" in line]
    assert retried, f"no extract retried on a transient Firebird error; {stack.logs()}"
    assert "ALERT warning: source billing unavailable: circuit open" in fleet_log
    assert "ALERT info: source billing answers again: circuit closed" in fleet_log
