"""The single loader: the only process that writes DuckDB. Run exactly one.

    python -m workers.loader

is exactly `celery -A etl_tasks worker -Q load,control --concurrency 1`.
"""

from __future__ import annotations

import socket
import sys

from etl_tasks import app
from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs

ARGV = ["worker", "-Q", "load,control", "--concurrency", "1", "-n",
        f"loader@{socket.gethostname()}", "--loglevel", "INFO"]


def main(extra: list[str] | None = None) -> None:
    options = logs.celery_options(get_settings().log_format)  # JSON logs: no banner
    app.worker_main(options + ARGV + (sys.argv[1:] if extra is None else extra))


if __name__ == "__main__":
    main()
