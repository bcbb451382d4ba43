"""Source checkpoints in Redis, advanced only after a committed load, rebuilt from the ledger.

Firebird keeps a key high-water mark (every key at or below it is committed; for a key cut
at sampled boundaries, the sealed token of that key) and an updated mark (every row at or
below the key mark whose UPDATED_AT is at or before it is stored in that version); file
sources keep the content hashes of files already loaded (with their row
counts, reported as skipped when the same content comes again). Redis may lose all of this;
a marker key tells that it did, and `rebuild` derives every checkpoint from the DuckDB ledger
before the next plan, so nothing committed is read as new and nothing new is skipped.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis

from etl_tasks.runs.state import Unit

MARKER = "etl:marker"  # present while Redis holds the checkpoints; gone when it lost them


def _key(source: str) -> str:
    return f"etl:checkpoint:{source}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def intact(r: redis.Redis) -> bool:
    """False when Redis lost its data (or never had any): rebuild before planning."""
    return bool(r.exists(MARKER))


def key_high_water(r: redis.Redis, source: str) -> int:
    value = r.hget(_key(source), "key")
    return int(value) if value is not None else 0


def sampled_high_water(r: redis.Redis, source: str) -> str:
    """The key mark of a key cut at sampled boundaries: the sealed token of the last key
    committed (runs/bounds.py), "" before the first commit."""
    return _text(r.hget(_key(source), "key_sampled")) or ""


def key_advanced_at(r: redis.Redis, source: str) -> datetime | None:
    """When the key mark (either kind) last moved; None when not known: it never moved, or
    it was rebuilt from the ledger after Redis lost its data."""
    text = _text(r.hget(_key(source), "key_at"))
    return datetime.fromisoformat(text) if text else None


def advance_key(r: redis.Redis, source: str, units: list[Unit], done: set[str],
                updated_to: str | None) -> int | str:
    """Move the key mark over the contiguous prefix of the run's committed ranges.

    Ranges load in parallel and commit in any order; a gap (a range not committed yet, or
    dead-lettered) stops the mark, so a crash or poison range never skips rows. The first
    advance of a source also sets its updated mark to the plan's UPDATED_AT maximum: the
    ranges were read after it, so no later failure can hide an update below the mark.
    """
    if any(u.sampled for u in units if u.kind == "range"):
        return _advance_sampled(r, source, units, done, updated_to)
    mark = start = key_high_water(r, source)
    # In key order: a range split in halves (runs/split.py) is two ranges in its place.
    ranges = sorted((u for u in units if u.kind == "range"), key=lambda u: u.lo)
    if not ranges or ranges[0].lo > mark + 1:
        return mark  # this run's ranges do not start at the mark (an older run, a rebuild)
    for unit in ranges:
        if unit.unit_id not in done:
            break
        mark = max(mark, unit.hi)
    _store_mark(r, source, "key", mark, updated_to, moved=mark != start)
    return mark


def _store_mark(r: redis.Redis, source: str, field: str, mark: int | str,
                updated_to: str | None, moved: bool) -> None:
    with r.pipeline() as p:
        p.hset(_key(source), field, mark)
        if moved:  # when, for `etl sources` (a sampled mark itself is never shown)
            p.hset(_key(source), "key_at", datetime.now(UTC).isoformat(timespec="seconds"))
        if updated_to:
            p.hsetnx(_key(source), "updated", updated_to)
        p.execute()


def _advance_sampled(r: redis.Redis, source: str, units: list[Unit], done: set[str],
                     updated_to: str | None) -> str:
    """advance_key for sampled ranges: they are planned in key order, each starting at the
    token the previous one ends with, the first at the mark; so the mark walks the plan's
    order by token equality, never comparing keys (Python's order is not Firebird's)."""
    mark = start = sampled_high_water(r, source)
    ranges = [u for u in units if u.kind == "range"]
    ends = [u.text_hi for u in ranges]
    if not ranges or mark not in (ranges[0].text_lo, *ends):
        return mark  # this run's ranges do not start at the mark (an older run, --full)
    # From the range after the mark (the run's first, or one after an earlier advance).
    for unit in ranges[ends.index(mark) + 1 if mark in ends else 0:]:
        if unit.unit_id not in done:
            break
        mark = unit.text_hi
    _store_mark(r, source, "key_sampled", mark, updated_to, moved=mark != start)
    return mark


def updated_mark(r: redis.Redis, source: str) -> datetime | None:
    text = _text(r.hget(_key(source), "updated"))
    return datetime.fromisoformat(text) if text else None


def updated_since(r: redis.Redis, source: str, lookback_s: float) -> datetime | None:
    """Where the next UPDATED_AT window starts: the mark minus a look-back, because source
    transactions can commit out of timestamp order. Re-reading costs nothing: loads upsert."""
    mark = updated_mark(r, source)
    return None if mark is None else mark - timedelta(seconds=lookback_s)


def advance_updated(r: redis.Redis, source: str, until_iso: str) -> None:
    """Called when a run ended with every update window committed."""
    current = updated_mark(r, source)
    if current is None or datetime.fromisoformat(until_iso) > current:
        r.hset(_key(source), "updated", until_iso)


def loaded_file_rows(r: redis.Redis, source: str, sha256: str) -> int | None:
    value = r.hget(f"etl:files:{source}", sha256)
    return int(value) if value is not None else None


def loaded_file_count(r: redis.Redis, source: str) -> int:
    """How many files (distinct contents) of a file source are loaded."""
    return int(r.hlen(f"etl:files:{source}"))


def mark_file_loaded(r: redis.Redis, source: str, sha256: str, rows: int) -> None:
    r.hset(f"etl:files:{source}", sha256, rows)


def reset(r: redis.Redis, source: str) -> None:
    """Forget a source's checkpoints (`etl run --full`); the upsert still prevents doubles."""
    r.delete(_key(source), f"etl:files:{source}")


def prefix_mark(ranges: list[tuple[int, int, datetime | None]],
                floor: tuple[int, datetime] | None = None) -> tuple[int, datetime | None]:
    """The key mark and updated mark that committed ranges prove, from the ledger.

    Ranges are planned contiguous from the mark + 1, so the key mark is the end of the union
    of committed ranges that starts at key 1. Each piece of that prefix is current as of the
    newest version that read it whole, or as of `floor` (the key and updated marks the last
    finished run left, which held for every key up to its key mark); the updated mark is the
    oldest of those: a conservative choice that re-reads a little more, never less.
    """
    mark, pieces = 0, []
    for lo, hi, _ in sorted(ranges, key=lambda r: (r[0], r[1])):
        if lo > mark + 1:
            break
        if hi > mark:
            pieces.append((max(lo, mark + 1), hi))
            mark = hi
    if not pieces:
        return 0, None
    newest: list[datetime | None] = []
    for lo, hi in pieces:
        dated = [v for a, b, v in ranges if a <= lo and b >= hi and v is not None]
        if floor is not None and hi <= floor[0]:
            dated.append(floor[1])
        newest.append(max(dated) if dated else None)
    known = [v for v in newest if v is not None]
    return mark, (min(known) if known and len(known) == len(newest) else None)


def sampled_prefix_mark(ranges: list[tuple[str, str, datetime | None]]
                        ) -> tuple[str, datetime | None]:
    """prefix_mark for sampled ranges (lo token, hi token, version; in commit order): the
    chain of committed ranges from the first key, each starting at the token the previous
    one ended with (later commits win a fork, e.g. a --full run's new boundaries)."""
    following: dict[str, tuple[str, datetime | None]] = {}
    for lo, hi, version in ranges:
        following[lo] = (hi, version)
    mark, versions, seen = "", [], set()
    while mark in following and mark not in seen:
        seen.add(mark)
        mark, version = following[mark]
        versions.append(version)
    if not versions or any(v is None for v in versions):
        return mark, None
    return mark, min(v for v in versions if v is not None)


def restore(r: redis.Redis, source: str, key_mark: int, updated: datetime | None,
            files: dict[str, int], sampled_mark: str = "") -> None:
    """Write a source's checkpoints rebuilt from the ledger (replacing what Redis has)."""
    with r.pipeline() as p:
        p.delete(_key(source), f"etl:files:{source}")
        p.hset(_key(source), "key", key_mark)
        if sampled_mark:
            p.hset(_key(source), "key_sampled", sampled_mark)
        if updated is not None:
            p.hset(_key(source), "updated", updated.isoformat())
        if files:
            p.hset(f"etl:files:{source}", mapping=files)  # type: ignore[arg-type]
        p.execute()


def mark_intact(r: redis.Redis) -> None:
    r.set(MARKER, 1)
