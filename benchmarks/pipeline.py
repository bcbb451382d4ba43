"""The billing pipeline against one process doing the same work and against dlt, in one run.

    python -m benchmarks.pipeline --claims 200000
    python -m benchmarks.pipeline --claims 1000000 --json --resilience both
    python -m benchmarks.pipeline --claims 200000 --fleet 4 --keep /tmp/bench --peers direct

From the repository root. In a temporary folder (or --keep DIR, left in place afterwards) it
generates the embedded Firebird demo database with N claims once, then measures on that file,
one after the other (each peer in its own process, so its memory is its own):

1. `direct`: one process, no Celery, no Redis: the pipeline's own fetch (`fetch_range` per
   chunk-size key range), validation (`transform_chunk`) and load (`write_chunk`) in a loop
   (benchmarks/measure.py);
2. `dlt`: dlt's `sql_table` (sqlalchemy-firebird, pyarrow backend) into a DuckDB file;
3. `dlt_2proc`: the same in two processes at once, each over one half of the CLAIM_ID range
   into its own DuckDB file; wall clock from the first start to the last end;
4. `pipeline`: a private redis-server, the fleet (`--concurrency K`, default the CPU count)
   and the single loader as real `celery worker` processes; from `run_source("billing")` to
   the run's end (worker start-up is reported on its own). `--resilience off` passes
   ETL_RESILIENCE=off to the workers; `both` runs the pipeline twice, on then off, each with
   its own Redis, workers and DuckDB file.

Each figure is rows per second = N / seconds. The benchmark fails (a BenchmarkError, exit 1)
unless every path's loaded + quarantined rows equal N and its quarantined rows equal the
claims the generator planted a defect on (dlt validates nothing: there loaded must be N).
Peak RSS is VmHWM per process: the peers report their own, the pipeline's processes are
sampled from /proc while the run goes. All processes started here are stopped at the end,
whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import DLT_CHUNK_SIZE, vm_hwm_mb

REPO = Path(__file__).resolve().parent.parent
BATCH_ROWS = 50_000
PEERS = ("direct", "dlt", "dlt_2proc")

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


class BenchmarkError(RuntimeError):
    """A count did not add up, or a run did not finish: the figures would mean nothing."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, required=True, help="claims to generate (N)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--fleet", type=int, default=os.cpu_count() or 1,
                        help="fleet worker concurrency K (default: the CPU count)")
    parser.add_argument("--resilience", choices=["on", "off", "both"], default="on",
                        help="pipeline with ETL_RESILIENCE on (default), off, or both runs")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers to measure (default: all of "
                             f"{','.join(PEERS)}; empty: none)")
    parser.add_argument("--dlt-chunk-size", type=int, default=DLT_CHUNK_SIZE,
                        help=f"dlt's sql_table chunk_size (default {DLT_CHUNK_SIZE:,})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every path R times, interleaved (peers, then the "
                             "pipeline, per round), and report the medians (default 1)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in DIR and leave the database, DuckDB files and logs there")
    args = parser.parse_args(argv)
    if args.claims < 2:
        parser.error("--claims must be at least 2 (dlt_2proc splits them in halves)")
    if args.fleet < 1:
        parser.error("--fleet must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    return args


def prepare_env(root: Path) -> None:
    """ETL_* settings of the source and the config, set in this process and so passed to
    every process started here (each pipeline run adds its Redis and DuckDB file)."""
    (root / "pipeline.toml").write_text(PIPELINE_TOML)
    os.environ.update({
        "ETL_FIREBIRD_DSN": str(root / "source" / "billing.fdb"),
        "ETL_FIREBIRD_RUNTIME_DIR": str(root / "source" / ".firebird"),
        "ETL_PIPELINE_CONFIG": str(root / "pipeline.toml"),
        "ETL_STAGE_TTL_S": "3600",
    })
    os.environ.pop("ETL_RESILIENCE", None)


def clean(root: Path) -> None:
    """Remove what an earlier run in --keep DIR left, so this run starts from nothing."""
    for name in ("source", "on", "off", "peers"):
        shutil.rmtree(root / name, ignore_errors=True)


# --- each measurement its own process (benchmarks/measure.py) --------------------------------


def _command(measure: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.measure", measure, "--out", str(out), *extra]


def _result(name: str, proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    if proc.returncode != 0:
        hint = ("; install the benchmark dependencies: make bench (pip install --group bench)"
                if "No module named 'dlt'" in proc.stderr else "")
        raise BenchmarkError(f"{name} failed (exit {proc.returncode}){hint}:\n"
                             f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_measure(measure: str, out: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(_command(measure, out, *extra), cwd=REPO, capture_output=True,
                          text=True, check=False)
    return _result(measure, proc)


def run_dlt_2proc(root: Path, n: int, chunk_size: int) -> dict[str, Any]:
    """dlt twice at once, CLAIM_ID 1..n/2 and n/2+1..n, each its own pipeline and DuckDB file:
    what a user could script around dlt. Timed from the first start to the last end."""
    half = n // 2
    procs = [subprocess.Popen(
        _command("dlt", root / "peers" / f"dlt_2proc_{i}", "--chunk-size", str(chunk_size),
                      "--lo", str(lo), "--hi", str(hi)),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, (lo, hi) in enumerate(((1, half), (half + 1, n)))]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        results.append(_result("dlt_2proc", subprocess.CompletedProcess(
            proc.args, proc.returncode, stdout, stderr)))
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {"seconds": seconds, "loaded": sum(r["loaded"] for r in results),
            "quarantined": 0, "processes": results}


# --- the pipeline ---------------------------------------------------------------------------


def run_pipeline(args: argparse.Namespace, root: Path, mode: str) -> dict[str, Any]:
    """One pipeline run of all N claims with resilience `mode` ("on" or "off") in its own
    process, with its own redis-server, fleet, loader and DuckDB file."""
    result = run_measure("pipeline", root / mode, "--fleet", str(args.fleet),
                         "--resilience", mode)
    if result["status"] != "finished":
        raise BenchmarkError(f"the pipeline run (resilience {mode}) {result['status']}: "
                             f"{result['error']}; see {root / mode / 'logs'}")
    if mode == "on" and (result["loaded"], result["quarantined"]) != (
            result["summary_loaded"], result["summary_quarantined"]):
        raise BenchmarkError(f"pipeline summary says {result['summary_loaded']}+"
                             f"{result['summary_quarantined']} rows but the warehouse holds "
                             f"{result['loaded']}+{result['quarantined']}")
    return result


# --- the whole run --------------------------------------------------------------------------


def check(name: str, result: dict[str, Any], n: int, expected_quarantine: int | None) -> None:
    """loaded + quarantined = N and quarantined = the planted defective claims (None: no
    validation, so every row is loaded)."""
    loaded, quarantined = result["loaded"], result["quarantined"]
    if loaded + quarantined != n:
        raise BenchmarkError(f"{name}: {loaded} loaded + {quarantined} quarantined != {n} claims")
    if expected_quarantine is not None and quarantined != expected_quarantine:
        raise BenchmarkError(f"{name}: {quarantined} quarantined, the planted defective claims "
                             f"are {expected_quarantine}")


def _rate(n: int, result: dict[str, Any] | None) -> float | None:
    return n / result["seconds"] if result else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def measure_round(args: argparse.Namespace, root: Path, n: int, expected: int,
                  loads: dict[str, float], index: int) -> dict[str, dict[str, Any]]:
    """Each chosen peer, then the pipeline (on, then off, with `both`), one after the other,
    each from an empty folder; every count checked. Keyed by peer and `pipeline_<mode>`."""
    tag = f" (round {index + 1})" if args.rounds > 1 else ""
    chunk = str(args.dlt_chunk_size)
    done: dict[str, dict[str, Any]] = {}
    for peer in args.peers:
        loads[peer + tag] = round(os.getloadavg()[0], 2)
        for folder in ([f"dlt_2proc_{i}" for i in (0, 1)] if peer == "dlt_2proc" else [peer]):
            shutil.rmtree(root / "peers" / folder, ignore_errors=True)
        if peer == "direct":
            done[peer] = run_measure("direct", root / "peers" / "direct")
            check("direct" + tag, done[peer], n, expected)
        elif peer == "dlt":
            done[peer] = run_measure("dlt", root / "peers" / "dlt", "--chunk-size", chunk)
            check("dlt" + tag, done[peer], n, None)
        else:
            done[peer] = run_dlt_2proc(root, n, args.dlt_chunk_size)
            check("dlt_2proc" + tag, done[peer], n, None)
    for mode in ["on", "off"] if args.resilience == "both" else [args.resilience]:
        loads[f"pipeline_resilience_{mode}{tag}"] = round(os.getloadavg()[0], 2)
        shutil.rmtree(root / mode, ignore_errors=True)
        result = run_pipeline(args, root, mode)
        # With resilience off validation may be off too: then every row is loaded.
        check(f"pipeline (resilience {mode}){tag}", result, n,
              expected if mode == "on" or result["quarantined"] else None)
        done[f"pipeline_{mode}"] = result
    return done


def _median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median time (the lower middle one of an even count), its peak
    memory the largest of all rounds, and every round's seconds in `rounds_seconds`."""
    ordered = sorted(results, key=lambda r: r["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds_seconds"] = [round(r["seconds"], 3) for r in results]
    chosen["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    if "roles_rss_mb" in chosen:
        chosen["roles_rss_mb"] = {role: max(r["roles_rss_mb"][role] for r in results)
                                  for role in chosen["roles_rss_mb"]}
    if "processes" in chosen:  # dlt_2proc: each half's peak over the rounds
        chosen["processes"] = [
            {**p, "peak_rss_mb": max(r["processes"][i]["peak_rss_mb"] for r in results)}
            for i, p in enumerate(chosen["processes"])]
    return chosen


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from etl_tasks.config import get_settings
    from etl_tasks.demo_data import expected_defective_claims, make_billing_db
    from etl_tasks.resources import get_resources, reset_resources

    clean(root)
    prepare_env(root)
    reset_resources()
    get_settings.cache_clear()
    n = args.claims
    loads: dict[str, float] = {"start": round(os.getloadavg()[0], 2)}
    t0 = time.perf_counter()
    make_billing_db(get_resources().firebird_target, n)
    generate_s = time.perf_counter() - t0
    expected = expected_defective_claims(1, n)

    rounds = [measure_round(args, root, n, expected, loads, i) for i in range(args.rounds)]
    loads["end"] = round(os.getloadavg()[0], 2)
    peers = {peer: _median_run([r[peer] for r in rounds]) for peer in args.peers}
    runs = {mode: _median_run([r[f"pipeline_{mode}"] for r in rounds]) for mode in
            (["on", "off"] if args.resilience == "both" else [args.resilience])}

    on, off = runs.get("on"), runs.get("off")
    main = on or off
    assert main is not None
    rate = _rate(n, main)
    rates = {peer: _rate(n, peers.get(peer)) for peer in PEERS}
    result: dict[str, Any] = {
        "claims": n,
        "resilience": args.resilience,
        "pipeline_rows_per_s": round(_rate(n, on)) if on else None,
        "direct_rows_per_s": round(rates["direct"]) if rates["direct"] else None,
        "dlt_rows_per_s": round(rates["dlt"]) if rates["dlt"] else None,
        "dlt_2proc_rows_per_s": round(rates["dlt_2proc"]) if rates["dlt_2proc"] else None,
        # The pipeline with resilience on (off when only off ran) over each peer.
        "ratio_vs_direct": _ratio(rate, rates["direct"]),
        "ratio_vs_dlt": _ratio(rate, rates["dlt"]),
        "ratio_vs_dlt_2proc": _ratio(rate, rates["dlt_2proc"]),
    }
    if args.rounds > 1:
        # Every round's own figures: pipeline and direct ran minutes apart at most.
        result["rounds"] = args.rounds
        result["rounds_seconds"] = {name: [round(r[name]["seconds"], 3) for r in rounds]
                                    for name in rounds[0]}
        if "direct" in args.peers and main is on:
            result["ratio_vs_direct_rounds"] = [
                round(r["direct"]["seconds"] / r["pipeline_on"]["seconds"], 2) for r in rounds]
    if off:
        off_rate = _rate(n, off)
        result["pipeline_resilience_off_rows_per_s"] = round(off_rate) if off_rate else None
    if on and off:
        on_over_off = (_rate(n, on) or 0) / (_rate(n, off) or 1)
        # Share of the unguarded throughput the resilience features take (target <= 0.15).
        result["resilience_cost"] = round(1 - on_over_off, 3)
        result["ratio_resilience_on_vs_off"] = round(on_over_off, 3)
    rss: dict[str, Any] = {**main["roles_rss_mb"], "client": main["peak_rss_mb"]}
    for peer in ("direct", "dlt"):
        if peer in peers:
            rss[peer] = peers[peer]["peak_rss_mb"]
    if "dlt_2proc" in peers:
        each = [p["peak_rss_mb"] for p in peers["dlt_2proc"]["processes"]]
        rss["dlt_2proc"], rss["dlt_2proc_each"] = max(each), each
    rss["harness"] = round(vm_hwm_mb(), 1)
    result.update({
        "pipeline_seconds": round(on["seconds"], 3) if on else None,
        "pipeline_resilience_off_seconds": round(off["seconds"], 3) if off else None,
        **{f"{peer}_seconds": round(peers[peer]["seconds"], 3) for peer in peers},
        "dlt_2proc_process_seconds": [round(p["seconds"], 3) for p in
                                      peers["dlt_2proc"]["processes"]]
        if "dlt_2proc" in peers else None,
        "peak_rss_mb": rss,
        "peak_rss_mb_resilience_off": {**off["roles_rss_mb"], "client": off["peak_rss_mb"]}
        if on and off else None,
        "loaded": main["loaded"],
        "quarantined": main["quarantined"],
        "expected_quarantined": expected,
        "worker_start_seconds": main["worker_start_s"],
        "generate_seconds": round(generate_s, 3),
        "fleet_processes": args.fleet,
        "cpu_count": os.cpu_count(),
        # Other work on the machine skews every figure: the 1-minute load at the start and
        # the end, and when each measurement began.
        "load_average_1m": [loads["start"], loads["end"]],
        "load_average_1m_at": loads,
        "direct_parts_s": peers["direct"]["parts_s"] if "direct" in peers else None,
        "dlt_settings": {"chunk_size": args.dlt_chunk_size, "backend": "pyarrow",
                         "reflection_level": "full_with_precision",
                         "write_disposition": "append", "destination": "duckdb"},
        "task_runtimes": main["task_runtimes"],
        "task_runtimes_resilience_off": off["task_runtimes"] if on and off else None,
        "workdir": str(root) if args.keep else None,
    })
    return result


def render(result: dict[str, Any]) -> str:
    def rate(key: str, seconds: str) -> str:
        value = result.get(key)
        return "-" if value is None else f"{value:,} rows/s  ({result[seconds]} s)"

    rows = [
        ("claims", f"{result['claims']:,}"),
        ("pipeline (resilience on)", rate("pipeline_rows_per_s", "pipeline_seconds")),
        ("pipeline (resilience off)", rate("pipeline_resilience_off_rows_per_s",
                                           "pipeline_resilience_off_seconds")),
        ("direct (one process)", rate("direct_rows_per_s", "direct_seconds")),
        ("dlt", rate("dlt_rows_per_s", "dlt_seconds")),
        ("dlt, two processes", rate("dlt_2proc_rows_per_s", "dlt_2proc_seconds")),
        ("ratio vs direct / dlt / dlt_2proc",
         " / ".join(f"{result[k]}x" if result[k] else "-"
                    for k in ("ratio_vs_direct", "ratio_vs_dlt", "ratio_vs_dlt_2proc"))),
    ]
    if "rounds" in result:
        rows.append(("rounds (medians above)", str(result["rounds"])))
        rows += [(f"  {name} seconds", " / ".join(map(str, seconds)))
                 for name, seconds in result["rounds_seconds"].items()]
        if "ratio_vs_direct_rounds" in result:
            rows.append(("  ratio vs direct per round",
                         " / ".join(f"{r}x" for r in result["ratio_vs_direct_rounds"])))
    if "resilience_cost" in result:
        rows.append(("resilience cost (1 - on/off)", f"{result['resilience_cost']:.1%}"))
    rows += [
        ("worker start-up (not timed)", f"{result['worker_start_seconds']} s"),
        ("demo data generation", f"{result['generate_seconds']} s"),
        ("fleet processes / CPUs", f"{result['fleet_processes']} / {result['cpu_count']}"),
        ("load average start / end", " / ".join(map(str, result["load_average_1m"]))),
        ("peak RSS MB", ", ".join(f"{k} {v}" for k, v in result["peak_rss_mb"].items())),
    ]
    if result["direct_parts_s"]:
        rows.append(("direct parts", ", ".join(f"{k.removesuffix('_s')} {v} s"
                                               for k, v in result["direct_parts_s"].items())))
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
