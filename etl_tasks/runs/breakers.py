"""Circuit breakers per source, shared through Redis by every worker on every host.

A source that fails `breaker_failures` times in a row with a transient error (Firebird
unavailable, as its `classify` says; an inbox that cannot be listed or read just now) is left
alone for `breaker_reset_s`: extracts raise `CircuitOpen` instead of calling it (Celery
retries them with backoff, and a transient error never counts as an attempt), and a run
planned meanwhile is skipped at once with the reason (`plan.plan_run`). The first call after
the cool-down is a half-open probe: success closes the circuit, failure opens it again.

pybreaker keeps the state, the failure counter and the opening time in Redis under
`etl:breaker:<source>:pybreaker:*`, so a breaker object is cheap and made per use: every
process reads the one shared state. Any other outcome of a guarded call (rows, a fatal SQL
error, a corrupt file) shows the source answering and resets the count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pybreaker
import redis

from etl_tasks.errors import CircuitOpen, TransientError
from etl_tasks.monitoring.alerts import alert
from etl_tasks.resources import Resources

log = logging.getLogger(__name__)


def _answered(exc: BaseException) -> bool:
    """Errors that do not count against the source: it answered (or we never called it)."""
    return not isinstance(exc, TransientError) or isinstance(exc, CircuitOpen)


class SourceBreaker:
    """The circuit breaker of one source (see the module docstring)."""

    def __init__(self, r: redis.Redis, source: str, failures: int, reset_s: float) -> None:
        self.source, self.reset_s = source, reset_s
        self.storage = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, r, namespace=f"etl:breaker:{source}")
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=failures, reset_timeout=reset_s, exclude=[_answered],
            state_storage=self.storage, name=source)

    @property
    def state(self) -> str:
        """`closed`, `open` or `half-open`, as every process sees it."""
        return self.breaker.current_state

    def reason(self) -> str:
        """Why the source is left alone, and until when (local time)."""
        opened = self.storage.opened_at
        until = (opened.timestamp() if opened else time.time()) + self.reset_s
        return (f"source {self.source} unavailable: circuit open after "
                f"{self.storage.counter} failures until "
                f"{time.strftime('%H:%M:%S', time.localtime(until))}")

    def check(self) -> None:
        """Refuse with `CircuitOpen` while the circuit is open and cooling down; count
        nothing (for work whose failures are counted elsewhere)."""
        opened = self.storage.opened_at
        if (self.state == pybreaker.STATE_OPEN and opened is not None
                and time.time() < opened.timestamp() + self.reset_s):
            raise CircuitOpen(self.reason(), source=self.source)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the block as a call to the source: refused with `CircuitOpen` while the circuit
        is open, counted when it raises a transient error, a probe when half-open."""
        before, called = self.state, False
        try:
            with self.breaker.calling():
                called = True
                yield
        except pybreaker.CircuitBreakerError:
            reason = self.reason()
            if called:  # this call tripped it (or failed the probe): say so once, from here
                alert("warning", f"{reason}; extracts wait and planned runs are skipped "
                      "until then")
            raise CircuitOpen(reason, source=self.source) from None
        if before != pybreaker.STATE_CLOSED and self.state == pybreaker.STATE_CLOSED:
            alert("info", f"source {self.source} answers again: circuit closed")


def for_source(res: Resources, source: str) -> SourceBreaker:
    """The breaker of `source` with the configured thresholds."""
    s = res.settings
    return SourceBreaker(res.redis, source, s.breaker_failures, s.breaker_reset_s)
