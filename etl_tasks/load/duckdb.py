"""The DuckDB store: one transaction per chunk writes rows, quarantined rows and a ledger row.

Only the `load` queue's single worker process opens this file for writing. The ledger, keyed
by chunk id, is what makes redelivery harmless: a chunk already in it is skipped. Rows are
upserted on the dataset's key, the newer version winning, so a re-read never doubles a row.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from etl_tasks import datasets
from etl_tasks.datasets import TableKey
from etl_tasks.errors import EtlError, FatalError, TransientError
from etl_tasks.load import evolve
from etl_tasks.load import fence as fencing
from etl_tasks.load.fence import WriterFence

# The natural key of each built-in dataset: what "no duplicate rows" means for it. Declared
# and generic datasets have theirs in the pipeline config (datasets.table_key).
KEYS: dict[str, TableKey] = {name: datasets.table_key(name) for name in datasets.BUILTIN}

_DDL = [
    # One row per committed chunk of a run. Keyed by run and chunk: a redelivery within a run
    # is a no-op, while a later run re-reading the same range loads what changed (the upsert
    # keeps it from doubling). The unit columns let checkpoints be rebuilt from the ledger.
    """CREATE TABLE IF NOT EXISTS etl_load_ledger (
        run_id VARCHAR NOT NULL, chunk_id VARCHAR NOT NULL, source VARCHAR NOT NULL,
        target_table VARCHAR NOT NULL, rows_loaded BIGINT NOT NULL,
        rows_quarantined BIGINT NOT NULL, rows_unchanged BIGINT NOT NULL,
        unit_id VARCHAR, kind VARCHAR, key_lo BIGINT, key_hi BIGINT, file_sha256 VARCHAR,
        unit_chunks INTEGER, source_version TIMESTAMP,
        loaded_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (run_id, chunk_id))""",
    """CREATE TABLE IF NOT EXISTS etl_quarantine (
        source VARCHAR NOT NULL, run_id VARCHAR NOT NULL, chunk_id VARCHAR NOT NULL,
        source_ref VARCHAR NOT NULL, reasons VARCHAR NOT NULL, raw VARCHAR,
        quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS etl_runs (
        run_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, status VARCHAR NOT NULL,
        started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, extracted BIGINT, loaded BIGINT,
        quarantined BIGINT, skipped BIGINT, duration_s DOUBLE, quality_score DOUBLE,
        error VARCHAR)""",
    "ALTER TABLE etl_runs ADD COLUMN IF NOT EXISTS dead_lettered BIGINT DEFAULT 0",
    # The source's checkpoints when the run ended: what a rebuild may start from.
    "ALTER TABLE etl_runs ADD COLUMN IF NOT EXISTS key_mark BIGINT",
    "ALTER TABLE etl_runs ADD COLUMN IF NOT EXISTS updated_mark TIMESTAMP",
    # Run metrics (issue "See it run"): seconds per stage summed over its steps, the source's
    # latency (plan start to first rows), failed step attempts by error class and their rate.
    *(f"ALTER TABLE etl_runs ADD COLUMN IF NOT EXISTS {c} DOUBLE" for c in (
        "plan_s", "extract_s", "transform_s", "load_s", "source_latency_s", "error_rate")),
    "ALTER TABLE etl_runs ADD COLUMN IF NOT EXISTS errors_by_class VARCHAR",
    """CREATE TABLE IF NOT EXISTS etl_dead_letters (
        dead_letter_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL, source VARCHAR NOT NULL,
        stage VARCHAR NOT NULL, item_id VARCHAR NOT NULL, unit_id VARCHAR NOT NULL,
        kind VARCHAR NOT NULL, key_lo BIGINT, key_hi BIGINT, since VARCHAR, until VARCHAR,
        path VARCHAR, sha256 VARCHAR, pointer VARCHAR NOT NULL, reason VARCHAR NOT NULL,
        attempts INTEGER NOT NULL, status VARCHAR NOT NULL, created_at TIMESTAMPTZ NOT NULL,
        resolved_at TIMESTAMPTZ, resolved_by VARCHAR)""",
    # The single writer (load/fence.py): the highest writer token that committed here, and
    # the token each chunk was committed with.
    fencing.TABLE_DDL,
    "ALTER TABLE etl_load_ledger ADD COLUMN IF NOT EXISTS writer_fence BIGINT",
    # Key ranges cut at sampled boundaries (keys that are not integers): their bounds as
    # sealed tokens, from which the key mark is rebuilt without a key in clear.
    "ALTER TABLE etl_load_ledger ADD COLUMN IF NOT EXISTS key_text_lo VARCHAR",
    "ALTER TABLE etl_load_ledger ADD COLUMN IF NOT EXISTS key_text_hi VARCHAR",
    "ALTER TABLE etl_dead_letters ADD COLUMN IF NOT EXISTS sampled BOOLEAN",
    "ALTER TABLE etl_dead_letters ADD COLUMN IF NOT EXISTS text_lo VARCHAR",
    "ALTER TABLE etl_dead_letters ADD COLUMN IF NOT EXISTS text_hi VARCHAR",
]
_DEAD_LETTER_COLUMNS = ("dead_letter_id", "run_id", "source", "stage", "item", "unit_id", "kind",
                        "key_lo", "key_hi", "since", "until", "path", "sha256", "pointer",
                        "reason", "attempts", "sampled", "text_lo", "text_hi")


# The run id of the ledger rows of `etl quarantine replay` (load/quarantine.py): rows that
# passed the rules later. Not a run of the pipeline: never recorded in etl_runs.
REPLAY_RUN_ID = "quarantine-replay"


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger row of a chunk records besides its counts: which work it was."""

    run_id: str
    chunk_id: str
    unit_id: str
    kind: str
    key_lo: int | None = None
    key_hi: int | None = None
    file_sha256: str | None = None
    unit_chunks: int = 1
    source_version: str | None = None  # the source's max UPDATED_AT when the run was planned
    key_text_lo: str | None = None  # a sampled key range's bounds, sealed (runs/bounds.py)
    key_text_hi: str | None = None


@dataclass(frozen=True)
class WriteResult:
    loaded: int
    quarantined: int
    already_loaded: bool
    unchanged: int = 0  # valid rows the store already had in the same or a newer version


def connect(path: Path, memory_mb: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open the store for writing and make sure the bookkeeping tables exist; `memory_mb`
    bounds DuckDB's memory (None: DuckDB's default, most of the machine's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path), config=(
            {"memory_limit": f"{memory_mb}MB"} if memory_mb else {}))
        _migrate(con)
        for ddl in _DDL:
            con.execute(ddl)
    except Exception as exc:
        raise classify(exc) from exc
    return con


@contextlib.contextmanager
def read_only(path: Path, wait_s: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the store for reading (operators, `etl reconcile`), waiting while the loader
    holds the file for a commit (DuckDB lets no other process open it meanwhile)."""
    if not path.exists():
        raise FatalError(f"no DuckDB store at {path} yet (set ETL_DUCKDB_PATH, or run a source "
                         "first)", source="duckdb")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=True)
            break
        except duckdb.IOException as exc:
            if time.monotonic() > deadline:
                raise TransientError(f"DuckDB store {path} stayed locked by its writer for "
                                     f"{wait_s:.0f}s; try again", source="duckdb") from exc
            time.sleep(0.02)  # the loader leaves the file for a moment (load/kept.py)
    try:
        yield con
    finally:
        con.close()


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    # 0.1.0 development builds keyed the ledger by chunk id alone; keep that table aside
    # (nothing is deleted) and start the run-scoped ledger beside it.
    old = con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                      "'etl_load_ledger' AND column_name = 'chunk_id'").fetchone()
    new = con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                      "'etl_load_ledger' AND column_name = 'unit_id'").fetchone()
    if old and old[0] and not (new and new[0]):
        con.execute("ALTER TABLE etl_load_ledger RENAME TO etl_load_ledger_v1")


def ensure_table(con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema,
                 source: str = "") -> None:
    """Create the target table for chunks of `schema`, or add the columns it lacks; a
    dropped or retyped column raises evolve.SchemaChanged (load/evolve.py)."""
    evolve.ensure_table(con, table, schema, source)


def write_chunk(con: duckdb.DuckDBPyConnection, *, source: str, table: str, dataset: str,
                entry: LedgerEntry, valid: pa.Table, quarantined: pa.Table,
                fault: Callable[[str], None] = lambda _: None,
                also: Callable[[duckdb.DuckDBPyConnection], None] = lambda _: None,
                fence: WriterFence | None = None, ledger: bool = True) -> WriteResult:
    """Commit one chunk atomically, or do nothing when its ledger row already exists.

    `fault` is called at the `before_commit` and `after_commit` windows (fault points);
    `also` runs in the chunk's transaction (the quarantine replay releases its rows there);
    `fence` (the loader's; None only outside workers) is sealed right before the COMMIT.
    `ledger=False` (ETL_RESILIENCE=off, benchmarks only) neither checks nor writes the ledger.
    """
    key = datasets.table_key(dataset)
    run_id, chunk_id = entry.run_id, entry.chunk_id
    try:
        con.begin()
        if ledger and con.execute("SELECT 1 FROM etl_load_ledger WHERE run_id = ? AND "
                                  "chunk_id = ?", [run_id, chunk_id]).fetchone():
            con.rollback()
            return WriteResult(0, 0, already_loaded=True)
        ensure_table(con, table, valid.schema, source)
        con.register("incoming", valid)
        con.register("incoming_q", quarantined)
        # No natural key (a table read whole each run): the row itself is its key.
        columns = key.columns or tuple(n for n in valid.schema.names if n != "source_ref")
        match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM i.{c}" for c in columns)
        # Strictly newer: a re-read of the same version is left alone and counted unchanged.
        newer = f" AND i.{key.version} > t.{key.version}" if key.version else ""
        # Upsert: drop the stored versions this chunk supersedes, then insert what is new.
        # (Without a key a stored row equal to an incoming one is that row: it stays.)
        if key.columns:
            con.execute(f"DELETE FROM {table} t USING incoming i WHERE {match}{newer}")
        names, values = evolve.insert_columns(con, valid.schema)
        # Without a key, a row repeated within the chunk is the same row: stored once.
        distinct = "" if key.columns else "DISTINCT "
        inserted = con.execute(
            f"INSERT INTO {table} ({names}, _run_id, _chunk_id, _loaded_at) SELECT {distinct}"
            f"{values}, ?, ?, now() FROM incoming i WHERE NOT EXISTS (SELECT 1 FROM {table} t "
            f"WHERE {match})",
            [run_id, chunk_id]).fetchone()
        # A row re-read in the same state (backfill, --full) is not quarantined twice. Once
        # its raw values were purged (retention), the same pointer with the same reasons is
        # taken as the same row: otherwise every re-read after a purge would add a copy.
        held = con.execute(
            "INSERT INTO etl_quarantine SELECT ?, ?, ?, source_ref, reasons, raw, now() "
            "FROM incoming_q i WHERE NOT EXISTS (SELECT 1 FROM etl_quarantine q WHERE "
            "q.source = ? AND q.source_ref = i.source_ref AND (q.raw IS NOT DISTINCT FROM i.raw "
            "OR (q.raw IS NULL AND q.reasons = i.reasons)))",
            [source, run_id, chunk_id, source]).fetchone()
        loaded = int(inserted[0]) if inserted else 0
        held_count = int(held[0]) if held else 0
        unchanged = valid.num_rows - loaded + quarantined.num_rows - held_count
        if ledger:
            con.execute(
                "INSERT INTO etl_load_ledger (run_id, chunk_id, source, target_table, "
                "rows_loaded, rows_quarantined, rows_unchanged, unit_id, kind, key_lo, key_hi, "
                "file_sha256, unit_chunks, source_version, writer_fence, key_text_lo, "
                "key_text_hi, loaded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                [run_id, chunk_id, source, table, loaded, held_count, unchanged,
                 entry.unit_id, entry.kind, entry.key_lo, entry.key_hi, entry.file_sha256,
                 entry.unit_chunks, entry.source_version, fence.token if fence else None,
                 entry.key_text_lo, entry.key_text_hi])
        also(con)
        fault("before_commit")
        # After the fault point: a loader held there (paused) and resumed after another took
        # over is refused here, with everything above rolled back.
        if fence is not None:
            fence.seal(con)
        con.commit()
        fault("after_commit")
    except Exception as exc:
        _rollback_quietly(con)
        raise classify(exc) from exc
    finally:
        for name in ("incoming", "incoming_q"):
            _unregister_quietly(con, name)
    return WriteResult(loaded, held_count, already_loaded=False, unchanged=unchanged)


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection,
                fence: WriterFence | None) -> Iterator[duckdb.DuckDBPyConnection]:
    """One fenced transaction around writes that have none of their own (run records, dead
    letters, purges): sealed before its COMMIT, rolled back on any error."""
    try:
        con.begin()
        yield con
        if fence is not None:
            fence.seal(con)
        con.commit()
    except Exception as exc:
        _rollback_quietly(con)
        raise classify(exc) from exc


def ledger_counts(con: duckdb.DuckDBPyConnection, run_id: str,
                  chunk_id: str) -> tuple[int, int, int] | None:
    """(rows_loaded, rows_quarantined, rows_unchanged) of a committed chunk, else None."""
    row = con.execute("SELECT rows_loaded, rows_quarantined, rows_unchanged FROM "
                      "etl_load_ledger WHERE run_id = ? AND chunk_id = ?",
                      [run_id, chunk_id]).fetchone()
    return None if row is None else (int(row[0]), int(row[1]), int(row[2]))


def ledger_rows(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, tuple[int, int, int]]:
    """A run's ledger: chunk id -> (rows_loaded, rows_quarantined, rows_unchanged)."""
    rows = con.execute("SELECT chunk_id, rows_loaded, rows_quarantined, rows_unchanged "
                       "FROM etl_load_ledger WHERE run_id = ?", [run_id]).fetchall()
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in rows}


def record_run(con: duckdb.DuckDBPyConnection, summary: dict[str, Any],
               started_at: float, finished_at: float, key_mark: int | None = None,
               updated_mark: datetime | None = None,
               metrics: dict[str, Any] | None = None) -> None:
    """Write the run's metrics row (idempotent on run id), with the checkpoints it left and
    its metrics (`runs.state.metrics`: seconds per stage, errors by class, latency)."""
    metrics = metrics or {}
    stage_s = metrics.get("stage_s", {})
    con.execute(
        "INSERT OR REPLACE INTO etl_runs (run_id, source, status, started_at, finished_at, "
        "extracted, loaded, quarantined, skipped, duration_s, quality_score, error, "
        "dead_lettered, key_mark, updated_mark, plan_s, extract_s, transform_s, load_s, "
        "source_latency_s, error_rate, errors_by_class) VALUES (?, ?, ?, to_timestamp(?), "
        "to_timestamp(?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [summary["run_id"], summary["source"], summary["status"], started_at, finished_at,
         summary["extracted"], summary["loaded"], summary["quarantined"], summary["skipped"],
         summary["duration_s"], summary["quality_score"], summary.get("error"),
         summary.get("dead_lettered", 0), key_mark, updated_mark,
         *(stage_s.get(s) for s in ("plan", "extract", "transform", "load")),
         metrics.get("source_latency_s"), metrics.get("error_rate"),
         json.dumps(metrics.get("errors_by_class") or {}, sort_keys=True)])


def last_marks(con: duckdb.DuckDBPyConnection, source: str) -> tuple[int, datetime] | None:
    """The key and updated marks the latest ended run of `source` left, if any."""
    row = con.execute("SELECT key_mark, updated_mark FROM etl_runs WHERE source = ? AND "
                      "key_mark IS NOT NULL AND updated_mark IS NOT NULL "
                      "ORDER BY finished_at DESC LIMIT 1", [source]).fetchone()
    return (int(row[0]), row[1]) if row else None


def purge_quarantine_raw(con: duckdb.DuckDBPyConnection, older_than_days: float) -> int:
    """Drop the raw values (patient data) of quarantined rows older than this; the rows, their
    reasons and source pointers stay, so every count still reconciles."""
    row = con.execute(
        "UPDATE etl_quarantine SET raw = NULL WHERE raw IS NOT NULL AND quarantined_at < "
        "now() - to_seconds(CAST(? AS DOUBLE))", [older_than_days * 86400]).fetchone()
    return int(row[0]) if row else 0


def record_dead_letters(con: duckdb.DuckDBPyConnection, entries: list[dict[str, Any]]) -> None:
    """Keep a run's dead letters durably (idempotent on their ids)."""
    for e in entries:
        con.execute(
            "INSERT OR IGNORE INTO etl_dead_letters (dead_letter_id, run_id, source, stage, "
            "item_id, unit_id, kind, key_lo, key_hi, since, until, path, sha256, pointer, "
            "reason, attempts, sampled, text_lo, text_hi, status, created_at) VALUES (?, ?, ?, "
            "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', to_timestamp(?))",
            [e.get(c) for c in _DEAD_LETTER_COLUMNS] + [e["created_at"]])


def resolve_dead_letters(con: duckdb.DuckDBPyConnection, ids: list[str], run_id: str) -> None:
    for dead_letter_id in ids:
        con.execute("UPDATE etl_dead_letters SET status = 'resolved', resolved_at = now(), "
                    "resolved_by = ? WHERE dead_letter_id = ? AND status = 'open'",
                    [run_id, dead_letter_id])


def dead_letters(con: duckdb.DuckDBPyConnection, source: str | None = None,
                 status: str | None = "open") -> list[dict[str, Any]]:
    """Dead letters as dicts (the shape `etl dead-letters --json` prints), newest first."""
    where, params = [], []
    if source:
        where.append("source = ?")
        params.append(source)
    if status:
        where.append("status = ?")
        params.append(status)
    cur = con.execute(
        "SELECT dead_letter_id, run_id, source, stage, item_id AS item, unit_id, kind, key_lo, "
        "key_hi, since, until, path, sha256, pointer, reason, attempts, sampled, text_lo, "
        "text_hi, status, "
        "epoch(created_at) AS created_at, resolved_by FROM etl_dead_letters"
        + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created_at DESC",
        params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def committed_ranges(con: duckdb.DuckDBPyConnection,
                     source: str) -> list[tuple[int, int, datetime | None]]:
    """Key ranges fully read and committed for `source`: (lo, hi, source version)."""
    rows = con.execute("SELECT key_lo, key_hi, source_version FROM etl_load_ledger WHERE "
                       "source = ? AND kind = 'range' AND key_lo IS NOT NULL ORDER BY key_lo",
                       [source]).fetchall()
    return [(int(lo), int(hi), version) for lo, hi, version in rows]


def committed_sampled_ranges(con: duckdb.DuckDBPyConnection, source: str
                             ) -> list[tuple[str, str, datetime | None]]:
    """Sampled key ranges committed for `source`, in commit order: (lo token, hi token,
    source version); "" is no bound."""
    rows = con.execute("SELECT key_text_lo, key_text_hi, source_version FROM etl_load_ledger "
                       "WHERE source = ? AND kind = 'range' AND key_text_hi IS NOT NULL "
                       "ORDER BY loaded_at", [source]).fetchall()
    return [(lo or "", hi, version) for lo, hi, version in rows]


def loaded_files(con: duckdb.DuckDBPyConnection, source: str) -> dict[str, int]:
    """Content hashes of files some run committed whole, with their rows."""
    rows = con.execute(
        "SELECT file_sha256, max(total) FROM (SELECT run_id, file_sha256, count(*) AS chunks, "
        "max(unit_chunks) AS expected, sum(rows_loaded + rows_quarantined + rows_unchanged) "
        "AS total FROM etl_load_ledger WHERE source = ? AND kind = 'file' "
        "GROUP BY run_id, file_sha256) WHERE chunks >= expected GROUP BY file_sha256",
        [source]).fetchall()
    return {sha: int(total) for sha, total in rows}


def runs_without_record(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(run_id, source) of runs that committed chunks but were never recorded as ended."""
    return [(str(a), str(b)) for a, b in con.execute(
        "SELECT DISTINCT l.run_id, l.source FROM etl_load_ledger l "
        "LEFT JOIN etl_runs r USING (run_id) WHERE r.run_id IS NULL AND l.run_id <> ?",
        [REPLAY_RUN_ID]).fetchall()]


def classify(exc: BaseException) -> EtlError:
    """DuckDB lock and IO errors are transient (another process holds the file); the rest fatal."""
    if isinstance(exc, EtlError):
        return exc
    if isinstance(exc, duckdb.IOException | duckdb.TransactionException):
        return TransientError(f"DuckDB unavailable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); will retry", source="duckdb")
    if isinstance(exc, duckdb.CatalogException):  # a missing table or column: names only
        return FatalError(f"DuckDB error {type(exc).__name__}: {str(exc).splitlines()[0]}",
                          source="duckdb")
    # A constraint or conversion error quotes the row's value ('Duplicate key "mrn: ..."').
    return FatalError(f"DuckDB error {type(exc).__name__} (its message is withheld: it may "
                      "quote a value)", source="duckdb")


def _rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # no transaction open: nothing to undo
        con.rollback()


def _unregister_quietly(con: duckdb.DuckDBPyConnection, name: str) -> None:
    with contextlib.suppress(duckdb.Error):
        con.unregister(name)
