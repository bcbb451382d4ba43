"""Two beats on one Redis: one leads and each schedule fires once per tick; the leader killed
(kill -9), the other takes over within the lock timeout; the pipeline config of the last beat
started is what runs, and a removed source's entry is gone from Redis.

Firings are counted from the task-sent events that Celery's publishing code emits for every
message (with the sender's pid), captured from Redis as they happen, not from the beats' logs;
the leader is read from the lock's value in Redis.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from etl_tasks.celery import BEAT_KEY_PREFIX, app
from etl_tasks.scheduler import lock_holder
from etl_tasks.tasks import run_id_of
from tests.integration.fault_stack import CHUNK_SIZE, PIPELINE, FaultStack, wait_until

pytestmark = pytest.mark.integration

LOCK_S = 12  # the test's ETL_BEAT_LOCK_TIMEOUT_S: a 2-second loop, takeover within 14 s
LOOP_S = LOCK_S / 6
# Each entry's interval in the test's config: billing every 2 s, the supervisor every 1 s
# (fault_stack's FAST_SUPERVISOR), replay and check-health every 3 s.
EVERY = {"run-billing": 2.0, "supervise": 1.0, "replay": 3.0, "check-health": 3.0}
ENTRY_OF_TASK = {"etl.control.supervise": "supervise", "etl.load.replay": "replay",
                 "etl.control.check_health": "check-health",
                 "etl.load.purge_quarantine_raw": "purge-quarantine-raw"}
WINDOW_S = 24
AFTER_S = 9
LABS = """
[[sources]]
name = "labs"
kind = "xml"
location = "{data_dir}/labs"
schedule = 1
"""


def entry_of(event: dict[str, Any]) -> str:
    """The schedule entry a plan or periodic task message belongs to."""
    if event["name"] == "etl.plan.run_source":
        return "run-" + event["args"].split("'")[1]  # args: "[None, 'billing']"
    return ENTRY_OF_TASK.get(event["name"], event["name"])


@contextmanager
def task_events() -> Iterator[list[dict[str, Any]]]:
    """Every task-sent and task-succeeded event published while the block runs."""
    events: list[dict[str, Any]] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"task-sent": events.append,
                                                       "task-succeeded": events.append})
        thread = threading.Thread(target=receiver.capture, daemon=True,
                                  kwargs={"limit": None, "timeout": None, "wakeup": False})
        thread.start()
        try:
            yield events
        finally:
            receiver.should_stop = True
            thread.join(timeout=10)


def sends(events: list[dict[str, Any]], pids: set[int], start: float = 0,
          end: float = float("inf")) -> list[tuple[float, str, int, str]]:
    """(time, entry, pid, task id) of the messages the processes `pids` sent in [start, end)."""
    return sorted((e["timestamp"], entry_of(e), e["pid"], e["uuid"]) for e in list(events)
                  if e["type"] == "task-sent" and e["pid"] in pids
                  and start <= e["timestamp"] < end)


def leader_pid(stack: FaultStack) -> int | None:
    holder = lock_holder(stack.redis.get(f"{BEAT_KEY_PREFIX}:lock"))
    return holder[1] if holder else None


def check_ticks(fired: list[tuple[float, str, int, str]], start: float, end: float,
                label: str) -> None:
    """Each entry sent about once per interval over [start, end), never twice for one tick."""
    for entry, every in EVERY.items():
        times = [t for t, e, _, _ in fired if e == entry and start <= t < end]
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
        expected = (end - start) / every
        print(f"{label}: {entry} every {every:.0f} s: {len(times)} sends in {end - start:.1f} s "
              f"(expected {expected:.1f}), gaps {gaps}")
        assert 0.75 * expected - 1 <= len(times) <= expected + 1, (label, entry, times)
        # Two beats sending the same tick would put two sends within milliseconds.
        assert all(gap >= 0.5 * every for gap in gaps), (label, entry, gaps)


def test_two_beats_fire_each_tick_once_and_the_other_takes_over(world):
    stack = world(schedule="5", pipeline_extra=LABS,
                  env={"ETL_BEAT_LOCK_TIMEOUT_S": str(LOCK_S), "ETL_REPLAY_EVERY_S": "3",
                       "ETL_HEALTH_CHECK_EVERY_S": "3"})
    r = stack.redis
    # An earlier deployment: billing every 5 s and a source `labs` every second.
    old = stack.start_worker("beat", "beat0")
    wait_until(lambda: leader_pid(stack) == old.pid, 60, "the first beat to lead")
    assert r.sismember(f"{BEAT_KEY_PREFIX}:statics", "run-labs")
    old.stop()
    assert r.get(f"{BEAT_KEY_PREFIX}:lock") is None, "a beat stopped did not hand the lead over"
    # The config changes: labs removed, billing every 2 s; two beats start with it.
    (stack.root / "pipeline.toml").write_text(
        PIPELINE.format(location="BILLING_CLAIMS", schedule=2, chunk_size=CHUNK_SIZE))
    with task_events() as events:
        beats = {w.pid: w for w in (stack.start_worker("beat", "beat1"),
                                    stack.start_worker("beat", "beat2"))}
        fleet = stack.start_fleet(wait=False)
        stack.start_loader()
        stack.wait_for(f"fleet-{fleet.pid}@")
        leader = wait_until(lambda: leader_pid(stack) in beats and leader_pid(stack), 60,
                            "one of the two beats to lead")
        wait_until(lambda: sends(events, set(beats)), 30, "the leader's first send")
        # What Redis holds is the new config: labs gone, billing's new interval.
        assert not r.exists(f"{BEAT_KEY_PREFIX}run-labs")
        assert r.zscore(f"{BEAT_KEY_PREFIX}:schedule", f"{BEAT_KEY_PREFIX}run-labs") is None
        assert not r.sismember(f"{BEAT_KEY_PREFIX}:statics", "run-labs")
        assert '"every": 2.0' in r.hget(f"{BEAT_KEY_PREFIX}run-billing", "definition")

        start = time.time()
        time.sleep(WINDOW_S)
        fired = sends(events, set(beats), start, start + WINDOW_S)
        assert {pid for _, _, pid, _ in fired} == {leader}, "the beat standing by sent tasks"
        check_ticks(fired, start, start + WINDOW_S, "both beats up")

        # kill -9 the leader: its lock stays until it expires, then the other beat takes it.
        name = beats[leader].log_path.stem
        other = next(pid for pid in beats if pid != leader)
        killed_at = time.time()
        stack.kill(name)
        wait_until(lambda: leader_pid(stack) == other, LOCK_S + LOOP_S + 5,
                   "the other beat to take the lock", every=0.05)
        locked_at = time.time()
        first = wait_until(lambda: sends(events, {other}, killed_at), 10,
                           "the new leader's first send", every=0.05)[0][0]
        takeover = first - killed_at
        print(f"takeover: lock taken {locked_at - killed_at:.1f} s, first send "
              f"{takeover:.1f} s after the leader was killed (lock {LOCK_S} s, loop "
              f"{LOOP_S:.0f} s)")
        assert takeover <= LOCK_S + LOOP_S + 1, takeover
        time.sleep(AFTER_S)
        after = sends(events, {other}, first, first + AFTER_S)
        check_ticks(after, first, first + AFTER_S, "after the takeover")
        time.sleep(2)  # the last supervisor runs end
        everything = sends(events, set(beats))
        succeeded = {e["uuid"] for e in list(events) if e["type"] == "task-succeeded"}

    # Before the kill only the leader sent, after it only the other beat.
    assert {pid for t, _, pid, _ in everything if t < killed_at} == {leader}
    assert {pid for t, _, pid, _ in everything if t > killed_at} == {other}
    # Nothing from the removed source, and the 6-hour purge was not sent at start or takeover
    # (an entry keeps its last run: a new leader does not treat it as never run).
    assert {e for _, e, _, _ in everything} == set(EVERY), {e for _, e, _, _ in everything}
    # The supervisor still runs: its messages were sent and a worker ran them, under both.
    for pid in (leader, other):
        ran = [u for _, e, p, u in everything if e == "supervise" and p == pid
               and u in succeeded]
        assert len(ran) >= 3, f"supervise ran {len(ran)} times under beat {pid}"
    # Billing's runs are the beats' sends (a run's id is its plan message's): none other.
    runs = set(r.lrange("etl:runs:billing", 0, -1))
    sent = {run_id_of(u) for _, e, _, u in everything if e == "run-billing"}
    assert len(runs) >= 2, runs
    assert runs <= sent, runs - sent
