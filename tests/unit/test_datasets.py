"""Declared datasets (datasets.py, rules.py, checks.py): each rule kind and column type on real
frames, every broken rule named, the config checked when it is read, keys for the loader."""

from __future__ import annotations

import datetime
import re
import tomllib
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from etl_tasks import datasets, demo_files
from etl_tasks.config import PipelineConfig
from etl_tasks.datasets import DatasetSpec, TableKey
from etl_tasks.errors import FatalError, SourceFileError
from etl_tasks.load import duckdb as store
from etl_tasks.sources import excel, files, xml_feed
from etl_tasks.transform import QUARANTINE_SCHEMA, TransformResult, transform_chunk

TODAY = datetime.date(2026, 11, 20)
OBSERVATIONS = """
[[sources]]
name = "partner"
kind = "xml"
location = "inbox"
dataset = "observations"

[[datasets]]
name = "observations"
key = ["obs_id"]
version = "reported_at"
rules = [
  { rule = "not_null", column = "mrn" },
  { rule = "unique", columns = ["obs_id"], scope = "file" },
  { rule = "unique", columns = ["mrn", "code"] },
  { rule = "in_set", column = "status", values = ["final", "corrected"] },
  { rule = "pattern", column = "code", pattern = "[0-9]{1,5}-[0-9]", message = "must be LOINC" },
  { rule = "range", column = "value", min = 0, max = 100 },
  { rule = "range", column = "count", above = 0 },
  { rule = "date_range", column = "born", not_before = 1900-01-01, not_after = "today" },
  { rule = "date_range", column = "collected_at", not_after = "today" },
  { rule = "compare", left = "reported_at", op = ">=", right = "collected_at" },
]
[datasets.columns]
obs_id = "text"
mrn = "text"
code = "text"
status = "text"
value = "decimal(6,2)"
count = "integer"
ratio = "decimal"
born = "date"
fasting = "boolean"
collected_at = "timestamptz"
reported_at = "timestamptz"
"""
GOOD = {"obs_id": "O-1", "mrn": "M1", "code": "2345-7", "status": "final", "value": "5.25",
        "count": "3", "ratio": "0.5", "born": "1960-01-02", "fasting": "yes",
        "collected_at": "2026-11-19T08:00:00Z", "reported_at": "2026-11-19T10:00:00+01:00"}


def pipeline(text: str = OBSERVATIONS) -> PipelineConfig:
    return PipelineConfig.model_validate(tomllib.loads(text))


@pytest.fixture(scope="module")
def spec() -> DatasetSpec:
    config = pipeline()
    return datasets.spec_for(config, config.sources[0])


def chunk(spec: DatasetSpec, *rows: dict[str, str | None],
          duplicate: tuple[int, ...] = ()) -> pa.Table:
    """A text chunk as a file reader stages it: the good row's values with each override,
    each row a fresh obs_id and mrn (so no rule but the one meant breaks)."""
    columns = spec.columns
    records = [{**GOOD, "obs_id": f"O-{i}", "mrn": f"M{i}", **row} for i, row in enumerate(rows)]
    arrays = [pa.array([r.get(c) for r in records], pa.string()) for c in columns]
    table = files.batch_table(files.text_schema(columns), arrays,
                              [f"feed.xml#record={i + 1}" for i in range(len(rows))],
                              files.DuplicateKeys(), key=())
    flags = pa.array([i in duplicate for i in range(len(rows))], pa.bool_())
    return table.set_column(table.schema.get_field_index("_duplicate"), "_duplicate", flags)


def judge(spec: DatasetSpec, table: pa.Table, today: datetime.date | None = TODAY
          ) -> TransformResult:
    """Transform and check what every result keeps: each row in exactly one table."""
    result = transform_chunk(spec, table, today=today)
    assert result.quarantined.schema.equals(QUARANTINE_SCHEMA)
    refs = result.valid["source_ref"].to_pylist() + result.quarantined["source_ref"].to_pylist()
    assert sorted(refs) == sorted(table["_source_ref"].to_pylist())
    return result


def reasons(result: TransformResult) -> dict[str, list[str]]:
    return {row["source_ref"]: row["reasons"].split("; ")
            for row in result.quarantined.to_pylist()}


def test_a_good_row_loads_typed_and_exact(spec):
    """Every type gives its Arrow type; decimals with a scale stay exact, instants are UTC."""
    result = judge(spec, chunk(spec, {}, {"value": " 99.10 ", "count": "+7", "ratio": "-.25",
                                          "fasting": "N", "born": None}))
    assert result.quarantined.num_rows == 0
    assert result.valid.schema == pa.schema([
        ("obs_id", pa.string()), ("mrn", pa.string()), ("code", pa.string()),
        ("status", pa.string()), ("value", pa.decimal128(6, 2)), ("count", pa.int64()),
        ("ratio", pa.float64()), ("born", pa.date32()), ("fasting", pa.bool_()),
        ("collected_at", pa.timestamp("us", tz="UTC")),
        ("reported_at", pa.timestamp("us", tz="UTC")), ("source_ref", pa.string())])
    first, second = result.valid.to_pylist()
    utc = datetime.UTC
    assert (first["value"], first["count"], first["ratio"], first["born"], first["fasting"]) == (
        Decimal("5.25"), 3, 0.5, datetime.date(1960, 1, 2), True)
    assert first["reported_at"] == datetime.datetime(2026, 11, 19, 9, tzinfo=utc)
    assert (second["value"], second["count"], second["ratio"], second["fasting"],
            second["born"]) == (Decimal("99.10"), 7, -0.25, False, None)


@pytest.mark.parametrize(("override", "reason"), [
    ({"mrn": "  "}, "mrn: required"),
    ({"status": "done"}, "status: must be one of final, corrected"),
    ({"code": "GLU"}, "code: must be LOINC"),
    ({"value": "100.01"}, "value: must be from 0 to 100"),
    ({"value": "-1"}, "value: must be from 0 to 100"),
    ({"count": "0"}, "count: must be > 0"),
    ({"born": "1899-12-31"}, "born: must be from 1900-01-01 to today"),
    ({"born": "2026-11-21"}, "born: must be from 1900-01-01 to today"),
    ({"collected_at": "2026-11-21T00:00:00Z", "reported_at": "2026-11-21T01:00:00Z"},
     "collected_at: must not be after today"),
    ({"reported_at": "2026-11-19T08:59:59+01:00"}, "reported_at: must not be before collected_at"),
    ({"value": "5.255"},
     "value: must be a decimal number with at most 4 digits before the point and 2 after"),
    ({"value": "12345"},
     "value: must be a decimal number with at most 4 digits before the point and 2 after"),
    ({"count": "1.5"}, "count: must be an integer"),
    ({"count": "1e3"}, "count: must be an integer"),
    ({"ratio": "nan"}, "ratio: must be a decimal number"),
    ({"born": "1960-02-30"}, "born: must be a date YYYY-MM-DD"),
    ({"fasting": "maybe"}, "fasting: must be true or false"),
    ({"collected_at": "2026-11-19T08:00:00"}, "collected_at: must be ISO-8601 with Z or an offset"),
])
def test_each_rule_and_type_fails_alone_named_never_valued(spec, override, reason):
    """One broken rule: that row is quarantined with exactly that reason (column and rule,
    no value), and the good row beside it loads."""
    result = judge(spec, chunk(spec, {}, override))
    assert reasons(result) == {"feed.xml#record=2": [reason]}
    assert result.valid["source_ref"].to_pylist() == ["feed.xml#record=1"]
    for value in override.values():
        if value and value.strip() and len(value.strip()) > 2:
            assert value.strip() not in reason


def test_every_broken_rule_of_a_row_is_named(spec):
    """A row breaking five rules (and a type) carries all six reasons."""
    result = judge(spec, chunk(spec, {}, {"mrn": None, "code": "x", "status": "?", "count": "-2",
                                          "fasting": "perhaps",
                                          "reported_at": "2026-11-19T07:00:00Z"}))
    assert sorted(reasons(result)["feed.xml#record=2"]) == sorted([
        "mrn: required", "code: must be LOINC", "status: must be one of final, corrected",
        "count: must be > 0", "fasting: must be true or false",
        "reported_at: must not be before collected_at"])


def test_uniqueness_in_the_file_and_in_the_chunk(spec):
    """`unique` scope file follows the reader's flag; scope chunk keeps the first of a repeat
    (nulls are never repeats); composite keys compare every column."""
    table = chunk(spec, {}, {"obs_id": "O-0"}, {"mrn": "M0"}, {"mrn": "M0", "code": "2345-8"},
                  {"mrn": None}, {"mrn": None}, duplicate=(1,))
    assert reasons(judge(spec, table)) == {
        "feed.xml#record=2": ["obs_id: duplicate within file"],
        "feed.xml#record=3": ["mrn, code: duplicate within chunk"],
        "feed.xml#record=5": ["mrn: required"],
        "feed.xml#record=6": ["mrn: required"],
    }


def test_compare_skips_nulls_and_compares_instants_across_offsets(spec):
    """09:00+01:00 is 08:00Z: equal instants pass `>=`; a missing side is its own rule."""
    table = chunk(spec, {"reported_at": "2026-11-19T09:00:00+01:00"},
                  {"reported_at": None}, {"collected_at": "bad"})
    assert reasons(judge(spec, table)) == {
        "feed.xml#record=3": ["collected_at: must be ISO-8601 with Z or an offset"]}


def test_today_is_the_validation_date_unless_given(spec):
    """`today` in a bound: the chunk's validation date (UTC) or the one given; the last
    instant of today passes a timestamp's `not_after`."""
    today = datetime.datetime.now(datetime.UTC).date()
    tomorrow = today + datetime.timedelta(days=1)
    table = chunk(spec, {"born": today.isoformat()}, {"born": tomorrow.isoformat()},
                  {"collected_at": f"{today}T23:59:59Z", "reported_at": f"{today}T23:59:59Z"},
                  {"collected_at": f"{tomorrow}T00:00:00Z", "reported_at": f"{tomorrow}T01:00Z"})
    assert reasons(judge(spec, table, today=None)) == {
        "feed.xml#record=2": ["born: must be from 1900-01-01 to today"],
        "feed.xml#record=4": ["collected_at: must not be after today"]}
    # With a fixed today a day later, tomorrow is today.
    assert reasons(judge(spec, table, today=tomorrow)) == {}


def test_typed_columns_are_cast_not_parsed(spec):
    """A Firebird chunk's typed columns are cast to the declared types (decimals exact);
    one that cannot be is fatal, without the value."""
    typed = chunk(spec, {}).drop_columns(["value", "count", "_source_ref", "_duplicate"])
    typed = typed.append_column("value", pa.array([Decimal("12.50")], pa.decimal128(9, 2)))
    typed = typed.append_column("count", pa.array([7], pa.int32()))
    result = transform_chunk(spec, typed, today=TODAY)
    assert result.valid.column("value").to_pylist() == [Decimal("12.50")]
    assert result.valid.column("count").type == pa.int64()
    assert result.valid["source_ref"].to_pylist() == ["OBS_ID=O-0"]  # no _source_ref: the key
    broken = typed.set_column(typed.schema.get_field_index("count"), "count",
                              pa.array([datetime.date(2026, 1, 1)], pa.date32()))
    with pytest.raises(FatalError, match="staged column count cannot be read as integer"):
        transform_chunk(spec, broken, today=TODAY)


def test_quarantined_raw_keeps_the_input_text_and_replays(spec):
    """Raw values are the staged text; read back (a fixed value) they pass the current rules."""
    from etl_tasks.transform import restage_quarantined

    datasets.install(pipeline())
    result = judge(spec, chunk(spec, {}, {"status": "done"}, {"obs_id": "O-0"},
                               duplicate=(2,)))
    rows = result.quarantined.to_pylist()
    assert '"status": "done"' in rows[0]["raw"]
    fixed = [rows[0]["raw"].replace('"done"', '"final"'), rows[1]["raw"]]
    restaged = restage_quarantined("observations", fixed, [r["source_ref"] for r in rows],
                                   [r["reasons"] for r in rows])
    again = transform_chunk("observations", restaged.table, today=TODAY)
    assert again.valid["source_ref"].to_pylist() == ["feed.xml#record=2"]
    # A duplicate within its file stays one: that is a fact about the file.
    assert again.quarantined["reasons"].to_pylist() == ["obs_id: duplicate within file"]


def test_the_builtin_lab_results_declared_in_the_same_terms_judge_alike(tmp_path):
    """lab_results written as configuration quarantines the same demo rows for the same
    reasons and loads the same typed rows as the built-in code."""
    declared = pipeline(LAB_RESULTS_DECLARED)
    spec = datasets.spec_for(declared, declared.sources[0])
    for manifest in demo_files.write_lab_feeds(tmp_path, files=2, records_per_file=400):
        path = tmp_path / manifest.name
        builtin_chunk = pa.concat_tables(xml_feed.iter_batches(path, batch_rows=10_000,
                                                               source="t"))
        declared_chunk = pa.concat_tables(xml_feed.iter_batches(
            path, batch_rows=10_000, source="t", **spec.reader_options("xml")))
        assert declared_chunk.equals(builtin_chunk)
        builtin = transform_chunk("lab_results", builtin_chunk, today=TODAY)
        mine = transform_chunk(spec, declared_chunk, today=TODAY)
        assert mine.valid.equals(builtin.valid)
        assert {r: sorted(w) for r, w in reasons(mine).items()} == {
            r: sorted(w) for r, w in reasons(builtin).items()}
        assert mine.quarantined.num_rows == sum(manifest.defects.values()) > 0


LAB_RESULTS_DECLARED = """
[[sources]]
name = "labs"
kind = "xml"
location = "in"
dataset = "labs_declared"

[[datasets]]
name = "labs_declared"
key = ["result_id", "patient_id", "test_code"]
version = "reported_at"
[datasets.columns]
result_id = "text"
patient_id = "text"
birth_date = "date"
test_code = "text"
test_system = "text"
test_name = "text"
value = "decimal"
unit = "text"
ref_low = "decimal"
ref_high = "decimal"
collected_at = "timestamptz"
reported_at = "timestamptz"
status = "text"

[[datasets.rules]]
rule = "not_null"
column = "result_id"
[[datasets.rules]]
rule = "unique"
columns = ["result_id"]
scope = "file"
[[datasets.rules]]
rule = "not_null"
column = "patient_id"
[[datasets.rules]]
rule = "not_null"
column = "test_code"
[[datasets.rules]]
rule = "pattern"
column = "test_code"
pattern = "[0-9]{1,5}-[0-9]"
message = "must be a LOINC code (digits-digit)"
[[datasets.rules]]
rule = "not_null"
column = "value"
[[datasets.rules]]
rule = "not_null"
column = "collected_at"
[[datasets.rules]]
rule = "not_null"
column = "reported_at"
[[datasets.rules]]
rule = "not_null"
column = "status"
[[datasets.rules]]
rule = "in_set"
column = "status"
values = ["final", "preliminary", "corrected", "amended", "cancelled"]
[[datasets.rules]]
rule = "compare"
left = "reported_at"
op = ">="
right = "collected_at"
[sources.layout.fields]
result_id = "ResultId"
patient_id = "Patient/Id"
birth_date = "Patient/BirthDate"
test_code = "Test/@code"
test_system = "Test/@system"
test_name = "Test"
value = "Value"
unit = "Unit"
ref_low = "ReferenceRange/@low"
ref_high = "ReferenceRange/@high"
collected_at = "CollectedAt"
reported_at = "ReportedAt"
status = "Status"
"""


@pytest.mark.parametrize(("dataset", "message"), [
    ('key = ["nope"]', "unknown columns ['nope']"),
    ('version = "mrn"', "version mrn must be a number, a date or a timestamp"),
    ('rules = [{ rule = "pattern", column = "born", pattern = "x" }]', "cannot judge ['born']"),
    ('rules = [{ rule = "range", column = "mrn", min = 1 }]', "cannot judge ['mrn']"),
    ('rules = [{ rule = "compare", left = "born", op = ">", right = "mrn" }]', "cannot judge"),
    ('rules = [{ rule = "pattern", column = "mrn", pattern = "(" }]', "not a regular expression"),
    ('rules = [{ rule = "range", column = "born" }]', "needs min, max, above or below"),
    ('rules = [{ rule = "no_such_rule", column = "mrn" }]', "no_such_rule"),
    ('rules = [{ rule = "not_null", column = "ghost" }]', "unknown columns ['ghost']"),
    ('rules = [{ rule = "unique", columns = ["mrn"], scope = "file" }, '
     '{ rule = "unique", columns = ["born"], scope = "file" }]', "at most one unique rule"),
    ('columns = { mrn = "varchar" }', "unknown column type 'varchar'"),
    ('columns = { mrn = "text(3,1)" }', "only decimal takes"),
    ('columns = { _mrn = "text" }', "column '_mrn'"),
])
def test_a_bad_dataset_is_refused_when_the_config_is_read(dataset, message):
    lines = {"key": 'key = ["mrn"]', "columns": 'columns = { mrn = "text", born = "date" }'}
    lines[dataset.split(" ", 1)[0]] = dataset
    text = ('[[sources]]\nname = "s"\nkind = "xml"\nlocation = "in"\ndataset = "d"\n'
            '[[datasets]]\nname = "d"\n' + "\n".join(lines.values()) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        pipeline(text)


def test_a_source_naming_an_unknown_dataset_or_column_is_refused():
    with pytest.raises(ValueError, match="names dataset 'ghost', which the pipeline config"):
        pipeline('[[sources]]\nname = "s"\nkind = "xml"\nlocation = "in"\ndataset = "ghost"\n')
    with pytest.raises(ValueError, match=r"layout names \['nope'\]"):
        pipeline(OBSERVATIONS.replace('dataset = "observations"',
                                      'dataset = "observations"\nlayout = { fields = '
                                      '{ nope = "X" } }'))
    with pytest.raises(ValueError, match="not a built-in's"):
        pipeline(OBSERVATIONS.replace('name = "observations"', 'name = "lab_results"'))


def test_key_version_and_table_come_from_the_config(tmp_path):
    """The source's table defaults to the dataset's; the loader upserts on the declared key
    with the newer version winning, found by the dataset's name."""
    config = pipeline(OBSERVATIONS.replace('version = "reported_at"',
                                           'version = "reported_at"\ntarget_table = "obs"'))
    [source] = config.sources
    assert (source.dataset, source.table) == ("observations", "obs")
    datasets.install(config)
    assert datasets.table_key("observations") == TableKey(("obs_id",), "reported_at")
    assert datasets.table_key("lab_results") == store.KEYS["lab_results"]
    spec = datasets.spec_for(config, source)
    con = store.connect(tmp_path / "w.duckdb")

    def load(run: str, value: str, reported: str) -> store.WriteResult:
        valid = transform_chunk(spec, chunk(spec, {"value": value, "reported_at": reported}),
                                today=TODAY).valid
        return store.write_chunk(con, source="partner", table=source.table,
                                 dataset=source.dataset,
                                 entry=store.LedgerEntry(run, "c", "u", "file"), valid=valid,
                                 quarantined=QUARANTINE_SCHEMA.empty_table())

    assert load("r1", "1.00", "2026-11-19T10:00:00Z").loaded == 1
    assert load("r2", "2.00", "2026-11-19T09:00:00Z").unchanged == 1  # older: kept out
    assert load("r3", "3.00", "2026-11-19T11:00:00Z").loaded == 1  # newer: replaces
    assert con.execute("SELECT obs_id, value FROM obs").fetchall() == [("O-0", Decimal("3.00"))]
    with pytest.raises(FatalError, match="unknown dataset 'ghost'"):
        datasets.table_key("ghost")


def test_a_generic_firebird_table_is_keyed_by_its_key_column():
    """No dataset on a Firebird source reading another table: key column = natural key,
    change column = version, only its key judged; `_undecodable` names bad text."""
    config = pipeline('[[sources]]\nname = "visits"\nkind = "firebird"\n'
                      'location = "PATIENT_VISITS"\nkey_column = "VISIT_ID"\n'
                      'updated_column = "CHANGED_AT"\n')
    [source] = config.sources
    spec = datasets.spec_for(config, source)
    assert (spec.name, spec.key, source.table) == (
        "source:visits", TableKey(("visit_id",), "changed_at"), "patient_visits")
    billing = pipeline('[[sources]]\nname = "b"\nkind = "firebird"\nlocation = "BILLING_CLAIMS"\n')
    assert billing.sources[0].dataset == "billing_claims"
    table = pa.table({"visit_id": pa.array(["V1", None, "V1", "V2"]),
                      "note": pa.array(["a", "b", "c", "d\ufffd"]),
                      "changed_at": pa.array([1, 2, 3, 4], pa.int64()),
                      "_undecodable": pa.array([None, None, None, "NOTE"])})
    result = transform_chunk(spec, table)
    assert result.valid.to_pylist() == [
        {"visit_id": "V1", "note": "a", "changed_at": 1, "source_ref": "VISIT_ID=V1"}]
    assert reasons(result) == {"VISIT_ID=NULL": ["visit_id: required"],
                               "VISIT_ID=V1": ["visit_id: duplicate within chunk"],
                               "VISIT_ID=V2": ["note: not valid text in the source's "
                                               "character set"]}


def test_a_table_without_a_key_is_keyed_by_its_whole_row(tmp_path):
    """Read whole each run, such a table is never doubled: the row itself is its key."""
    spec = datasets.generic_spec("source:codes", key=(), version=None, table="codes")
    table = pa.table({"code": ["A", "B", None], "label": ["x", None, "z"]})
    valid = transform_chunk(spec, table).valid
    assert valid["source_ref"].to_pylist() == ["ROW=1", "ROW=2", "ROW=3"]
    con = store.connect(tmp_path / "w.duckdb")
    datasets._installed[spec.name] = spec  # what install() does for a configured source
    for run in ("r1", "r2"):
        store.write_chunk(con, source="codes", table="codes", dataset=spec.name,
                          entry=store.LedgerEntry(run, "c", "u", "range"), valid=valid,
                          quarantined=QUARANTINE_SCHEMA.empty_table())
    assert con.execute("SELECT count(*) FROM codes").fetchone() == (3,)


def test_readers_give_a_declared_dataset_its_columns(tmp_path: Path):
    """An XML layout with a record attribute and an Excel form with its own header names,
    each flagging a repeat of its file key (composite for the workbook)."""
    feed = tmp_path / "feed.xml"
    feed.write_text('<Batch><Obs id="A"><Who mrn="1"/><Val>2</Val></Obs>'
                    '<Obs id="A"><Who mrn="2"/></Obs><Obs id="B"><Val> 3 </Val></Obs></Batch>')
    [table] = xml_feed.iter_batches(feed, batch_rows=10, source="t", record="Obs",
                                    fields={"obs_id": "@id", "mrn": "Who/@mrn", "v": "Val"},
                                    columns=("obs_id", "mrn", "v"), duplicate_key=("obs_id",))
    assert table.select(["obs_id", "mrn", "v", "_duplicate"]).to_pylist() == [
        {"obs_id": "A", "mrn": "1", "v": "2", "_duplicate": False},
        {"obs_id": "A", "mrn": "2", "v": None, "_duplicate": True},
        {"obs_id": "B", "mrn": None, "v": " 3 ", "_duplicate": False}]
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for row in (["Visit form"], ["Chart No", "Visit Day", "Note"], ["C1", "2026-01-02", "x"],
                ["C1", "2026-01-03", "y"], ["C1", "2026-01-02", "z"]):
        sheet.append(row)
    book.save(tmp_path / "visits.xlsx")
    [table] = excel.iter_batches(tmp_path / "visits.xlsx", batch_rows=10, source="t",
                                 columns=("chart", "day", "note"),
                                 headers={"chart": "chart no", "day": "VisitDay"},
                                 required=("chart", "day"), duplicate_key=("chart", "day"))
    assert table.column_names == ["chart", "day", "note", "_source_ref", "_duplicate"]
    assert table["_duplicate"].to_pylist() == [False, False, True]
    assert table["_source_ref"][0].as_py().endswith(":row=3")
    other = tmp_path / "other.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Chart No", "Note"])  # no Visit Day: not the form's header row
    book.save(other)
    with pytest.raises(SourceFileError, match=r"header row \(chart no, VisitDay, \.\.\.\)"):
        list(excel.iter_batches(other, batch_rows=10, source="t", columns=("chart", "day"),
                                headers={"chart": "chart no", "day": "VisitDay"}))


def test_duckdb_rejects_nothing_of_the_compiled_output(tmp_path, spec):
    """The declared types land in DuckDB as the right SQL types."""
    valid = judge(spec, chunk(spec, {})).valid
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    store.ensure_table(con, "obs", valid.schema)
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'obs'").fetchall())
    assert (types["value"], types["count"], types["born"], types["fasting"],
            types["collected_at"]) == ("DECIMAL(6,2)", "BIGINT", "DATE", "BOOLEAN",
                                       "TIMESTAMP WITH TIME ZONE")
