"""The Celery app: configuration from Settings, queues, routes and reliability settings."""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs

settings = get_settings()
# Every Celery process (workers, their pool children, beat) logs through structlog.
logs.hook_celery(settings.log_format)

app = Celery("etl_tasks", broker=settings.redis_url, backend=settings.redis_url,
             include=["etl_tasks.tasks"])

# Longest wait before a message held by a dead worker is redelivered. It must exceed the hard
# time limit and the longest retry countdown, or Redis re-delivers a task still running.
# Messages held by a dead worker are re-sent long before this by the supervisor.
VISIBILITY_TIMEOUT_S = max(2 * settings.task_time_limit_s, 3600)
# extract/transform: the fleet; load: the single loader; control: the supervisor (both).
QUEUES = ("extract", "transform", "load", "control")

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
)

import beat_schedule  # noqa: E402 - the schedule needs the settings loaded above

app.conf.beat_schedule = beat_schedule.BEAT_SCHEDULE


def use_redis(url: str) -> None:
    """Point the already-built app at another Redis (the CLI after starting a local one)."""
    app.conf.broker_url = url
    app.conf.result_backend = url
