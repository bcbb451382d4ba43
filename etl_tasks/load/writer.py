"""The loader's one writer: DuckDB, else SQLite, else the spool, for chunks and run records.

Only store-unavailable errors step down (a DuckDB file held by another process beyond
`ETL_DUCKDB_LOCK_WAIT_S`, IO errors, a locked or read-only SQLite file, a full disk): they
are `TransientError`s of each store's `classify`; anything else (a data or SQL error) is
raised as it is. A commit to a fallback is durable, so it counts as committed for the run.
Each change of the store in use raises one alert (warning for SQLite, critical for the
spool), and one note when DuckDB takes the writes back; `load/replay.py` drains the
fallbacks. Every write first asks every store whether it already has the chunk, so a chunk
committed to DuckDB and redelivered while DuckDB is locked is not written again elsewhere.
Every write, in whichever store, is sealed with the loader's writer fence (load/fence.py);
a refusal (`FencedOut`) never steps down: a stale loader must not write a fallback either.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

import duckdb
import pyarrow as pa
import redis

from etl_tasks.config import Settings
from etl_tasks.errors import TransientError
from etl_tasks.load import duckdb as main_store
from etl_tasks.load import spool
from etl_tasks.load import sqlite as fallback
from etl_tasks.load.duckdb import LedgerEntry, WriteResult
from etl_tasks.load.fence import WriterFence
from etl_tasks.load.kept import KeptConnection
from etl_tasks.monitoring.alerts import Severity, alert

log = logging.getLogger(__name__)

Store = Literal["duckdb", "sqlite", "spool"]
ACTIVE_STORE = "etl:store:active"  # which store took the last write (alerts on changes)
_SEVERITY: dict[Store, Severity] = {"duckdb": "info", "sqlite": "warning", "spool": "critical"}


class StoreChain:
    """One loader task's access to the stores; opens each lazily, closes them at the end."""

    def __init__(self, settings: Settings, r: redis.Redis | None = None,
                 fence: WriterFence | None = None, kept: KeptConnection | None = None,
                 linger: bool = False) -> None:
        # fence: the loader's (None only for tools and tests outside a worker); kept: the
        # loader's DuckDB connection shared by its tasks (None: opened and closed here),
        # left open after this task when `linger` (a chunk's load: more may follow at once)
        self.settings, self.redis, self.fence, self.kept = settings, r, fence, kept
        self.linger = linger
        self._duckdb: duckdb.DuckDBPyConnection | None = None
        self._sqlite: sqlite3.Connection | None = None
        self.unavailable: dict[str, str] = {}

    def __enter__(self) -> StoreChain:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: BaseException | TracebackType
                 | None) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        if self._duckdb is not None and self.kept is not None:
            self.kept.release(failed=failed or "duckdb" in self.unavailable,
                              linger=self.linger)
            self._duckdb = None
        for con in (self._duckdb, self._sqlite):
            if con is not None:
                with contextlib.suppress(Exception):
                    con.close()
        self._duckdb = self._sqlite = None

    def primary(self) -> duckdb.DuckDBPyConnection | None:
        """The primary, or None while it is unavailable (held by another process...)."""
        if self._duckdb is None and "duckdb" not in self.unavailable:
            deadline = time.monotonic() + self.settings.store_lock_wait_s
            while True:
                try:
                    self._duckdb = (self.kept.acquire() if self.kept is not None
                                    else main_store.connect(self.settings.duckdb_path,
                                                            self.settings.loader_memory_mb))
                    break
                except TransientError as exc:
                    if time.monotonic() >= deadline:
                        self.unavailable["duckdb"] = str(exc)
                        break
                    time.sleep(0.1)
        return self._duckdb

    def sqlite(self) -> sqlite3.Connection | None:
        if self._sqlite is None and "sqlite" not in self.unavailable:
            try:
                self._sqlite = fallback.connect(self.settings.fallback_path,
                                                self.settings.store_lock_wait_s)
            except TransientError as exc:
                self.unavailable["sqlite"] = str(exc)
        return self._sqlite

    def committed(self, run_id: str, chunk_id: str) -> WriteResult | None:
        """The chunk's counts if some store already committed it."""
        con = self.primary()
        if con is not None:
            counts = main_store.ledger_counts(con, run_id, chunk_id)
            if counts is not None:
                return WriteResult(counts[0], counts[1], already_loaded=True,
                                   unchanged=counts[2])
        if self.settings.fallback_path.exists():
            lite = self.sqlite()
            held = fallback.committed_counts(lite, run_id, chunk_id) if lite else None
            if held is not None:
                return WriteResult(held[0], held[1], already_loaded=True)
        if spool.is_committed(self.settings.spool_path, run_id, chunk_id):
            return WriteResult(0, 0, already_loaded=True)
        return None

    def write(self, *, source: str, table: str, dataset: str, entry: LedgerEntry,
              valid: pa.Table, quarantined: pa.Table,
              fault: Callable[[str], None] = lambda _: None) -> tuple[Store, WriteResult]:
        """Commit a chunk to the first store that can take it."""
        args: dict[str, Any] = {"source": source, "table": table, "dataset": dataset,
                                "entry": entry, "valid": valid, "quarantined": quarantined,
                                "fence": self.fence}
        con = self.primary()
        if con is not None:
            try:
                result = main_store.write_chunk(con, **args, fault=fault,
                                                ledger=self.settings.resilience)
            except TransientError as exc:
                self.unavailable["duckdb"] = str(exc)
            else:
                return self._used("duckdb"), result
        lite = self.sqlite()
        if lite is not None:
            try:
                result = fallback.write_chunk(lite, **args, fault=fault)
            except TransientError as exc:
                self.unavailable["sqlite"] = str(exc)
            else:
                return self._used("sqlite"), result
        # The last resort; its failure (a full disk) is raised: nothing was stored.
        result = spool.write_chunk(self.settings.spool_path, **args,
                                   lock_wait_s=self.settings.store_lock_wait_s)
        return self._used("spool"), result

    def record(self, kind: str, payload: dict[str, Any],
               apply: Callable[[duckdb.DuckDBPyConnection], None]) -> Store:
        """A run-side record (run row, dead letters): applied to DuckDB, or kept in a
        fallback for the replay to apply."""
        con = self.primary()
        if con is not None:
            try:
                with main_store.transaction(con, self.fence):
                    apply(con)
            except TransientError as exc:
                self.unavailable["duckdb"] = str(exc)
            else:
                return "duckdb"
        lite = self.sqlite()
        if lite is not None:
            try:
                fallback.add_record(lite, kind, payload, self.fence)
            except TransientError as exc:
                self.unavailable["sqlite"] = str(exc)
            else:
                return "sqlite"
        spool.add_record(self.settings.spool_path, kind, payload, self.fence,
                         self.settings.store_lock_wait_s)
        return "spool"

    def _used(self, store: Store) -> Store:
        """Alert once when writes move to another store (not on every chunk)."""
        if self.redis is None:
            return store
        previous = self.redis.getset(ACTIVE_STORE, store)
        before = previous.decode() if isinstance(previous, bytes) else "duckdb"
        if before != store:
            why = "; ".join(f"{name}: {reason}" for name, reason in self.unavailable.items())
            message = (f"loads go to {store} now (were going to {before})"
                       + (f" because {why}" if why else "")
                       + ("; the replay moves them into DuckDB once it is healthy"
                          if store != "duckdb" else ""))
            alert(_SEVERITY[store], message)
        return store


def waiting(settings: Settings) -> dict[str, dict[str, int]]:
    """Chunks and rows waiting in each fallback for the replay."""
    return {"sqlite": fallback.waiting(settings.fallback_path),
            "spool": spool.waiting(settings.spool_path)}
