"""`etl report --html FILE`: one self-contained HTML page of the last runs per source.

Plain functions, in order: `collect` reads aggregates from DuckDB's `etl_runs` and the rule
names of `etl_quarantine` (never its `raw` values or source pointers), `sections` draws the
charts as inline SVG (`monitoring/charts.py`), `render` writes the page. The page has no
script and loads nothing (its Content-Security-Policy forbids it), so it opens offline and
can be mailed; it holds counts, durations, scores, rule and error class names, no row.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import duckdb

from etl_tasks.load import duckdb as store
from etl_tasks.monitoring import charts

_RUN_COLUMNS = ("run_id", "source", "status", "started_at", "finished_at", "extracted",
                "loaded", "quarantined", "skipped", "dead_lettered", "duration_s",
                "quality_score", "error")
# Run metrics added later (issue "See it run"); a store written before them lacks them.
STAGES = ("plan_s", "extract_s", "transform_s", "load_s")
_OPTIONAL = (*STAGES, "source_latency_s", "error_rate", "errors_by_class")
TABLE_RUNS = 10  # rows per source in the table of last runs
_ROWS = ("loaded", "quarantined")


@dataclass
class ReportData:
    """What the page shows: the covered runs (oldest first) and quarantined rows by rule."""

    generated_at: datetime
    last: int
    sources: list[str]
    runs: list[dict[str, Any]] = field(default_factory=list)
    reasons: dict[str, Counter[str]] = field(default_factory=dict)
    present: tuple[str, ...] = ()  # which of the optional run columns the store has

    def runs_of(self, source: str) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["source"] == source]


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {name for (name,) in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
        [table]).fetchall()}


def collect(con: duckdb.DuckDBPyConnection, last: int, sources: Sequence[str] = (),
            now: datetime | None = None) -> ReportData:
    """The last `last` runs of each source (or of `sources`), by end time."""
    data = ReportData(now or datetime.now(UTC), last, list(sources))
    have = _columns(con, "etl_runs")
    if not have:  # no run was ever recorded
        return data
    data.present = tuple(c for c in _OPTIONAL if c in have)
    where = f"WHERE source IN ({', '.join('?' * len(sources))})" if sources else ""
    cur = con.execute(
        f"SELECT {', '.join((*_RUN_COLUMNS, *data.present))} FROM etl_runs {where} "
        "QUALIFY row_number() OVER (PARTITION BY source ORDER BY "
        "coalesce(finished_at, started_at) DESC) <= ? "
        "ORDER BY coalesce(finished_at, started_at), run_id", [*sources, last])
    names = [d[0] for d in cur.description]
    data.runs = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    if not sources:
        data.sources = sorted({str(r["source"]) for r in data.runs})
    if data.runs and "reasons" in _columns(con, "etl_quarantine"):
        # Only the rule names: `raw` holds patient values and is never selected here.
        rows = con.execute(
            "SELECT source, reason, count(*) FROM (SELECT source, unnest(string_split("
            "reasons, '; ')) AS reason FROM etl_quarantine WHERE list_contains(?, run_id)) "
            "GROUP BY ALL", [[str(r["run_id"]) for r in data.runs]]).fetchall()
        for source, reason, count in rows:
            data.reasons.setdefault(str(source), Counter())[str(reason).strip()] += int(count)
    return data


def read(path: Path, last: int, sources: Sequence[str] = (),
         wait_s: float = 30.0) -> ReportData:
    """Collect from the store at `path`; no file yet means no runs yet. Raises
    TransientError when the loader holds the file for longer than `wait_s`."""
    if not path.exists():
        return ReportData(datetime.now(UTC), last, list(sources))
    with store.read_only(path, wait_s) as con:
        return collect(con, last, sources)


def errors_by_class(runs: Sequence[dict[str, Any]]) -> Counter[str]:
    """Failed step attempts by error class over `runs` (JSON text {class: count} per run;
    a value that is not such an object is passed over)."""
    total: Counter[str] = Counter()
    for run in runs:
        try:
            counts = json.loads(run.get("errors_by_class") or "{}")
        except ValueError:
            continue
        if isinstance(counts, dict):
            total.update({str(k): int(v) for k, v in counts.items()
                          if isinstance(v, int | float)})
    return total


@dataclass(frozen=True)
class Section:
    title: str
    note: str
    charts: list[tuple[str, str]]  # (caption, svg or an HTML paragraph saying why none)


def _end(run: dict[str, Any]) -> datetime:
    moment: datetime = run["finished_at"] or run["started_at"]
    return moment.astimezone(UTC)


def _span(runs: Sequence[dict[str, Any]]) -> float:
    ends = [_end(r).timestamp() for r in runs]
    return max(ends) - min(ends) if ends else 0.0


def _none(text: str) -> str:
    return f'<p class="none">{escape(text)}</p>'


def _per_run_bars(data: ReportData, chart: str, series: Sequence[tuple[str, str]], *,
                  stacked: bool, unit: str) -> list[tuple[str, str]]:
    """One bar chart per source; `series` maps run columns to legend names."""
    out = []
    span = _span(data.runs)
    for source in data.sources:
        runs = data.runs_of(source)
        groups = [charts.Group(charts.when(_end(r), span), str(r["run_id"]),
                               {name: None if r.get(col) is None else float(r[col])
                                for col, name in series}) for r in runs]
        groups = [g for g in groups if any(v is not None for v in g.values.values())]
        out.append((source, charts.bars(f"{chart}:{source}", f"{source} {chart} per run",
                                        groups, [name for _, name in series],
                                        stacked=stacked, unit=unit)
                    if groups else _none(f"no {chart} recorded for {source}")))
    return out


def _trend(data: ReportData, chart: str, column: str, *, zero: bool,
           unit: str) -> list[tuple[str, str]]:
    """One line chart with a line per source."""
    series = {s: [charts.Point(_end(r), float(r[column]), str(r["run_id"]))
                  for r in data.runs_of(s) if r[column] is not None] for s in data.sources}
    series = {s: points for s, points in series.items() if points}
    if not series:
        return [("", _none(f"no {chart} recorded"))]
    return [("every source", charts.lines(chart, f"{chart} per run", series,
                                          charts.colours_for(data.sources), zero=zero,
                                          unit=unit))]


def sections(data: ReportData) -> list[Section]:
    """The charts of the page, in order."""
    out = [
        Section("Rows per run", "Rows loaded and quarantined by each run, by its end time.",
                _per_run_bars(data, "rows", [(c, c) for c in _ROWS], stacked=False,
                              unit="rows")),
        Section("Quality", "Quality score per run: loaded / (loaded + quarantined).",
                _trend(data, "quality", "quality_score", zero=False, unit="")),
        Section("Duration", "Wall-clock seconds per run, from its start to its finalize.",
                _trend(data, "duration", "duration_s", zero=True, unit="s")),
    ]
    stages = [(c, c.removesuffix("_s")) for c in STAGES if c in data.present]
    if stages:
        out.append(Section("Time per stage", "Seconds spent in each stage per run, summed "
                           "over its steps (parallel steps add up).",
                           _per_run_bars(data, "stages", stages, stacked=True, unit="s")))
    reasons = []
    colour = charts.PALETTE[1]  # the quarantined series' colour in the rows charts
    for source in data.sources:
        counts = data.reasons.get(source)
        reasons.append((source, charts.hbars(f"reasons:{source}", f"{source} quarantine "
                                             "reasons", sorted(counts.items()), colour,
                                             series=source, unit="rows")
                        if counts else _none(f"no quarantined rows in {source}'s runs")))
    out.append(Section("Quarantine reasons", "Rows of the runs covered still in quarantine, "
                       "by broken rule (a row breaking two rules counts under each; a row "
                       "replayed out of quarantine no longer counts).", reasons))
    return out


def _cell(value: Any, kind: str = "") -> str:
    if value is None:
        return "<td>-</td>"
    if kind == "pct":
        return f'<td class="num">{value:.2%}</td>'
    if isinstance(value, int | float):
        return f'<td class="num">{escape(charts.number(round(float(value), 2)))}</td>'
    return f"<td>{escape(str(value))}</td>"


def _runs_table(data: ReportData) -> str:
    extra = [c for c in (*STAGES, "source_latency_s", "error_rate") if c in data.present]
    head = ["source", "ended (UTC)", "run", "status", "duration s", "extracted", "loaded",
            "quarantined", "skipped", "dead-lettered", "quality",
            *(_HEADS.get(c, c) for c in extra), "error"]
    rows = []
    for source in data.sources:
        for r in reversed(data.runs_of(source)[-TABLE_RUNS:]):
            run_id = str(r["run_id"])
            rows.append(
                "<tr>" + _cell(source) + _cell(_end(r).strftime("%Y-%m-%d %H:%M:%S"))
                + f'<td title="{escape(run_id)}"><code>{escape(run_id[:8])}</code></td>'
                + f'<td class="status {escape(str(r["status"]))}">{escape(str(r["status"]))}'
                "</td>" + "".join(_cell(r[c]) for c in ("duration_s", "extracted", "loaded",
                                                        "quarantined", "skipped",
                                                        "dead_lettered"))
                + _cell(r["quality_score"], "pct") + "".join(_cell(r[c]) for c in extra)
                + _cell(r["error"]).replace("<td>", '<td class="error">', 1) + "</tr>")
    return f'<div class="wide">{_table(head, rows)}</div>'


_HEADS = {"plan_s": "plan s", "extract_s": "extract s", "transform_s": "transform s",
          "load_s": "load s", "source_latency_s": "latency s", "error_rate": "error rate"}


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    return ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _errors_table(data: ReportData) -> str:
    by_source = {s: errors_by_class(data.runs_of(s)) for s in data.sources}
    classes = sorted(set().union(*by_source.values()))
    if not classes:
        return _none("no failed step attempts in the runs covered")
    rows = ["<tr>" + _cell(name) + "".join(_cell(by_source[s][name]) for s in data.sources)
            + _cell(sum(c[name] for c in by_source.values())) + "</tr>" for name in classes]
    return _table(["error class", *data.sources, "total"], rows)


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1a202c; max-width: 1240px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 4px; }
.meta { color: #4a5568; margin: 0 0 8px; } .note { color: #4a5568; margin: 0 0 8px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; border: 1px solid #e2e8f0; border-radius: 4px; padding: 8px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { display: block; max-width: 100%; height: auto; }
svg .tick { font-size: 10px; fill: #4a5568; } svg .legend { font-size: 11px; fill: #1a202c; }
svg .axis { font-size: 10px; fill: #718096; } svg .grid { stroke: #edf2f7; }
svg .line { fill: none; stroke-width: 1.5; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #e2e8f0; padding: 3px 8px; text-align: left;
         white-space: nowrap; vertical-align: top; }
td.error { white-space: normal; min-width: 240px; } .wide { overflow-x: auto; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status.finished { color: #2f855a; } .status.partial { color: #b7791f; }
.status.failed { color: #c53030; } .none { color: #718096; font-style: italic; }
"""


def render(data: ReportData) -> str:
    """The whole page."""
    title = "ETL report"
    if data.runs:
        ends = [_end(r) for r in data.runs]
        plural = "" if len(data.runs) == 1 else "s"
        covered = (f"{len(data.runs):,} run{plural} (the last {data.last} per source at most), "
                   f"ended {min(ends):%Y-%m-%d %H:%M} to {max(ends):%Y-%m-%d %H:%M} UTC")
    else:
        covered = "none"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: the page must open offline and tell no server it was opened.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">",
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">Generated at {data.generated_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} '
        f"UTC · sources: {escape(', '.join(data.sources) or 'none')} · runs covered: "
        f"{escape(covered)}</p>",
        '<p class="note">Aggregates only: counts, durations, scores, rule and error class '
        "names. No row values.</p>",
    ]
    if not data.runs:
        which = f" for {', '.join(data.sources)}" if data.sources else ""
        parts.append(_none(f"No runs yet{which}: the store has no recorded runs. Run a "
                           "source (etl run billing --wait), then build the report again."))
        return "\n".join([*parts, "</body></html>"])
    for section in sections(data):
        parts.append(f"<h2>{escape(section.title)}</h2><p class=\"note\">"
                     f"{escape(section.note)}</p><div class=\"charts\">")
        parts.extend(f"<figure><figcaption>{escape(caption)}</figcaption>{body}</figure>"
                     for caption, body in section.charts)
        parts.append("</div>")
    parts.append(f"<h2>Last runs</h2><p class=\"note\">The last {TABLE_RUNS} runs per source, "
                 "newest first.</p>" + _runs_table(data))
    if "errors_by_class" in data.present:
        parts.append("<h2>Errors by class</h2><p class=\"note\">Failed step attempts over the "
                     "runs covered, by error class.</p>" + _errors_table(data))
    return "\n".join([*parts, "</body></html>"])


def write(path: Path, page: str) -> None:
    """Write the page whole (a reader never opens half a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
