"""Peak memory of the streaming XML reader on a large lab feed (issue: flat memory).

    python benchmarks/xml_memory.py --records 1000000 [--json]

Writes a feed of N records (about 500 bytes each, so 1,000,000 is about 500 MB) to a temp
folder, reads it with `xml_feed.iter_batches` in 50,000-record batches, and prints the file
size, records/s and the peak RSS measured after 10% of the records and at the end: a flat
profile has both about equal, far below the file size.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from etl_tasks.sources import xml_feed

RECORD = """  <Result>
    <ResultId>R-{n:09d}</ResultId>
    <Patient><Id>P{p:06d}</Id><BirthDate>1961-04-02</BirthDate></Patient>
    <Test code="2345-7" system="LOINC">Glucose</Test>
    <Value>5.4</Value><Unit>mmol/L</Unit>
    <ReferenceRange low="3.9" high="5.5"/>
    <CollectedAt>2026-11-19T08:15:00Z</CollectedAt>
    <ReportedAt>2026-11-19T12:02:00Z</ReportedAt>
    <Status>final</Status>
  </Result>
"""


def write_feed(path: Path, records: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write('<?xml version="1.0" encoding="UTF-8"?>\n'
                  '<LabResults xmlns="urn:example:lab:v1" partner="BENCH">\n')
        for start in range(0, records, 10_000):
            out.write("".join(RECORD.format(n=n, p=n % 250_000)
                              for n in range(start, min(start + 10_000, records))))
        out.write("</LabResults>\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "feed.xml"
        write_feed(path, args.records)
        size_mb = path.stat().st_size / 1e6
        baseline = peak_rss_mb()
        rows, early, started = 0, None, time.perf_counter()
        for batch in xml_feed.iter_batches(path, batch_rows=50_000, source="bench"):
            rows += batch.num_rows
            if early is None and rows >= args.records // 10:
                early = peak_rss_mb()
        seconds = time.perf_counter() - started
    result = {"records": rows, "file_mb": round(size_mb, 1),
              "records_per_s": round(rows / seconds), "rss_before_mb": round(baseline, 1),
              "peak_rss_at_10pct_mb": round(early or 0, 1),
              "peak_rss_at_end_mb": round(peak_rss_mb(), 1),
              "growth_after_10pct_mb": round(peak_rss_mb() - (early or 0), 1)}
    assert rows == args.records, f"read {rows} of {args.records} records"
    print(json.dumps(result) if args.json else
          "\n".join(f"{k:>24}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
