"""Splitting a key range that ran out of memory, against a real Redis: the plan, the window
and the key mark see its halves in its place."""

from __future__ import annotations

import pyarrow as pa

from etl_tasks import checkpoints, staging
from etl_tasks.runs import split, state, window
from etl_tasks.runs.state import Unit
from etl_tasks.sealing import Sealer

RUN = "run1"
SEALER = Sealer((bytes(32),))  # a fixed test key


def ranges(*bounds: tuple[int, int]) -> list[Unit]:
    return [Unit(f"billing:keys:{lo}-{hi}", "range", lo=lo, hi=hi) for lo, hi in bounds]


def test_halves_down_to_the_floor():
    """Halves keep the kind, window and attempts of the range; files and ranges at the floor
    are not split."""
    [unit] = ranges((1, 50_000))
    low, high = split.halves(unit, 1_000)
    assert (low.unit_id, high.unit_id) == ("billing:keys:1-25000", "billing:keys:25001-50000")
    assert (low.lo, low.hi, high.lo, high.hi) == (1, 25_000, 25_001, 50_000)
    updated = Unit("billing:updated:11-20:retry", "updated", lo=11, hi=20, since="a",
                   until="b", max_attempts=1)
    parts = split.halves(updated, 5)
    assert parts is not None
    assert [p.unit_id for p in parts] == ["billing:updated:11-15:retry",
                                         "billing:updated:16-20:retry"]
    assert {(p.kind, p.since, p.until, p.max_attempts) for p in parts} == {
        ("updated", "a", "b", 1)}
    assert split.halves(Unit("billing:keys:1-1000", "range", lo=1, hi=1_000), 1_000) is None
    assert split.halves(Unit("lab:file:ab", "file", path="/x.xml", sha256="ab"), 1) is None


def test_split_unit_replaces_it_in_plan_order_and_the_mark_walks_the_halves(client):
    """A range split at transform: its halves take its place in the plan and come next out
    of the window, its staged chunk is gone, a second split of it does nothing, and the key
    mark moves over the halves once both are committed."""
    r = client()
    units = ranges((1, 100), (101, 200), (201, 300))
    state.create(r, RUN, "billing")
    state.record_plan(r, RUN, units, 0, None)
    ids = [u.unit_id for u in units]
    assert window.release(r, RUN, 2) == ids[:2]
    for unit_id in ids[:2]:
        state.register_chunks(r, RUN, unit_id, {unit_id: 100})
    staging.put(r, SEALER, RUN, ids[1], "raw", pa.table({"x": [1]}), 60)

    parts = split.split_unit(r, RUN, ids[1], 10, "transform", "MemoryError")
    assert parts is not None
    halves = [p.unit_id for p in parts]
    assert halves == ["billing:keys:101-150", "billing:keys:151-200"]
    assert split.split_unit(r, RUN, ids[1], 10, "transform", "again") is None
    assert [u.unit_id for u in state.units(r, RUN)] == [ids[0], *halves, ids[2]]
    assert split.is_replaced(r, RUN, ids[1])
    assert ids[1] not in state.chunk_rows(r, RUN)
    assert r.keys(f"etl:stage:{RUN}:{ids[1]}:*") == []
    assert int(state.info(r, RUN)["units_total"]) == 4
    # The old range's slot is free: the first half is next (range 1 still holds a slot).
    assert window.release(r, RUN, 2) == halves[:1]

    for unit_id in (ids[0], halves[0]):
        state.register_chunks(r, RUN, unit_id, {unit_id: 50})
        state.mark_done(r, RUN, unit_id, 50, 0)
    assert checkpoints.advance_key(r, "billing", state.units(r, RUN),
                                   state.done_chunks(r, RUN), None) == 150
    assert not state.is_complete(r, RUN)
    assert window.release(r, RUN, 2) == [halves[1], ids[2]]
    for unit_id in (halves[1], ids[2]):
        state.register_chunks(r, RUN, unit_id, {unit_id: 50})
        state.mark_done(r, RUN, unit_id, 50, 0)
    assert checkpoints.advance_key(r, "billing", state.units(r, RUN),
                                   state.done_chunks(r, RUN), None) == 300
    assert state.is_complete(r, RUN)


def test_a_sampled_range_is_cut_at_its_middle_token_and_the_mark_walks_the_parts(client):
    """A sampled range's parts share the middle boundary's token (the first ends there, the
    second starts there), keep its kind and window, and take its place in the plan; the
    sampled mark walks them by token. Not cut without a middle (at its floor in rows, or no
    key inside it), nor without a way to find one."""
    r = client()
    units = [Unit(f"visits:skeys:{n}", "range", sampled=True, text_lo=lo, text_hi=hi)
             for n, (lo, hi) in enumerate([("", "t1"), ("t1", "t2"), ("t2", "t3")], start=1)]
    assert split.halves(units[1], 10) is None  # no middle finder: not cut
    assert split.halves(units[1], 10, lambda unit: None) is None
    state.create(r, RUN, "visits")
    state.record_plan(r, RUN, units, 0, None)
    asked: list[str] = []

    def middle(unit: Unit) -> str:
        asked.append(unit.unit_id)
        return "tm"

    parts = split.split_unit(r, RUN, "visits:skeys:2", 10, "extract", "MemoryError", middle)
    assert parts is not None
    assert [(p.unit_id, p.text_lo, p.text_hi, p.kind, p.sampled) for p in parts] == [
        ("visits:skeys:2.1", "t1", "tm", "range", True),
        ("visits:skeys:2.2", "tm", "t2", "range", True)]
    # Split once: a second delivery does not even look for a middle.
    assert split.split_unit(r, RUN, "visits:skeys:2", 10, "extract", "again", middle) is None
    assert asked == ["visits:skeys:2"]
    plan = [u.unit_id for u in state.units(r, RUN)]
    assert plan == ["visits:skeys:1", "visits:skeys:2.1", "visits:skeys:2.2", "visits:skeys:3"]
    done = {"visits:skeys:1", "visits:skeys:2.1"}
    assert checkpoints.advance_key(r, "visits", state.units(r, RUN), done, None) == "tm"
    done |= {"visits:skeys:2.2", "visits:skeys:3"}
    assert checkpoints.advance_key(r, "visits", state.units(r, RUN), done, None) == "t3"
