"""Backpressure: Redis memory while a loader slower than the fleet works through a big run.

    .venv/bin/python benchmarks/backpressure.py --claims 1000000
    .venv/bin/python benchmarks/backpressure.py --claims 1000000 --window 4 1000 --json
    .venv/bin/python benchmarks/backpressure.py --claims 200000 --load-delay 1 --keep /tmp/bp

In a temporary folder (or --keep DIR) it generates the embedded Firebird demo database with N
claims, starts a redis-server (`maxmemory` 1 GB, `noeviction`), the fleet and the loader as
real processes, the loader slowed by a fault point that sleeps before each commit
(`ETL_FAULT_POINT=before_commit`, `ETL_FAULT_ACTION=delay:S`), and runs billing once per
window given (`ETL_STAGE_WINDOW`; a window as large as the run's chunk count is "no window").

While each run goes it samples every 0.1 s: `INFO memory` (used_memory), the run's staged
chunks and their payload bytes (`MEMORY USAGE` of each `etl:stage:<run>:*` key). The bound
is window x the largest chunk's payloads (raw + valid + quarantine) over the used memory
before the run; the peak must stay under it plus slack for queues, results, run state and
the allocator (8 MB), and loaded + quarantined must equal N, or the benchmark fails (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PIPELINE_TOML = """
[[sources]]
name = "billing"
kind = "firebird"
location = "BILLING_CLAIMS"
schedule = "manual"
chunk_size = {chunk_size}
"""
SLACK = 8 << 20  # queues, results, run state and allocator overhead beside the payloads


class BenchmarkError(RuntimeError):
    """A count did not add up, or memory passed the window's bound."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--claims", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=50_000)
    parser.add_argument("--window", type=int, nargs="+", default=[4],
                        help="ETL_STAGE_WINDOW values, one run each")
    parser.add_argument("--load-delay", type=float, default=2.0,
                        help="seconds the loader sleeps before each commit")
    parser.add_argument("--fleet", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--keep", type=Path, help="work in this folder and leave it there")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def stage_sample(r: Any, run_id: str, parts: dict[str, int]) -> tuple[int, int, dict[str, int]]:
    """(chunks staged, payload bytes staged, chunk -> its payload bytes) of a run; `parts`
    keeps the largest payload seen per part (raw, valid, quarantine)."""
    per_chunk: dict[str, int] = {}
    for name in r.scan_iter(match=f"etl:stage:{run_id}:*", count=1000):
        size = int(r.memory_usage(name) or 0)
        chunk, _, part = name.decode().rpartition(":")
        per_chunk[chunk] = per_chunk.get(chunk, 0) + size
        parts[part] = max(parts.get(part, 0), size)
    return len(per_chunk), sum(per_chunk.values()), per_chunk


def measure(args: argparse.Namespace, root: Path, window: int) -> dict[str, Any]:
    """One run of billing with `window`: peak memory against the bound, counts checked."""
    import redis

    from etl_tasks.api import run_source
    from etl_tasks.celery import app
    from etl_tasks.local_services import Worker, wait_for_workers

    env = dict(os.environ, ETL_STAGE_WINDOW=str(window))
    slow = dict(env, ETL_FAULT_POINT="before_commit", ETL_FAULT_ACTION=f"delay:{args.load_delay}")
    logs = root / "logs" / f"window{window}"
    workers = [Worker("fleet", env, logs / "fleet.log", ["--concurrency", str(args.fleet)]),
               Worker("loader", slow, logs / "loader.log")]
    r = redis.Redis.from_url(env["ETL_REDIS_URL"])
    # Each run starts from an empty Redis and store (before the workers declare their
    # queues): no checkpoint, so every claim is new again.
    r.flushall()
    r.set("etl:marker", 1)
    for leftover in (root / "data").glob("warehouse.duckdb*"):
        leftover.unlink()
    try:
        for worker in workers:
            worker.start()
        wait_for_workers(app.control, ["fleet-", "loader-"])
        before = int(r.info("memory")["used_memory"])
        handle = run_source("billing")
        peak = peak_chunks = peak_staged = largest = peak_other = 0
        parts: dict[str, int] = {}
        t0 = time.monotonic()
        while (summary := handle.summary()) is None:
            if time.monotonic() - t0 > 3600:
                raise BenchmarkError(f"run {handle.run_id} not finished after an hour; "
                                     f"see {logs}")
            used = int(r.info("memory")["used_memory"])
            chunks, staged, per_chunk = stage_sample(r, handle.run_id, parts)
            peak, peak_other = max(peak, used), max(peak_other, used - staged - before)
            peak_chunks, peak_staged = max(peak_chunks, chunks), max(peak_staged, staged)
            largest = max([largest, *per_chunk.values()])
            time.sleep(0.1)
        seconds = time.monotonic() - t0
    finally:
        for worker in workers:
            worker.stop()
        r.close()
    if summary.status != "finished" or summary.loaded + summary.quarantined != args.claims:
        raise BenchmarkError(f"window {window}: run {summary.status}, {summary.loaded} loaded "
                             f"+ {summary.quarantined} quarantined != {args.claims}; see {logs}")
    bound = before + window * largest + SLACK
    return {"window": window, "seconds": round(seconds, 1),
            "loaded": summary.loaded, "quarantined": summary.quarantined,
            "used_memory_before_mb": round(before / 2**20, 1),
            "peak_used_memory_mb": round(peak / 2**20, 1),
            "largest_chunk_payloads_mb": round(largest / 2**20, 2),
            "largest_payload_mb": {k: round(v / 2**20, 2) for k, v in sorted(parts.items())},
            "peak_not_staging_mb": round(peak_other / 2**20, 1),
            "window_bound_mb": round(bound / 2**20, 1),
            "peak_staged_chunks": peak_chunks,
            "peak_staged_mb": round(peak_staged / 2**20, 1),
            "under_bound": peak <= bound}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="etl-backpressure-"))
    root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    (root / "pipeline.toml").write_text(PIPELINE_TOML.format(chunk_size=args.chunk_size))
    from etl_tasks.local_services import RedisServer

    redis_server = RedisServer(root / "redis", appendonly=False, maxmemory="1gb")
    os.environ.update({
        "ETL_REDIS_URL": redis_server.url, "ETL_DATA_DIR": str(root / "data"),
        "ETL_DUCKDB_PATH": str(root / "data" / "warehouse.duckdb"),
        "ETL_FIREBIRD_DSN": str(root / "data" / "billing.fdb"),
        "ETL_FIREBIRD_RUNTIME_DIR": str(root / "data" / ".firebird"),
        "ETL_PIPELINE_CONFIG": str(root / "pipeline.toml"),
    })
    from etl_tasks.celery import use_redis
    from etl_tasks.demo_data import make_billing_db
    from etl_tasks.resources import get_resources, reset_resources

    reset_resources()  # importing etl_tasks read the settings before they pointed here
    use_redis(redis_server.url)
    if get_resources().settings.firebird_dsn != os.environ["ETL_FIREBIRD_DSN"]:
        raise BenchmarkError("settings do not point at the benchmark's folder")
    results = []
    try:
        if not (root / "data" / "billing.fdb").exists():
            make_billing_db(get_resources().firebird_target, args.claims)
        redis_server.start()
        for window in args.window:
            results.append(measure(args, root, window))
    finally:
        redis_server.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"claims": args.claims, "chunk_size": args.chunk_size,
                          "load_delay_s": args.load_delay, "runs": results}))
    else:
        print(f"{args.claims} claims, chunks of {args.chunk_size}, loader delayed "
              f"{args.load_delay}s per commit, fleet of {args.fleet}")
        for res in results:
            print(f"window {res['window']:>5}: peak used_memory {res['peak_used_memory_mb']} MB"
                  f" (before {res['used_memory_before_mb']} MB), bound "
                  f"{res['window_bound_mb']} MB = before + window x "
                  f"{res['largest_chunk_payloads_mb']} MB + slack; peak "
                  f"{res['peak_staged_chunks']} chunks staged ({res['peak_staged_mb']} MB); "
                  f"{res['loaded']} loaded + {res['quarantined']} quarantined in "
                  f"{res['seconds']}s")
            print(f"{'':14}largest payloads (MB) {res['largest_payload_mb']}; besides staged "
                  f"payloads Redis grew by at most {res['peak_not_staging_mb']} MB")
    bad = [res["window"] for res in results if not res["under_bound"]]
    if bad:
        print(f"peak memory over the window's bound for window(s) {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
