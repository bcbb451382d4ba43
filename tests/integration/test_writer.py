"""One writer (issue 10, FAULTS.md F11 and F12): two real loaders against one DuckDB file.

Only the holder of the writer lease consumes `load`; the other stands by. The writer killed
with SIGKILL is replaced by the standby within the lease time; a writer frozen with SIGSTOP
inside its commit, resumed after the standby took over, has that commit refused by the
fence. Each test ends with the shared oracle and the ledger: every chunk committed once, and
by whom (`etl_load_ledger.writer_fence`).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from etl_tasks.api import fallbacks_waiting, run_source
from etl_tasks.celery import app
from etl_tasks.load import fence
from etl_tasks.local_services import Worker
from tests.integration import oracle
from tests.integration.fault_stack import WRITER_LEASE_S, FaultStack, wait_until
from tests.integration.test_faults import UNITS, chunks_done, wait_end

pytestmark = pytest.mark.integration

STANDBY_POLL_S = 1.0  # a standby tries the lease about every second (single_writer.py)


def queues() -> dict[str, set[str]]:
    """Worker name -> the queues it consumes, as `celery inspect active_queues` says."""
    replies = app.control.inspect(timeout=1).active_queues() or {}
    return {name: {q["name"] for q in qs} for name, qs in replies.items()}


def loaders_on(queue: str) -> list[str]:
    return sorted(name for name, qs in queues().items()
                  if name.startswith("loader-") and queue in qs)


def writer(stack: FaultStack) -> str | None:
    """The Celery name of the lease holder, None while nobody holds it."""
    value = fence.holder(stack.redis)
    return value.partition(":")[2] if value else None


def token(stack: FaultStack) -> int:
    """The lease holder's writer token."""
    value = fence.token_of(fence.holder(stack.redis))
    assert value is not None, "nobody holds the writer lease"
    return value


def node(worker: Worker) -> str:
    return FaultStack.node("loader", worker)


def start_writer_and_standby(stack: FaultStack, writer_env: dict[str, str]) -> tuple[
        Worker, Worker]:
    """The fleet and beat, a first loader that takes the lease, then a second beside it."""
    stack.start_fleet()
    stack.start_beat()
    first = stack.start_loader(writer_env)
    wait_until(lambda: (writer(stack) or "").startswith(node(first)), 30,
               "the first loader to take the writer lease")
    second = stack.start_loader(name="standby")
    return first, second


def ledger(stack: FaultStack, run_id: str) -> dict[str, int]:
    """chunk id -> the writer token that committed it; fails if a chunk is there twice."""
    rows = stack.query("SELECT chunk_id, writer_fence FROM etl_load_ledger WHERE run_id = ?",
                       [run_id])
    committed = {chunk: int(token) for chunk, token in rows}
    assert len(committed) == len(rows), f"a chunk committed twice: {sorted(rows)}"
    return committed


def test_two_loaders_started_together_one_writes(world):
    """Two loaders started at the same moment: exactly one consumes `load`, both `control`;
    the run loads every row once, every chunk committed by that one writer."""
    stack = world()
    fleet = stack.start_fleet(wait=False)
    first = stack.start_loader(wait=False)
    second = stack.start_loader(wait=False, name="loader2")
    stack.start_beat()
    stack.wait_for(FaultStack.node("fleet", fleet), node(first), node(second))
    on_control = wait_until(lambda: len(loaders_on("control")) == 2 and loaders_on("control"),
                            30, "both loaders on the control queue")
    [active] = loaders_on("load")
    assert active == writer(stack), (active, fence.holder(stack.redis))
    print(f"loaders {on_control}; the writer is {active}")

    handle = run_source("billing")
    summary = wait_end(stack, handle, 90)
    assert summary.status == "finished", summary
    oracle.check(stack, "two loaders started together")
    assert ledger(stack, handle.run_id) == dict.fromkeys(UNITS, token(stack))
    assert loaders_on("load") == [active], "the standby started consuming load"
    standby = "loader2" if active.startswith(node(first)) else "loader"
    log = (stack.root / "logs" / f"{standby}.log").read_text()
    assert "etl.load.chunk[" not in log, "the standby received a load task"


def test_writer_killed_the_standby_takes_over(world):
    """The writer killed with SIGKILL mid-run: the standby takes the lease within the lease
    time, consumes `load`, and the run finishes with every row once."""
    stack = world()
    # A second after each commit keeps the run going long enough to kill it mid-way.
    _, second = start_writer_and_standby(
        stack, {"ETL_FAULT_POINT": "after_commit", "ETL_FAULT_ACTION": "delay:1"})
    token_first = token(stack)
    handle = run_source("billing")
    wait_until(lambda: chunks_done(handle) >= 1, 60, "the first committed chunk", 0.05)
    assert handle.summary() is None, "the run ended before the fault"
    stack.kill("loader")
    killed_at = stack.mark_fault()
    wait_until(lambda: (writer(stack) or "").startswith(node(second)), WRITER_LEASE_S + 10,
               "the standby to take the writer lease", 0.05)
    took = time.monotonic() - killed_at
    wait_until(lambda: loaders_on("load") == [writer(stack)], 10, "the standby to consume load")
    consuming = time.monotonic() - killed_at
    print(f"writer killed: the standby took the lease after {took:.1f}s and consumed load "
          f"after {consuming:.1f}s (lease {WRITER_LEASE_S}s)")
    assert took <= WRITER_LEASE_S + STANDBY_POLL_S + 1

    summary = wait_end(stack, handle, 90)
    assert summary.status == "finished", summary
    oracle.check(stack, "writer killed, standby took over", fault_at=killed_at,
                 ended_at=stack.ended_at)
    token_second = token(stack)
    assert token_second > token_first
    committed = ledger(stack, handle.run_id)
    assert set(committed) == set(UNITS)
    assert set(committed.values()) == {token_first, token_second}, committed


def test_a_paused_writer_cannot_commit_after_the_standby_took_over(world):
    """The writer frozen with SIGSTOP inside its second commit (holding DuckDB's file), past
    its lease: the standby takes over and commits (to SQLite while the file is held); the
    frozen one, resumed, has its commit refused by the fence, and writes nothing after the
    takeover. The replay then brings every row into DuckDB exactly once."""
    stack = world(env={"ETL_STORE_LOCK_WAIT_S": "0.3", "ETL_REPLAY_EVERY_S": "1"})
    point = "before_commit:2"
    first, second = start_writer_and_standby(
        stack, {"ETL_FAULT_POINT": point, "ETL_FAULT_ACTION": "delay:3"})
    token_first = token(stack)
    r = stack.redis
    handle = run_source("billing")
    # The fault point counts its hits in Redis: at 2 the writer sleeps inside the commit
    # (3 s, far less than the pause: resumed, it goes straight on to COMMIT).
    wait_until(lambda: r.get(f"etl:fault:{point}") == "2", 60,
               "the writer inside its second commit", 0.01)
    os.killpg(first.pid, signal.SIGSTOP)
    stopped_at = stack.mark_fault()
    committed_before = set(r.smembers(f"etl:run:{handle.run_id}:done"))
    try:
        wait_until(lambda: (writer(stack) or "").startswith(node(second)), WRITER_LEASE_S + 10,
                   "the standby to take the writer lease", 0.05)
        took = time.monotonic() - stopped_at
        summary = wait_end(stack, handle, 90)
        assert summary.status == "finished", summary
        # The frozen writer still holds DuckDB's file: the standby committed to SQLite.
        assert fallbacks_waiting()["sqlite"]["chunks"] >= len(UNITS) - len(committed_before)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    log = stack.root / "logs" / "loader.log"
    wait_until(lambda: "commit refused" in log.read_text(), 30,
               "the resumed writer's commit to be refused")
    refused = time.monotonic() - resumed_at
    wait_until(lambda: fallbacks_waiting()["sqlite"]["chunks"] == 0, 60, "the replay")
    print(f"writer paused: the standby took the lease after {took:.1f}s (lease "
          f"{WRITER_LEASE_S}s); the resumed writer was refused {refused:.1f}s after SIGCONT")
    assert took <= WRITER_LEASE_S + STANDBY_POLL_S + 1

    oracle.check(stack, "writer paused past its lease", fault_at=stopped_at,
                 ended_at=stack.ended_at)
    token_second = token(stack)
    committed = ledger(stack, handle.run_id)
    assert set(committed) == set(UNITS)
    # Nothing the frozen writer began commits: its chunks are those done before the pause.
    assert {c for c, t in committed.items() if t == token_first} == committed_before
    assert stack.query("SELECT fence FROM etl_writer") == [(token_second,)]
    text = log.read_text()
    assert "lost the writer lease" in text
    assert loaders_on("load") == [writer(stack)]
