"""The loader's side of the single writer: the lease it keeps and when it consumes `load`.

A worker started on the `load` queue (`python -m workers.loader`, or any `celery worker -Q
load,...`) does not consume it at first: `celeryd_after_setup` takes `load` out of its queues
and notes the worker's name, which its pool process inherits and seals every write with
(`fence()`, load/fence.py). Its main process keeps the writer lease with a thread
(`LeaseKeeper`): renewed every third of ETL_WRITER_LEASE_S while held, tried about every
second while another loader holds it. The consumer step `WriterLease` adds the `load`
consumer while the lease is held and cancels it once it is not, in the worker's event loop.
So a second loader is a standby that consumes only `control` and takes over within the
lease time when the writer dies or freezes. A clean shutdown releases the lease once the
pool has finished its task.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import bootsteps
from celery.signals import celeryd_after_setup, worker_shutdown

from etl_tasks.celery import app
from etl_tasks.load import fence as fencing
from etl_tasks.load.fence import WriterFence
from etl_tasks.resources import get_resources

log = logging.getLogger(__name__)

LOAD_QUEUE = "load"
RECONCILE_S = 0.5  # how soon the event loop follows the lease (consume load or stop)

_name: str | None = None
"""This worker's node name when it is a loader; set before its pool forks."""
_keeper: LeaseKeeper | None = None


def fence() -> WriterFence:
    """The writer fence for this loader's pool process; FencedOut unless its worker holds
    the lease now (the message then goes back for the writer before any work is done)."""
    return fencing.fence_for(get_resources().redis, _name)


class LeaseKeeper:
    """Holds (or waits for) the writer lease from a thread of the loader's main process."""

    def __init__(self, r: redis.Redis, name: str, ttl_s: float) -> None:
        self.redis, self.name, self.ttl_s = r, name, ttl_s
        self.value: str | None = None  # `<token>:<name>` while this worker holds the lease
        self._valid_until = 0.0
        self._unreachable = False  # log a Redis outage once, not every second
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer-lease", daemon=True)

    def start(self) -> LeaseKeeper:
        self.tick()  # at once: two loaders started together race for it now
        self._thread.start()
        return self

    def holding(self) -> bool:
        # Measured from before the last successful renewal, so never later than Redis's
        # own expiry; a renewal thread stuck on a silent Redis lets this lapse too.
        return self.value is not None and time.monotonic() < self._valid_until

    def current(self) -> str | None:
        """Who holds the lease now, read afresh (None also when Redis does not answer)."""
        try:
            return fencing.holder(self.redis)
        except redis.RedisError:
            return None

    def tick(self) -> None:
        began = time.monotonic()
        try:
            holder, ours = fencing.hold(self.redis, self.name, self.ttl_s, self.value)
        except redis.RedisError as exc:
            if not self._unreachable:
                log.warning("writer lease: Redis unreachable (%s); %s", type(exc).__name__,
                            "it lapses unless renewed" if self.value else "standing by")
            self._unreachable = True
            return
        self._unreachable = False
        if ours and holder != self.value:
            log.warning("%s took the writer lease (token %s)", self.name,
                        fencing.token_of(holder))
        self.value = holder if ours else None
        if ours:
            self._valid_until = began + self.ttl_s

    def _run(self) -> None:
        while not self._stopping.wait(self._interval()):
            self.tick()

    def _interval(self) -> float:
        third = self.ttl_s / 3
        return third if self.value else min(third, 1.0)

    def stop(self) -> None:
        """Stop renewing and release the lease (the standby takes over at once)."""
        self._stopping.set()
        self._thread.join(timeout=5)
        if self.value is not None:
            try:
                fencing.release(self.redis, self.value)
            except redis.RedisError:
                return  # it expires by itself
            log.info("%s released the writer lease (token %s)", self.name,
                     fencing.token_of(self.value))
            self.value = None


class WriterLease(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consume `load` exactly while this loader holds the writer lease."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        global _keeper
        if _name is None:
            return  # not a loader
        if _keeper is None:
            settings = get_resources().settings
            _keeper = LeaseKeeper(get_resources().redis, _name, settings.writer_lease_s).start()
        self.reconcile(c)
        self.tref = c.timer.call_repeatedly(RECONCILE_S, self.reconcile, (c,))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    def reconcile(self, c: Any) -> None:
        keeper = _keeper
        if keeper is None or c.task_consumer is None:
            return
        consuming = c.task_consumer.consuming_from(LOAD_QUEUE)
        if keeper.holding() and not consuming:
            c.add_task_queue(LOAD_QUEUE)
            log.warning("%s is the writer now: consuming %s", keeper.name, LOAD_QUEUE)
        elif consuming and not keeper.holding():
            c.cancel_task_queue(LOAD_QUEUE)
            log.error("%s lost the writer lease (not renewed in time; held now by %s): it "
                      "stops consuming %s and stands by; a commit it had begun is refused and "
                      "its message goes back to the writer", keeper.name,
                      keeper.current() or "nobody", LOAD_QUEUE)


def _stand_by(sender: str, instance: Any, **_: Any) -> None:
    """A worker asked to consume `load` starts without it, as a standby (before its pool
    forks, so the pool process knows the worker's name)."""
    global _name
    queues = instance.app.amqp.queues
    if LOAD_QUEUE in queues.consume_from:
        queues.deselect(LOAD_QUEUE)
        _name = sender


def _release(**_: Any) -> None:
    # Sent after a warm shutdown let the pool finish its task: no commit is cut short.
    if _keeper is not None:
        _keeper.stop()


celeryd_after_setup.connect(_stand_by, weak=False)
worker_shutdown.connect(_release, weak=False)
app.steps["consumer"].add(WriterLease)
