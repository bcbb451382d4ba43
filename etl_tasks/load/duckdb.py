"""The DuckDB store: one transaction per chunk writes rows, quarantined rows and a ledger row.

Only the `load` queue's single worker process opens this file for writing. The ledger, keyed
by chunk id, is what makes redelivery harmless: a chunk already in it is skipped. Rows are
upserted on the dataset's key, the newer version winning, so a re-read never doubles a row.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from etl_tasks.errors import EtlError, FatalError, TransientError


@dataclass(frozen=True)
class TableKey:
    columns: tuple[str, ...]
    version: str | None = None  # newer version wins; None: the later load wins


# The natural key of each dataset: what "no duplicate rows" means for it.
KEYS: dict[str, TableKey] = {
    "billing_claims": TableKey(("claim_id",), "updated_at"),
    # ResultId is unique only within a file (DESIGN.md): another file's result with the same
    # id is a different result unless patient and test match too (then it is a correction).
    "lab_results": TableKey(("result_id", "patient_id", "test_code"), "reported_at"),
    "patient_registrations": TableKey(("mrn", "clinic", "registration_date")),
}

_DDL = [
    """CREATE TABLE IF NOT EXISTS etl_load_ledger (
        chunk_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL, source VARCHAR NOT NULL,
        target_table VARCHAR NOT NULL, rows_loaded BIGINT NOT NULL,
        rows_quarantined BIGINT NOT NULL, rows_unchanged BIGINT NOT NULL,
        loaded_at TIMESTAMPTZ NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS etl_quarantine (
        source VARCHAR NOT NULL, run_id VARCHAR NOT NULL, chunk_id VARCHAR NOT NULL,
        source_ref VARCHAR NOT NULL, reasons VARCHAR NOT NULL, raw VARCHAR,
        quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS etl_runs (
        run_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, status VARCHAR NOT NULL,
        started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, extracted BIGINT, loaded BIGINT,
        quarantined BIGINT, skipped BIGINT, duration_s DOUBLE, quality_score DOUBLE,
        error VARCHAR)""",
    # Stores made before the column existed (0.1.0 development builds).
    "ALTER TABLE etl_load_ledger ADD COLUMN IF NOT EXISTS rows_unchanged BIGINT DEFAULT 0",
]


@dataclass(frozen=True)
class WriteResult:
    loaded: int
    quarantined: int
    already_loaded: bool
    unchanged: int = 0  # valid rows the store already had in the same or a newer version


def connect(path: Path) -> duckdb.DuckDBPyConnection:
    """Open the store for writing and make sure the bookkeeping tables exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path))
        for ddl in _DDL:
            con.execute(ddl)
    except Exception as exc:
        raise classify(exc) from exc
    return con


def ensure_table(con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema) -> None:
    empty = schema.empty_table()  # noqa: F841 - read by DuckDB's replacement scan below
    con.execute(f"""CREATE TABLE IF NOT EXISTS {table} AS SELECT *,
        CAST(NULL AS VARCHAR) AS _run_id, CAST(NULL AS VARCHAR) AS _chunk_id,
        CAST(NULL AS TIMESTAMPTZ) AS _loaded_at FROM empty WHERE false""")


def write_chunk(con: duckdb.DuckDBPyConnection, *, source: str, table: str, dataset: str,
                run_id: str, chunk_id: str, valid: pa.Table,
                quarantined: pa.Table) -> WriteResult:
    """Commit one chunk atomically, or do nothing when its ledger row already exists."""
    key = KEYS[dataset]
    try:
        con.begin()
        if con.execute("SELECT 1 FROM etl_load_ledger WHERE chunk_id = ?",
                       [chunk_id]).fetchone():
            con.rollback()
            return WriteResult(0, 0, already_loaded=True)
        ensure_table(con, table, valid.schema)
        con.register("incoming", valid)
        con.register("incoming_q", quarantined)
        match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM i.{c}" for c in key.columns)
        # Strictly newer: a re-read of the same version is left alone and counted unchanged.
        newer = f" AND i.{key.version} > t.{key.version}" if key.version else ""
        # Upsert: drop the stored versions this chunk supersedes, then insert what is new.
        con.execute(f"DELETE FROM {table} t USING incoming i WHERE {match}{newer}")
        cols = ", ".join(f"i.{name}" for name in valid.schema.names)
        inserted = con.execute(
            f"INSERT INTO {table} SELECT {cols}, ?, ?, now() FROM incoming i "
            f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {match})",
            [run_id, chunk_id]).fetchone()
        # A row re-read in the same state (backfill, --full) is not quarantined twice.
        held = con.execute(
            "INSERT INTO etl_quarantine SELECT ?, ?, ?, source_ref, reasons, raw, now() "
            "FROM incoming_q i WHERE NOT EXISTS (SELECT 1 FROM etl_quarantine q WHERE "
            "q.source = ? AND q.source_ref = i.source_ref AND q.raw IS NOT DISTINCT FROM i.raw)",
            [source, run_id, chunk_id, source]).fetchone()
        loaded = int(inserted[0]) if inserted else 0
        held_count = int(held[0]) if held else 0
        unchanged = valid.num_rows - loaded + quarantined.num_rows - held_count
        con.execute("INSERT INTO etl_load_ledger (chunk_id, run_id, source, target_table, "
                    "rows_loaded, rows_quarantined, rows_unchanged, loaded_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, now())",
                    [chunk_id, run_id, source, table, loaded, held_count, unchanged])
        con.commit()
    except Exception as exc:
        _rollback_quietly(con)
        raise classify(exc) from exc
    finally:
        for name in ("incoming", "incoming_q"):
            _unregister_quietly(con, name)
    return WriteResult(loaded, held_count, already_loaded=False, unchanged=unchanged)


def ledger_rows(con: duckdb.DuckDBPyConnection, chunk_ids: list[str]) -> dict[str, Any]:
    """Ledger entries: chunk id -> (run_id, rows_loaded, rows_quarantined, rows_unchanged)."""
    if not chunk_ids:
        return {}
    ids = pa.table({"chunk_id": pa.array(chunk_ids, pa.string())})  # noqa: F841 - scanned
    rows = con.execute("SELECT l.chunk_id, run_id, rows_loaded, rows_quarantined, "
                       "rows_unchanged FROM etl_load_ledger l JOIN ids USING (chunk_id)"
                       ).fetchall()
    return {row[0]: row[1:] for row in rows}


def record_run(con: duckdb.DuckDBPyConnection, summary: dict[str, Any],
               started_at: float, finished_at: float) -> None:
    """Write the run's metrics row (idempotent on run id)."""
    con.execute(
        "INSERT OR REPLACE INTO etl_runs VALUES (?, ?, ?, to_timestamp(?), to_timestamp(?), "
        "?, ?, ?, ?, ?, ?, ?)",
        [summary["run_id"], summary["source"], summary["status"], started_at, finished_at,
         summary["extracted"], summary["loaded"], summary["quarantined"], summary["skipped"],
         summary["duration_s"], summary["quality_score"],
         json.dumps(summary.get("error")) if summary.get("error") else None])


def classify(exc: BaseException) -> EtlError:
    """DuckDB lock and IO errors are transient (another process holds the file); the rest fatal."""
    if isinstance(exc, EtlError):
        return exc
    if isinstance(exc, duckdb.IOException | duckdb.TransactionException):
        return TransientError(f"DuckDB unavailable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); will retry", source="duckdb")
    return FatalError(f"DuckDB error {type(exc).__name__}: {str(exc).splitlines()[0]}",
                      source="duckdb")


def _rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # no transaction open: nothing to undo
        con.rollback()


def _unregister_quietly(con: duckdb.DuckDBPyConnection, name: str) -> None:
    with contextlib.suppress(duckdb.Error):
        con.unregister(name)
