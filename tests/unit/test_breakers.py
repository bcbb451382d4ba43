"""Circuit breakers per source, shared through a real Redis by breakers on two "hosts"."""

from __future__ import annotations

import logging
import time

import pytest

from etl_tasks.errors import CircuitOpen, FatalError, TransientError
from etl_tasks.runs.breakers import SourceBreaker

RESET_S = 2.0


@pytest.fixture
def hosts(client) -> tuple[SourceBreaker, SourceBreaker]:
    """Two breakers of one source with their own Redis clients, as on two hosts."""
    return SourceBreaker(client(), "billing", 3, RESET_S), SourceBreaker(
        client(), "billing", 3, RESET_S)


def fail(breaker: SourceBreaker, exc: Exception) -> type[BaseException]:
    """Call the source through `breaker` and fail with `exc`; the type that came out."""
    try:
        with breaker.guard():
            raise exc
    except (TransientError, FatalError) as out:
        return type(out)
    raise AssertionError("the guard swallowed the error")


def test_opens_after_consecutive_failures_on_any_host_and_closes_after_a_probe(hosts, caplog):
    """Three transient failures split over two hosts open the circuit for both; while it is
    open neither calls the source; after the cool-down one successful probe closes it."""
    a, b = hosts
    caplog.set_level(logging.INFO, logger="etl.alerts")
    assert fail(a, TransientError("Firebird unavailable")) is TransientError
    assert fail(b, TransientError("Firebird unavailable")) is TransientError
    assert a.state == b.state == "closed"
    # The third failure trips it: the caller learns the circuit is open, and an alert says so.
    assert fail(a, TransientError("Firebird unavailable")) is CircuitOpen
    assert a.state == b.state == "open"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "source billing unavailable: circuit open after 3 failures until" in caplog.text

    called = []
    for host in (a, b):
        with pytest.raises(CircuitOpen, match="circuit open after 3 failures"), host.guard():
            called.append(host)
        with pytest.raises(CircuitOpen):
            host.check()
    assert called == [], "the source was called while its circuit was open"

    time.sleep(RESET_S + 1.1)  # pybreaker keeps the opening time in whole seconds
    b.check()  # cooled down: work may go ahead
    with b.guard():  # the half-open probe succeeds
        called.append(b)
    assert called == [b]
    assert a.state == b.state == "closed"
    assert "circuit closed" in caplog.records[-1].getMessage()
    # Counting starts afresh: two more failures do not open it again.
    for host in (a, b):
        assert fail(host, TransientError("Firebird unavailable")) is TransientError
    assert a.state == "closed"


def test_a_failed_probe_opens_it_again(hosts):
    """After the cool-down a probe that fails opens the circuit for another cool-down."""
    a, b = hosts
    for host in (a, b, a):
        fail(host, TransientError("Firebird unavailable"))
    assert a.state == "open"
    time.sleep(RESET_S + 1.1)
    assert fail(b, TransientError("still down")) is CircuitOpen
    assert a.state == "open"
    with pytest.raises(CircuitOpen, match="after 4 failures"), a.guard():
        pass


def test_an_answer_resets_the_count(hosts):
    """A fatal error (the source answered: a missing table, bad SQL) is not a failure of
    the source and resets the count of consecutive failures."""
    a, b = hosts
    fail(a, TransientError("Firebird unavailable"))
    fail(b, TransientError("Firebird unavailable"))
    assert fail(a, FatalError("table unknown")) is FatalError
    fail(b, TransientError("Firebird unavailable"))
    fail(a, TransientError("Firebird unavailable"))
    assert a.state == "closed"


def test_breaker_state_lives_in_redis_per_source(hosts, client):
    """Each source has its own namespace in Redis: billing's open circuit leaves lab_results
    alone."""
    a, _ = hosts
    for _ in range(3):
        fail(a, TransientError("Firebird unavailable"))
    other = SourceBreaker(client(), "lab_results", 3, RESET_S)
    with other.guard():
        pass
    assert other.state == "closed"
    keys = {k.decode() for k in client().keys("etl:breaker:*")}
    assert "etl:breaker:billing:pybreaker:state" in keys
    assert "etl:breaker:lab_results:pybreaker:state" in keys
