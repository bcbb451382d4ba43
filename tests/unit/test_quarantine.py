"""load/quarantine.py on a real DuckDB file: listing without values, and the replay of
quarantined rows against the current rules, exactly once."""

from __future__ import annotations

import json
from decimal import Decimal

import duckdb
import pytest

from etl_tasks.load import duckdb as store
from etl_tasks.load import quarantine
from etl_tasks.transform import restage_quarantined, transform_chunk
from tests.unit.test_transform import claims, labs

RUN = "run-1"


def _load(con, source, dataset, table, chunk, chunk_id):
    """Commit a chunk the way the loader does: transform, then write_chunk with its ledger.
    `dataset` is a name or a spec (a generic table's)."""
    result = transform_chunk(dataset, chunk)
    store.write_chunk(con, source=source, table=table, dataset=getattr(dataset, "name", dataset),
                      entry=store.LedgerEntry(RUN, chunk_id, chunk_id, "range"),
                      valid=result.valid, quarantined=result.quarantined)


@pytest.fixture
def con(tmp_path):
    con = store.connect(tmp_path / "warehouse.duckdb")
    yield con
    con.close()


def _edit_raw(con, source, ref, **values):
    """What a source fix amounts to: the quarantined row's values changed (None: purged)."""
    if values.get("raw", "") is None:
        con.execute("UPDATE etl_quarantine SET raw = NULL WHERE source = ? AND source_ref = ?",
                    [source, ref])
        return
    [(raw,)] = con.execute("SELECT raw FROM etl_quarantine WHERE source = ? AND source_ref = ?",
                           [source, ref]).fetchall()
    con.execute("UPDATE etl_quarantine SET raw = ? WHERE source = ? AND source_ref = ?",
                [json.dumps({**json.loads(raw), **values}, ensure_ascii=False), source, ref])


def _counts(con, table, source):
    return (con.execute(f"SELECT count(*), count(DISTINCT claim_id) FROM {table}").fetchone(),
            con.execute("SELECT count(*) FROM etl_quarantine WHERE source = ?",
                        [source]).fetchone()[0],
            con.execute("SELECT count(*) FROM etl_load_ledger").fetchone()[0])


def _reasons(con, source):
    return dict(con.execute("SELECT source_ref, reasons FROM etl_quarantine WHERE source = ?",
                            [source]).fetchall())


def test_replay_loads_what_passes_now_once_and_refreshes_what_still_fails(con):
    """After a source fix, a claim that passes is upserted with its exact decimal, released
    from quarantine and recorded in the ledger in one go; one failing differently gets its
    new rule, an unreadable one and a purged one stay; a second replay changes nothing."""
    _load(con, "billing", "billing_claims", "billing_claims", claims(
        {}, {"amount": Decimal("-5.00")}, {"status": "unknown"}, {"cpt_code": "9921"},
        {"patient_id": None}, {"amount": Decimal("-1.00")}), "billing:keys:1-6")
    assert quarantine.replay(con, source="billing", dataset="billing_claims",
                             table="billing_claims").public() == {
        "examined": 5, "loaded": 0, "unchanged": 0, "still_quarantined": 5,
        "reasons_refreshed": 0, "purged": 0, "chunks": 0}
    _edit_raw(con, "billing", "CLAIM_ID=2", amount="12.50")       # fixed
    _edit_raw(con, "billing", "CLAIM_ID=3", status="paid", cpt_code="123")  # broken otherwise
    _edit_raw(con, "billing", "CLAIM_ID=4", amount="twelve")      # not a decimal at all
    _edit_raw(con, "billing", "CLAIM_ID=5", raw=None)             # purged
    _edit_raw(con, "billing", "CLAIM_ID=6", claim_id="60")        # key no longer its pointer
    before = _counts(con, "billing_claims", "billing")

    counts = quarantine.replay(con, source="billing", dataset="billing_claims",
                               table="billing_claims")

    assert counts.public() == {"examined": 4, "loaded": 1, "unchanged": 0,
                               "still_quarantined": 3, "reasons_refreshed": 3, "purged": 1,
                               "chunks": 1}
    after = _counts(con, "billing_claims", "billing")
    assert after == ((before[0][0] + 1, before[0][1] + 1), before[1] - 1, before[2] + 1)
    assert con.execute("SELECT amount, source_ref, _run_id FROM billing_claims WHERE "
                       "claim_id = 2").fetchall() == [(Decimal("12.50"), "CLAIM_ID=2",
                                                       store.REPLAY_RUN_ID)]
    reasons = _reasons(con, "billing")
    assert "CLAIM_ID=2" not in reasons
    assert reasons["CLAIM_ID=3"] == "cpt_code: must be exactly 5 characters"
    assert reasons["CLAIM_ID=4"] == "amount: cannot be read as decimal128(12, 2)"
    assert reasons["CLAIM_ID=5"] == "patient_id: required"  # purged: left as it was
    assert reasons["CLAIM_ID=6"] == "claim_id: must match the source pointer"
    [(kind, unit, loaded)] = con.execute(
        "SELECT kind, unit_id, rows_loaded FROM etl_load_ledger WHERE run_id = ?",
        [store.REPLAY_RUN_ID]).fetchall()
    assert (kind, unit, loaded) == (quarantine.REPLAY_KIND, "billing:keys:1-6", 1)
    # The replay's ledger rows are not a lost run for the recovery to record as failed.
    assert (store.REPLAY_RUN_ID, "billing") not in store.runs_without_record(con)

    again = quarantine.replay(con, source="billing", dataset="billing_claims",
                              table="billing_claims")
    assert (again.loaded, again.chunks, again.reasons_refreshed) == (0, 0, 0)
    assert _counts(con, "billing_claims", "billing") == after


def test_the_same_rows_replayed_again_are_skipped_by_the_ledger(con):
    """A replay chunk's id depends only on its rows: rows identical to ones already replayed
    (say, a restored copy of the quarantine) are not loaded a second time."""
    _load(con, "billing", "billing_claims", "billing_claims",
          claims({"amount": Decimal("-5.00")}), "billing:keys:1-1")
    _edit_raw(con, "billing", "CLAIM_ID=1", amount="5.00")
    [fixed] = con.execute("SELECT * FROM etl_quarantine").fetchall()
    assert quarantine.replay(con, source="billing", dataset="billing_claims",
                             table="billing_claims").loaded == 1
    con.execute("INSERT INTO etl_quarantine VALUES (?, ?, ?, ?, ?, ?, ?)", list(fixed))
    ledger = con.execute("SELECT count(*) FROM etl_load_ledger").fetchone()
    again = quarantine.replay(con, source="billing", dataset="billing_claims",
                              table="billing_claims")
    assert (again.loaded, again.chunks) == (0, 0)
    assert con.execute("SELECT count(*) FROM billing_claims").fetchone() == (1,)
    assert con.execute("SELECT count(*) FROM etl_load_ledger").fetchone() == ledger


def test_a_duplicate_within_its_file_stays_quarantined(con):
    """The file's first occurrence of a ResultId wins: a later duplicate stays quarantined
    however its values read, while a repaired lab row loads with its source pointer."""
    _load(con, "lab_results", "lab_results", "lab_results",
          labs({}, {"result_id": "R-000001"}, {"result_id": "R-2", "status": "done"},
               duplicate={1}), "lab:file:1")
    _edit_raw(con, "lab_results", "in#2", status="final")
    counts = quarantine.replay(con, source="lab_results", dataset="lab_results",
                               table="lab_results")
    assert (counts.loaded, counts.still_quarantined) == (1, 1)
    assert _reasons(con, "lab_results") == {"in#1": "result_id: duplicate within file"}
    assert con.execute("SELECT source_ref FROM lab_results ORDER BY 1").fetchall() == [
        ("in#0",), ("in#2",)]


def test_list_shows_rules_fields_and_pointers_but_no_values(con):
    """summary() and rows() count and point at quarantined rows by rule, never by value."""
    _load(con, "lab_results", "lab_results", "lab_results",
          labs({"patient_id": "PCANARY1", "test_code": "xx", "value": "high"}), "lab:file:1")
    _edit_raw(con, "lab_results", "in#0")
    assert quarantine.summary(con) == {"lab_results": {
        "rows": 1, "raw_purged": 0,
        "by_reason": {"test_code: must be a LOINC code (digits-digit)": 1,
                      "value: must be a decimal number": 1}}}
    [row] = quarantine.rows(con, source="lab_results", limit=5)
    assert row["fields"] == ["test_code", "value"]
    assert (row["source_ref"], row["run_id"], row["chunk_id"], row["raw_kept"]) == (
        "in#0", RUN, "lab:file:1", True)
    text = json.dumps([quarantine.summary(con), quarantine.rows(con)])
    assert "PCANARY1" not in text
    assert "high" not in text
    assert quarantine.rows(con, run_id="another run") == []


def test_replay_of_a_store_without_quarantined_rows_does_nothing(tmp_path):
    """A fresh store replays nothing and says so in counts."""
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.close()
    con = store.connect(tmp_path / "w.duckdb")
    try:
        counts = quarantine.replay(con, source="registrations",
                                   dataset="patient_registrations",
                                   table="patient_registrations")
    finally:
        con.close()
    assert counts.public() == quarantine.ReplayCounts().public()


def test_rows_that_cannot_be_read_back_are_left_out_with_one_reason_each():
    """restage_quarantined names why a row cannot be judged again (never its value), once."""
    restaged = restage_quarantined(
        "billing_claims",
        ['{"claim_id": "1", "amount": "1.5", "updated_at": "2026-01-01 00:00:01.000000"}',
         "not json", '{"claim_id": "x"}', '{"claim_id": "4"}', '{"claim_id": "5", "amount": 3}'],
        ["CLAIM_ID=1", "CLAIM_ID=2", "CLAIM_ID=3", "CLAIM_ID=40", "CLAIM_ID=5"],
        [""] * 5)
    assert restaged.unreadable == {
        1: ["raw: not an object of the row's values as text"],
        2: ["claim_id: cannot be read as int64"],
        3: ["claim_id: must match the source pointer"],
        4: ["raw: not an object of the row's values as text"]}
    assert restaged.table.column("claim_id").to_pylist() == [1]
    assert str(restaged.table.column("amount")[0]) == "1.50"


def test_a_generic_tables_rows_replay_in_their_reflected_types_and_one_failing_source_is_told(
        con, monkeypatch):
    """A generic Firebird table's held rows read back in the types reflected from Firebird
    (a time of day, an instant, an exact decimal, INT128's digits, a boolean, the digest
    pointer of a text key) and load once fixed; a row whose text was not valid in the
    source's character set stays held (its raw has the bad bytes replaced). A source whose
    types cannot be had is reported by name with what to do; the others are replayed."""
    import datetime as dt

    import pyarrow as pa

    from etl_tasks import datasets
    from etl_tasks.config import SourceConfig
    from etl_tasks.errors import TransientError
    from etl_tasks.sources import firebird_keys, firebird_text
    from etl_tasks.sources import firebird_schema as fs

    schema = fs.TableSchema("T", (
        fs.Column("CODE", fs.VARCHAR, length=8, charset="WIN1252"),
        fs.Column("AMOUNT", fs.INT64, sub_type=1, scale=-2, precision=12),
        fs.Column("HUGE", fs.INT128), fs.Column("AT", fs.TIME),
        fs.Column("SEEN_AT", fs.TIMESTAMP_TZ), fs.Column("OK", fs.BOOLEAN),
        fs.Column("NOTE", fs.BLOB, sub_type=1, charset="WIN1252")))
    staged = schema.arrow_schema()
    values = [Decimal("-12.34"), "170141183460469231731687303715884105727",
              dt.time(23, 59, 59, 999900), dt.datetime(2024, 6, 1, 10, 0, 0, 123400, tzinfo=dt.UTC),
              True]
    typed = [pa.array([v] * 3, f.type) for v, f in zip(values, list(staged)[1:6], strict=True)]
    chunk = pa.table([pa.array(["A", None, "C"], pa.string()), *typed,
                      pa.array(["ok", "µmol/L", "M\ufffdller"], pa.string())], schema=staged)
    chunk = firebird_keys.row_pointers(chunk, schema, "CODE", b"k" * 32).append_column(
        firebird_text.UNDECODABLE, pa.array([None, None, "NOTE"], pa.string()))
    spec = datasets.generic_spec("source:t", key=("code",), version=None, table="t",
                                 schema=firebird_keys.staged_schema(schema, "CODE"))
    monkeypatch.setitem(datasets._installed, spec.name, spec)  # as the loader installs it
    _load(con, "t", spec, "t", chunk, "t:skeys:1")
    assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)
    refs = _reasons(con, "t")
    assert sorted(refs.values()) == ["code: required",
                                     "note: not valid text in the source's character set"]
    assert all(ref.startswith("CODE#") for ref in refs)  # a digest: no key in clear
    null_key = next(ref for ref, why in refs.items() if why == "code: required")
    _edit_raw(con, "t", null_key, code="B")

    def spec_of(src: SourceConfig):
        if src.name == "gone":
            raise TransientError("Firebird server unreachable or connection lost (table G)")
        return spec

    sources = [SourceConfig(name="gone", kind="firebird", location="G", key_column="ID"),
               SourceConfig(name="t", kind="firebird", location="T", key_column="CODE",
                            target_table="t")]
    _load(con, "gone", "billing_claims", "billing_claims",
          claims({"amount": Decimal("-1.00")}), "gone:keys:1-1")
    done = quarantine.replay_sources(con, sources, spec_of)
    assert done["t"] == {**quarantine.ReplayCounts(examined=2, loaded=1, still_quarantined=1,
                                                   chunks=1).public(), "error": None}
    assert done["gone"]["error"] == (
        "source gone: quarantine replay stopped reading its columns' types: Firebird server "
        "unreachable or connection lost (table G). What was replayed stays; fix that, then "
        "run `etl quarantine replay --source gone` again")
    assert done["gone"]["examined"] == 0
    stored = con.execute("SELECT code, amount, huge, \"at\", seen_at, ok, note, source_ref FROM t "
                         "WHERE code = 'B'").fetchall()
    assert stored == [("B", Decimal("-12.34"), 2**127 - 1, dt.time(23, 59, 59, 999900),
                       values[3], True, "µmol/L", null_key)]
    assert list(_reasons(con, "t").values()) == [
        "note: not valid text in the source's character set"]
    # Again: nothing is left to do for the table; the failing source is told again.
    again = quarantine.replay_sources(con, sources, spec_of)
    assert (again["t"]["loaded"], again["t"]["chunks"], again["t"]["error"]) == (0, 0, None)
    assert again["gone"]["error"]
