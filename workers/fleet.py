"""The extract/transform fleet: any number of these, on any host sharing one Redis.

    python -m workers.fleet [extra celery worker options, e.g. --concurrency 4]

is exactly `celery -A etl_tasks worker -Q extract,transform,control`.
"""

from __future__ import annotations

import os
import socket
import sys

from etl_tasks import app
from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs

ARGV = ["worker", "-Q", "extract,transform,control", "-n",
        f"fleet-{os.getpid()}@{socket.gethostname()}", "--loglevel", "INFO"]


def main(extra: list[str] | None = None) -> None:
    options = logs.celery_options(get_settings().log_format)  # JSON logs: no banner
    app.worker_main(options + ARGV + (sys.argv[1:] if extra is None else extra))


if __name__ == "__main__":
    main()
