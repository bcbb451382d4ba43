"""The read path: answer a read-only query from DuckDB, or say where else the answer came from.

DuckDB first (opened read-only, waiting briefly while the loader commits). Every answer it
gives is cached as a Parquet file keyed by the query's text; while DuckDB is unavailable a
cached answer younger than `ETL_QUERY_CACHE_TTL_S` is served, else the SQLite fallback is
asked (it holds only the rows written while DuckDB was down). The answer names its store and
the time its data is from. Only reads: anything but a query is refused before it runs, and
every store is opened read-only.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from etl_tasks.config import Settings
from etl_tasks.errors import FatalError, TransientError
from etl_tasks.load import duckdb as main_store

Answerer = Literal["duckdb", "cache", "sqlite"]
_READS = re.compile(r"^\s*(\(\s*)*(select|with|values|table|from|describe|show|summarize)\b",
                    re.IGNORECASE)
_WRITES = re.compile(r"\b(insert|update|delete|merge|create|drop|alter|attach|detach|copy|"
                     r"install|load|pragma|set|truncate|vacuum|checkpoint|export|import|"
                     r"call)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Answer:
    """A query's rows and where they came from."""

    table: pa.Table
    store: Answerer
    as_of: float  # epoch seconds of the data
    note: str

    def public(self) -> dict[str, Any]:
        return {"store": self.store, "as_of": self.as_of,
                "age_s": round(time.time() - self.as_of, 1), "note": self.note,
                "columns": self.table.column_names, "rows": self.table.to_pylist()}


def check_read_only(sql: str) -> None:
    """Refuse anything but one query (statements are never run to find out)."""
    body = sql.strip().rstrip(";")
    if not _READS.match(body) or ";" in body or _WRITES.search(_strip_strings(body)):
        raise FatalError("only a single read-only query (SELECT, WITH ...) is allowed here; "
                         "the store is changed only by the loader")


def _strip_strings(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


def _cache_path(settings: Settings, sql: str) -> Path:
    digest = hashlib.sha256(" ".join(sql.split()).encode()).hexdigest()[:24]
    return settings.data_dir / ".query_cache" / f"{digest}.parquet"


def read_data(settings: Settings, sql: str) -> Answer:
    check_read_only(sql)
    cache = _cache_path(settings, sql)
    try:
        with main_store.read_only(settings.duckdb_path, settings.store_lock_wait_s) as con:
            table = con.sql(sql).to_arrow_table()
    except TransientError as exc:
        why = str(exc)
    else:
        _write_cache(cache, table)
        return Answer(table, "duckdb", time.time(), "the primary store")
    if cache.exists() and time.time() - cache.stat().st_mtime <= settings.query_cache_ttl_s:
        age = time.time() - cache.stat().st_mtime
        return Answer(pq.read_table(cache), "cache", cache.stat().st_mtime,
                      f"DuckDB unavailable ({why}); a cached answer from {age:.0f}s ago")
    if settings.fallback_path.exists():
        uri = f"file:{settings.fallback_path}?mode=ro"
        lite = sqlite3.connect(uri, uri=True, timeout=settings.store_lock_wait_s)
        try:
            cur = lite.execute(sql)
            names = [d[0] for d in cur.description or []]
            rows = cur.fetchall()
        except sqlite3.Error as exc:
            raise FatalError(f"DuckDB unavailable ({why}) and the SQLite fallback could not "
                             f"answer ({type(exc).__name__}); try again later") from None
        finally:
            lite.close()
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        table = pa.table({n: list(c) for n, c in zip(names, columns, strict=True)})
        return Answer(table, "sqlite", time.time(),
                      f"DuckDB unavailable ({why}); the SQLite fallback holds only rows "
                      "written while DuckDB was down")
    raise TransientError(f"DuckDB unavailable ({why}), no fresh cached answer and no fallback "
                         "store; try again later", source="duckdb")


def _write_cache(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
