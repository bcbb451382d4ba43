"""The loader's kept DuckDB connection, on a real file: reused while tasks keep coming, left
for readers once idle or held long enough, never reused after an error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb

from etl_tasks.load import duckdb as store
from etl_tasks.load.kept import KeptConnection

# Another process opening the file read-only: DuckDB refuses it while a writer holds it.
_READER = """
import sys, duckdb
try:
    duckdb.connect(sys.argv[1], read_only=True).close()
except duckdb.IOException:
    sys.exit(1)
"""


def _reader_gets_in(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", _READER, str(path)], check=False,
                          timeout=60).returncode == 0


def _counting(opened: list[int]):
    def connect(path: Path) -> duckdb.DuckDBPyConnection:
        opened.append(1)
        return store.connect(path)
    return connect


def test_one_connection_serves_tasks_in_a_row_and_is_left_for_readers_when_idle(tmp_path):
    path, opened = tmp_path / "w.duckdb", []
    kept = KeptConnection(path, _counting(opened), idle_s=0.3, hold_s=60)
    first = kept.acquire()
    first.execute("CREATE TABLE t (x INTEGER)")
    kept.release()
    second = kept.acquire()  # within the idle time: the same connection
    second.execute("INSERT INTO t VALUES (1)")
    kept.release()
    assert second is first
    assert len(opened) == 1
    time.sleep(0.6)  # idle past idle_s: closed
    assert _reader_gets_in(path)
    third = kept.acquire()
    assert third.execute("SELECT count(*) FROM t").fetchone() == (1,)
    kept.release()
    kept.close()
    assert len(opened) == 2


def test_a_connection_held_long_enough_after_an_error_or_another_task_is_closed_at_once(
        tmp_path):
    path, opened = tmp_path / "w.duckdb", []
    kept = KeptConnection(path, _counting(opened), idle_s=60, hold_s=0.2)
    kept.acquire()
    time.sleep(0.3)
    kept.release()  # held past hold_s: closed now, though the idle time is long
    assert _reader_gets_in(path)
    kept.acquire()
    kept.release(failed=True)
    assert _reader_gets_in(path)
    kept.acquire()
    kept.release(linger=False)  # a task other than a chunk's load
    assert _reader_gets_in(path)
    kept.acquire()
    kept.release()
    kept.close()
    assert len(opened) == 4
