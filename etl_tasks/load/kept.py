"""The loader's DuckDB connection, kept open from one load to the next while they keep coming.

Opening the store costs its bookkeeping DDL and closing it a checkpoint of the file, 0.1 to
0.25 s a 50,000-row chunk when done per task (benchmarks/README.md). DuckDB lets no other
process open the file while one holds it, so the connection is still closed often: at once
after any task but a chunk's load (`linger=False`), once the loader has been idle `idle_s`,
and after a task that finds it open `hold_s` or longer, with a short pause before the next
open, so a reader waiting for the file (`duckdb.read_only` polls every 20 ms, for up to
ETL_STORE_LOCK_WAIT_S, 2 s by default) gets its turn even while the loader is busy. A
connection that saw any error is closed, never reused.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

IDLE_S = 0.5
HOLD_S = 1.5
READERS_TURN_S = 0.1  # the pause after a hold-limit close, before the loader opens again


class KeptConnection:
    """One process's DuckDB connection shared by its tasks, one task at a time."""

    def __init__(self, path: Path, connect: Callable[[Path], duckdb.DuckDBPyConnection],
                 idle_s: float = IDLE_S, hold_s: float = HOLD_S) -> None:
        self.path, self._connect = path, connect
        self.idle_s, self.hold_s = idle_s, hold_s
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._opened_at = 0.0
        self._closed_at = 0.0
        self._users = 0
        self._timer: threading.Timer | None = None

    def acquire(self) -> duckdb.DuckDBPyConnection:
        """The open connection, opened now if needed (raises what `connect` raises)."""
        with self._lock:
            self._cancel_timer()
            self._users += 1
            try:
                if self._con is None:
                    wait = self._closed_at + READERS_TURN_S - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    self._con = self._connect(self.path)
                    self._opened_at = time.monotonic()
            except BaseException:
                self._users -= 1
                raise
            return self._con

    def release(self, failed: bool = False, linger: bool = True) -> None:
        """A task is done with the connection: close it now (after an error, a task that
        does not linger, or held long enough), or once it stays idle."""
        with self._lock:
            self._users = max(self._users - 1, 0)
            if self._users:
                return
            if failed or not linger or time.monotonic() - self._opened_at >= self.hold_s:
                self._close()
            elif self._con is not None:
                self._timer = threading.Timer(self.idle_s, self._close_if_idle)
                self._timer.daemon = True
                self._timer.start()

    def close(self) -> None:
        with self._lock:
            self._cancel_timer()
            self._close()

    def _close_if_idle(self) -> None:
        with self._lock:
            if not self._users:
                self._close()

    def _close(self) -> None:
        if self._con is not None:
            with contextlib.suppress(Exception):
                self._con.close()
            self._con = None
            self._closed_at = time.monotonic()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
