"""`etl report --html`: real runs of billing and lab_results (two each, every one with
quarantined rows), the page built by the CLI, then rendered in headless Chromium: every chart
is painted, its numbers are those of etl_runs and etl_quarantine, and nothing is fetched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from etl_tasks.api import run_source
from etl_tasks.demo_data import generate_claims
from etl_tasks.demo_files import write_lab_feeds
from etl_tasks.resources import get_resources
from tests.integration.browser import Browser

pytestmark = pytest.mark.integration

SOURCES = ("billing", "lab_results")
# Kept after the run (gitignored) for a person to look at.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

# Every chart's marks with their figures, laid-out size and what is painted at their centre.
_GEOMETRY = """[...document.querySelectorAll('svg.chart')].map(svg => ({
  chart: svg.dataset.chart,
  marks: [...svg.querySelectorAll('.mark')].map(m => {
    const r = m.getBoundingClientRect();
    const x = r.x + r.width / 2, y = r.y + r.height / 2;
    return {series: m.dataset.series, run: m.dataset.run || null, item: m.dataset.item || null,
            value: Number(m.dataset.value), x, y, w: r.width, h: r.height,
            fill: getComputedStyle(m).fill, hit: document.elementFromPoint(x, y) === m};
  })}))"""


@pytest.fixture(scope="module")
def two_runs_each(stack, tmp_path_factory):
    """Two rounds of runs of billing and lab_results, each round with new claims and a new
    lab feed (with planted defects), so every run loads and quarantines rows."""
    from tests.integration.conftest import _set_env

    _set_env(stack.env)
    inbox = stack.root / "data" / "demo" / "lab_feeds"
    summaries: dict[str, list] = {s: [] for s in SOURCES}
    for round_ in (1, 2):
        [(top,)] = stack.firebird("SELECT MAX(CLAIM_ID) FROM BILLING_CLAIMS")
        generate_claims(get_resources().firebird_target, int(top or 0) + 1, 6000)
        folder = tmp_path_factory.mktemp(f"feed{round_}")
        [made] = write_lab_feeds(folder, files=1, records_per_file=120, seed=900 + round_)
        shutil.copy(folder / made.name, inbox / f"report_feed_{round_}.xml")
        past = time.time() - 60  # settled: older than the inbox's settle_s
        os.utime(inbox / f"report_feed_{round_}.xml", (past, past))
        for source in SOURCES:
            summary = run_source(source).wait(timeout=240)
            assert summary.status == "finished", summary.error
            assert summary.quarantined > 0, source
            summaries[source].append(summary)
    return summaries


def _etl_report(stack, html: Path, *options: str) -> None:
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, "report", "--html", str(html), *options], env=stack.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert html.exists()


def _covered_runs(stack, last: int) -> list[dict]:
    """The runs the report covers, read straight from etl_runs."""
    names = [d[0] for d in stack.query("DESCRIBE etl_runs")]
    rows = stack.query("SELECT * FROM etl_runs QUALIFY row_number() OVER (PARTITION BY source "
                       "ORDER BY coalesce(finished_at, started_at) DESC) <= ?", [last])
    return [dict(zip(names, row, strict=True)) for row in rows]


def test_report_charts_are_drawn_with_the_numbers_of_the_store(env, two_runs_each, tmp_path):
    """In Chromium, each chart has painted marks of non-zero size whose figures are the
    covered runs' rows, quality scores and durations (and stage seconds when the store has
    them), and quarantined rows per rule; the page fetches nothing and shows no raw value."""
    html = tmp_path / "report.html"
    _etl_report(env, html)
    page = html.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<script" not in page.lower()
    assert "url(" not in page

    runs = _covered_runs(env, 50)
    assert f"{len(runs):,} runs" in page
    browser = Browser(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        tab = browser.open(html.as_uri())
        charts = {c["chart"]: c["marks"] for c in browser.evaluate(tab, _GEOMETRY)}
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "report.png").write_bytes(browser.screenshot(tab))
        # Painted: the pixel at the centre of each chart's largest visible mark is its colour.
        for name, marks in charts.items():
            visible = [m for m in marks if m["hit"]]
            assert visible, f"no mark of {name} is on top at its own centre"
            mark = max(visible, key=lambda m: m["w"] * m["h"])
            painted = browser.pixel(tab, mark["x"], mark["y"])
            assert f"rgb{painted}".replace(" ", "") == mark["fill"].replace(" ", ""), name
        requested = browser.requested()
    finally:
        browser.close()
    assert requested == [html.as_uri()]  # the page itself, nothing else

    # Quarantined rows per rule, counted here from the reasons column alone.
    counted: dict[str, Counter[str]] = {}
    for source, reasons in env.query("SELECT source, reasons FROM etl_quarantine WHERE "
                                     "list_contains(?, run_id)",
                                     [[str(r["run_id"]) for r in runs]]):
        counted.setdefault(source, Counter()).update(r.strip() for r in reasons.split("; "))
    assert set(SOURCES) <= set(counted)
    expected = {*(f"rows:{r['source']}" for r in runs), "quality", "duration",
                *(f"reasons:{s}" for s in counted)}
    stages = [c for c in ("plan_s", "extract_s", "transform_s", "load_s") if c in runs[0]]
    if stages:  # the run metrics columns exist: a stage chart per source that has them
        expected |= {f"stages:{r['source']}" for r in runs
                     if any(r[c] is not None for c in stages)}
    assert set(charts) == expected
    for name, marks in charts.items():
        assert any(m["w"] > 0 and m["h"] > 0 for m in marks), f"{name} has nothing drawn"
        for m in marks:
            assert m["value"] <= 0 or (m["w"] > 0 and m["h"] > 0), (name, m)

    def figure(chart, series, run_id):
        [value] = [m["value"] for m in charts[chart]
                   if m["series"] == series and m["run"] == run_id]
        return value

    for r in runs:
        source, run_id = r["source"], r["run_id"]
        assert figure(f"rows:{source}", "loaded", run_id) == r["loaded"]
        assert figure(f"rows:{source}", "quarantined", run_id) == r["quarantined"]
        assert figure("duration", source, run_id) == pytest.approx(r["duration_s"])
        if r["quality_score"] is not None:
            assert figure("quality", source, run_id) == pytest.approx(r["quality_score"])
        for column in stages:
            if r[column] is not None:
                assert figure(f"stages:{source}", column.removesuffix("_s"),
                              run_id) == pytest.approx(r[column])
    # Taller bars for more rows: the loaded bars of a source are proportional to their rows.
    for source in SOURCES:
        loaded = [m for m in charts[f"rows:{source}"]
                  if m["series"] == "loaded" and m["h"] > 10]
        ratios = [m["h"] / m["value"] for m in loaded]
        assert len(ratios) >= 2
        assert max(ratios) == pytest.approx(min(ratios), rel=0.02)

    for source, counts in counted.items():
        drawn = {m["item"]: m["value"] for m in charts[f"reasons:{source}"]}
        assert drawn == dict(counts), source
    # No patient value: the demo's patient ids (P + six digits, in quarantined rows' raw
    # values too) appear nowhere on the page.
    assert not re.search(r"P\d{6}", page)


def test_report_source_and_last_narrow_the_page(env, two_runs_each, tmp_path):
    """`--source billing --last 1` charts only billing's latest run."""
    html = tmp_path / "billing.html"
    _etl_report(env, html, "--source", "billing", "--last", "1")
    page = html.read_text()
    [latest] = [r for r in _covered_runs(env, 1) if r["source"] == "billing"]
    assert set(re.findall(r'data-chart="([^":]+)', page)) >= {"rows", "quality", "reasons"}
    assert not re.findall(r'data-chart="[^"]*lab_results', page)
    assert set(re.findall(r'data-run="([^"]+)"', page)) == {latest["run_id"]}
    assert "runs covered: 1 run (" in page
