"""load/fence.py against a real redis-server and real DuckDB, SQLite and spool files: one
holder of the writer lease, higher tokens for later holders, and a stale writer's commit
refused in every store with nothing of it left behind."""

from __future__ import annotations

import pytest

from etl_tasks.config import Settings
from etl_tasks.errors import FencedOut
from etl_tasks.load import duckdb as store
from etl_tasks.load import fence, spool, sqlite
from etl_tasks.load.writer import StoreChain
from etl_tasks.transform import transform_chunk
from tests.unit.test_transform import claims


def _chunk(chunk_id: str):
    result = transform_chunk("billing_claims", claims({}, {}))
    return {"source": "billing", "table": "billing_claims", "dataset": "billing_claims",
            "entry": store.LedgerEntry("run-1", chunk_id, chunk_id, "range"),
            "valid": result.valid, "quarantined": result.quarantined}


def test_one_holder_and_a_higher_token_for_the_next(client):
    """The first loader takes the lease; the second sees it held; after a release the second
    takes it with a higher token, and the first can no longer renew it."""
    r = client()
    first, ours = fence.hold(r, "loader-1@h", 5, None)
    assert (first, ours) == ("1:loader-1@h", True)
    assert fence.hold(r, "loader-2@h", 5, None) == (first, False)
    assert fence.hold(r, "loader-1@h", 5, first) == (first, True)  # renewed
    with pytest.raises(FencedOut, match="does not hold the writer lease"):
        fence.fence_for(r, "loader-2@h")
    assert fence.release(r, first)
    second, ours = fence.hold(r, "loader-2@h", 5, None)
    assert (second, ours) == ("2:loader-2@h", True)
    assert fence.hold(r, "loader-1@h", 5, first) == (second, False)
    assert fence.fence_for(r, "loader-2@h").token == 2


def test_a_stale_writer_commits_nowhere(client, tmp_path):
    """After a takeover the old writer's chunk is refused by DuckDB, SQLite and the spool,
    each rolled back whole; the new writer's commits carry its token."""
    r = client()
    fence.hold(r, "old@h", 5, None)
    old = fence.fence_for(r, "old@h")
    fence.release(r, old.value)
    fence.hold(r, "new@h", 5, None)
    new = fence.fence_for(r, "new@h")
    con = store.connect(tmp_path / "warehouse.duckdb")
    lite = sqlite.connect(tmp_path / "fallback.sqlite")
    try:
        with pytest.raises(FencedOut, match="lease is now 2:new@h"):
            store.write_chunk(con, **_chunk("c1"), fence=old)
        with pytest.raises(FencedOut):
            sqlite.write_chunk(lite, **_chunk("c1"), fence=old)
        with pytest.raises(FencedOut):
            spool.write_chunk(tmp_path / "spool", **_chunk("c1"), fence=old)
        assert con.execute("SELECT count(*) FROM etl_load_ledger").fetchone() == (0,)
        assert sqlite.pending(lite) == []
        assert spool.pending(tmp_path / "spool") == []
        assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # nothing half-written

        store.write_chunk(con, **_chunk("c1"), fence=new)
        assert con.execute("SELECT writer_fence FROM etl_load_ledger").fetchall() == [(2,)]
        assert con.execute("SELECT fence FROM etl_writer").fetchall() == [(2,)]
        # Once the new writer sealed a store, the old token is refused there by the store
        # itself, even were the lease to come back to the old writer's value.
        r.set(fence.LEASE, old.value)
        with pytest.raises(FencedOut, match="store's fence is 2"):
            store.write_chunk(con, **_chunk("c2"), fence=old)
    finally:
        con.close()
        lite.close()


def test_records_are_fenced_and_never_step_down(client, tmp_path, monkeypatch):
    """A stale writer's run record is refused in DuckDB and not written to a fallback."""
    monkeypatch.setenv("ETL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ETL_DUCKDB_PATH", str(tmp_path / "warehouse.duckdb"))
    r = client()
    fence.hold(r, "old@h", 5, None)
    old = fence.fence_for(r, "old@h")
    r.delete(fence.LEASE)  # the lease lapsed
    with StoreChain(Settings(), r, old) as chain, pytest.raises(FencedOut):
        chain.record("run", {"x": 1}, lambda con: con.execute(
            "CREATE TABLE written_by_a_stale_writer (x INT)"))
    assert not (tmp_path / "fallback.sqlite").exists()
    assert spool.records(tmp_path / "spool") == []
    with store.read_only(tmp_path / "warehouse.duckdb") as con:
        assert con.execute("SELECT count(*) FROM information_schema.tables WHERE "
                           "table_name = 'written_by_a_stale_writer'").fetchone() == (0,)


def test_redis_that_lost_the_counter_heals(client, tmp_path):
    """Redis restarted empty hands out token 1 below the store's fence 3: refused once, the
    counter is raised and the lease given up, and the next take is accepted."""
    r = client()
    con = store.connect(tmp_path / "warehouse.duckdb")
    try:
        r.set(fence.COUNTER, 2)
        fence.hold(r, "loader@h", 5, None)
        store.write_chunk(con, **_chunk("c1"), fence=fence.fence_for(r, "loader@h"))
        r.flushall()
        value, _ = fence.hold(r, "loader@h", 5, None)
        assert value == "1:loader@h"
        with pytest.raises(FencedOut, match="store's fence is 3"):
            store.write_chunk(con, **_chunk("c2"), fence=fence.fence_for(r, "loader@h"))
        assert fence.holder(r) is None  # given up
        value, _ = fence.hold(r, "loader@h", 5, None)
        assert value == "4:loader@h"
        store.write_chunk(con, **_chunk("c2"), fence=fence.fence_for(r, "loader@h"))
        assert con.execute("SELECT chunk_id, writer_fence FROM etl_load_ledger ORDER BY 1"
                           ).fetchall() == [("c1", 3), ("c2", 4)]
    finally:
        con.close()
