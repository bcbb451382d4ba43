"""Replay: drain the SQLite fallback, then the spool, back into DuckDB, in commit order.

Runs on the loader (beat sends `etl.load.replay` every `ETL_REPLAY_EVERY_S`), only when
DuckDB opens. Each chunk goes through DuckDB's ledger (`write_chunk` is idempotent on run
and chunk), and is deleted from its fallback only after DuckDB committed it: a loader killed
between the two finds the chunk in DuckDB's ledger next time and only deletes it. Run-side
records (a run's row, its dead letters) are applied after the chunks. Every DuckDB and SQLite
transaction is sealed with the loader's writer fence (load/fence.py); deleting a spooled file
is not (it only forgets what DuckDB committed under the fence).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import duckdb

from etl_tasks import faults
from etl_tasks.load import duckdb as primary
from etl_tasks.load import spool
from etl_tasks.load import sqlite as fallback
from etl_tasks.load.duckdb import LedgerEntry
from etl_tasks.load.writer import StoreChain
from etl_tasks.monitoring.alerts import alert

log = logging.getLogger(__name__)


@dataclass
class Replayed:
    """What one replay moved (ids and counts only)."""

    chunks: int = 0
    rows: int = 0
    records: int = 0
    skipped: str | None = None  # why nothing was tried
    by_store: dict[str, int] = field(default_factory=dict)


def anything_waiting(chain: StoreChain) -> bool:
    """Cheap check first: most of the time there is nothing to replay."""
    s = chain.settings
    return bool(spool.pending(s.spool_path) or spool.records(s.spool_path)) or (
        s.fallback_path.exists() and fallback.waiting(s.fallback_path)["chunks"] > 0) or (
        s.fallback_path.exists() and bool(_sqlite_records(chain)))


def _sqlite_records(chain: StoreChain) -> list[tuple[int, str, dict[str, Any]]]:
    lite = chain.sqlite()
    return fallback.records(lite) if lite is not None else []


def replay(chain: StoreChain) -> Replayed:
    done = Replayed()
    if not anything_waiting(chain):
        return done
    con = chain.primary()
    if con is None:
        done.skipped = f"DuckDB unavailable: {chain.unavailable.get('duckdb')}"
        return done
    lite = chain.sqlite() if chain.settings.fallback_path.exists() else None
    if lite is not None:
        for item in fallback.pending(lite):
            entry, valid, quarantined = fallback.read_chunk(lite, item["seq"])
            _commit(chain, con, item["source"], item["target_table"], item["dataset"], entry,
                    valid, quarantined)
            fallback.delete_chunk(lite, item["seq"], chain.fence)
            done.chunks += 1
            done.rows += valid.num_rows + quarantined.num_rows
            done.by_store["sqlite"] = done.by_store.get("sqlite", 0) + 1
    for folder in spool.pending(chain.settings.spool_path):
        meta, valid, quarantined = spool.read_chunk(folder)
        _commit(chain, con, meta["source"], meta["target_table"], meta["dataset"],
                LedgerEntry(**meta["entry"]), valid, quarantined)
        spool.delete_chunk(folder)
        done.chunks += 1
        done.rows += valid.num_rows + quarantined.num_rows
        done.by_store["spool"] = done.by_store.get("spool", 0) + 1
    if lite is not None:
        for seq, kind, payload in fallback.records(lite):
            with primary.transaction(con, chain.fence):
                apply_record(con, kind, payload)
            fallback.delete_record(lite, seq, chain.fence)
            done.records += 1
    for path, kind, payload in spool.records(chain.settings.spool_path):
        with primary.transaction(con, chain.fence):
            apply_record(con, kind, payload)
        path.unlink()
        done.records += 1
    if done.chunks or done.records:
        alert("info", f"replayed {done.chunks} chunk(s), {done.rows} row(s) and "
                            f"{done.records} record(s) from the fallbacks into DuckDB")
    return done


def _commit(chain: StoreChain, con: duckdb.DuckDBPyConnection, source: str, table: str,
            dataset: str, entry: LedgerEntry, valid: Any, quarantined: Any) -> None:
    # write_chunk finds a chunk an earlier replay committed (and died before deleting) in
    # its ledger and does nothing: the replay is idempotent through it.
    primary.write_chunk(
        con, source=source, table=table, dataset=dataset, entry=entry, valid=valid,
        quarantined=quarantined, fence=chain.fence,
        fault=lambda point: faults.fault_point("replay", entry.chunk_id, chain.redis)
        if point == "after_commit" else None)


def apply_record(con: duckdb.DuckDBPyConnection, kind: str, payload: dict[str, Any]) -> None:
    """Apply a run-side record to DuckDB (each kind is idempotent)."""
    if kind == "run":
        primary.record_run(con, payload["summary"], payload["started_at"],
                           payload["finished_at"], payload.get("key_mark"),
                           payload.get("updated_mark"), payload.get("metrics"))
    elif kind == "dead_letters":
        primary.record_dead_letters(con, payload["entries"])
    elif kind == "resolve":
        primary.resolve_dead_letters(con, payload["ids"], payload["run_id"])
    else:
        log.error("unknown fallback record kind %s; left in place", kind)
