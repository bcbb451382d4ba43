"""Backpressure against a real Redis: the run's window admits units while fewer than
`window` chunks are extracted and not committed, and staging refuses to fill Redis."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from etl_tasks import staging
from etl_tasks.errors import TransientError
from etl_tasks.runs import dead_letters, state, window
from etl_tasks.runs.state import Unit
from etl_tasks.sealing import Sealer

RUN = "run1"
SEALER = Sealer((bytes(32),))  # a fixed test key


def plan(r, *units: Unit) -> None:
    state.create(r, RUN, "billing")
    assert state.record_plan(r, RUN, list(units), 0, None)


def ranges(n: int) -> list[Unit]:
    return [Unit(f"billing:keys:{i * 10 + 1}-{i * 10 + 10}", "range", lo=i * 10 + 1,
                 hi=i * 10 + 10) for i in range(n)]


def test_window_admits_units_as_chunks_commit(client):
    """Two slots: two ranges admitted at plan time, none while both are extracted and
    staged, the next one after each commit or dead letter, each unit once."""
    r = client()
    units = ranges(5)
    plan(r, *units)
    ids = [u.unit_id for u in units]
    assert window.release(r, RUN, 2) == ids[:2]
    assert window.release(r, RUN, 2) == [], "admitted twice, or past the window"
    state.register_chunks(r, RUN, ids[0], {ids[0]: 10})
    state.register_chunks(r, RUN, ids[1], {ids[1]: 10})
    assert window.release(r, RUN, 2) == []  # extracted but not committed: still in flight
    assert window.in_flight(r, RUN) == 2
    state.mark_done(r, RUN, ids[0], 10, 0)
    assert window.release(r, RUN, 2) == [ids[2]]
    assert window.release(r, RUN, 2) == []
    # A dead letter frees its slot too.
    dead_letters.record(r, RUN, "billing", "extract", ids[2], units[2], "poison", 3)
    assert window.release(r, RUN, 2) == [ids[3]]
    assert window.held(r, RUN) == {ids[4]}


def test_a_file_counts_its_chunks_not_one_unit(client):
    """A file staged as three chunks occupies three slots: nothing more is admitted until
    enough of them commit."""
    r = client()
    files = [Unit(f"lab:file:{n}", "file", path=f"/inbox/{n}.xml", sha256=str(n) * 64)
             for n in range(3)]
    plan(r, *files)
    assert window.release(r, RUN, 2) == ["lab:file:0", "lab:file:1"]
    chunks = {f"lab:file:0:{i}": 100 for i in range(3)}
    state.register_chunks(r, RUN, "lab:file:0", chunks)
    assert window.release(r, RUN, 2) == []  # 3 staged chunks + 1 unit extracting
    state.register_chunks(r, RUN, "lab:file:1", {})  # refused whole: nothing staged
    state.mark_done(r, RUN, "lab:file:0:0", 100, 0)
    assert window.release(r, RUN, 2) == []  # still 2 chunks staged
    state.mark_done(r, RUN, "lab:file:0:1", 100, 0)
    assert window.release(r, RUN, 2) == ["lab:file:2"]


def test_staging_refuses_to_fill_redis(client):
    """Staging stops at its share of maxmemory with a TransientError (retried later), and
    a write Redis refuses as out of memory is a TransientError too, not a crash."""
    r = client()
    r.config_set("maxmemory", str(8 << 20))
    try:
        # Random bytes do not compress: each payload is about 1 MB.
        table = pa.table({"blob": [os.urandom(1 << 20)]})
        with pytest.raises(TransientError, match="Redis staging is full"):  # noqa: PT012
            for n in range(16):
                staging.put(r, SEALER, RUN, f"c{n}", "raw", table, 60)
        assert n >= 2, f"refused at the {n + 1}th payload: the fence is too tight"
        used = int(r.info("memory")["used_memory"])
        assert used < 8 << 20, "staging filled Redis past maxmemory"
        r.config_set("maxmemory", str(used - (1 << 20)))  # now Redis itself is over it
        with pytest.raises(TransientError, match="Redis is full"), \
                staging.translate_errors("a test payload"):
            r.set("etl:stage:x", b"x")
    finally:
        r.config_set("maxmemory", str(64 << 20))
