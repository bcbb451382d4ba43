"""The Celery app: configuration from Settings, queues, routes and reliability settings."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import celeryd_init
from kombu.entity import Queue

from etl_tasks.config import get_settings
from etl_tasks.errors import FatalError
from etl_tasks.monitoring import logs
from etl_tasks.redis_conn import RedisConn, conn_from

settings = get_settings()
# Every Celery process (workers, their pool children, beat) logs through structlog.
logs.hook_celery(settings.log_format)

# Its Redis (broker, result backend, beat's schedule and lock) is set by use_redis, below.
# amqp: kombu's connection, surviving a broker that dies mid-read (redis_conn.py).
app = Celery("etl_tasks", include=["etl_tasks.tasks"], amqp="etl_tasks.redis_conn:CeleryAMQP")

# Longest wait before a message held by a dead worker is redelivered. It must exceed the hard
# time limit and the longest retry countdown, or Redis re-delivers a task still running.
# Messages held by a dead worker are re-sent long before this by the supervisor.
VISIBILITY_TIMEOUT_S = max(2 * settings.task_time_limit_s, 3600)
# extract/transform: the fleet; load: the single loader; control: the supervisor (both).
QUEUES = ("extract", "transform", "load", "control")
# Beat's keys (redbeat's layout): `etl:beat:<name>` per schedule entry, `etl:beat::schedule`
# (due times), `etl:beat::statics` (the names installed from beat_schedule.py) and
# `etl:beat::lock` (the leader: host:pid:token).
BEAT_KEY_PREFIX = "etl:beat:"
BEAT_LOOP_S = settings.beat_lock_timeout_s / 6

app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_time_limit=settings.task_time_limit_s,
    task_soft_time_limit=settings.task_time_limit_s - 30,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    broker_connection_retry_on_startup=True,
    result_expires=24 * 3600,
    task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
    task_default_queue="extract",
    task_routes={
        "etl.plan.*": {"queue": "extract"},
        "etl.extract.*": {"queue": "extract"},
        "etl.transform.*": {"queue": "transform"},
        "etl.load.*": {"queue": "load"},
        "etl.control.*": {"queue": "control"},
    },
    # Flower and `etl status` see tasks as they move.
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    timezone="UTC",
    # Beat: any number of processes on any hosts, one leads (etl_tasks/scheduler.py: redbeat's
    # schedule and leader lock in Redis, under the project's namespace).
    beat_scheduler="etl_tasks.scheduler.LeaderScheduler",
    redbeat_key_prefix=BEAT_KEY_PREFIX,
    # The leader renews its lock every loop; another beat tries to take it once a loop. A lock
    # of six loops (30 s and 5 s by default) outlives five missed renewals (a slow Redis call,
    # cut short by the socket timeout below, a pause) before a second beat could lead, and a
    # dead leader is replaced within lock + loop (35 s): sources' ticks are late by that at
    # most, never lost (an overdue entry fires at the new leader's first loop), and the
    # supervisor (every 10 s) resumes well inside the two minutes a crashed run may take.
    # Celery's default loop (300 s) would give redbeat a 25-minute lock.
    redbeat_lock_timeout=settings.beat_lock_timeout_s,
    beat_max_loop_interval=BEAT_LOOP_S,
    redbeat_redis_options={"socket_timeout": BEAT_LOOP_S,
                           "socket_connect_timeout": BEAT_LOOP_S},
)

import beat_schedule  # noqa: E402 - the schedule needs the settings loaded above

app.conf.beat_schedule = beat_schedule.BEAT_SCHEDULE


_redis: RedisConn
# What use_redis merges Redis's own options into (sentinel, credentials).
_BASE_OPTIONS = {key: dict(app.conf[key]) for key in (
    "broker_transport_options", "result_backend_transport_options", "redbeat_redis_options")}


def use_redis(url: str) -> None:
    """Point the app at a Redis: at import, the project's ETL_REDIS_URL; the CLI, another one
    after starting it. The one place where that URL (with the password, TLS and Sentinel
    settings, redis_conn.py) becomes Celery's and redbeat's settings."""
    global _redis
    _redis = conn_from(get_settings(), url)
    conf = _redis.celery_conf()
    for key, base in _BASE_OPTIONS.items():
        conf[key] = {**base, **conf[key]}
    app.conf.update(conf)
    # redbeat caches its settings and client on the app: forget them so they follow.
    for cached in ("redbeat_conf", "redbeat_redis", "redbeat_sentinel"):
        app.__dict__.pop(cached, None)


def check_redis(**_: Any) -> None:
    """A worker or beat whose Redis refuses its password, master name or TLS stops at once
    saying which setting to fix, where Celery would retry the connection for ever (beat's
    scheduler calls it: redbeat reads Redis before beat_init)."""
    try:
        _redis.check()
    except FatalError as exc:
        logging.getLogger("etl.redis").critical("%s", exc)
        raise SystemExit(f"error: {exc}") from None


celeryd_init.connect(check_redis, weak=False)


use_redis(settings.redis_url)
