"""The beat schedule, built from the pipeline config: one entry per source.

`celery -A etl_tasks beat` (or `python -m workers.beat`) runs it: every beat, leading or not,
writes it into Redis when it starts, and deletes there the entries no longer in it (a source
removed or made manual); the leading beat sends what Redis holds (etl_tasks/scheduler.py).
Each source entry enqueues
`etl.plan.run_source` with only the source name (the run id is made by the task); a source
with `schedule = "manual"` runs only when asked. The supervisor runs every
`ETL_SUPERVISE_EVERY_S` seconds: without it a run whose worker died waits for the broker's
visibility timeout.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from etl_tasks.config import PipelineConfig, Settings, get_settings, load_pipeline


def build_schedule(pipeline: PipelineConfig,
                   settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    settings = settings or get_settings()
    every, replay_every = settings.supervise_every_s, settings.replay_every_s
    health_every = settings.health_check_every_s
    schedule: dict[str, dict[str, Any]] = {
        "supervise": {"task": "etl.control.supervise", "schedule": every,
                      # A tick nobody took in time is dropped: the next one does the same.
                      "options": {"expires": every}},
        "replay": {"task": "etl.load.replay", "schedule": replay_every,
                   "options": {"expires": replay_every}},
        # Staleness and stuck runs are checked even when nothing runs.
        "check-health": {"task": "etl.control.check_health", "schedule": health_every,
                         "options": {"expires": health_every}},
        # Retention of the patient values kept with quarantined rows (ETL_QUARANTINE_RAW_DAYS).
        "purge-quarantine-raw": {"task": "etl.load.purge_quarantine_raw",
                                 "schedule": 6 * 3600.0, "options": {"expires": 3600.0}},
    }
    for src in pipeline.sources:
        if src.schedule == "manual":
            continue
        when: Any = src.schedule
        if isinstance(when, str):
            minute, hour, day, month, weekday = when.split()
            when = crontab(minute=minute, hour=hour, day_of_month=day, month_of_year=month,
                           day_of_week=weekday)
        schedule[f"run-{src.name}"] = {
            "task": "etl.plan.run_source",
            "schedule": when,
            "args": (None, src.name),
            # A run not picked up before the next one is due is dropped, not stacked.
            "options": {"expires": float(src.schedule) if isinstance(src.schedule, float)
                        else 3600.0},
        }
    return schedule


BEAT_SCHEDULE = build_schedule(load_pipeline(get_settings()))
