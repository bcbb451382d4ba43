"""Degrade, don't stop (issue 8): the DuckDB file held by another process, SQLite locked too,
the spool's disk full, the loader killed mid-replay, and reads while DuckDB is held. Real
processes hold the real locks; each test ends with the shared oracle (lost 0, duplicated 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from etl_tasks.api import fallbacks_waiting, read_data, run_source
from etl_tasks.demo_data import generate_claims
from etl_tasks.errors import FatalError
from tests.integration import oracle
from tests.integration.fault_stack import FaultStack, wait_until
from tests.integration.receivers import http_receiver
from tests.integration.test_faults import wait_end

pytestmark = pytest.mark.integration

FAST = {"ETL_STORE_LOCK_WAIT_S": "0.3", "ETL_REPLAY_EVERY_S": "1"}
HOLD_DUCKDB = """
import sys, time, duckdb
while True:
    try:
        con = duckdb.connect(sys.argv[1])  # for writing: no other process may open it now
        break
    except duckdb.IOException:
        time.sleep(0.05)
print("held", flush=True)
time.sleep(3600)
"""
HOLD_SQLITE = """
import sys, time
from pathlib import Path
from etl_tasks.load import sqlite
con = sqlite.connect(Path(sys.argv[1]))
con.execute("BEGIN EXCLUSIVE")  # no other writer until this process ends
print("held", flush=True)
time.sleep(3600)
"""


@contextmanager
def holding(script: str, path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding a store's write lock until the block ends (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held", "the holder could not take the lock"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _alerts(stack: FaultStack, severity: str) -> int:
    return (stack.root / "logs" / "loader.log").read_text().count(f"ALERT {severity}")


def _more_claims(stack: FaultStack, n: int = 12_000) -> None:
    [(top,)] = stack.firebird("SELECT MAX(CLAIM_ID) FROM BILLING_CLAIMS")
    generate_claims(stack.firebird_target, int(top) + 1, n)


def _first_run(stack: FaultStack) -> None:
    """A normal run first: DuckDB exists and holds the first 12,000 claims."""
    first = wait_end(stack, run_source("billing"), 120)
    assert first.status == "finished", first


def test_a_held_duckdb_sends_loads_to_sqlite_and_the_replay_drains_it(world):
    """While another process holds DuckDB, loads commit to SQLite and the run finishes; reads
    are answered from the cache or SQLite, saying which; after the release the replay empties
    SQLite into DuckDB, exactly, and the alert was raised once."""
    stack = world(env=FAST)
    stack.start_all()
    _first_run(stack)
    counted = "SELECT count(*) FROM billing_claims"
    assert read_data(counted).store == "duckdb"  # and now cached
    with holding(HOLD_DUCKDB, stack.duckdb_path):
        _more_claims(stack)
        second = wait_end(stack, run_source("billing"), 120)
        assert second.status == "finished", second
        # The new claims plus the look-back window re-read; in SQLite a re-read row counts
        # as loaded (only DuckDB's upsert can tell it is unchanged).
        assert second.loaded + second.quarantined == second.extracted >= 12_000
        waiting = fallbacks_waiting()
        assert waiting["sqlite"]["rows"] == second.extracted
        assert waiting["sqlite"]["chunks"] >= 6
        assert waiting["spool"]["chunks"] == 0
        cached = read_data(counted)
        assert cached.store == "cache"
        assert cached.table.num_rows == 1
        fresh = read_data("SELECT count(*) AS n FROM billing_claims WHERE claim_id > 12000")
        assert fresh.store == "sqlite"
        assert 11_000 < fresh.table.to_pylist()[0]["n"] <= 12_000
        with pytest.raises(FatalError, match="read-only"):
            read_data("DELETE FROM billing_claims")
        assert _alerts(stack, "warning") == 1
    wait_until(lambda: fallbacks_waiting()["sqlite"]["chunks"] == 0, 60, "the replay")
    tally = oracle.check(stack, "DuckDB held, loads to SQLite, replayed")
    assert tally.source == 24_000
    assert stack.query("SELECT status FROM etl_runs WHERE run_id = ?", [second.run_id]) == [
        ("finished",)]
    [(chunks, distinct)] = stack.query(
        "SELECT count(*), count(DISTINCT chunk_id) FROM etl_load_ledger WHERE run_id = ?",
        [second.run_id])
    assert chunks == distinct == waiting["sqlite"]["chunks"]


def test_duckdb_and_sqlite_both_unusable_send_chunks_to_the_spool(world):
    """DuckDB held and SQLite locked: chunks go to the fsynced spool and the run finishes;
    once both are free the replay moves everything into DuckDB exactly."""
    stack = world(env=FAST)
    stack.start_all()
    _first_run(stack)
    lite = Path(stack.env["ETL_DATA_DIR"]) / "fallback.sqlite"
    with holding(HOLD_DUCKDB, stack.duckdb_path), holding(HOLD_SQLITE, lite):
        _more_claims(stack)
        second = wait_end(stack, run_source("billing"), 120)
        assert second.status == "finished", second
        spooled = fallbacks_waiting()["spool"]
        assert spooled["rows"] == second.extracted >= 12_000
        assert _alerts(stack, "critical") == 1
    wait_until(lambda: fallbacks_waiting()["spool"]["chunks"] == 0, 60, "the replay")
    oracle.check(stack, "DuckDB and SQLite unusable, loads to the spool, replayed")
    assert stack.query("SELECT count(*) FROM etl_runs WHERE run_id = ?", [second.run_id]) == [
        (1,)]


def test_a_full_spool_disk_stores_nothing_half_and_acknowledges_nothing(world, tmp_path):
    """With both stores unusable and the spool on a full filesystem the chunk is not stored
    (a clear error, no half-written chunk, no checkpoint advance); once DuckDB is free the
    run finishes exactly."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs for the spool: run it as root (CI does)")
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(spool)], check=True)
    try:
        stack = world(env={**FAST, "ETL_SPOOL_DIR": str(spool)})
        stack.start_all()
        _first_run(stack)
        mark = stack.redis.hget("etl:checkpoint:billing", "key")
        lite = Path(stack.env["ETL_DATA_DIR"]) / "fallback.sqlite"
        with holding(HOLD_DUCKDB, stack.duckdb_path), holding(HOLD_SQLITE, lite):
            _more_claims(stack)
            handle = run_source("billing")
            log = stack.root / "logs" / "loader.log"
            wait_until(lambda: "spool's disk is full" in log.read_text(), 60,
                       "the loader to meet the full disk")
            assert handle.summary() is None, "a run finished with nothing stored"
            assert handle.progress()["chunks_done"] == 0
            assert stack.redis.hget("etl:checkpoint:billing", "key") == mark
            assert not list((spool / "tmp").glob("*")), "a half-written chunk was left"
            assert fallbacks_waiting()["spool"]["chunks"] == 0
        summary = wait_end(stack, handle, 150)
        assert summary.status == "finished", summary
        wait_until(lambda: fallbacks_waiting()["sqlite"]["chunks"] == 0, 60, "the replay")
        oracle.check(stack, "spool disk full, then DuckDB free")
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_the_loader_killed_mid_replay_doubles_nothing(world):
    """The loader killed right after the replay committed a chunk to DuckDB (before it was
    deleted from SQLite): the next replay finishes the job, nothing doubled."""
    stack = world(env=FAST)
    stack.start_all()
    _first_run(stack)
    with holding(HOLD_DUCKDB, stack.duckdb_path):
        _more_claims(stack)
        second = wait_end(stack, run_source("billing"), 120)
        assert second.status == "finished", second
        waiting = fallbacks_waiting()["sqlite"]["chunks"]
        stack.kill("loader")
    stack.start_loader(extra_env={"ETL_FAULT_POINT": "replay:2"})
    # The second chunk's DuckDB commit kills the loader's pool child before SQLite forgets
    # the chunk; the replay task comes back (reject on worker lost) and finishes the job.
    wait_until(lambda: int(stack.redis.get("etl:fault:replay:2") or 0) >= 2, 60,
               "the loader to be killed mid-replay")
    stack.mark_fault()
    wait_until(lambda: fallbacks_waiting()["sqlite"]["chunks"] == 0, 60, "the replay")
    assert "signal 9" in (stack.root / "logs" / "loader.log").read_text()
    oracle.check(stack, "loader killed mid-replay")
    [(chunks, distinct)] = stack.query(
        "SELECT count(*), count(DISTINCT chunk_id) FROM etl_load_ledger WHERE run_id = ?",
        [second.run_id])
    assert chunks == distinct == waiting



def test_quarantine_purge_drops_raw_values_and_keeps_the_accounting(world):
    """`etl quarantine purge --older-than 0` drops every quarantined row's raw values (patient
    data) through the loader; the rows, reasons and pointers stay, so the oracle still adds up."""
    stack = world()
    stack.start_all()
    _first_run(stack)
    [(rows, with_raw)] = stack.query("SELECT count(*), count(raw) FROM etl_quarantine")
    assert rows == with_raw > 0
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, "quarantine", "purge", "--older-than", "0"], env=stack.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{rows:,} quarantined row(s)" in done.stdout
    assert stack.query("SELECT count(*), count(raw) FROM etl_quarantine") == [(rows, 0)]
    oracle.check(stack, "quarantine raw values purged")
    # Re-reading everything afterwards finds the same bad rows: quarantined once, not again.
    again = wait_end(stack, run_source("billing", full=True), 120)
    assert (again.status, again.loaded, again.quarantined) == ("finished", 0, 0), again
    assert stack.query("SELECT count(*), count(raw) FROM etl_quarantine") == [(rows, 0)]
    oracle.check(stack, "re-read after the purge")


def test_a_failing_task_is_reported_to_sentry_without_patient_data(world):
    """With ETL_SENTRY_DSN pointing at a receiver on loopback, a plan that fails (its table
    does not exist) is reported by the worker's Sentry integration, with our safe message."""
    with http_receiver() as sentry:
        received = sentry.bodies
        dsn = sentry.url.replace("http://", "http://public@") + "/1"
        stack = world(location="NO_SUCH_TABLE", env={"ETL_SENTRY_DSN": dsn})
        stack.start_all()
        failed = wait_end(stack, run_source("billing"), 60)
        assert failed.status == "failed", failed
        wait_until(lambda: any(b"FatalError" in body for body in received), 30,
                   "the Sentry event")
    event = next(body for body in received if b"FatalError" in body)
    assert b"does not exist" in event
    assert b'"vars"' not in event
