"""The source lease: at most one run of a source in flight, on any host.

A lease, not a lock: it is taken by the plan with a TTL, renewed while the run makes progress
(and by the supervisor while it watches the run), and released when the run ends, however it
ends. A run that stops making progress loses it after `run_lease_s`, so a source is never
blocked for good by a run that nobody can finish.
"""

from __future__ import annotations

import redis

_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('expire', KEYS[1], ARGV[2]) end return 0")
_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) end return 0")


def _key(source: str) -> str:
    return f"etl:lock:{source}"


def acquire(r: redis.Redis, source: str, run_id: str, ttl_s: int) -> str | None:
    """Take the source's lease for `run_id` (re-entrant); the holder's run id if another
    run has it."""
    if r.set(_key(source), run_id, nx=True, ex=ttl_s):
        return None
    holder = r.get(_key(source))
    if holder is None:  # expired between the two calls: try once more
        return None if r.set(_key(source), run_id, nx=True, ex=ttl_s) else "another run"
    text = holder.decode() if isinstance(holder, bytes) else str(holder)
    if text == run_id:
        renew(r, source, run_id, ttl_s)
        return None
    return text


def holder(r: redis.Redis, source: str) -> str | None:
    value = r.get(_key(source))
    return value.decode() if isinstance(value, bytes) else None


def renew(r: redis.Redis, source: str, run_id: str, ttl_s: int) -> bool:
    """Extend the lease if `run_id` still holds it (compare-and-expire in one round trip)."""
    return bool(r.eval(_RENEW, 1, _key(source), run_id, ttl_s))


def release(r: redis.Redis, source: str, run_id: str) -> None:
    """Only the holder releases (compare-and-delete in one round trip)."""
    r.eval(_RELEASE, 1, _key(source), run_id)
