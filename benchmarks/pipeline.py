"""The billing pipeline against one plain process doing the same work, on the same data.

    .venv/bin/python benchmarks/pipeline.py --claims 200000
    .venv/bin/python benchmarks/pipeline.py --claims 1000000 --json
    .venv/bin/python benchmarks/pipeline.py --claims 200000 --fleet 4 --keep /tmp/bench

In a temporary folder (or --keep DIR, left in place afterwards) it generates the embedded
Firebird demo database with N claims, then measures, one after the other:

1. baseline ("plain script"): one process, no Celery, no Redis. One
   `SELECT ... FROM BILLING_CLAIMS ORDER BY CLAIM_ID`, `fetchmany(50_000)` into Arrow batches,
   `transform_chunk` per batch, valid rows and quarantine appended to a DuckDB file with a
   plain `INSERT ... SELECT` per batch, all in one transaction;
2. baseline with the project's range reader: the same, but reading each 50,000-key range with
   `firebird.fetch_range` (Firebird builds the range as one CSV text, Arrow parses it), so
   the ratio separates "a faster reader" from "a parallel fleet";
3. the pipeline: a local redis-server, the fleet (`--concurrency K`, default the CPU count)
   and the single loader as real `celery worker` processes; `run_source("billing").wait()`
   is timed, worker start-up is not (it is reported on its own).

Each figure is rows per second = N / seconds. The pipeline's loaded + quarantined and each
baseline's valid + quarantined must equal N, or the benchmark fails. Task runtimes from the
worker logs ("succeeded in Xs") are summed per task name to show where the pipeline's time
goes. All processes started here are stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BATCH_ROWS = 50_000

PIPELINE_TOML = f"""
[[sources]]
name = "billing"
kind = "firebird"
location = "BILLING_CLAIMS"
key_column = "CLAIM_ID"
schedule = 300
chunk_size = {BATCH_ROWS}
target_table = "billing_claims"
"""

_SUCCEEDED = re.compile(r"Task (etl\.[\w.]+)\[[^\]]+\] succeeded in ([0-9.]+)s")


class BenchmarkError(RuntimeError):
    """A count did not add up, or a run did not finish: the figures would mean nothing."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, required=True, help="claims to generate (N)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--fleet", type=int, default=os.cpu_count() or 1,
                        help="fleet worker concurrency K (default: the CPU count)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in DIR and leave the database, DuckDB files and logs there")
    args = parser.parse_args(argv)
    if args.claims < 1:
        parser.error("--claims must be at least 1")
    if args.fleet < 1:
        parser.error("--fleet must be at least 1")
    return args


def prepare_env(root: Path, redis_url: str) -> dict[str, str]:
    """ETL_* settings pointing at `root`, set in this process (as the integration tests do)."""
    (root / "pipeline.toml").write_text(PIPELINE_TOML)
    env = {
        "ETL_REDIS_URL": redis_url,
        "ETL_DATA_DIR": str(root / "data"),
        "ETL_DUCKDB_PATH": str(root / "data" / "warehouse.duckdb"),
        "ETL_FIREBIRD_DSN": str(root / "data" / "billing.fdb"),
        "ETL_FIREBIRD_RUNTIME_DIR": str(root / "data" / ".firebird"),
        "ETL_PIPELINE_CONFIG": str(root / "pipeline.toml"),
        "ETL_STAGE_TTL_S": "3600",
    }
    os.environ.update(env)
    from etl_tasks.celery import use_redis
    from etl_tasks.resources import reset_resources

    reset_resources()
    use_redis(redis_url)
    return dict(os.environ)


def clean(root: Path) -> None:
    """Remove what an earlier run in --keep DIR left, so this run starts from nothing."""
    for name in ("redis", "logs"):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in ("warehouse.duckdb", "baseline.duckdb", "baseline_range.duckdb"):
        for path in (root / "data").glob(name + "*"):
            path.unlink()


# --- baselines ------------------------------------------------------------------------------


def plain_batches(target: Any) -> Iterator[Any]:
    """What a plain script does: one ordered SELECT, fetchmany into Arrow batches."""
    import pyarrow as pa

    from etl_tasks.sources import firebird

    names = [name.lower() for name, _, _ in firebird.CLAIM_COLUMNS]
    types = [typ for _, typ, _ in firebird.CLAIM_COLUMNS]
    columns = ", ".join(name for name, _, _ in firebird.CLAIM_COLUMNS)
    con = firebird.connect(target)
    try:
        cur = con.cursor()
        cur.execute(f"SELECT {columns} FROM BILLING_CLAIMS ORDER BY CLAIM_ID")
        while rows := cur.fetchmany(BATCH_ROWS):
            values = list(zip(*rows, strict=True))
            yield pa.table([pa.array(v, type=t) for v, t in zip(values, types, strict=True)],
                           names=names)
        cur.close()
        con.commit()
    finally:
        con.close()


def range_batches(target: Any) -> Iterator[Any]:
    """The project's reader in one process: fetch_range per 50,000-key range."""
    from etl_tasks.sources import firebird

    con = firebird.connect(target)
    try:
        bounds = firebird.key_bounds(con, "BILLING_CLAIMS", "CLAIM_ID", 0)
        if bounds is not None:
            lo, hi = bounds
            for start in range(lo, hi + 1, BATCH_ROWS):
                end = min(start + BATCH_ROWS - 1, hi)
                yield firebird.fetch_range(con, "BILLING_CLAIMS", "CLAIM_ID", start, end)
        con.commit()
    finally:
        con.close()


def run_baseline(batches: Callable[[Any], Iterator[Any]], target: Any,
                 duckdb_path: Path) -> dict[str, Any]:
    """Read, transform and append every claim in one process; time the whole and its parts."""
    import duckdb

    from etl_tasks.transform import OUTPUT_SCHEMAS, QUARANTINE_SCHEMA, transform_chunk

    parts = {"read_s": 0.0, "transform_s": 0.0, "load_s": 0.0}
    valid_rows = quarantined_rows = 0
    started = time.perf_counter()
    con = duckdb.connect(str(duckdb_path))
    try:
        empty_valid = OUTPUT_SCHEMAS["billing_claims"].empty_table()  # noqa: F841 - scanned
        empty_q = QUARANTINE_SCHEMA.empty_table()  # noqa: F841 - scanned by DuckDB
        con.execute("CREATE TABLE billing_claims AS SELECT * FROM empty_valid")
        con.execute("CREATE TABLE etl_quarantine AS SELECT * FROM empty_q")
        con.begin()
        reader = batches(target)
        while True:
            t0 = time.perf_counter()
            batch = next(reader, None)
            t1 = time.perf_counter()
            parts["read_s"] += t1 - t0
            if batch is None:
                break
            result = transform_chunk("billing_claims", batch)
            t2 = time.perf_counter()
            parts["transform_s"] += t2 - t1
            valid, quarantined = result.valid, result.quarantined  # noqa: F841 - scanned
            con.execute("INSERT INTO billing_claims SELECT * FROM valid")
            con.execute("INSERT INTO etl_quarantine SELECT * FROM quarantined")
            parts["load_s"] += time.perf_counter() - t2
            valid_rows += result.valid.num_rows
            quarantined_rows += result.quarantined.num_rows
        t3 = time.perf_counter()
        con.commit()
        parts["load_s"] += time.perf_counter() - t3
        seconds = time.perf_counter() - started
        stored = con.execute("SELECT (SELECT count(*) FROM billing_claims), "
                             "(SELECT count(*) FROM etl_quarantine)").fetchone()
    finally:
        con.close()
    assert stored is not None
    if (valid_rows, quarantined_rows) != (stored[0], stored[1]):
        raise BenchmarkError(f"baseline counted {valid_rows}+{quarantined_rows} rows but "
                             f"{duckdb_path.name} holds {stored[0]}+{stored[1]}")
    return {"seconds": seconds, "valid": valid_rows, "quarantined": quarantined_rows,
            **{k: round(v, 3) for k, v in parts.items()}}


# --- the pipeline ---------------------------------------------------------------------------


def task_runtimes(log_dir: Path) -> dict[str, dict[str, float]]:
    """Count, total, mean and max of "succeeded in Xs" per task name over the worker logs."""
    seen: dict[str, list[float]] = {}
    for log in sorted(log_dir.glob("*.log")):
        for match in _SUCCEEDED.finditer(log.read_text(errors="replace")):
            seen.setdefault(match.group(1), []).append(float(match.group(2)))
    return {name: {"count": len(v), "total_s": round(sum(v), 3),
                   "mean_s": round(sum(v) / len(v), 3), "max_s": round(max(v), 3)}
            for name, v in sorted(seen.items())}


def pss_mb(pids: set[int], groups: set[int]) -> float:
    """Memory of these processes plus every process in these process groups, as PSS: pages
    shared after a fork count once in all, not once per pool process as RSS would."""
    kb = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            pgrp = int(stat[stat.rindex(")") + 2 :].split()[2])
            if int(entry.name) not in pids and pgrp not in groups:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kb += int(line.split()[1])
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return kb / 1024


def count_warehouse(path: Path) -> tuple[int, int]:
    """Billing rows and quarantined rows in the pipeline's DuckDB file (read only)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute("SELECT (SELECT count(*) FROM billing_claims), "
                          "(SELECT count(*) FROM etl_quarantine)").fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0]), int(row[1])


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from etl_tasks.local_services import RedisServer

    clean(root)
    redis_server = RedisServer(root / "redis")
    env = prepare_env(root, redis_server.url)

    from etl_tasks.api import run_source
    from etl_tasks.celery import app
    from etl_tasks.demo_data import expected_claim_defects, make_billing_db
    from etl_tasks.local_services import Worker, wait_for_workers
    from etl_tasks.resources import get_resources

    n = args.claims
    load_before = os.getloadavg()[0]
    target = get_resources().firebird_target
    t0 = time.perf_counter()
    make_billing_db(target, n)
    generate_s = time.perf_counter() - t0
    expected_quarantine = sum(expected_claim_defects(1, n).values())

    data = root / "data"
    plain = run_baseline(plain_batches, target, data / "baseline.duckdb")
    ranged = run_baseline(range_batches, target, data / "baseline_range.duckdb")
    for name, result in (("plain", plain), ("range reader", ranged)):
        if result["valid"] + result["quarantined"] != n:
            raise BenchmarkError(f"{name} baseline: {result['valid']} valid + "
                                 f"{result['quarantined']} quarantined != {n} claims")

    workers: list[Worker] = []
    try:
        redis_server.start()
        env = dict(os.environ)
        t0 = time.perf_counter()
        workers.append(Worker("fleet", env, root / "logs" / "fleet.log",
                              ["--concurrency", str(args.fleet)]).start())
        workers.append(Worker("loader", env, root / "logs" / "loader.log").start())
        wait_for_workers(app.control, ["fleet-", "loader-"])
        worker_start_s = time.perf_counter() - t0

        # Worker start-up is over: sample memory while the run goes (the workers started
        # their own sessions, so each one's process group holds it and its pool children).
        groups = {w.pid for w in workers}
        assert redis_server.process is not None
        redis_pid = redis_server.process.pid
        peak_workers = peak_redis = 0.0
        t0 = time.perf_counter()
        handle = run_source("billing")
        deadline = time.monotonic() + 3600
        next_sample = 0.0
        while (summary := handle.summary()) is None:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the pipeline run {handle.run_id} is not finished "
                                     f"after an hour; see {root / 'logs'}")
            if time.monotonic() >= next_sample:
                peak_workers = max(peak_workers, pss_mb(set(), groups))
                peak_redis = max(peak_redis, pss_mb({redis_pid}, set()))
                next_sample = time.monotonic() + 0.25
            time.sleep(0.02)
        pipeline_s = time.perf_counter() - t0
    finally:
        for worker in workers:
            worker.stop()
        redis_server.stop()
    if summary.status != "finished":
        raise BenchmarkError(f"the pipeline run {summary.run_id} {summary.status}: "
                             f"{summary.error}; see {root / 'logs'}")
    if summary.loaded + summary.quarantined != n:
        raise BenchmarkError(f"pipeline: {summary.loaded} loaded + {summary.quarantined} "
                             f"quarantined != {n} claims")
    stored = count_warehouse(Path(env["ETL_DUCKDB_PATH"]))
    if stored != (summary.loaded, summary.quarantined):
        raise BenchmarkError(f"pipeline summary says {summary.loaded}+{summary.quarantined} "
                             f"rows but the warehouse holds {stored[0]}+{stored[1]}")
    for name, q in (("plain", plain["quarantined"]), ("range reader", ranged["quarantined"]),
                    ("pipeline", summary.quarantined)):
        if q != expected_quarantine:
            raise BenchmarkError(f"{name}: {q} quarantined, the planted defects are "
                                 f"{expected_quarantine}")

    baseline_rate = n / plain["seconds"]
    range_rate = n / ranged["seconds"]
    pipeline_rate = n / pipeline_s
    return {
        "claims": n,
        "baseline_rows_per_s": round(baseline_rate),
        "baseline_range_reader_rows_per_s": round(range_rate),
        "pipeline_rows_per_s": round(pipeline_rate),
        "ratio": round(pipeline_rate / baseline_rate, 2),
        "ratio_vs_range_reader": round(pipeline_rate / range_rate, 2),
        "baseline_seconds": round(plain["seconds"], 3),
        "baseline_range_reader_seconds": round(ranged["seconds"], 3),
        "pipeline_seconds": round(pipeline_s, 3),
        "worker_start_seconds": round(worker_start_s, 3),
        "generate_seconds": round(generate_s, 3),
        "fleet_processes": args.fleet,
        "cpu_count": os.cpu_count(),
        # Other work on the machine skews every figure: the 1-minute load before and after.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_pss_workers_mb": round(peak_workers, 1),
        "peak_pss_redis_mb": round(peak_redis, 1),
        "loaded": summary.loaded,
        "quarantined": summary.quarantined,
        "baseline_parts_s": {k: plain[k] for k in ("read_s", "transform_s", "load_s")},
        "baseline_range_reader_parts_s": {k: ranged[k]
                                          for k in ("read_s", "transform_s", "load_s")},
        "task_runtimes": task_runtimes(root / "logs"),
        "workdir": str(root) if args.keep else None,
    }


def render(result: dict[str, Any]) -> str:
    rows = [
        ("claims", f"{result['claims']:,}"),
        ("baseline (plain fetchmany)", f"{result['baseline_rows_per_s']:,} rows/s  "
                                       f"({result['baseline_seconds']} s)"),
        ("baseline (range reader)", f"{result['baseline_range_reader_rows_per_s']:,} rows/s  "
                                    f"({result['baseline_range_reader_seconds']} s)"),
        ("pipeline", f"{result['pipeline_rows_per_s']:,} rows/s  "
                     f"({result['pipeline_seconds']} s)"),
        ("ratio pipeline / baseline", f"{result['ratio']}x"),
        ("ratio pipeline / range reader", f"{result['ratio_vs_range_reader']}x"),
        ("worker start-up (not timed)", f"{result['worker_start_seconds']} s"),
        ("demo data generation", f"{result['generate_seconds']} s"),
        ("fleet processes / CPUs", f"{result['fleet_processes']} / {result['cpu_count']}"),
        ("load average before / after", " / ".join(map(str, result["load_average_1m"]))),
        ("peak RSS: benchmark process", f"{result['peak_rss_mb']} MB"),
        ("peak PSS: all workers / redis", f"{result['peak_pss_workers_mb']} MB / "
                                          f"{result['peak_pss_redis_mb']} MB (sampled)"),
    ]
    for label, key in (("baseline parts", "baseline_parts_s"),
                       ("range reader parts", "baseline_range_reader_parts_s")):
        rows.append((label, ", ".join(f"{k.removesuffix('_s')} {v} s"
                                      for k, v in result[key].items())))
    for name, t in result["task_runtimes"].items():
        rows.append((name, f"{t['count']} tasks, {t['total_s']} s in all, mean {t['mean_s']} s, "
                           f"max {t['max_s']} s"))
    if result["workdir"]:
        rows.append(("kept in", result["workdir"]))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keep is not None:
        root = args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
        result = run(args, root)
    else:
        with tempfile.TemporaryDirectory(prefix="etl-bench-") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
