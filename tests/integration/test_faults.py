"""Real faults, no mocks (../shared/FAULTS.md, issue 7): processes killed with SIGKILL, Redis
killed and restarted, staged payloads deleted, poison work, a failing scheduled run and a
message delivered twice. Each test has its own world (fault_stack.py) and ends with the
shared oracle (oracle.py): every source row loaded once, quarantined or dead-lettered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from etl_tasks.api import RunHandle, run_source
from etl_tasks.celery import app
from etl_tasks.demo_data import generate_claims
from tests.integration import oracle
from tests.integration.fault_stack import FaultStack, wait_until

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 3
UNITS = [f"billing:keys:{lo}-{lo + 1999}" for lo in range(1, 12_000, 2_000)]
POISON = {"ETL_FAULT_ACTION": "raise"}




class DeathWatch:
    """Notes when a worker's main process or one of its pool children first died, and
    starts a replacement (`restart`) when the main process is gone."""

    def __init__(self, stack: FaultStack, name: str,
                 restart: Callable[[], object] | None = None) -> None:
        self.stack, self.name, self.restart = stack, name, restart
        self.children = set(stack.pool_children(name))
        self.restarts = 0

    def __call__(self) -> None:
        if not self.stack.alive(self.name):
            if self.stack.fault_at is None:
                self.stack.mark_fault()
            if self.restart is not None:
                self.restart()
                self.restarts += 1
                self.children = set(self.stack.pool_children(self.name))
            return
        if self.children - set(self.stack.pool_children(self.name)) and (
                self.stack.fault_at is None):
            self.stack.mark_fault()


def wait_end(stack: FaultStack, handle: RunHandle, timeout: float,
             watch: Callable[[], None] | None = None) -> Any:
    """The run's summary once it ended; fails after `timeout` with its progress."""
    deadline = time.monotonic() + timeout
    while True:
        if watch is not None:
            watch()
        try:
            summary = handle.summary()
        except (redis.ConnectionError, redis.TimeoutError):
            summary = None
        if summary is not None:
            stack.ended_at = time.monotonic()
            return summary
        if time.monotonic() > deadline:
            try:
                progress = handle.progress()
            except redis.RedisError as exc:
                progress = {"unreadable": type(exc).__name__}
            raise AssertionError(f"run {handle.run_id} did not end within {timeout:.0f}s: "
                                 f"{progress}; {stack.logs()}")
        time.sleep(0.2)


def check(stack: FaultStack, label: str) -> oracle.Tally:
    return oracle.check(stack, label, fault_at=stack.fault_at, ended_at=stack.ended_at)


def chunks_done(handle: RunHandle) -> int:
    try:
        return int(handle.progress()["chunks_done"])
    except (redis.RedisError, KeyError):
        return 0


def ledger_mark(stack: FaultStack) -> int:
    """The key mark the ledger justifies: the end of the committed ranges contiguous from
    the first key."""
    mark = 0
    for lo, hi in stack.query("SELECT DISTINCT key_lo, key_hi FROM etl_load_ledger "
                              "WHERE source = 'billing' AND kind = 'range' ORDER BY 1"):
        if lo > mark + 1:
            break
        mark = max(mark, hi)
    return mark


def test_pool_child_killed_mid_transform(world):
    """A pool child killed by SIGKILL mid-transform: its message is requeued, the run finishes
    with every row loaded or quarantined once."""
    stack = world()
    stack.start_all(fleet_env={"ETL_FAULT_POINT": "transform:1"})
    watch = DeathWatch(stack, "fleet")
    summary = wait_end(stack, run_source("billing"), 120, watch)
    assert stack.fault_at is not None, "the transform fault point never killed a pool child"
    assert summary.status == "finished", summary
    check(stack, "pool child killed mid-transform")


def test_fleet_main_process_killed_mid_run(world):
    """The fleet's main process and children killed mid-run, a new fleet started: the
    supervisor re-sends what the dead one held and the run finishes within 120 s."""
    stack = world()
    stack.start_all()
    handle = run_source("billing")
    wait_until(lambda: stack.stage_keys(handle.run_id), 60, "the first staged chunk", 0.01)
    assert handle.summary() is None, "the run ended before the fault"
    stack.kill("fleet")
    killed_at = stack.mark_fault()
    stack.start_fleet()
    summary = wait_end(stack, handle, 120 - (time.monotonic() - killed_at))
    assert summary.status == "finished", summary
    check(stack, "fleet main process killed")


@pytest.mark.parametrize("point", ["before_commit:2", "after_commit:2"])
def test_loader_killed_around_its_commit(world, point):
    """The loader killed just before or just after its second commit (restarted when it
    died): nothing lost or doubled, and each chunk is in the ledger once."""
    stack = world()
    stack.start_all(loader_env={"ETL_FAULT_POINT": point})
    watch = DeathWatch(stack, "loader", restart=lambda: stack.start_loader(wait=False))
    handle = run_source("billing")
    summary = wait_end(stack, handle, 120, watch)
    assert stack.fault_at is not None, f"the {point} fault point never killed the loader"
    assert summary.status == "finished", summary
    check(stack, f"loader killed at {point}")
    twice = stack.query("SELECT chunk_id, count(*) FROM etl_load_ledger GROUP BY chunk_id "
                        "HAVING count(*) > 1")
    assert twice == [], f"chunks in the ledger more than once: {twice}"
    [(chunks,)] = stack.query("SELECT count(*) FROM etl_load_ledger WHERE run_id = ?",
                              [handle.run_id])
    assert chunks == len(UNITS)


def test_redis_restarted_empty_mid_run(world):
    """Redis killed mid-run and restarted empty: the waiter ends (never hangs), the next run
    loads what is missing, the key mark matches the ledger, nothing is doubled."""
    stack = world(appendonly=False)
    stack.start_all()
    handle = run_source("billing")
    wait_until(lambda: chunks_done(handle) >= 1, 60, "the first committed chunk", 0.01)
    assert handle.summary() is None, "the run ended before the fault"
    stack.restart_redis()
    stack.mark_fault()
    first = wait_end(stack, handle, 60)
    assert first.status in ("finished", "failed"), first
    if first.status == "failed":
        assert first.error, "a failed run must say why"
    again = wait_end(stack, run_source("billing"), 120)
    assert again.status == "finished", again
    check(stack, f"redis restarted empty (first run {first.status})")
    mark = stack.redis.hget("etl:checkpoint:billing", "key")
    assert mark is not None, "no key mark after a finished run"
    assert int(mark) == ledger_mark(stack) == 12_000


def test_redis_restarted_from_its_append_only_file_mid_run(world):
    """Redis killed mid-run and restarted from its append-only file: the run ends (or fails
    with a reason and the next run completes); nothing is lost or doubled."""
    stack = world(appendonly=True)
    stack.start_all()
    handle = run_source("billing")
    # An operator follows the run from the CLI: it must outlive the restart, not crash.
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    follower = subprocess.Popen([etl, "wait", handle.run_id, "--json"], env=stack.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: chunks_done(handle) >= 1, 60, "the first committed chunk", 0.01)
    assert handle.summary() is None, "the run ended before the fault"
    stack.restart_redis()  # appendfsync everysec: the last second's writes may be lost
    stack.mark_fault()
    first = wait_end(stack, handle, 120)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode in (0, 1), err
    assert "Traceback" not in err
    assert [s["status"] for s in json.loads(out)] == [first.status]
    label = f"redis restarted from its AOF (run {first.status})"
    if first.status == "failed":
        assert first.error, "a failed run must say why"
        again = wait_end(stack, run_source("billing"), 120)
        assert again.status == "finished", again
    else:
        assert first.status == "finished", first
    check(stack, label)


def test_staged_payloads_deleted_before_their_load(world):
    """Every staged payload deleted while the loader is down: the work is extracted again and
    the run finishes with every row, not failed."""
    stack = world(env={"ETL_STAGE_WINDOW": "100"})  # every unit staged while the loader is down
    stack.start_all()
    # A first run while the loader is up: a fresh Redis has the loader rebuild checkpoints
    # from the ledger before anything is planned.
    assert wait_end(stack, run_source("billing"), 120).status == "finished"
    generate_claims(stack.firebird_target, 12_001, 12_000)
    stack.workers["loader"].stop()
    handle = run_source("billing")

    def all_transformed() -> bool:
        p = handle.progress()
        return bool(p["units_total"] and p["units_split"] == p["units_total"]
                    and len(stack.stage_keys(handle.run_id, "valid")) == p["chunks_total"])

    wait_until(all_transformed, 60, "every chunk transformed (a valid payload staged for each)")
    stack.redis.delete(*stack.stage_keys())
    stack.mark_fault()
    stack.start_loader()
    summary = wait_end(stack, handle, 120)
    assert summary.status == "finished", summary
    check(stack, "staged payloads deleted")


@pytest.mark.parametrize("action", ["raise", "kill"])
def test_poison_unit_is_dead_lettered_and_loaded_once_fixed(world, action):
    """A unit that raises (or kills its worker) every time becomes a dead letter after
    ETL_MAX_ATTEMPTS attempts, the run ends partial with the rest loaded, and the next run,
    with the fault gone, loads the dead range and resolves the dead letter. A unit that
    kills its worker is first split in halves (it may be out of memory): the half with the
    fault is dead at the floor (1,000 keys), the other half loads."""
    stack = world()
    # billing:keys:4001-6000, or its half billing:keys:4001-5000 once split
    poison = UNITS[2] if action == "raise" else "billing:keys:4001-5000"
    stack.start_all(fleet_env={"ETL_FAULT_POINT": "extract@billing:keys:4001",
                               "ETL_FAULT_ACTION": action})
    stack.mark_fault()
    first = wait_end(stack, run_source("billing"), 150)
    assert first.status == "partial", first
    assert [d["item"] for d in first.dead_letters] == [poison], first.dead_letters
    [dead] = first.dead_letters
    assert dead["stage"] == "extract"
    assert dead["attempts"] == MAX_ATTEMPTS, dead
    assert dead["reason"], dead
    tally = check(stack, f"poison unit ({action}), first run")
    assert tally.dead_lettered == (2_000 if action == "raise" else 1_000)
    [(dead_id, status)] = stack.query(
        "SELECT dead_letter_id, status FROM etl_dead_letters WHERE item_id = ?", [poison])
    assert status == "open"

    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    if action == "raise":
        # The next run, the fault still there, is not failed by it: one attempt, rest loaded.
        again = wait_end(stack, run_source("billing"), 120)
        assert again.status == "partial", again
        assert [(d["item"], d["attempts"]) for d in again.dead_letters] == [(poison, 1)]
        listed = subprocess.run([etl, "dead-letters", "--json"], env=stack.env,
                                capture_output=True, text=True, timeout=60, check=True)
        letters = {d["dead_letter_id"]: d for d in json.loads(listed.stdout)}
        assert dead_id in letters
        assert letters[dead_id]["pointer"] == "keys 4001-6000"
        assert "InjectedFault" in letters[dead_id]["reason"]

    stack.kill("fleet")  # the fault is fixed: a fleet without it
    stack.start_fleet()
    stack.fault_at = None
    if action == "raise":  # the operator sends the dead work again by hand
        done = subprocess.run([etl, "retry", dead_id, "--wait", "--json"], env=stack.env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        [retried] = json.loads(done.stdout)
        assert (retried["status"], retried["loaded"] + retried["quarantined"]) == (
            "finished", 2_000)
    second = wait_end(stack, run_source("billing"), 120)
    assert second.status == "finished", second
    assert stack.query("SELECT DISTINCT status FROM etl_dead_letters") == [("resolved",)]
    tally = check(stack, f"poison unit ({action}), run after the fix")
    assert tally.dead_lettered == 0


# poison unit -> (key mark after the partial run, claims updated afterwards)
UPDATE_CASES = {"billing:keys:1-": (0, [2_500, 4_321, 7_001, 11_999]),  # above the mark
                "billing:keys:10001": (10_000, [17, 2_500, 4_321, 9_999])}  # below it


@pytest.mark.parametrize("poison", list(UPDATE_CASES))
def test_updates_after_a_partial_run_are_never_skipped(world, poison):
    """The first run ends partial (its first, or its last, range poison); claims in ranges
    it committed are updated at the source; the next run stores their new versions."""
    stack = world()
    stack.start_all(fleet_env={"ETL_FAULT_POINT": f"extract@{poison}", **POISON})
    first = wait_end(stack, run_source("billing"), 150)
    assert first.status == "partial", first
    mark, claims = UPDATE_CASES[poison]
    assert int(stack.redis.hget("etl:checkpoint:billing", "key") or 0) == mark
    stack.firebird(
        "UPDATE BILLING_CLAIMS SET AMOUNT = AMOUNT + 100, UPDATED_AT = CURRENT_TIMESTAMP, "
        # TRIM: Firebird types IIF of literals as CHAR of the longest ('paid  ').
        "STATUS = TRIM(IIF(STATUS = 'paid', 'denied', 'paid')) "
        f"WHERE CLAIM_ID IN ({', '.join(map(str, claims))})")
    assert set(oracle.stale_versions(stack, claims)) == set(claims)

    stack.kill("fleet")  # the fault is fixed: a fleet without it
    stack.start_fleet()
    second = wait_end(stack, run_source("billing"), 120)
    assert second.status == "finished", second
    assert oracle.stale_versions(stack, claims) == {}
    check(stack, f"updates after a partial run (poison {poison})")


def _runs_of(r: redis.Redis, source: str) -> dict[str, dict[str, str]]:
    records = {}
    for name in r.scan_iter(match="etl:run:*", count=1000):
        run_id = name.removeprefix("etl:run:")
        if ":" not in run_id:
            data = r.hgetall(name)
            if data.get("source") == source:
                records[run_id] = data
    return records


def test_failing_scheduled_run_is_marked_failed_and_frees_the_source(world):
    """A beat-scheduled run that fails (its table does not exist) is marked failed with a
    reason naming the table, releases the source's lease, and the next tick runs too."""
    stack = world(location="NO_SUCH_TABLE", schedule="2")
    stack.start_all()
    r = stack.redis

    def failed_runs() -> dict[str, dict[str, str]]:
        return {run_id: data for run_id, data in _runs_of(r, "billing").items()
                if data.get("status") == "failed"}

    failed = wait_until(lambda: len(failed_runs()) >= 2 and failed_runs(), 30,
                        "two failed scheduled runs of billing", 0.5)
    for run_id, data in failed.items():
        assert "NO_SUCH_TABLE" in data.get("error", "").upper(), (run_id, data)
    print(f"{len(failed)} failed scheduled runs, e.g. {next(iter(failed.values()))['error']}")
    assert r.get("etl:lock:billing") not in failed, "a failed run still holds the lease"


def test_same_load_message_delivered_twice(world):
    """The load message of a committed chunk delivered twice with the same task id: one
    effect, the chunk is in the ledger once."""
    stack = world()
    stack.start_all()
    handle = run_source("billing")
    summary = wait_end(stack, handle, 120)
    assert summary.status == "finished", summary
    chunk = UNITS[0]
    before = stack.query("SELECT count(*), sum(amount), max(_loaded_at) FROM billing_claims")
    ledger = stack.query("SELECT loaded_at FROM etl_load_ledger WHERE chunk_id = ?", [chunk])
    assert len(ledger) == 1
    task_id = str(uuid.uuid4())
    for _ in range(2):
        app.send_task("etl.load.chunk", args=(handle.run_id, chunk), task_id=task_id,
                      queue="load")
    log = stack.root / "logs" / "loader.log"
    done = f"etl.load.chunk[{task_id}] succeeded"
    wait_until(lambda: log.read_text().count(done) == 2, 30, "the loader to run both deliveries")
    results = [line for line in log.read_text().splitlines() if done in line]
    assert all("'already_loaded': True" in line for line in results), results
    assert stack.query("SELECT count(*), sum(amount), max(_loaded_at) FROM billing_claims"
                       ) == before
    assert stack.query("SELECT loaded_at FROM etl_load_ledger WHERE chunk_id = ?",
                       [chunk]) == ledger
    check(stack, "load message delivered twice")
