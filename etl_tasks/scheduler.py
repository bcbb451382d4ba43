"""Beat's scheduler for a fleet: any number of beat processes on any hosts, one leads.

redbeat's RedBeatScheduler (celery-redbeat) keeps the schedule in Redis, an entry per name
under `etl:beat:` with the due times in `etl:beat::schedule`, and a leader lock,
`etl:beat::lock`. Only the beat holding the lock reads the due entries and sends them; it
renews the lock to ETL_BEAT_LOCK_TIMEOUT_S at every loop, so when it dies the lock expires and
another beat takes it. An entry's last run is kept in Redis, so the new leader sends what fell
due meanwhile once and goes on from there.

Every beat installs the static schedule (beat_schedule.py) when it starts, leading or not:
definitions are replaced (a changed interval counts from the entry's last run), the entries
no longer in it (a removed source, a source made manual) are deleted, and each entry keeps
its last run, so a restart neither repeats nor skips a tick. All beats must run the same
pipeline config: the last one started writes the schedule every beat follows.

What this subclass changes, and why:
- The lock is taken in `tick`, one try per loop, instead of once and blocking at beat_init.
  A beat whose lock was lost (Redis restarted empty or failed over, or another beat took it
  while this one was paused) stands by and tries again, where redbeat's tick raises
  LockNotOwnedError and ends the process; a Redis it cannot reach is waited for the same way.
- The lock's value names its holder, `host:pid:random`: `GET etl:beat::lock` says who leads.
- Redis that lost its data lost the schedule too: a beat taking the lock installs it again
  when the set of installed names (`etl:beat::statics`) is gone.

A leader paused after renewing its lock and before sending, for longer than the lock
timeout, can send one tick the next leader also sends: every scheduled task tolerates it (a
source's run lease refuses a second run in flight; supervise, replay, check_health and the
purge are idempotent).
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import suppress
from typing import Any

from celery.signals import beat_init
from celery.utils.log import get_logger
from redbeat.schedulers import (
    LUA_EXTEND_TO_SCRIPT,
    RedBeatScheduler,
    acquire_distributed_beat_lock,
    get_redis,
)
from redis.exceptions import LockNotOwnedError, RedisError

from etl_tasks.celery import check_redis

logger = get_logger("celery.beat")

# LeaderScheduler.tick takes the lock; redbeat's receiver would block beat_init until it has
# it, and only once.
beat_init.disconnect(acquire_distributed_beat_lock)


def lock_holder(value: str | None) -> tuple[str, int] | None:
    """The host and pid of the beat whose lock value is `value` (None: no such lock)."""
    parts = (value or "").rsplit(":", 2)
    return (parts[0], int(parts[1])) if len(parts) == 3 and parts[1].isdigit() else None


class LeaderScheduler(RedBeatScheduler):  # type: ignore[misc]  # redbeat is untyped
    """RedBeatScheduler that stands by when it cannot lead, instead of blocking or exiting."""

    lock: Any = None
    _standing_by = False

    def __init__(self, app: Any, **kwargs: Any) -> None:
        check_redis()  # a wrong password or master name: stop saying so, before redbeat
        super().__init__(app, **kwargs)

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            if self.lock is None and not self._take_lead():
                return float(self.max_interval)
            return float(super().tick(min=min, **kwargs))  # renews the lock, then sends
        except LockNotOwnedError:
            logger.warning("beat: lost the lead: %s expired or another beat holds it",
                           self.lock_key)
            self.lock = None
            return 0.0  # try at once: when Redis lost the lock, nobody else holds it
        except RedisError as exc:  # unreachable, timed out, loading: keep the lock, if any
            logger.warning("beat: Redis unavailable (%s); trying again in %.0f s",
                           type(exc).__name__, self.max_interval)
            return float(self.max_interval)

    def _take_lead(self) -> bool:
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout)
        # redbeat's renewal sets the time to live back to the timeout; redis-py's adds to it.
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        if not lock.acquire(blocking=False, token=token):
            if not self._standing_by:
                logger.info("beat: standing by; leading: (host, pid) %s",
                            lock_holder(client.get(self.lock_key)))
            self._standing_by = True
            return False
        self._standing_by = False
        self.lock = lock
        logger.info("beat: leading (%s, %s s, renewed every loop)", self.lock_key,
                    self.lock_timeout)
        if not client.exists(self.app.redbeat_conf.statics_key):
            logger.warning("beat: the schedule is missing from Redis (its data was lost); "
                           "installing it again")
            self.setup_schedule()
        return True

    def close(self) -> None:
        lock, self.lock = self.lock, None
        if lock is not None:
            # Hand over now rather than after the timeout; a lock already lost (expired,
            # taken, Redis gone) has nothing to release.
            with suppress(RedisError):
                lock.release()
                logger.info("beat: released the lead")
        super().close()
