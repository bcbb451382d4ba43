"""The single writer: a lease in Redis carrying a fencing token, checked inside every write.

Only one loader may write the stores (DuckDB, the SQLite fallback, the spool). DuckDB's file
lock keeps two processes from holding the file at once, but not a loader paused (SIGSTOP, a
frozen VM) past the moment another took over from committing what it had begun. So:

- The writer holds the lease `etl:writer` = `<token>:<worker name>`, taken with SET NX PX and
  renewed by the loader's main process (`single_writer.py`). The token comes from INCR of
  `etl:writer:token`: every new holder's token is higher than every earlier holder's.
- Every write transaction calls `WriterFence.seal` right before its COMMIT: the store's
  one-row table `etl_writer` is raised to the writer's token, or the write is refused when it
  holds a higher one (a newer writer committed there); then the lease must still carry the
  writer's token. A refusal raises `FencedOut` and the transaction is rolled back.
- The spool has no transactions: its writes hold a lock file and seal a `fence` file the same
  way before the rename that commits them (`load/spool.py`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import duckdb
import redis

from etl_tasks.errors import FencedOut

log = logging.getLogger(__name__)

LEASE = "etl:writer"
COUNTER = "etl:writer:token"
TABLE_DDL = "CREATE TABLE IF NOT EXISTS etl_writer (fence BIGINT NOT NULL)"
"""The one-row fence table, the same in DuckDB and SQLite."""

# Renew the lease if `ARGV[3]` (the caller's current value) still holds it, else take it when
# it is free with a new token; either way return {holder, 1 if the caller holds it}.
_HOLD = """
local cur = redis.call('get', KEYS[1])
if cur then
  if cur == ARGV[3] then
    redis.call('pexpire', KEYS[1], ARGV[1])
    return {cur, 1}
  end
  return {cur, 0}
end
local value = redis.call('incr', KEYS[2]) .. ':' .. ARGV[2]
redis.call('set', KEYS[1], value, 'px', ARGV[1])
return {value, 1}
"""
_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) end return 0")
# A store's fence is above the lease's token while the lease is ours: Redis lost the counter
# (restarted empty). Raise the counter past the fence and give the lease up, so the next
# take gets a token the stores accept.
_HEAL = """
if tonumber(redis.call('get', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('set', KEYS[2], ARGV[2])
end
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def holder(r: redis.Redis) -> str | None:
    """`<token>:<worker name>` of the writer, None while nobody holds the lease."""
    return _text(r.get(LEASE))


def token_of(value: str | None) -> int | None:
    return int(value.partition(":")[0]) if value else None


def hold(r: redis.Redis, name: str, ttl_s: float, current: str | None) -> tuple[str, bool]:
    """Renew `current` (this worker's lease value, None if it holds none) or take the lease if
    it is free; returns (the holder's value, whether it is this worker)."""
    value, ours = r.eval(_HOLD, 2, LEASE, COUNTER, int(ttl_s * 1000), name, current or "")
    return str(_text(value)), bool(ours)


def release(r: redis.Redis, value: str) -> bool:
    """Give the lease up if `value` still holds it (a clean shutdown: the standby need not
    wait for it to expire)."""
    return bool(r.eval(_RELEASE, 1, LEASE, value))


def fence_for(r: redis.Redis, name: str | None) -> WriterFence:
    """The fence of the worker `name` if it holds the lease now; FencedOut otherwise (its
    message goes back for the writer before any work is done)."""
    try:
        value = holder(r)
    except redis.RedisError as exc:
        raise FencedOut(f"cannot read the writer lease ({type(exc).__name__}); nothing is "
                        "written until it can be confirmed", source="loader") from exc
    if name is None or value is None or value.partition(":")[2] != name:
        raise FencedOut(f"{name or 'this worker'} does not hold the writer lease (held by "
                        f"{value or 'nobody'}); the work goes back to the load queue for the "
                        "writer", source="loader")
    return WriterFence(r, name, int(value.partition(":")[0]))


@dataclass(frozen=True)
class WriterFence:
    """The writer's token, checked by every write right before it commits."""

    redis: redis.Redis = field(repr=False)
    name: str
    token: int

    @property
    def value(self) -> str:
        return f"{self.token}:{self.name}"

    def seal(self, con: duckdb.DuckDBPyConnection | sqlite3.Connection) -> None:
        """Inside a DuckDB or SQLite write transaction, right before COMMIT: raise the
        store's fence to this token, or refuse (FencedOut) when a newer writer's is there
        or the lease has moved on. Both stores take the same SQL here."""
        row = con.execute("SELECT max(fence) FROM etl_writer").fetchone()
        stored = None if row is None or row[0] is None else int(row[0])
        if self.admit(stored):
            if stored is None:
                con.execute("INSERT INTO etl_writer VALUES (?)", [self.token])
            else:
                con.execute("UPDATE etl_writer SET fence = ?", [self.token])
        self.confirm()

    def admit(self, stored: int | None) -> bool:
        """Whether the store's fence must be raised to this token; FencedOut when the store
        holds a newer writer's token."""
        if stored is not None and stored > self.token:
            # Refused either way; without Redis the next holder's token is checked again.
            with contextlib.suppress(redis.RedisError):
                self.redis.eval(_HEAL, 2, LEASE, COUNTER, self.value, stored)
            raise self._refused(f"the store's fence is {stored} (a newer writer committed "
                                "there, or Redis lost the token counter and it is raised now)")
        return stored is None or stored < self.token

    def confirm(self) -> None:
        """The lease still carries this token (read right before the commit)."""
        try:
            current = holder(self.redis)
        except redis.RedisError as exc:
            raise self._refused(f"the writer lease cannot be read ({type(exc).__name__})"
                                ) from exc
        if current != self.value:
            raise self._refused(f"the writer lease is now {current or 'free'}")

    def _refused(self, why: str) -> FencedOut:
        message = (f"commit refused: {self.name} wrote with token {self.token} but {why}; "
                   "nothing of this transaction was written and its work goes back to the "
                   "load queue for the writer")
        log.error("%s", message)
        return FencedOut(message, source="loader")
