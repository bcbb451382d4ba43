"""The Prometheus exporter: /metrics with `etl status`'s figures and the Celery queue depths,
computed at each scrape (etl_tasks/monitoring/exporter.py).

    python -m workers.exporter [--port 9808] [--address 127.0.0.1] [--timeout 5] [--last 20]

Unlike Flower it needs no authentication beyond loopback: its labels are source, queue and
severity names and its values are counts, rates and durations, never patient data, and
Prometheus must reach it (in a container it listens on 0.0.0.0). Keep the port on the
monitoring network, not published to the world: docker-compose does not publish it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from prometheus_client import CollectorRegistry, start_http_server

from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs
from etl_tasks.monitoring.exporter import collector


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workers.exporter",
        description="Serve the pipeline's health as Prometheus metrics on /metrics: per "
        "source success rate, durations, quality, staleness, dead letters and last run; rows "
        "waiting in the fallbacks, workers online and depth per Celery queue, open alerts. "
        "Figures are read at each scrape from the same stores as `etl status` (ETL_* "
        "settings); a store that cannot be read within --timeout gives etl_exporter_up 0. "
        "Metrics carry no patient data, so any address may be given (0.0.0.0 in a "
        "container); keep the port on the monitoring network.")
    parser.add_argument("--port", type=int, default=9808, help="port (default 9808)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds a scrape waits for DuckDB, Redis and the workers' "
                        "answer (default 5; over 1, the time the workers are given to answer, "
                        "and under Prometheus' scrape_timeout)")
    parser.add_argument("--last", type=int, default=20,
                        help="runs per source the figures look at (default 20, as etl status)")
    args = parser.parse_args(argv)
    if args.timeout <= 1.0:  # status.workers_by_queue always waits 1 s for the replies
        parser.error("--timeout must be over 1 s: the workers are given 1 s to answer")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    logs.setup(get_settings().log_format)  # console or JSON lines, like every process
    registry = CollectorRegistry()
    registry.register(collector(last=args.last, timeout_s=args.timeout))
    server, _ = start_http_server(args.port, args.address, registry=registry)
    logging.getLogger("etl.exporter").info("serving /metrics on %s:%d", args.address,
                                           args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
