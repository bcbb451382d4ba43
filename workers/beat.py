"""The scheduler: exactly one. It runs the sources on their schedules and the supervisor.

    python -m workers.beat

is exactly `celery -A etl_tasks beat` with its schedule file in ETL_DATA_DIR.
"""

from __future__ import annotations

import sys

from etl_tasks import app
from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs


def main(extra: list[str] | None = None) -> None:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = [*logs.celery_options(settings.log_format),  # JSON logs: no banner
            "beat", "--loglevel", "INFO", "-s", str(settings.data_dir / "celerybeat-schedule")]
    app.start(argv + (sys.argv[1:] if extra is None else extra))


if __name__ == "__main__":
    main()
