"""A partner feed and a spreadsheet form added by configuration alone (no code): their
layouts, datasets and rules are TOML appended to a fault world's pipeline config, and their
files go through the real fleet and loader into DuckDB. The test counts what must load and
what must be quarantined, for which rules, from the rows it writes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import openpyxl
import pytest

from etl_tasks.api import run_source

pytestmark = pytest.mark.integration

EXTRA = """
[[sources]]
name = "harbor_labs"
kind = "xml"
location = "{data_dir}/harbor"
schedule = "manual"
chunk_size = 7
settle_s = 1
dataset = "harbor_results"

[sources.layout]
record = "Specimen"

[sources.layout.fields]
ref = "@ref"
mrn = "Who/MRN"
loinc = "Test/@loinc"
result = "Result"
critical = "Result/@critical"
taken_at = "Times/@taken"
released_at = "Times/@released"

[[sources]]
name = "visit_forms"
kind = "excel"
location = "{data_dir}/visits"
schedule = "manual"
settle_s = 1
dataset = "clinic_visits"

[sources.layout.headers]
chart = "Chart No"
visit_day = "Visit Day"
weight_kg = "Weight (kg)"
follow_up = "Follow-up"

[[datasets]]
name = "harbor_results"
key = ["ref", "mrn", "loinc"]
version = "released_at"
rules = [
  { rule = "not_null", column = "ref" },
  { rule = "unique", columns = ["ref"], scope = "file" },
  { rule = "not_null", column = "mrn" },
  { rule = "pattern", column = "loinc", pattern = "[0-9]{1,5}-[0-9]", message = "must be LOINC" },
  { rule = "range", column = "result", min = 0 },
  { rule = "date_range", column = "taken_at", not_before = 2000-01-01, not_after = "today" },
  { rule = "compare", left = "released_at", op = ">=", right = "taken_at" },
]
[datasets.columns]
ref = "text"
mrn = "text"
loinc = "text"
result = "decimal(6,2)"
critical = "boolean"
taken_at = "timestamptz"
released_at = "timestamptz"

[[datasets]]
name = "clinic_visits"
target_table = "visits"
key = ["chart", "visit_day"]
rules = [
  { rule = "not_null", column = "chart" },
  { rule = "not_null", column = "visit_day" },
  { rule = "pattern", column = "chart", pattern = "[A-Z][0-9]{5}" },
  { rule = "unique", columns = ["chart", "visit_day"], scope = "file" },
  { rule = "range", column = "weight_kg", min = 0.5, max = 500 },
  { rule = "in_set", column = "clinician", values = ["Dr Ito", "Dr Okafor", "NP Reyes"] },
  { rule = "compare", left = "follow_up", op = ">=", right = "visit_day" },
]
[datasets.columns]
chart = "text"
visit_day = "sheet_date"
clinician = "text"
weight_kg = "decimal(5,1)"
follow_up = "sheet_date"
"""
TAKEN = dt.datetime(2026, 10, 1, 8, 0, tzinfo=dt.UTC)


def _specimen(ref: str, mrn: str | None, loinc: str, result: str, critical: str,
              taken: str, released: str) -> str:
    who = "<Who/>" if mrn is None else f"<Who><MRN>{mrn}</MRN></Who>"
    return (f'<Specimen ref="{ref}">{who}<Test loinc="{loinc}"/>'
            f'<Result critical="{critical}">{result}</Result>'
            f'<Times taken="{taken}" released="{released}"/></Specimen>\n')


def _feed(path: Path, specimens: list[str]) -> None:
    path.write_text('<?xml version="1.0"?>\n<Harbor>\n' + "".join(specimens) + "</Harbor>\n")


def _lab_feed(path: Path) -> tuple[int, dict[str, list[str]]]:
    """30 specimens: 24 good, 6 broken; each broken one's expected reasons by its pointer."""
    specimens, expected = [], {}
    for n in range(1, 31):
        fields = {"ref": f"H-{n:03d}", "mrn": f"{10_000_000 + n}", "loinc": "2345-7",
                  "result": f"{n}.25", "critical": "no",
                  "taken": (TAKEN + dt.timedelta(hours=n)).isoformat(),
                  "released": (TAKEN + dt.timedelta(hours=n, minutes=30)).isoformat()}
        broken = {25: ({"mrn": None}, ["mrn: required"]),
                  26: ({"loinc": "GLU"}, ["loinc: must be LOINC"]),
                  27: ({"result": "-2"}, ["result: must be >= 0"]),
                  28: ({"released": TAKEN.isoformat()},
                       ["released_at: must not be before taken_at"]),
                  29: ({"critical": "perhaps"}, ["critical: must be true or false"]),
                  30: ({"ref": "H-001", "result": "1.255"}, [
                      "ref: duplicate within file",
                      "result: must be a decimal number with at most 4 digits before the "
                      "point and 2 after"])}.get(n)
        if broken:
            fields.update(broken[0])
            expected[f"{path.name}#record={n}"] = broken[1]
        specimens.append(_specimen(**fields))  # type: ignore[arg-type]
    _feed(path, specimens)
    return 30 - len(expected), expected


def _visit_form(path: Path) -> tuple[int, dict[str, list[str]]]:
    """A title row, the header, 12 visits: 8 good, 4 broken (a repeat of the first visit)."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Visits"
    sheet.append(["Harbor clinic: visits of the week"])
    sheet.append(["Chart No", "Visit Day", "Clinician", "Weight (kg)", "Follow-up"])
    expected = {}
    for n in range(1, 13):
        day = dt.date(2026, 11, n)
        row: list[object] = [f"C{10_000 + n}", day, "Dr Ito", 70.5 + n, f"{day.month}/"
                             f"{day.day + 14}/{day.year}"]
        broken = {9: (0, "c9", "chart: must match [A-Z][0-9]{5}"),
                  10: (3, 900, "weight_kg: must be from 0.5 to 500"),
                  11: (4, "2026-10-01", "follow_up: must not be before visit_day"),
                  12: (0, "C10001", None)}.get(n)
        if broken:
            row[broken[0]] = broken[1]
            if n == 12:  # the first visit again: same chart, same day
                row[1] = dt.date(2026, 11, 1)
            expected[f"{path.name}!Visits:row={n + 2}"] = [
                broken[2] or "chart, visit_day: duplicate within file"]
        sheet.append(row)
    book.save(path)
    return 12 - len(expected), expected


def _settled(*paths: Path) -> None:
    past = time.time() - 60
    for path in paths:
        os.utime(path, (past, past))


def test_a_partner_feed_and_a_form_added_by_configuration_load_exactly(world):
    stack = world(pipeline_extra=EXTRA)
    data = Path(stack.env["ETL_DATA_DIR"])
    (data / "harbor").mkdir()
    (data / "visits").mkdir()
    lab_good, lab_bad = _lab_feed(data / "harbor" / "harbor_001.xml")
    form_good, form_bad = _visit_form(data / "visits" / "week_47.xlsx")
    _settled(data / "harbor" / "harbor_001.xml", data / "visits" / "week_47.xlsx")
    stack.start_all()

    runs = {name: run_source(name).wait(timeout=120) for name in ("harbor_labs", "visit_forms")}
    for name, good, bad, table in (("harbor_labs", lab_good, lab_bad, "harbor_results"),
                                   ("visit_forms", form_good, form_bad, "visits")):
        summary = runs[name]
        assert summary.status == "finished", summary.error
        assert (summary.extracted, summary.loaded, summary.quarantined) == (
            good + len(bad), good, len(bad)), name
        assert stack.query(f"SELECT count(*) FROM {table}") == [(good,)]
        stored = {ref: reasons.split("; ") for ref, reasons in stack.query(
            "SELECT source_ref, reasons FROM etl_quarantine WHERE source = ?", [name])}
        # Every broken rule of each row is named, and nothing else.
        assert {ref: sorted(r) for ref, r in stored.items()} == {
            ref: sorted(r) for ref, r in bad.items()}, name

    # The rows are typed by the declared columns: exact decimals, UTC instants, booleans,
    # dates from real date cells and from US text alike.
    [(result, critical, released)] = stack.query(
        "SELECT result, critical, released_at FROM harbor_results WHERE ref = 'H-002'")
    assert (result, critical) == (Decimal("2.25"), False)
    assert released == TAKEN + dt.timedelta(hours=2, minutes=30)
    [(day, weight, follow_up)] = stack.query(
        "SELECT visit_day, weight_kg, follow_up FROM visits WHERE chart = 'C10003'")
    assert (day, weight, follow_up) == (dt.date(2026, 11, 3), Decimal("73.5"),
                                        dt.date(2026, 11, 17))

    # The declared key and version: a newer release of H-002 replaces it, an older one of
    # H-003 is left out, a new specimen is added.
    later = (TAKEN + dt.timedelta(hours=9)).isoformat()
    _feed(data / "harbor" / "harbor_002.xml", [
        _specimen("H-002", "10000002", "2345-7", "2.75", "yes", TAKEN.isoformat(), later),
        _specimen("H-003", "10000003", "2345-7", "9.99", "no", TAKEN.isoformat(),
                  (TAKEN + dt.timedelta(hours=1)).isoformat()),
        _specimen("H-031", "10000031", "2345-7", "1.00", "no", TAKEN.isoformat(), later)])
    _settled(data / "harbor" / "harbor_002.xml")
    again = run_source("harbor_labs").wait(timeout=120)
    assert again.status == "finished", again.error
    assert (again.loaded, again.quarantined, again.skipped) == (2, 0, 1)
    assert stack.query("SELECT count(*) FROM harbor_results") == [(lab_good + 1,)]
    assert stack.query("SELECT ref, result, critical FROM harbor_results WHERE ref IN "
                       "('H-002', 'H-003') ORDER BY ref") == [
        ("H-002", Decimal("2.75"), True), ("H-003", Decimal("3.25"), False)]

    # `etl sources --json` names what the config declares, and the checkpoints.
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    listed = subprocess.run([etl, "sources", "--json"], env=stack.env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    sources = {s["name"]: s for s in json.loads(listed.stdout)}
    assert list(sources) == ["billing", "harbor_labs", "visit_forms"]
    harbor, visits = sources["harbor_labs"], sources["visit_forms"]
    assert (harbor["kind"], harbor["inbox"], harbor["dataset"], harbor["target_table"]) == (
        "xml", str(data / "harbor"), "harbor_results", "harbor_results")
    assert (harbor["key"], harbor["version"], harbor["schedule"]) == (
        ["ref", "mrn", "loinc"], "released_at", "manual")
    assert harbor["columns"][:2] == [{"name": "ref", "from": "@ref", "type": "text"},
                                     {"name": "mrn", "from": "Who/MRN", "type": "text"}]
    assert harbor["checkpoint"] == {"files_loaded": 2}
    assert (visits["target_table"], visits["key"], visits["version"]) == (
        "visits", ["chart", "visit_day"], None)
    assert [(c["name"], c["from"], c["type"]) for c in visits["columns"]] == [
        ("chart", "Chart No", "text"), ("visit_day", "Visit Day", "sheet_date"),
        ("clinician", "clinician", "text"), ("weight_kg", "Weight (kg)", "decimal(5,1)"),
        ("follow_up", "Follow-up", "sheet_date")]
    assert visits["checkpoint"] == {"files_loaded": 1}
    assert harbor["columns_from"] == visits["columns_from"] == "config"
    billing = sources["billing"]
    assert (billing["table"], billing["key"], billing["version"]) == (
        "BILLING_CLAIMS", ["claim_id"], "updated_at")
    # A Firebird table's columns as Firebird declares them.
    assert billing["columns_from"] == "reflection"
    assert billing["columns"][0] == {"name": "claim_id", "from": "CLAIM_ID", "type": "BIGINT"}
    assert {"name": "amount", "from": "AMOUNT", "type": "NUMERIC(12,2)"} in billing["columns"]
    assert billing["checkpoint"] == {  # never run in this world
        "key_mark": 0, "key_mark_kind": "integer", "key_advanced_at": None,
        "updated_mark": None}
