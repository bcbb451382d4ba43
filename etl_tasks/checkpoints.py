"""Source checkpoints in Redis, advanced only after a committed load.

Firebird keeps a key high-water mark; file sources keep the content hashes of files already
loaded (with their row counts, reported as skipped when the same content comes again).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import redis

from etl_tasks.runs import Unit


def key_high_water(r: redis.Redis, source: str) -> int:
    value = r.hget(f"etl:checkpoint:{source}", "key")
    return int(value) if value is not None else 0


def advance_key(r: redis.Redis, source: str, units: list[Unit], done: set[str]) -> int:
    """Move the key mark over the contiguous prefix of committed ranges; never backwards.

    Ranges load in parallel and commit in any order; a gap (a range not yet committed)
    stops the mark so that a crash never skips rows.
    """
    mark = key_high_water(r, source)
    for unit in units:
        if unit.kind != "range" or unit.unit_id not in done:
            break
        mark = max(mark, unit.hi)
    r.hset(f"etl:checkpoint:{source}", "key", mark)
    return mark


def updated_since(r: redis.Redis, source: str, lookback_s: float) -> datetime | None:
    """Where the next UPDATED_AT window starts: the mark minus a look-back, because source
    transactions can commit out of timestamp order. Re-reading costs nothing: loads upsert."""
    value = r.hget(f"etl:checkpoint:{source}", "updated")
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    return datetime.fromisoformat(text) - timedelta(seconds=lookback_s)


def advance_updated(r: redis.Redis, source: str, until_iso: str) -> None:
    """Called when a run finished: every row updated up to `until_iso` is committed."""
    current = r.hget(f"etl:checkpoint:{source}", "updated")
    text = current.decode() if isinstance(current, bytes) else current
    if text is None or datetime.fromisoformat(until_iso) > datetime.fromisoformat(str(text)):
        r.hset(f"etl:checkpoint:{source}", "updated", until_iso)


def loaded_file_rows(r: redis.Redis, source: str, sha256: str) -> int | None:
    value = r.hget(f"etl:files:{source}", sha256)
    return int(value) if value is not None else None


def mark_file_loaded(r: redis.Redis, source: str, sha256: str, rows: int) -> None:
    r.hset(f"etl:files:{source}", sha256, rows)


def reset(r: redis.Redis, source: str) -> None:
    """Forget a source's checkpoints (`etl run --full`); the ledger still prevents doubles."""
    r.delete(f"etl:checkpoint:{source}", f"etl:files:{source}")
