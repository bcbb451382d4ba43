"""The scheduler: one or more, on any hosts; one leads. It runs the sources on their
schedules and the supervisor.

    python -m workers.beat

is exactly `celery -A etl_tasks beat`: the app's scheduler keeps the schedule and a leader lock
in Redis (etl_tasks/scheduler.py), so it needs no schedule file, and a second beat stands by.
"""

from __future__ import annotations

import sys

from etl_tasks import app
from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs


def main(extra: list[str] | None = None) -> None:
    settings = get_settings()
    argv = [*logs.celery_options(settings.log_format),  # JSON logs: no banner
            "beat", "--loglevel", "INFO"]
    app.start(argv + (sys.argv[1:] if extra is None else extra))


if __name__ == "__main__":
    main()
