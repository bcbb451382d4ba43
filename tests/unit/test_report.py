"""`etl report`'s page from small real DuckDB files: escaping, no patient data, an empty
store, the run metrics columns present or not, the options, a busy store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest

from etl_tasks.load import duckdb as store
from etl_tasks.monitoring import report

HOSTILE = '<script>alert("x")</script>'
# A quarantined row's raw values and pointer: what the page must never show.
PATIENT = '{"patient_id": "P900001", "name": "Jane Q. Patient"}'
POINTER = "feed_secret.xml#41"


def _run(con, source, n, *, loaded, quarantined, error=None, metrics=None):
    ended = 1_780_000_000.0 + 600 * n
    summary = {"run_id": f"{source}-run-{n}", "source": source, "status": "finished",
               "extracted": loaded + quarantined, "loaded": loaded, "quarantined": quarantined,
               "skipped": 0, "duration_s": 5.0 + n, "quality_score":
               loaded / (loaded + quarantined), "error": error}
    store.record_run(con, summary, ended - summary["duration_s"], ended, metrics=metrics)


def _old_store(path: Path) -> duckdb.DuckDBPyConnection:
    """A store written before the run metrics columns existed (etl_runs as it was then)."""
    con = duckdb.connect(str(path))
    con.execute("""CREATE TABLE etl_runs (run_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL,
        status VARCHAR NOT NULL, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
        extracted BIGINT, loaded BIGINT, quarantined BIGINT, skipped BIGINT, duration_s DOUBLE,
        quality_score DOUBLE, error VARCHAR, dead_lettered BIGINT DEFAULT 0)""")
    return con


class _Charts(HTMLParser):
    """The page's charts as the browser reads them: {data-chart: [mark attributes]}."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.charts: dict[str, list[dict[str, str]]] = {}
        self._chart: str | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        found = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self._chart = found["data-chart"]
            self.charts[self._chart] = []
        elif self._chart is not None and "mark" in found.get("class", "").split():
            self.charts[self._chart].append(found)

    def handle_endtag(self, tag):
        if tag == "svg":
            self._chart = None


def _marks(page: str, chart: str) -> list[dict[str, str]]:
    return _Charts(page).charts[chart]


def test_page_escapes_every_text_and_never_shows_quarantined_values(tmp_path):
    """Source names, errors and error classes are escaped; raw values and pointers of
    quarantined rows do not reach the page, their rule names do, counted per rule."""
    path = tmp_path / "s.duckdb"
    with store.connect(path) as con:
        _run(con, HOSTILE, 1, loaded=90, quarantined=10, error=f"failed near {HOSTILE}",
             metrics={"errors_by_class": {HOSTILE: 2}})
        con.executemany("INSERT INTO etl_quarantine VALUES (?, ?, 'c1', ?, ?, ?, now())",
                        [(HOSTILE, f"{HOSTILE}-run-1", POINTER, reasons, PATIENT)
                         for reasons in ("amount: must be > 0; status: must be one of a, b",
                                         "amount: must be > 0")])
    page = report.render(report.read(path, 50))
    assert "<script" not in page
    assert page.count("&lt;script&gt;") >= 4  # header, captions, table, errors by class
    for secret in ("P900001", "Jane", POINTER, "patient_id"):
        assert secret not in page
    reasons = {m["data-item"]: float(m["data-value"]) for m in _marks(page, f"reasons:{HOSTILE}")}
    assert reasons == {"amount: must be > 0": 2, "status: must be one of a, b": 1}


def test_empty_store_or_no_store_gives_a_page_saying_there_are_no_runs(tmp_path):
    """A store with no run (or no file at all) gives a page, not a crash."""
    path = tmp_path / "s.duckdb"
    for data in (report.read(path, 50), report.read(path, 50, ["billing"])):
        assert not data.runs
        assert "No runs yet" in report.render(data)
    store.connect(path).close()
    page = report.render(report.read(path, 50))
    assert "No runs yet" in page
    assert 'class="chart"' not in page


def test_stage_chart_and_errors_table_only_when_the_store_has_those_columns(tmp_path):
    """Without the run metrics columns the page has the four charts and no stage chart;
    with them, stacked stage bars whose values are the stored seconds and the errors table."""
    old = tmp_path / "old.duckdb"
    with _old_store(old) as con:
        con.execute("INSERT INTO etl_runs VALUES ('r1', 'billing', 'finished', now(), now(), "
                    "10, 9, 1, 0, 2.5, 0.9, NULL, 0)")
    page = report.render(report.read(old, 50))
    assert set(_Charts(page).charts) == {"rows:billing", "quality", "duration"}
    assert "Time per stage" not in page
    assert "Errors by class" not in page

    new = tmp_path / "new.duckdb"
    with store.connect(new) as con:
        for n in (1, 2):
            _run(con, "billing", n, loaded=100 * n, quarantined=n, metrics={
                "stage_s": {"plan": 0.5, "extract": 2.0 * n, "transform": 1.0, "load": 0.25},
                "errors_by_class": {"TransientError": n, "FatalError": 1}})
    page = report.render(report.read(new, 50))
    stages = {(m["data-run"], m["data-series"]): float(m["data-value"])
              for m in _marks(page, "stages:billing")}
    assert stages[("billing-run-2", "extract")] == 4.0
    assert stages[("billing-run-1", "load")] == 0.25
    # Stacked: each run's bars sit on one another, extract above plan.
    bars = {(m["data-run"], m["data-series"]): m for m in _marks(page, "stages:billing")}
    plan, extract = bars[("billing-run-2", "plan")], bars[("billing-run-2", "extract")]
    assert float(extract["y"]) + float(extract["height"]) == pytest.approx(float(plan["y"]))
    table = page[page.index("Errors by class"):]
    assert re.search(r"TransientError</td><td class=\"num\">3</td><td class=\"num\">3", table)


def test_last_and_source_narrow_the_runs_and_bars_follow_the_numbers(tmp_path):
    """--last N keeps each source's N latest runs, --source only those sources; bar heights
    are proportional to the rows they stand for."""
    path = tmp_path / "s.duckdb"
    with store.connect(path) as con:
        for n in range(1, 5):
            _run(con, "billing", n, loaded=1000 * n, quarantined=n)
            _run(con, "lab_results", n, loaded=10 * n, quarantined=0)
    data = report.read(path, 2, ["billing"])
    assert [r["run_id"] for r in data.runs] == ["billing-run-3", "billing-run-4"]
    assert data.sources == ["billing"]
    loaded = [m for m in _marks(report.render(data), "rows:billing")
              if m["data-series"] == "loaded"]
    assert [float(m["data-value"]) for m in loaded] == [3000, 4000]
    assert float(loaded[0]["height"]) / float(loaded[1]["height"]) == pytest.approx(0.75,
                                                                                     abs=0.01)
    both = report.read(path, 50)
    assert both.sources == ["billing", "lab_results"]
    assert len(both.runs) == 8


def test_etl_report_says_the_store_is_busy_and_exits_non_zero(tmp_path):
    """While another process holds the store for writing, `etl report` waits --wait seconds,
    then says the store is busy and to retry, exit 2, and writes no page."""
    path = tmp_path / "s.duckdb"
    store.connect(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('held', flush=True); time.sleep(120)", str(path)], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout
        assert holder.stdout.readline().strip() == "held"
        etl = os.path.join(os.path.dirname(sys.executable), "etl")
        started = time.monotonic()
        done = subprocess.run([etl, "report", "--html", str(tmp_path / "r.html"), "--wait",
                               "1"], env={**os.environ, "ETL_DUCKDB_PATH": str(path)},
                              capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.communicate()  # reaps it and closes its pipe
    assert done.returncode == 2
    assert "busy" in done.stderr
    assert "Retry" in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "r.html").exists()
