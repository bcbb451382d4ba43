"""Extraction speed of the generic Firebird reader against the claim-specific one it replaced.

    .venv/bin/etl demo-data --claims 1000000      # with ETL_DATA_DIR / ETL_FIREBIRD_DSN set
    .venv/bin/python benchmarks/firebird_extract.py --dsn DIR/demo/billing.fdb [--rounds 3]

One process reads every 50,000-key range of BILLING_CLAIMS into Arrow, in turn with:

- "claim-specific": the reader as it was before tables were configurable (commit 2bf8202's
  parent), reproduced here verbatim: the CSV expression built from the hard-coded claim
  columns, the blob returned as text (decoded by the driver), re-encoded and parsed;
- "generic": `firebird.fetch_range` with the columns reflected from the table (once, as a
  run's plan does), the text returned as a binary blob and decoded with the table's
  character set.

Each round reads every range with both readers, back to back (paired: whatever else the
machine does weighs on both alike), alternating which goes first from range to range; a
reader's round time is the sum of its ranges. The figure per reader is its best round in
rows/s (N / seconds), the median beside it. Both must give the same rows, or the benchmark
fails. Run it when the machine is quiet (the tests take `flock /tmp/etl-heavy.lock`; so
should this).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv

from etl_tasks.sources import firebird, firebird_schema
from etl_tasks.sources.firebird import CLAIM_COLUMNS, FirebirdTarget

RANGE = 50_000


def claim_specific_range(con: Any, lo: int, hi: int) -> pa.Table:
    """The pre-generic reader of BILLING_CLAIMS, as it was (expression, fetch, parse)."""
    parts = []
    for name, _, is_text in CLAIM_COLUMNS:
        if is_text:
            parts.append(f"CASE WHEN {name} IS NULL THEN '' ELSE "
                         f"'\"' || REPLACE({name}, '\"', '\"\"') || '\"' END")
        else:
            parts.append(f"COALESCE({name}, '')")
    line = " || ',' || ".join(parts)
    sql = (f"SELECT LIST(r, ASCII_CHAR(10)) FROM (SELECT {line} AS r "
           "FROM BILLING_CLAIMS WHERE CLAIM_ID BETWEEN ? AND ? ORDER BY CLAIM_ID)")
    cur = con.cursor()
    try:
        cur.execute(sql, (lo, hi))
        text = cur.fetchone()[0]
    finally:
        cur.close()
    names = [name.lower() for name, _, _ in CLAIM_COLUMNS]
    schema = pa.schema([(name.lower(), typ) for name, typ, _ in CLAIM_COLUMNS])
    if not text:
        return schema.empty_table()
    data = text.encode("utf-8")
    block_size = 1 << 20
    if b"\r" in data:
        block_size = max(block_size, len(data) + 1)
    return pcsv.read_csv(
        io.BytesIO(data),
        read_options=pcsv.ReadOptions(column_names=names, block_size=block_size),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            column_types={f.name: f.type for f in schema},
            strings_can_be_null=True, quoted_strings_can_be_null=False),
    ).select(names)


def paired_round(con: Any, readers: dict[str, Callable[[Any, int, int], pa.Table]],
                 bounds: tuple[int, int]) -> tuple[dict[str, float], int]:
    """One round: every range read by each reader back to back (the order alternating by
    range); seconds per reader, and rows. The readers' rows must be equal."""
    lo, hi = bounds
    seconds = dict.fromkeys(readers, 0.0)
    rows = 0
    for n, start in enumerate(range(lo, hi + 1, RANGE)):
        end = min(start + RANGE - 1, hi)
        got = {}
        for name in list(readers) if n % 2 == 0 else list(reversed(readers)):
            began = time.perf_counter()
            got[name] = readers[name](con, start, end)
            seconds[name] += time.perf_counter() - began
        first, *others = got.values()
        if any(not first.equals(other) for other in others):
            raise SystemExit(f"the readers gave different rows for keys {start}-{end}")
        rows += first.num_rows
    con.commit()
    return seconds, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", type=Path, required=True, help="the demo billing.fdb")
    parser.add_argument("--runtime", type=Path, default=None,
                        help="embedded engine runtime folder (default: beside the database)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    target = FirebirdTarget(dsn=str(args.dsn), user="SYSDBA", password="masterkey",
                            runtime_dir=args.runtime or args.dsn.parent / ".firebird")
    con = firebird.connect(target)
    try:
        key_range = firebird.key_bounds(con, "BILLING_CLAIMS", "CLAIM_ID", 0)
        assert key_range is not None, "no claims: run `etl demo-data --claims N` first"
        schema = firebird_schema.reflect(con, "BILLING_CLAIMS")  # once, as the plan does

        def generic(c: Any, lo: int, hi: int) -> pa.Table:
            return firebird.fetch_range(c, "BILLING_CLAIMS", "CLAIM_ID", lo, hi, schema=schema)

        readers = {"claim-specific": claim_specific_range, "generic": generic}
        seconds: dict[str, list[float]] = {name: [] for name in readers}
        rows = 0
        for _ in range(args.rounds):
            took, rows = paired_round(con, readers, key_range)
            for name, value in took.items():
                seconds[name].append(value)
    finally:
        con.close()
    figures = {name: {"best_rows_per_s": round(rows / min(s)),
                      "median_rows_per_s": round(rows / statistics.median(s)),
                      "seconds": [round(x, 2) for x in s]} for name, s in seconds.items()}
    if args.json:
        print(json.dumps({"rows": rows, "range": RANGE, **figures}))
        return
    print(f"{rows:,} claims in ranges of {RANGE:,} keys, one process, {args.rounds} rounds")
    for name, f in figures.items():
        print(f"  {name:15} best {f['best_rows_per_s']:>9,} rows/s  median "
              f"{f['median_rows_per_s']:>9,} rows/s  ({', '.join(map(str, f['seconds']))} s)")


if __name__ == "__main__":
    main()
