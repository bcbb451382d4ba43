"""The SQLite fallback store: where chunks commit while DuckDB is unavailable.

A real store, not a queue: the same tables as DuckDB (the target tables, `etl_quarantine`,
and a ledger, `fallback_ledger`), each chunk's rows, quarantined rows and ledger row in one
transaction (WAL, `synchronous=FULL`, `BEGIN IMMEDIATE`, a busy timeout), so that the read
path can answer from it. SQLite has fewer types than Arrow: decimals, dates and timestamps
are stored as text, and the ledger keeps each chunk's Arrow schema so that the replay casts
them back exactly. Replay (`load/replay.py`) moves chunks to DuckDB in commit order and
deletes them here only after DuckDB committed them.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from etl_tasks.errors import EtlError, FatalError, TransientError
from etl_tasks.load import fence as fencing
from etl_tasks.load.duckdb import LedgerEntry, WriteResult
from etl_tasks.load.fence import WriterFence

_DDL = [
    """CREATE TABLE IF NOT EXISTS fallback_ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, chunk_id TEXT NOT NULL,
        source TEXT NOT NULL, target_table TEXT NOT NULL, dataset TEXT NOT NULL,
        entry TEXT NOT NULL, valid_schema BLOB NOT NULL, quarantine_schema BLOB NOT NULL,
        rows_valid INTEGER NOT NULL, rows_quarantined INTEGER NOT NULL,
        committed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
        UNIQUE (run_id, chunk_id))""",
    # Durable records of the run side (a run's row, its dead letters) made while DuckDB was
    # down; replayed like chunks.
    """CREATE TABLE IF NOT EXISTS fallback_records (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload TEXT NOT NULL)""",
    fencing.TABLE_DDL,  # a stale loader must not write the fallback either (load/fence.py)
]


def connect(path: Path, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """Open the fallback store (made on first use); durable settings on every connection."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        for ddl in _DDL:
            con.execute(ddl)
    except (sqlite3.Error, OSError) as exc:
        raise classify(exc) from exc
    return con


def _schema_bytes(schema: pa.Schema) -> bytes:
    return bytes(schema.serialize())


def _schema(data: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(data))


def _column_type(field: pa.Field) -> str:
    if (pa.types.is_integer(field.type) or pa.types.is_boolean(field.type)
            or pa.types.is_time(field.type)):  # a time of day as its microseconds
        return "INTEGER"
    if pa.types.is_floating(field.type):
        return "REAL"
    return "TEXT"


def _storable(table: pa.Table) -> pa.Table:
    """Columns SQLite stores as they are, or as text (decimals, dates, timestamps), or a time
    of day as its microseconds (Arrow reads no time back from text)."""
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        kept = (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
                or pa.types.is_boolean(field.type) or pa.types.is_string(field.type))
        stored = pa.int64() if pa.types.is_time(field.type) else pa.string()
        columns.append(column if kept else pc.cast(column, stored))
    return pa.table(columns, names=table.schema.names)


def _ensure(con: sqlite3.Connection, table: str, schema: pa.Schema) -> None:
    cols = ", ".join(f'"{f.name}" {_column_type(f)}' for f in schema)
    con.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ({cols}, _run_id TEXT, _chunk_id TEXT)')


@dataclass
class _Transaction:
    cancelled: bool = False

    def cancel(self) -> None:
        """Nothing to write after all: roll back instead of committing."""
        self.cancelled = True


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection, fence: WriterFence | None,
                 fault: Callable[[str], None] = lambda _: None) -> Iterator[_Transaction]:
    """BEGIN IMMEDIATE (this writer alone until the end), sealed right before COMMIT."""
    tx = _Transaction()
    try:
        con.execute("BEGIN IMMEDIATE")
        yield tx
        if tx.cancelled:
            con.execute("ROLLBACK")
            return
        fault("before_commit")
        if fence is not None:
            fence.seal(con)
        con.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error | OSError | EtlError):
            raise classify(exc) from exc
        raise


def write_chunk(con: sqlite3.Connection, *, source: str, table: str, dataset: str,
                entry: LedgerEntry, valid: pa.Table, quarantined: pa.Table,
                fault: Callable[[str], None] = lambda _: None,
                fence: WriterFence | None = None) -> WriteResult:
    """Commit one chunk here in one transaction, or nothing when it is here already."""
    with _transaction(con, fence, fault) as tx:
        if con.execute("SELECT 1 FROM fallback_ledger WHERE run_id = ? AND chunk_id = ?",
                       (entry.run_id, entry.chunk_id)).fetchone():
            tx.cancel()
        else:
            _insert_chunk(con, source, table, dataset, entry, valid, quarantined)
    if tx.cancelled:
        return WriteResult(0, 0, already_loaded=True)
    return WriteResult(valid.num_rows, quarantined.num_rows, already_loaded=False)


def _insert_chunk(con: sqlite3.Connection, source: str, table: str, dataset: str,
                  entry: LedgerEntry, valid: pa.Table, quarantined: pa.Table) -> None:
    for name, rows in ((table, valid), ("etl_quarantine", quarantined)):
        _ensure(con, name, rows.schema)
        stored = _storable(rows)
        marks = ", ".join("?" * (rows.num_columns + 2))
        values = zip(*(c.to_pylist() for c in stored.columns), strict=True)
        con.executemany(f'INSERT INTO "{name}" VALUES ({marks})',
                        ((*v, entry.run_id, entry.chunk_id) for v in values))
    con.execute(
        "INSERT INTO fallback_ledger (run_id, chunk_id, source, target_table, dataset, "
        "entry, valid_schema, quarantine_schema, rows_valid, rows_quarantined) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (entry.run_id, entry.chunk_id, source, table, dataset, json.dumps(asdict(entry)),
         _schema_bytes(valid.schema), _schema_bytes(quarantined.schema), valid.num_rows,
         quarantined.num_rows))


def committed_counts(con: sqlite3.Connection, run_id: str,
                     chunk_id: str) -> tuple[int, int] | None:
    """(valid rows, quarantined rows) of a chunk committed here, else None."""
    row = con.execute("SELECT rows_valid, rows_quarantined FROM fallback_ledger WHERE "
                      "run_id = ? AND chunk_id = ?", (run_id, chunk_id)).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def pending(con: sqlite3.Connection) -> list[dict[str, Any]]:
    """Chunks waiting for DuckDB, in commit order."""
    rows = con.execute("SELECT seq, run_id, chunk_id, source, target_table, dataset, "
                       "rows_valid, rows_quarantined FROM fallback_ledger ORDER BY seq")
    names = [d[0] for d in rows.description]
    return [dict(zip(names, row, strict=True)) for row in rows.fetchall()]


def read_chunk(con: sqlite3.Connection, seq: int) -> tuple[LedgerEntry, pa.Table, pa.Table]:
    """A chunk's ledger entry, valid and quarantined rows, with their Arrow types back."""
    entry_text, table, valid_schema, q_schema = con.execute(
        "SELECT entry, target_table, valid_schema, quarantine_schema FROM fallback_ledger "
        "WHERE seq = ?", (seq,)).fetchone()
    entry = LedgerEntry(**json.loads(entry_text))
    return (entry, _read_rows(con, table, entry, _schema(valid_schema)),
            _read_rows(con, "etl_quarantine", entry, _schema(q_schema)))


def _read_rows(con: sqlite3.Connection, table: str, entry: LedgerEntry,
               schema: pa.Schema) -> pa.Table:
    cols = ", ".join(f'"{name}"' for name in schema.names)
    rows = con.execute(f'SELECT {cols} FROM "{table}" WHERE _run_id = ? AND _chunk_id = ? '
                       "ORDER BY rowid", (entry.run_id, entry.chunk_id)).fetchall()
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    arrays = []
    for field, values in zip(schema, columns, strict=True):
        stored = _storable(pa.table({field.name: pa.array([], field.type)})).schema[0].type
        if pa.types.is_boolean(stored):  # SQLite gives a boolean back as 0 or 1
            values = [None if v is None else bool(v) for v in values]
        arrays.append(pc.cast(pa.array(list(values), stored), field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def delete_chunk(con: sqlite3.Connection, seq: int, fence: WriterFence | None = None) -> None:
    """Forget a chunk DuckDB has committed (rows, quarantine and ledger row together)."""
    with _transaction(con, fence):
        row = con.execute("SELECT run_id, chunk_id, target_table FROM fallback_ledger "
                          "WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            run_id, chunk_id, table = row
            for name in (table, "etl_quarantine"):
                con.execute(f'DELETE FROM "{name}" WHERE _run_id = ? AND _chunk_id = ?',
                            (run_id, chunk_id))
            con.execute("DELETE FROM fallback_ledger WHERE seq = ?", (seq,))


def add_record(con: sqlite3.Connection, kind: str, payload: dict[str, Any],
               fence: WriterFence | None = None) -> None:
    with _transaction(con, fence):
        con.execute("INSERT INTO fallback_records (kind, payload) VALUES (?, ?)",
                    (kind, json.dumps(payload, default=str)))


def records(con: sqlite3.Connection) -> list[tuple[int, str, dict[str, Any]]]:
    return [(seq, kind, json.loads(payload)) for seq, kind, payload in con.execute(
        "SELECT seq, kind, payload FROM fallback_records ORDER BY seq").fetchall()]


def delete_record(con: sqlite3.Connection, seq: int, fence: WriterFence | None = None) -> None:
    with _transaction(con, fence):
        con.execute("DELETE FROM fallback_records WHERE seq = ?", (seq,))


def waiting(path: Path) -> dict[str, int]:
    """Chunks and rows waiting here (0 when the store was never made)."""
    if not path.exists():
        return {"chunks": 0, "rows": 0}
    with contextlib.closing(connect(path)) as con:
        chunks, rows = con.execute("SELECT count(*), coalesce(sum(rows_valid + "
                                   "rows_quarantined), 0) FROM fallback_ledger").fetchone()
    return {"chunks": int(chunks), "rows": int(rows)}


def classify(exc: BaseException) -> EtlError:
    """Locked, busy, read-only, IO and full disk make the store unavailable (step down);
    anything else is a bug or a data problem (fatal, never a step down)."""
    if isinstance(exc, EtlError):
        return exc
    text = str(exc).lower()
    unavailable = ("locked", "busy", "readonly", "read-only", "disk i/o", "full",
                   "unable to open", "no space")
    if isinstance(exc, OSError) or any(mark in text for mark in unavailable):
        return TransientError(f"SQLite fallback unavailable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})",
                              source="sqlite")
    return FatalError(f"SQLite fallback error {type(exc).__name__}", source="sqlite")


@contextlib.contextmanager
def opened(path: Path, busy_timeout_s: float = 5.0) -> Iterator[sqlite3.Connection]:
    con = connect(path, busy_timeout_s)
    try:
        yield con
    finally:
        con.close()
