"""The Firebird source: embedded runtime setup, a bounded pool, key-range reads as Arrow.

Any table: its columns come from reflection (firebird_schema.py), each range is built by
Firebird as one text and parsed by Arrow (firebird_text.py), and extraction scales with
processes because each range is its own task. Integer keys are cut by arithmetic; other keys
by boundaries sampled from the table (every Nth key in key order).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from etl_tasks.errors import EtlError, FatalError, TransientError
from etl_tasks.sources import firebird_schema, firebird_text
from etl_tasks.sources.firebird_schema import Column, TableSchema
from etl_tasks.sources.firebird_text import RANGE_BLOCK_SIZE, quote

Bound = int | bytes | None
"""A key range's end: an integer key, a sampled key value's bytes, or none (open)."""

# What reflection gives for the demo's BILLING_CLAIMS (column, staged Arrow type, is it
# text): the tests and benchmarks compare with it. The reader itself reads any table.
CLAIM_COLUMNS: list[tuple[str, pa.DataType, bool]] = [
    ("CLAIM_ID", pa.int64(), False),
    ("PATIENT_ID", pa.string(), True),
    ("PROVIDER_NPI", pa.string(), True),
    ("SERVICE_DATE", pa.date32(), False),
    ("CPT_CODE", pa.string(), True),
    ("ICD10_CODE", pa.string(), True),
    ("AMOUNT", pa.decimal128(12, 2), False),
    ("PAYER", pa.string(), True),
    ("STATUS", pa.string(), True),
    ("UPDATED_AT", pa.timestamp("us"), False),
]

_SERVER_DSN = re.compile(r"^[\w.\-]+(/\d+)?:")
_runtime_lock = threading.Lock()
_runtime_ready = False


@dataclass(frozen=True)
class FirebirdTarget:
    """Where and how to connect; built from Settings by the caller."""

    dsn: str
    user: str
    password: str
    runtime_dir: Path

    @property
    def embedded(self) -> bool:
        # "host:path" or "host/port:path" is a server; a plain path is the embedded engine.
        return _SERVER_DSN.match(self.dsn) is None


def configure_runtime(runtime_dir: Path) -> None:
    """Make the firebird-embedded wheel usable in this process, shared with other processes.

    The wheel's engine plugin needs libtomcrypt (shipped) and libtommath (Debian's
    libtommath1), which it cannot find without LD_LIBRARY_PATH; loading both globally here
    first lets dlopen resolve them by soname. SuperClassic lets several worker processes open
    the same database file, provided they share the FIREBIRD_LOCK directory.
    """
    global _runtime_ready
    with _runtime_lock:
        if _runtime_ready:
            return
        from firebird.driver import driver_config
        from firebird.embedded.provider import FirebirdProvider

        wheel = FirebirdProvider().root
        runtime_dir = runtime_dir.resolve()
        conf_dir, lock_dir = runtime_dir / "conf", runtime_dir / "lock"
        conf_dir.mkdir(parents=True, exist_ok=True)
        lock_dir.mkdir(parents=True, exist_ok=True)
        for item in wheel.iterdir():
            link = conf_dir / item.name
            if item.name in ("firebird.conf", "firebird.log"):
                continue
            if link.is_symlink() and link.resolve() != item.resolve():
                link.unlink()  # the venv moved: repoint the link
            if not link.exists():
                link.symlink_to(item)
        conf = conf_dir / "firebird.conf"
        if not conf.exists():
            conf.write_text("ServerMode = SuperClassic\n")
        os.environ["FIREBIRD"] = str(conf_dir)
        os.environ["FIREBIRD_LOCK"] = str(lock_dir)
        try:
            ctypes.CDLL("libtommath.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise FatalError(
                "the embedded Firebird engine needs libtommath: "
                "run `sudo apt-get install libtommath1` (Debian/Ubuntu)") from exc
        ctypes.CDLL(str(wheel / "libtomcrypt.so.1"), mode=ctypes.RTLD_GLOBAL)
        driver_config.fb_client_library.value = str(wheel / "libfbclient.so.2")
        # One LIST() blob per range can be several MB: return it as text, not a stream.
        driver_config.stream_blob_threshold.value = 2**31 - 1
        _runtime_ready = True


def connect(target: FirebirdTarget, charset: str | None = None) -> Any:
    """One new connection (the pool owns reuse). Without `charset` the connection's is NONE:
    Firebird sends text as the bytes it stores, which the range reader decodes itself;
    writers of non-ASCII text name the character set their strings should arrive in."""
    configure_runtime(target.runtime_dir)
    from firebird.driver import connect as fb_connect

    dsn = str(Path(target.dsn).resolve()) if target.embedded else target.dsn
    if target.embedded and not Path(dsn).exists():
        raise FatalError(f"Firebird database {dsn} does not exist; run `etl demo-data` to "
                         "create the demo database or set ETL_FIREBIRD_DSN", source="firebird")
    try:
        return fb_connect(dsn, user=target.user, password=target.password, charset=charset)
    except Exception as exc:
        raise classify(exc) from exc


def create_database(target: FirebirdTarget, *, overwrite: bool = False,
                    charset: str | None = None) -> Any:
    """A new, empty database at the target (a file for the embedded engine, or on the
    server); `overwrite` replaces one that exists. `charset` is its default character set
    (and the connection's), NONE when not given, as the demo's billing database."""
    configure_runtime(target.runtime_dir)
    from firebird.driver import create_database as fb_create
    from firebird.driver import driver_config

    dsn = target.dsn if not target.embedded else str(Path(target.dsn).resolve())
    if target.embedded:
        Path(target.dsn).parent.mkdir(parents=True, exist_ok=True)
    # The driver takes a new database's default character set from its configuration only.
    with _runtime_lock:
        driver_config.db_defaults.db_charset.value = charset
        try:
            return fb_create(dsn, user=target.user, password=target.password,
                             overwrite=overwrite, charset=charset)
        except Exception as exc:
            if target.embedded:
                raise
            raise classify(exc) from exc
        finally:
            driver_config.db_defaults.db_charset.value = None


class ConnectionPool:
    """A bounded pool of connections; waiting longer than `timeout` is a transient error.

    A connection that fails mid-use is closed, not returned. When the failure says the server
    went away (`connection_lost`), the idle connections are closed too: they point at the
    same dead server process (after a restart, at its predecessor) and would each fail once
    more on their next use.
    """

    def __init__(self, target: FirebirdTarget, size: int, timeout: float) -> None:
        self.target, self.size, self.timeout = target, size, timeout
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)

    @contextmanager
    def connection(self) -> Iterator[Any]:
        if not self._slots.acquire(timeout=self.timeout):
            raise TransientError(f"Firebird pool exhausted ({self.size} connections busy for "
                                 f"{self.timeout:.0f}s); will retry", source="firebird")
        con = None
        try:
            try:
                con = self._idle.get_nowait()
            except queue.Empty:
                con = connect(self.target)
            yield con
            if con.main_transaction.is_active():
                con.commit()  # end the read transaction so the next use sees new rows
            self._idle.put(con)
        except BaseException as exc:
            if con is not None:
                _close_quietly(con)  # a connection that failed mid-use is not reused
            if connection_lost(exc):
                self.close()
            raise
        finally:
            self._slots.release()

    def close(self) -> None:
        while True:
            try:
                _close_quietly(self._idle.get_nowait())
            except queue.Empty:
                return


def _close_quietly(con: Any) -> None:
    # Closing a broken connection must not mask the error that broke it.
    with contextlib.suppress(Exception):
        con.close()


_BIGINT_MAX = 2**63 - 1
_ASCENDING_INDEX = """SELECT 1 FROM RDB$INDICES i JOIN RDB$INDEX_SEGMENTS s
    ON s.RDB$INDEX_NAME = i.RDB$INDEX_NAME WHERE i.RDB$RELATION_NAME = ?
    AND TRIM(s.RDB$FIELD_NAME) = ? AND s.RDB$FIELD_POSITION = 0
    AND COALESCE(i.RDB$INDEX_TYPE, 0) = 0 AND COALESCE(i.RDB$INDEX_INACTIVE, 0) = 0"""


def key_bounds(con: Any, table: str, key: str, after: int) -> tuple[int, int] | None:
    """Smallest and largest key above `after`, or None when there is no new row.

    With an ascending index on the key (a primary key has one), the largest is found by
    index seeks (`_seek_largest`): Firebird reads MAX only from a descending index, and
    otherwise scans the whole table, 0.4 s per million rows here on every run's plan, however
    few rows are new. Without such an index, MIN and MAX as they are.
    """
    cur = con.cursor()
    try:
        cur.execute(_ASCENDING_INDEX, (table.strip('"'), key.strip('"')))
        if cur.fetchone() is None:
            cur.execute(f"SELECT MIN({key}), MAX({key}) FROM {table} WHERE {key} > ?",
                        (after,))
            lo, hi = cur.fetchone()
            return None if lo is None else (int(lo), int(hi))
        first = _first_key_from(cur, table, key, after + 1)
        return None if first is None else (first, _seek_largest(cur, table, key, first))
    finally:
        cur.close()


def _first_key_from(cur: Any, table: str, key: str, start: int) -> int | None:
    """The smallest key >= start (one index seek), None when there is none."""
    cur.execute(f"SELECT FIRST 1 {key} FROM {table} WHERE {key} >= ? ORDER BY {key}",
                (min(start, _BIGINT_MAX),))
    row = cur.fetchone()
    return None if row is None or start > _BIGINT_MAX else int(row[0])


def _seek_largest(cur: Any, table: str, key: str, known: int) -> int:
    """The largest key, given one that exists: steps doubling past it until no key is
    found, then halving the gap (about two seeks per bit of the key span)."""
    step = 1
    while (found := _first_key_from(cur, table, key, known + step)) is not None:
        known, step = found, step * 2
    beyond = known + step  # no key at or above
    while beyond - known > 1:
        middle = (known + beyond) // 2
        found = _first_key_from(cur, table, key, middle)
        if found is None:
            beyond = middle
        else:
            known = found
    return known


def max_updated(con: Any, table: str, updated: str) -> datetime | None:
    cur = con.cursor()
    try:
        cur.execute(f"SELECT MAX({updated}) FROM {table}")
        (value,) = cur.fetchone()
    finally:
        cur.close()
    return value  # type: ignore[no-any-return]


def updated_bounds(con: Any, table: str, key: str, updated: str, since: datetime,
                   until: datetime, max_key: int) -> tuple[int, int] | None:
    """Key bounds of rows at or below `max_key` whose `updated` is in (since, until]."""
    cur = con.cursor()
    try:
        cur.execute(f"SELECT MIN({key}), MAX({key}) FROM {table} WHERE {updated} > ? AND "
                    f"{updated} <= ? AND {key} <= ?", (since, until, max_key))
        lo, hi = cur.fetchone()
    finally:
        cur.close()
    return None if lo is None else (int(lo), int(hi))


def fetch_range(con: Any, table: str, key: str | None, lo: Bound, hi: Bound, *,
                schema: TableSchema | None = None, updated_column: str = "UPDATED_AT",
                since: str | None = None, until: str | None = None,
                block_size: int = RANGE_BLOCK_SIZE) -> pa.Table:
    """The rows of a key range (and, given a window, updated in (since, until]) as Arrow.

    Integer bounds are inclusive (lo <= key <= hi); other bounds are sampled key values,
    the lower one exclusive (lo < key <= hi), None meaning no bound; no key: every row.
    `schema` is the run's (reflected now when None); its columns are what is read.
    """
    schema = schema or firebird_schema.reflect(con, table)
    raw = fetch_range_text(con, schema, key, lo, hi, updated_column=updated_column,
                           since=since, until=until)
    where = (f"{table} {key} {lo}-{hi}" if isinstance(lo, int) and isinstance(hi, int)
             else f"{table} {key or 'rows'} (a sampled key range)")
    parsed = firebird_text.parse(raw, schema, where=where, block_size=block_size)
    column = schema.column(key) if key else None
    # In key order, whichever way the text was fetched (groups come in any order): a range
    # re-read gives the same chunk. About 5 ms for 50,000 rows.
    return parsed.sort_by(column.staged_name) if column is not None else parsed


def fetch_range_text(con: Any, schema: TableSchema, key: str | None, lo: Bound, hi: Bound, *,
                     updated_column: str = "UPDATED_AT", since: str | None = None,
                     until: str | None = None, rows: tuple[int, int] | None = None) -> bytes | None:
    """The range as Firebird writes it: one CSV line per row, joined by ASCII 10 (LF), as the
    bytes of the table's character set (a binary blob, so the driver decodes nothing).
    `rows` (first, last; 1-based) takes a slice of a keyless table in its natural order."""
    where, params = range_condition(schema, key, lo, hi)
    if since and until:
        changed = quote(updated_column)
        where.append(f"{changed} > ? AND {changed} <= ?")
        params += [datetime.fromisoformat(since), datetime.fromisoformat(until)]
    line = firebird_text.line_expression(schema)
    condition = (" WHERE " + " AND ".join(where)) if where else ""
    sql = f"SELECT {line} AS r FROM {quote(schema.table)}{condition}"
    if key:
        sql += f" ORDER BY {quote(key)}"
    if rows:
        sql += f" ROWS {int(rows[0])} TO {int(rows[1])}"
    if group := firebird_text.group_rows(schema):
        column = schema.column(key) if key else None
        if column is not None and column.is_integer_key and not rows:
            # Grouped by the key itself: cheaper than numbering the rows, and the order of
            # lines in a range does not matter.
            grouped = (f"SELECT {quote(column.name)} / {group} AS g, {line} AS r "
                       f"FROM {quote(schema.table)}{condition}")
        else:
            grouped = f"SELECT ROW_NUMBER() OVER () / {group} AS g, r FROM ({sql})"
        try:
            return _fetch_groups(con, grouped, params)
        except Exception as exc:
            if not _truncated(exc):
                raise
            # A group longer than its columns' declared lengths foretold (values full of
            # quotes, or a key repeated): this range is read as one blob instead.
    cur = con.cursor()
    try:
        cur.execute(f"SELECT CAST(LIST(r, ASCII_CHAR(10)) AS BLOB SUB_TYPE BINARY) FROM ({sql})",
                    params)
        return cur.fetchone()[0]  # type: ignore[no-any-return]
    finally:
        cur.close()


def _fetch_groups(con: Any, grouped: str, params: list[Any]) -> bytes | None:
    """The range text fetched as groups of lines (firebird_text.group_rows), joined."""
    cur = con.cursor()
    try:
        cur.execute(f"SELECT CAST(LIST(r, ASCII_CHAR(10)) AS VARCHAR({firebird_text.GROUP_BYTES})"
                    f" CHARACTER SET OCTETS) FROM ({grouped}) GROUP BY g", params)
        parts = [part for (part,) in cur.fetchall()]
    finally:
        cur.close()
    return b"\n".join(parts) if parts else None


_STRING_TRUNCATION = 335544914  # isc_string_truncation


def _truncated(exc: BaseException) -> bool:
    return _STRING_TRUNCATION in (getattr(exc, "gds_codes", None) or ())


def range_condition(schema: TableSchema, key: str | None, lo: Bound,
                    hi: Bound) -> tuple[list[str], list[Any]]:
    """WHERE terms and parameters of a key range (see `fetch_range`)."""
    if not key:
        return [], []
    q = quote(key)
    if isinstance(lo, int) and isinstance(hi, int):
        return [f"{q} BETWEEN ? AND ?"], [lo, hi]
    terms, params = [], []
    for op, bound in ((">", lo), ("<=", hi)):
        if bound is not None:
            marker, value = _bound_parameter(schema, key, bound)
            terms.append(f"{q} {op} {marker}")
            params.append(value)
    return terms, params


def _bound_parameter(schema: TableSchema, key: str, bound: int | bytes) -> tuple[str, Any]:
    """A sampled bound as a parameter: text keys compare as the exact bytes Firebird gave
    (OCTETS, so no character set conversion can change them); other keys as their text."""
    column = schema.column(key)
    if isinstance(bound, bytes) and column is not None and column.is_text:
        return f"CAST(? AS VARCHAR({octets(column)}) CHARACTER SET OCTETS)", bound
    return "?", bound.decode("ascii") if isinstance(bound, bytes) else bound


def octets(column: Column) -> int:
    # Bytes a value of the column can take: up to four per character (UTF8).
    return max(column.length, 1) * 4


# Firebird status codes (iberror.h) that say the server or the connection went away: a
# server stopped or killed, restarting, or a connection cut by its administrator.
CONNECTION_LOST_CODES = frozenset({
    335544721,  # isc_network_error: Unable to complete network request to host
    335544722,  # isc_net_connect_err: Failed to establish a connection (refused)
    335544726,  # isc_net_read_err: Error reading data from the connection
    335544727,  # isc_net_write_err: Error writing data to the connection
    335544741,  # isc_lost_db_connection: Connection lost to database
    335544856,  # isc_att_shutdown: connection shutdown
    335544528,  # isc_shutdown: database shutdown
})
_CONNECTION_LOST_MARKS = ("unable to complete network request", "failed to establish",
                          "connection refused", "error reading data from the connection",
                          "error writing data to the connection", "connection lost",
                          "connection shutdown", "shutdown")


def connection_lost(exc: BaseException) -> bool:
    """Does `exc` (or an error it was raised from) say the server or connection went away?"""
    seen: BaseException | None = exc
    for _ in range(4):  # the driver's error, possibly wrapped by classify()
        if seen is None:
            return False
        if CONNECTION_LOST_CODES.intersection(getattr(seen, "gds_codes", ()) or ()):
            return True
        if not isinstance(seen, EtlError) and any(
                mark in str(seen).lower() for mark in _CONNECTION_LOST_MARKS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify(exc: BaseException, where: str = "") -> EtlError:
    """Map a firebird-driver exception to the error tree (anything unknown is fatal).

    Messages keep only what is safe to show: Firebird's own text can quote a value (a failed
    conversion does), so an unrecognized error shows its type and SQL code, never its text.
    `where` names what was being read (a table, a key range). A server that is down,
    restarting or shutting down, or a connection lost on the way, is transient.
    """
    if isinstance(exc, EtlError):
        return exc
    text = str(exc).lower()
    at = f" ({where})" if where else ""
    if connection_lost(exc):
        return TransientError(f"Firebird server unreachable or connection lost{at} "
                              f"({type(exc).__name__}); will retry", source="firebird")
    transient_marks = ("lock conflict", "deadlock", "unavailable", "network", "timeout",
                       "too many")
    if any(mark in text for mark in transient_marks):
        return TransientError(f"Firebird unavailable{at} ({type(exc).__name__}); will retry",
                              source="firebird")
    if "password" in text or "user name" in text:
        return FatalError("Firebird rejected the credentials; check ETL_FIREBIRD_USER and "
                          "ETL_FIREBIRD_PASSWORD", source="firebird")
    if "no such file or directory" in text:
        return FatalError("the Firebird database named by ETL_FIREBIRD_DSN does not exist "
                          "on its server; check the path after the host", source="firebird")
    if "is not allowed by server configuration" in text:
        return FatalError("the Firebird server refuses to open a database at the path in "
                          "ETL_FIREBIRD_DSN (its DatabaseAccess setting)", source="firebird")
    if "table unknown" in text:
        return FatalError(f"a table named in the pipeline config does not exist in the Firebird "
                          f"database{at}; check the source's location", source="firebird")
    if "column unknown" in text:
        return FatalError(f"a column named in the pipeline config does not exist{at}; check "
                          "the source's key_column and updated_column", source="firebird")
    code = getattr(exc, "sqlcode", None)
    return FatalError(f"Firebird error {type(exc).__name__}{at}"
                      + (f", SQL code {code}" if code else "")
                      + " (its message is withheld: it may quote a value)", source="firebird")
