"""Fault points: named places where a test makes this process die (or raise) for real.

Enabled only by the environment, so production code paths run unchanged:

    ETL_FAULT_POINT=<point>[:<n>][@<match>]
    ETL_FAULT_ACTION=kill|raise|memory|delay:<seconds>   (default kill)

`point` is one of POINTS; `match` a substring of the unit or chunk id at that point; `:n`
fires only on the n-th matching hit counted across every process (a Redis counter), once.
Without `:n` it fires on every matching hit (poison work). `kill` is a real SIGKILL of the
process; `raise` an unclassified error, as a bug in a reader would raise; `memory` a
MemoryError, as a chunk too big for the worker's memory does; `delay:S` sleeps S seconds (a
loader slower than the fleet). FAULTS.md explains why: a timed `kill -9` hits a window only by
luck; a fault point makes it deterministic.
"""

from __future__ import annotations

import os
import signal
import time

import redis

POINTS = ("extract", "transform", "load", "before_commit", "after_commit", "replay")


class InjectedFault(RuntimeError):
    """Raised by a fault point with ETL_FAULT_ACTION=raise."""


def fault_point(name: str, item: str, r: redis.Redis | None = None) -> None:
    spec = os.environ.get("ETL_FAULT_POINT")
    if not spec:
        return
    # The match comes last and may hold colons (`extract@billing:keys:4001`).
    head, _, match = spec.partition("@")
    point, _, nth = head.partition(":")
    if point != name or (match and match not in item):
        return
    if nth and (r is None or int(r.incr(f"etl:fault:{spec}")) != int(nth)):
        return
    action = os.environ.get("ETL_FAULT_ACTION", "kill")
    if action == "raise":
        raise InjectedFault(f"fault point {name} for {item}")
    if action == "memory":
        raise MemoryError(f"fault point {name} for {item}")
    if action.startswith("delay:"):
        time.sleep(float(action.removeprefix("delay:")))
        return
    os.kill(os.getpid(), signal.SIGKILL)
