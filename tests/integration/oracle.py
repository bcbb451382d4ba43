"""The oracle every fault test shares (../shared/FAULTS.md): count rows independently.

Nothing here reads the pipeline's own counters. Source rows come from Firebird itself, loaded
rows from the target table, quarantined rows from `etl_quarantine` pointers, dead-lettered
rows from the key ranges of open dead letters; what is none of these is lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class World(Protocol):
    def firebird(self, sql: str, params: Sequence[Any] = ...) -> list[tuple[Any, ...]]: ...

    def query(self, sql: str, params: list[Any] | None = ...) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class Tally:
    source: int
    loaded: int
    duplicated: int
    quarantined: int
    dead_lettered: int
    lost: int
    stray: int  # loaded keys the source does not have
    missing_sample: tuple[int, ...]
    recovery_s: float | None

    def line(self, label: str) -> str:
        took = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return (f"oracle {label}: source={self.source} loaded={self.loaded} "
                f"quarantined={self.quarantined} dead_lettered={self.dead_lettered} "
                f"lost={self.lost} duplicated={self.duplicated} stray={self.stray} "
                f"fault_to_end={took}")


def _in_ranges(keys: Iterable[int], ranges: list[tuple[int, int]]) -> set[int]:
    return {k for k in keys if any(lo <= k <= hi for lo, hi in ranges)}


def _has_table(world: World, table: str) -> bool:
    return bool(world.query("SELECT 1 FROM information_schema.tables WHERE table_name = ?",
                            [table]))


def count(world: World, *, fault_at: float | None = None,
          ended_at: float | None = None) -> Tally:
    """The figures of FAULTS.md for the billing source, from Firebird and DuckDB only."""
    source = {int(k) for (k,) in world.firebird("SELECT CLAIM_ID FROM BILLING_CLAIMS")}
    [(stored, distinct)] = world.query(
        "SELECT count(*), count(DISTINCT claim_id) FROM billing_claims")
    loaded = {int(k) for (k,) in world.query("SELECT DISTINCT claim_id FROM billing_claims")}
    refs = world.query("SELECT DISTINCT source_ref FROM etl_quarantine WHERE source = 'billing'")
    quarantined = {int(ref.split("=", 1)[1]) for (ref,) in refs} - loaded
    ranges = [(int(lo), int(hi)) for lo, hi in world.query(
        "SELECT key_lo, key_hi FROM etl_dead_letters WHERE source = 'billing' "
        "AND status = 'open' AND key_lo IS NOT NULL")] if _has_table(world, "etl_dead_letters") \
        else []
    dead = _in_ranges(source - loaded - quarantined, ranges)
    missing = source - loaded - quarantined - dead
    recovery = None
    if fault_at is not None:
        recovery = (ended_at or time.monotonic()) - fault_at
    return Tally(source=len(source), loaded=len(loaded & source), duplicated=stored - distinct,
                 quarantined=len(quarantined & source), dead_lettered=len(dead),
                 lost=len(missing), stray=len(loaded - source),
                 missing_sample=tuple(sorted(missing)[:10]), recovery_s=recovery)


def check(world: World, label: str, *, fault_at: float | None = None,
          ended_at: float | None = None) -> Tally:
    """Print the oracle's line and assert nothing was lost or doubled."""
    tally = count(world, fault_at=fault_at, ended_at=ended_at)
    print(tally.line(label))
    assert tally.lost == 0, f"{tally.line(label)}; missing claims e.g. {tally.missing_sample}"
    assert tally.duplicated == 0, tally.line(label)
    assert tally.stray == 0, tally.line(label)
    return tally


def stale_versions(world: World, claim_ids: Sequence[int]) -> dict[int, tuple[Any, Any]]:
    """Claims whose stored (updated_at, amount, status) differs from Firebird's: id ->
    (source version, stored version). Empty when DuckDB holds the current versions."""
    marks = ", ".join("?" * len(claim_ids))
    source = {int(k): (ts, amount, status.strip()) for k, ts, amount, status in world.firebird(
        f"SELECT CLAIM_ID, UPDATED_AT, AMOUNT, STATUS FROM BILLING_CLAIMS "
        f"WHERE CLAIM_ID IN ({marks})", list(claim_ids))}
    stored = {int(k): (ts, amount, status) for k, ts, amount, status in world.query(
        f"SELECT claim_id, updated_at, amount, status FROM billing_claims "
        f"WHERE claim_id IN ({marks})", list(claim_ids))}
    return {k: (source.get(k), stored.get(k)) for k in claim_ids
            if source.get(k) != stored.get(k)}
