"""The DuckDB file held by another process in the middle of a run: how the fallback copes.

    .venv/bin/python -m benchmarks.fallback --claims 1000000 [--hold-s 60] [--json] [--keep DIR]

Generates N claims in an embedded Firebird database, starts Redis, the fleet, the loader and
beat, starts a billing run, and as soon as it is planned has another process open the DuckDB
file for writing and hold it for `--hold-s` seconds (or until the run ended, whichever is
later). Loads step down to SQLite; after the release beat's replay drains SQLite into DuckDB.
Prints: run_seconds (enqueue to the run's end), rows_in_fallback (rows waiting when the lock
was released), release_to_empty_s (release until SQLite is empty), rows_replayed, and the
counts in DuckDB at the end against the source (lost and duplicated must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.pipeline import BenchmarkError, clean, prepare_env

HOLD = """
import sys, time, duckdb
while True:
    try:
        con = duckdb.connect(sys.argv[1])
        break
    except duckdb.IOException:
        time.sleep(0.01)
print("held", flush=True)
sys.stdin.readline()
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=1_000_000)
    parser.add_argument("--hold-s", type=float, default=60.0,
                        help="hold the DuckDB file at least this long (default 60)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from etl_tasks.local_services import RedisServer

    clean(root)
    server = RedisServer(root / "redis")
    prepare_env(root, server.url)
    os.environ.update({"ETL_STORE_LOCK_WAIT_S": "0.5", "ETL_REPLAY_EVERY_S": "2",
                       "ETL_SUPERVISE_EVERY_S": "5"})
    from etl_tasks.api import fallbacks_waiting, run_source
    from etl_tasks.celery import app
    from etl_tasks.demo_data import make_billing_db
    from etl_tasks.load import duckdb as store
    from etl_tasks.local_services import Worker, wait_for_workers
    from etl_tasks.resources import get_resources, reset_resources

    reset_resources()
    settings = get_resources().settings
    make_billing_db(get_resources().firebird_target, args.claims)
    workers: list[Worker] = []
    holder = None
    try:
        server.start()
        env = dict(os.environ)
        for role, extra in (("fleet", ["--concurrency", str(os.cpu_count() or 2)]),
                            ("loader", []), ("beat", [])):
            workers.append(Worker(role, env, root / "logs" / f"{role}.log", extra).start())
        wait_for_workers(app.control, ["fleet-", "loader-"])
        started = time.perf_counter()
        handle = run_source("billing")
        while handle.progress()["status"] not in ("running", "finished", "failed"):
            time.sleep(0.01)
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(settings.duckdb_path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None
        assert holder.stdin is not None
        if holder.stdout.readline().strip() != "held":
            raise BenchmarkError("the holder could not take the DuckDB file")
        held_at = time.perf_counter()
        summary = handle.wait(timeout=3600)
        run_s = time.perf_counter() - started
        time.sleep(max(0.0, args.hold_s - (time.perf_counter() - held_at)))
        waiting = fallbacks_waiting()["sqlite"]
        holder.stdin.write("release\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
        released = time.perf_counter()
        while fallbacks_waiting()["sqlite"]["chunks"]:
            if time.perf_counter() - released > 1800:
                raise BenchmarkError("the replay did not empty SQLite within 30 minutes")
            time.sleep(0.1)
        release_to_empty = time.perf_counter() - released
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        for worker in workers:
            worker.stop()
        server.stop()
    with store.read_only(settings.duckdb_path) as con:
        [(rows, keys)] = con.execute(
            "SELECT count(*), count(DISTINCT claim_id) FROM billing_claims").fetchall()
        [(held,)] = con.execute(
            "SELECT count(DISTINCT source_ref) FROM etl_quarantine WHERE source = 'billing'"
        ).fetchall()
    return {
        "claims": args.claims, "status": summary.status, "run_seconds": round(run_s, 1),
        "hold_seconds": round(released - held_at, 1),
        "chunks_in_fallback": waiting["chunks"], "rows_in_fallback": waiting["rows"],
        "release_to_empty_s": round(release_to_empty, 1), "rows_replayed": waiting["rows"],
        "stored": rows, "quarantined": held, "duplicated": rows - keys,
        "lost": args.claims - keys - held,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="etl-fallback-") as tmp:
            result = run(args, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            print(f"{name:>20}: {value}")
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
