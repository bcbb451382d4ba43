"""The single loader: the only process that writes DuckDB (and its fallbacks).

    python -m workers.loader

is exactly `celery -A etl_tasks worker -Q load,control --concurrency 1`. One loader writes,
holding the writer lease; any other started beside it (on purpose or by mistake) stands by,
consuming only `control`, and takes over when the writer dies (etl_tasks/single_writer.py).
Each names itself after its pid, so two can run on one host.
"""

from __future__ import annotations

import os
import socket
import sys

from etl_tasks import app
from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs

ARGV = ["worker", "-Q", "load,control", "--concurrency", "1", "-n",
        f"loader-{os.getpid()}@{socket.gethostname()}", "--loglevel", "INFO"]


def main(extra: list[str] | None = None) -> None:
    options = logs.celery_options(get_settings().log_format)  # JSON logs: no banner
    app.worker_main(options + ARGV + (sys.argv[1:] if extra is None else extra))


if __name__ == "__main__":
    main()
