"""The file sources on large files: rows per second and peak memory of the reading process.

    .venv/bin/python -m benchmarks.files --xml-records 1000000 --workbook-rows 300000
    .venv/bin/python -m benchmarks.files --xml-records 200000 --workbook-rows 50000 --json
    .venv/bin/python -m benchmarks.files --workbook-rows 300000 --xml-records 0 --calamine

In a temporary folder (`--keep DIR`: in DIR, left there) it writes, with the demo generators
of `etl_tasks/demo_files.py` (the same layouts and planted defects as `etl demo`), one lab
feed of N records and one registrations workbook of M rows, each also at a quarter of its
size (`--fraction`), then reads every file in a fresh child process: the product's reader
(`xml_feed.iter_batches`, `excel.iter_batches`) in 50,000-row batches and `transform_chunk`
with the file's dataset on every batch, as a worker does. Each child reports its own peak
RSS (`VmHWM`), so no measurement inherits another's memory, and the two sizes of one kind
give `peak_ratio` (peak at full size / peak at a quarter): 1.0 is memory flat in file size.
`--calamine` also reads each workbook through python-calamine's whole-sheet strategy (the
reader before the streaming one) for comparison. The benchmark fails (exit 1) unless every
reading's valid + quarantined rows equal the file's rows and the quarantine holds exactly the
planted defects.
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

BATCH_ROWS = 50_000


class BenchmarkError(RuntimeError):
    """A reading that lost, doubled or misjudged rows."""


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


# --- children ---------------------------------------------------------------------------


def generate(kind: str, rows: int, folder: Path) -> dict[str, Any]:
    """Write one demo file of `rows` rows into `folder`; return its name and manifest."""
    from etl_tasks import demo_files

    started = time.perf_counter()
    if kind == "xml":
        [manifest] = demo_files.write_lab_feeds(folder, files=1, records_per_file=rows)
    else:
        [manifest] = demo_files.write_registrations(folder, files=1, rows_per_file=rows)
    path = folder / manifest.name
    return {"path": str(path), "rows": manifest.rows, "defects": sum(manifest.defects.values()),
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "generate_s": round(time.perf_counter() - started, 1)}


def measure(kind: str, path: Path, engine: str) -> dict[str, Any]:
    """Read `path` with the product's reader and transform every batch; time and memory."""
    from etl_tasks.sources import excel, xml_feed
    from etl_tasks.transform import transform_chunk

    if engine == "calamine":
        excel._SLICED = frozenset()  # the whole-sheet reader that streaming replaced
    streamed = kind == "workbook" and path.suffix in getattr(excel, "_SLICED", ())
    dataset = "lab_results" if kind == "xml" else "patient_registrations"
    reader = xml_feed.iter_batches if kind == "xml" else excel.iter_batches
    rss_start = _status_kb("VmRSS")
    rows = valid = quarantined = 0
    read_s = transform_s = 0.0
    started = mark = time.perf_counter()
    for batch in reader(path, batch_rows=BATCH_ROWS, source="bench"):
        now = time.perf_counter()
        read_s += now - mark
        result = transform_chunk(dataset, batch)
        rows += batch.num_rows
        valid += result.valid.num_rows
        quarantined += result.quarantined.num_rows
        del batch, result
        mark = time.perf_counter()
        transform_s += mark - now
    seconds = time.perf_counter() - started
    return {"rows": rows, "valid": valid, "quarantined": quarantined,
            "seconds": round(seconds, 2), "read_s": round(read_s, 2),
            "transform_s": round(transform_s, 2),
            "rows_per_s": round(rows / seconds) if seconds else 0,
            "read_rows_per_s": round(rows / read_s) if read_s else 0,
            "rss_start_mb": _mb(rss_start), "peak_rss_mb": _mb(_status_kb("VmHWM")),
            "reader": ("lxml iterparse" if kind == "xml" else
                       "python-calamine in slices" if streamed else "python-calamine whole sheet")}


def _child(argv: list[str]) -> dict[str, Any]:
    return json.loads(subprocess.run(
        [sys.executable, "-m", "benchmarks.files", "--child", *argv],
        check=True, capture_output=True, text=True,
    ).stdout)


# --- parent -----------------------------------------------------------------------------


def run(xml_records: int, workbook_rows: int, fraction: int, folder: Path,
        calamine: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"cpu_count": os.cpu_count(),
                              "load_average_1m_before": round(os.getloadavg()[0], 2)}
    kinds = [("xml", xml_records, ["stream"]),
             ("workbook", workbook_rows, ["stream", "calamine"] if calamine else ["stream"])]
    problems = []
    for kind, full, engines in kinds:
        if full <= 0:
            continue
        sizes = sorted({max(1, full // fraction), full})
        for engine in engines:
            readings = []
            for size in sizes:
                made = folder / f"{kind}-{size}"
                made.mkdir(exist_ok=True)
                files = list(made.iterdir())
                manifest = (json.loads((made / "manifest.json").read_text())
                            if (made / "manifest.json").exists() and len(files) == 2
                            else None)
                if manifest is None:
                    manifest = _child(["generate", kind, str(size), str(made)])
                    (made / "manifest.json").write_text(json.dumps(manifest))
                reading = _child(["measure", kind, manifest["path"], engine])
                reading.update({k: manifest[k] for k in ("file_mb", "generate_s")})
                readings.append(reading)
                if (reading["rows"], reading["valid"] + reading["quarantined"],
                        reading["quarantined"]) != (size, size, manifest["defects"]):
                    problems.append(f"{kind} {engine} {size}: read {reading['rows']}, valid "
                                    f"{reading['valid']}, quarantined {reading['quarantined']}; "
                                    f"expected {size} rows, {manifest['defects']} defects")
            small, large = readings[0], readings[-1]
            name = kind if engine == "stream" else f"{kind}_{engine}"
            result[name] = {
                "rows": large["rows"], "file_mb": large["file_mb"],
                "rows_per_s": large["rows_per_s"], "read_rows_per_s": large["read_rows_per_s"],
                "peak_rss_mb": large["peak_rss_mb"],
                "peak_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
                "readings": readings,
            }
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    if problems:
        raise BenchmarkError("; ".join(problems))
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"cpus {result['cpu_count']}, 1-minute load {result['load_average_1m_before']} -> "
          f"{result['load_average_1m_after']}")
    for name, figures in result.items():
        if not isinstance(figures, dict):
            continue
        print(f"\n{name} ({figures['readings'][-1]['reader']}): {figures['rows']:,} rows, "
              f"{figures['file_mb']} MB file, "
              f"{figures['rows_per_s']:,} rows/s read + transform "
              f"({figures['read_rows_per_s']:,} rows/s reading alone), peak RSS "
              f"{figures['peak_rss_mb']} MB, peak ratio {figures['peak_ratio']}")
        print(f"  {'rows':>10} {'file MB':>8} {'rows/s':>8} {'read/s':>8} {'read s':>7} "
              f"{'xform s':>7} {'RSS start':>9} {'peak RSS':>8}")
        for r in figures["readings"]:
            print(f"  {r['rows']:>10,} {r['file_mb']:>8} {r['rows_per_s']:>8,} "
                  f"{r['read_rows_per_s']:>8,} {r['read_s']:>7} {r['transform_s']:>7} "
                  f"{r['rss_start_mb']:>9} {r['peak_rss_mb']:>8}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        what, kind, *rest = sys.argv[2:]
        if what == "generate":
            out = generate(kind, int(rest[0]), Path(rest[1]))
        else:
            out = measure(kind, Path(rest[0]), rest[1])
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--xml-records", type=int, default=1_000_000)
    parser.add_argument("--workbook-rows", type=int, default=300_000)
    parser.add_argument("--fraction", type=int, default=4,
                        help="the smaller file of each kind is this many times smaller")
    parser.add_argument("--calamine", action="store_true",
                        help="also read the workbooks with python-calamine's whole-sheet reader")
    parser.add_argument("--keep", type=Path,
                        help="generate (or reuse) the files here and keep them")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        folder, cleanup = args.keep, None
    else:
        cleanup = tempfile.mkdtemp(prefix="bench-files-")
        folder = Path(cleanup)
    try:
        result = run(args.xml_records, args.workbook_rows, max(1, args.fraction), folder,
                     args.calamine)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)


if __name__ == "__main__":
    main()
