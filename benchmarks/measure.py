"""The measurements of benchmarks/pipeline.py, each run as its own process.

    python -m benchmarks.measure pipeline --out DIR [--fleet K] [--resilience on|off]
    python -m benchmarks.measure direct --out DIR [--chunk-size N]
    python -m benchmarks.measure dlt --out DIR [--chunk-size N] [--lo A --hi B]

The settings (ETL_FIREBIRD_DSN, ETL_FIREBIRD_RUNTIME_DIR, ETL_PIPELINE_CONFIG) come from the
environment, as benchmarks/pipeline.py sets them. Each prints one JSON line: wall-clock start
and end of the timed work (`time.time()`, so that processes running side by side can be
timed together), seconds, rows loaded and quarantined (counted in its DuckDB file after the
clock stops) and peak RSS (VmHWM, from each process's own exec).

- `pipeline`: a private redis-server (append-only file as in production), the fleet
  (`celery worker --concurrency K`) and the single loader as real processes, with every
  resilience feature on, or ETL_RESILIENCE=off passed to them; `run_source("billing")` timed
  from enqueue to the run's end (worker start-up reported on its own). Peak RSS per role is
  sampled from /proc: the fleet's and the loader's main and pool processes, redis-server.
- `direct`: one process, no Celery, no Redis, doing what the pipeline does with the same
  code: `firebird.fetch_range` over each key range of the source's chunk size (the run's
  reflected schema), `transform_chunk` with the source's dataset spec, and the loader's
  `write_chunk` (the upsert on the dataset's key, the quarantine and a ledger row, one
  transaction per chunk) into its own DuckDB file, over one DuckDB connection kept open.
- `dlt`: dlt's `sql_table` over BILLING_CLAIMS through sqlalchemy-firebird (firebird-driver
  with the embedded engine configured as etl_tasks/sources/firebird.py does), pyarrow
  backend, into its own DuckDB file; `--lo/--hi` restrict it to a CLAIM_ID range with a
  `query_adapter_callback` (the halves of `dlt_2proc`). No validation: it loads every row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

DLT_CHUNK_SIZE = 50_000
"""dlt's rows per batch (its default): none of 20,000 to 200,000 was faster here."""

_SUCCEEDED = re.compile(r"Task (etl\.[\w.]+)\[[^\]]+\] succeeded in ([0-9.]+)s")


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM, kB in /proc), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


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


class RssPeaks:
    """Peak RSS (VmHWM) per role, sampled from /proc: each role is a worker's process group
    (its main process and its pool children) or one process (redis-server). VmHWM is each
    process's own high-water mark, so a sample misses only a process that ended between two."""

    def __init__(self, groups: dict[str, int], singles: dict[str, int]) -> None:
        self.groups, self.singles = groups, singles
        self.peaks: dict[str, float] = {}

    def _keep(self, role: str, mb: float) -> None:
        self.peaks[role] = max(self.peaks.get(role, 0.0), round(mb, 1))

    def sample(self) -> None:
        leaders = {pid: role for role, pid in self.groups.items()}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                pgrp = int(stat[stat.rindex(")") + 2 :].split()[2])
            except (OSError, ValueError):
                continue  # the process ended meanwhile
            role = leaders.get(pgrp)
            if role is not None:
                part = "main" if int(entry.name) == pgrp else "pool"
                self._keep(f"{role}_{part}", vm_hwm_mb(entry.name))
        for role, pid in self.singles.items():
            self._keep(role, vm_hwm_mb(pid))

    def roles(self) -> dict[str, float]:
        """Each role's peak (its largest process), then each part's (main, pool)."""
        out = {role: max((v for k, v in self.peaks.items() if k.startswith(f"{role}_")),
                         default=0.0) for role in self.groups}
        return {**out, **{k: self.peaks[k] for k in self.singles if k in self.peaks},
                **{k: v for k, v in sorted(self.peaks.items()) if k not in self.singles}}


def count_stored(path: Path, table: str = "billing_claims",
                 schema: str = "main") -> tuple[int, int]:
    """Rows in `table` and in etl_quarantine (0 when it has none) of a DuckDB file."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        quarantine = con.execute("SELECT count(*) FROM information_schema.tables WHERE "
                                 "table_name = 'etl_quarantine'").fetchone()
        q = "(SELECT count(*) FROM etl_quarantine)" if quarantine and quarantine[0] else "0"
        row = con.execute(f"SELECT (SELECT count(*) FROM {schema}.{table}), {q}").fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0]), int(row[1])


def run_pipeline(out: Path, fleet: int, resilience: str) -> dict[str, Any]:
    from etl_tasks.local_services import RedisServer

    redis_server = RedisServer(out / "redis")
    os.environ.update({"ETL_REDIS_URL": redis_server.url, "ETL_DATA_DIR": str(out),
                       "ETL_DUCKDB_PATH": str(out / "warehouse.duckdb")})
    if resilience == "off":
        os.environ["ETL_RESILIENCE"] = "off"
    else:
        os.environ.pop("ETL_RESILIENCE", None)
    from etl_tasks.api import run_source
    from etl_tasks.celery import app, use_redis
    from etl_tasks.local_services import Worker, wait_for_workers
    from etl_tasks.resources import reset_resources

    reset_resources()
    use_redis(redis_server.url)
    logs = out / "logs"
    workers: list[Worker] = []
    try:
        redis_server.start()
        env = dict(os.environ)
        t0 = time.perf_counter()
        workers.append(Worker("fleet", env, logs / "fleet.log",
                              ["--concurrency", str(fleet)]).start())
        workers.append(Worker("loader", env, logs / "loader.log").start())
        wait_for_workers(app.control, ["fleet-", "loader-"])
        worker_start_s = time.perf_counter() - t0

        assert redis_server.process is not None
        warm_s = warm_up()
        peaks = RssPeaks({"fleet": workers[0].pid, "loader": workers[1].pid},
                         {"redis": redis_server.process.pid})
        started = time.time()
        handle = run_source("billing")
        deadline = time.monotonic() + 3600
        next_sample = 0.0
        while (summary := handle.summary()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pipeline run {handle.run_id} is not finished after "
                                   f"an hour; see {logs}")
            if time.monotonic() >= next_sample:
                peaks.sample()
                next_sample = time.monotonic() + 0.5
            time.sleep(0.02)
        ended = time.time()
        peaks.sample()
    finally:
        for worker in workers:
            worker.stop()
        redis_server.stop()
    stored = count_stored(out / "warehouse.duckdb")
    return {"started": started, "ended": ended, "seconds": ended - started,
            "status": summary.status, "error": summary.error,
            "loaded": stored[0], "quarantined": stored[1],
            "summary_loaded": summary.loaded, "summary_quarantined": summary.quarantined,
            "worker_start_s": round(worker_start_s, 3), "warm_up_s": round(warm_s, 3),
            "roles_rss_mb": peaks.roles(),
            "task_runtimes": task_runtimes(logs)}


def warm_up() -> float:
    """What a running deployment has done before any run we time, as the peers' clocks start
    after their imports: this client's imports (etl_tasks.tasks, 0.5 s, on the first
    `run_source`) and the loader's one-time rebuild of the checkpoints from the (empty)
    ledger that a brand-new Redis asks for (a rebuild task and the plan sent twice, 0.3 s).
    Returns the seconds it took."""
    t0 = time.perf_counter()
    from etl_tasks import checkpoints
    from etl_tasks.resources import get_resources
    from etl_tasks.tasks import rebuild_state

    rebuild_state.apply_async().get(timeout=120)
    if not checkpoints.intact(get_resources().redis):
        raise RuntimeError("the loader's checkpoint rebuild left no marker in Redis")
    return time.perf_counter() - t0


# --- the peers -----------------------------------------------------------------------------


def run_direct(out: Path, chunk_size: int | None) -> dict[str, Any]:
    from etl_tasks import datasets
    from etl_tasks.config import Settings, load_pipeline
    from etl_tasks.load import duckdb as store
    from etl_tasks.sources import firebird, firebird_schema
    from etl_tasks.transform import transform_chunk

    settings = Settings()
    pipeline = load_pipeline(settings)
    src = pipeline.source("billing")
    spec = datasets.spec_for(pipeline, src)
    chunk_size = chunk_size or src.chunk_size
    target = firebird.FirebirdTarget(settings.firebird_dsn, settings.firebird_user,
                                     settings.firebird_password.get_secret_value(),
                                     settings.firebird_runtime_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"read_s": 0.0, "transform_s": 0.0, "load_s": 0.0}
    started = time.time()
    fb = firebird.connect(target)
    duck = store.connect(out / "direct.duckdb")
    try:
        schema = firebird_schema.reflect(fb, src.location, source=src.name)
        bounds = firebird.key_bounds(fb, schema.table, src.key_column, 0)
        lo, hi = bounds or (1, 0)
        for start in range(lo, hi + 1, chunk_size):
            end = min(start + chunk_size - 1, hi)
            t0 = time.perf_counter()
            raw = firebird.fetch_range(fb, schema.table, src.key_column, start, end,
                                       schema=schema, updated_column=src.updated_column)
            t1 = time.perf_counter()
            result = transform_chunk(spec, raw)
            t2 = time.perf_counter()
            unit = f"direct:{start}-{end}"
            store.write_chunk(duck, source=src.name, table=spec.table, dataset=spec.name,
                              entry=store.LedgerEntry("direct", unit, unit, "range",
                                                      key_lo=start, key_hi=end),
                              valid=result.valid, quarantined=result.quarantined)
            t3 = time.perf_counter()
            parts["read_s"] += t1 - t0
            parts["transform_s"] += t2 - t1
            parts["load_s"] += t3 - t2
        fb.commit()
        ended = time.time()
    finally:
        duck.close()
        fb.close()
    loaded, quarantined = count_stored(out / "direct.duckdb", spec.table)
    return {"started": started, "ended": ended, "seconds": ended - started,
            "loaded": loaded, "quarantined": quarantined,
            "parts_s": {k: round(v, 3) for k, v in parts.items()}}


def run_dlt(out: Path, chunk_size: int, lo: int | None, hi: int | None) -> dict[str, Any]:
    from etl_tasks.config import Settings
    from etl_tasks.sources import firebird

    settings = Settings()
    # firebird-driver with the embedded engine of the firebird-embedded wheel, as the
    # product's reader sets it up (client library, lock directory, libtommath).
    firebird.configure_runtime(settings.firebird_runtime_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    os.environ["DLT_DATA_DIR"] = str(out / "home")
    os.environ["DLT_PROJECT_DIR"] = str(out)
    import dlt
    import sqlalchemy as sa
    from dlt.sources.sql_database import sql_table

    def halves(query: Any, table: Any) -> Any:
        key = table.c.claim_id
        return query.where(key >= lo) if hi is None else query.where(key.between(lo, hi))

    path = out / "dlt.duckdb"
    started = time.time()
    engine = sa.create_engine(
        f"firebird+firebird://{settings.firebird_user}@/{Path(settings.firebird_dsn).resolve()}")
    resource = sql_table(engine, table="billing_claims", backend="pyarrow",
                         chunk_size=chunk_size, reflection_level="full_with_precision",
                         query_adapter_callback=halves if lo is not None else None)
    pipeline = dlt.pipeline(pipeline_name="bench", pipelines_dir=str(out / "pipelines"),
                            destination=dlt.destinations.duckdb(str(path)),
                            dataset_name="billing", progress=None)
    pipeline.run(resource, write_disposition="append")
    ended = time.time()
    engine.dispose()
    loaded, _ = count_stored(path, "billing_claims", schema="billing")
    return {"started": started, "ended": ended, "seconds": ended - started,
            "loaded": loaded, "quarantined": 0, "chunk_size": chunk_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measure", choices=["pipeline", "direct", "dlt"])
    parser.add_argument("--out", type=Path, required=True, help="its own folder")
    parser.add_argument("--fleet", type=int, default=os.cpu_count() or 1,
                        help="pipeline: the fleet's concurrency (default: the CPU count)")
    parser.add_argument("--resilience", choices=["on", "off"], default="on",
                        help="pipeline: ETL_RESILIENCE for the workers")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--lo", type=int, default=None, help="dlt: smallest CLAIM_ID")
    parser.add_argument("--hi", type=int, default=None, help="dlt: largest CLAIM_ID")
    args = parser.parse_args(argv)
    if args.measure == "pipeline":
        result = run_pipeline(args.out, args.fleet, args.resilience)
    elif args.measure == "direct":
        result = run_direct(args.out, args.chunk_size)
    else:
        result = run_dlt(args.out, args.chunk_size or DLT_CHUNK_SIZE, args.lo, args.hi)
    result["pid"] = os.getpid()
    result["peak_rss_mb"] = round(vm_hwm_mb(), 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
