"""transform.py: staged chunks split into typed valid rows and quarantined rows, none lost."""

from __future__ import annotations

import datetime
import json
from collections.abc import Collection
from decimal import Decimal

import pyarrow as pa
import pytest

from etl_tasks.errors import FatalError
from etl_tasks.sources import excel, xml_feed
from etl_tasks.transform import (
    OUTPUT_SCHEMAS,
    QUARANTINE_SCHEMA,
    Dataset,
    TransformResult,
    transform_chunk,
)

TODAY = datetime.date(2026, 11, 20)
UTC = datetime.UTC

CLAIMS_IN = pa.schema(
    [
        ("claim_id", pa.int64()),
        ("patient_id", pa.string()),
        ("provider_npi", pa.string()),
        ("service_date", pa.date32()),
        ("cpt_code", pa.string()),
        ("icd10_code", pa.string()),
        ("amount", pa.decimal128(12, 2)),
        ("payer", pa.string()),
        ("status", pa.string()),
        ("updated_at", pa.timestamp("us")),
    ]
)
GOOD_CLAIM = {
    "claim_id": 1,
    "patient_id": "P000123",
    "provider_npi": "1234567893",
    "service_date": datetime.date(2026, 11, 2),
    "cpt_code": "99213",
    "icd10_code": "E11.9",
    "amount": Decimal("125.10"),
    "payer": "ACME Health",
    "status": "paid",
    "updated_at": datetime.datetime(2026, 11, 3, 9, 30),
}
LAB_COLUMNS = list(xml_feed.COLUMNS)
GOOD_LAB = {
    "result_id": "R-000001",
    "patient_id": "P000123",
    "birth_date": "1961-04-02",
    "test_code": "2345-7",
    "test_system": "LOINC",
    "test_name": "Glucose",
    "value": "5.4",
    "unit": "mmol/L",
    "ref_low": "3.9",
    "ref_high": "5.5",
    "collected_at": "2026-11-19T08:15:00Z",
    "reported_at": "2026-11-19T12:02:00Z",
    "status": "final",
}
REGISTRATION_COLUMNS = list(excel.COLUMNS)
GOOD_REGISTRATION = {
    "mrn": "MRN-1",
    "first_name": "Ann",
    "last_name": "Lee",
    "date_of_birth": "1980-02-03",
    "sex": "F",
    "zip": "02134",
    "phone": "6175550123",
    "registration_date": "2024-01-02",
    "clinic": "North",
    "insurance_id": "INS-9",
}


def claims(*rows: dict[str, object]) -> pa.Table:
    """A billing chunk: each row is the good claim with its overrides and its own CLAIM_ID."""
    records = [{**GOOD_CLAIM, "claim_id": i + 1, **row} for i, row in enumerate(rows)]
    return pa.Table.from_pylist(records, schema=CLAIMS_IN)


def file_chunk(
    columns: list[str],
    good: dict[str, str],
    *rows: dict[str, str | None],
    duplicate: Collection[int] = (),
) -> pa.Table:
    """A text chunk as the XML/Excel extractors stage it, with `_source_ref` and `_duplicate`."""
    schema = pa.schema(
        [(name, pa.string()) for name in columns]
        + [("_source_ref", pa.string()), ("_duplicate", pa.bool_())]
    )
    records = [
        {**good, **row, "_source_ref": f"in#{i}", "_duplicate": i in duplicate}
        for i, row in enumerate(rows)
    ]
    return pa.Table.from_pylist(records, schema=schema)


def labs(*rows: dict[str, str | None], duplicate: Collection[int] = ()) -> pa.Table:
    """A lab chunk of the good result with each row's overrides."""
    return file_chunk(LAB_COLUMNS, GOOD_LAB, *rows, duplicate=duplicate)


def registrations(*rows: dict[str, str | None], duplicate: Collection[int] = ()) -> pa.Table:
    """A registration chunk of the good registration with each row's overrides."""
    return file_chunk(REGISTRATION_COLUMNS, GOOD_REGISTRATION, *rows, duplicate=duplicate)


def run(dataset: Dataset, table: pa.Table) -> TransformResult:
    """Transform a chunk and check the invariants every result must keep."""
    result = transform_chunk(dataset, table, today=TODAY)
    assert result.valid.schema.equals(OUTPUT_SCHEMAS[dataset])
    assert result.quarantined.schema.equals(QUARANTINE_SCHEMA)
    refs = result.valid["source_ref"].to_pylist() + result.quarantined["source_ref"].to_pylist()
    assert len(refs) == table.num_rows
    assert len(set(refs)) == len(refs)
    return result


def only_reasons(result: TransformResult) -> list[str]:
    """The reasons of the one quarantined row."""
    assert result.quarantined.num_rows == 1
    reasons: str = result.quarantined["reasons"][0].as_py()
    return reasons.split("; ")


def test_output_schemas_are_the_loader_contract():
    """OUTPUT_SCHEMAS name the exact column types the loader creates tables from."""
    assert OUTPUT_SCHEMAS["billing_claims"] == CLAIMS_IN.append(pa.field("source_ref", pa.string()))
    lab = OUTPUT_SCHEMAS["lab_results"]
    assert lab.names == [*LAB_COLUMNS, "source_ref"]
    assert lab.field("birth_date").type == pa.date32()
    assert {lab.field(n).type for n in ("value", "ref_low", "ref_high")} == {pa.float64()}
    assert lab.field("collected_at").type == pa.timestamp("us", tz="UTC")
    assert lab.field("reported_at").type == pa.timestamp("us", tz="UTC")
    registration = OUTPUT_SCHEMAS["patient_registrations"]
    assert registration.names == [*REGISTRATION_COLUMNS, "source_ref"]
    assert registration.field("date_of_birth").type == pa.date32()
    assert registration.field("registration_date").type == pa.date32()
    assert registration.field("zip").type == pa.string()
    assert registration.field("phone").type == pa.string()


def test_clean_claims_pass_with_exact_decimals_and_refs():
    """Good claims come out whole, decimals exact, each pointing at its CLAIM_ID."""
    result = run("billing_claims", claims({}, {"amount": Decimal("0.01")}))
    assert result.quarantined.num_rows == 0
    assert result.valid["amount"].to_pylist() == [Decimal("125.10"), Decimal("0.01")]
    assert result.valid["source_ref"].to_pylist() == ["CLAIM_ID=1", "CLAIM_ID=2"]
    assert result.valid.drop_columns("source_ref").equals(claims({}, {"amount": Decimal("0.01")}))


@pytest.mark.parametrize(
    ("override", "reason", "value"),
    [
        ({"amount": Decimal("0.00")}, "amount: must be > 0", "0.00"),
        ({"amount": Decimal("-12.34")}, "amount: must be > 0", "-12.34"),
        ({"amount": None}, "amount: required", None),
        ({"cpt_code": "9921"}, "cpt_code: must be exactly 5 characters", "9921"),
        ({"status": "PAIDX"}, "status: must be one of submitted, paid, denied, pending", "PAIDX"),
        ({"patient_id": None}, "patient_id: required", None),
    ],
)
def test_each_claim_rule_quarantines(override, reason, value):
    """A claim breaking one rule is quarantined with that rule and never its value."""
    result = run("billing_claims", claims({}, override, {}))
    assert result.valid["claim_id"].to_pylist() == [1, 3]
    assert only_reasons(result) == [reason]
    assert result.quarantined["source_ref"].to_pylist() == ["CLAIM_ID=2"]
    if value is not None:
        assert value not in result.quarantined["reasons"][0].as_py()


def test_claim_with_several_broken_rules_lists_all():
    """A claim breaking four rules carries all four reasons in one quarantined row."""
    bad = {"amount": Decimal("-1.00"), "cpt_code": "1", "status": "PAIDX", "patient_id": None}
    result = run("billing_claims", claims(bad))
    assert sorted(only_reasons(result)) == sorted(
        [
            "patient_id: required",
            "cpt_code: must be exactly 5 characters",
            "amount: must be > 0",
            "status: must be one of submitted, paid, denied, pending",
        ]
    )


def test_duplicate_claim_id_quarantines_the_later_row():
    """Within a chunk the first row of a CLAIM_ID wins and a repeat is quarantined."""
    table = claims({}, {"claim_id": 1, "payer": "Other"})
    result = transform_chunk("billing_claims", table)
    assert result.valid.num_rows + result.quarantined.num_rows == table.num_rows
    assert result.valid["payer"].to_pylist() == ["ACME Health"]
    assert only_reasons(result) == ["claim_id: duplicate within chunk"]


def test_quarantined_claim_keeps_raw_values_as_text():
    """The raw JSON holds every source value as text (null stays null), for repair."""
    result = run("billing_claims", claims({"status": "PAIDX", "payer": None}))
    raw = json.loads(result.quarantined["raw"][0].as_py())
    assert raw == {
        "claim_id": "1",
        "patient_id": "P000123",
        "provider_npi": "1234567893",
        "service_date": "2026-11-02",
        "cpt_code": "99213",
        "icd10_code": "E11.9",
        "amount": "125.10",
        "payer": None,
        "status": "PAIDX",
        "updated_at": "2026-11-03 09:30:00.000000",
    }


def test_many_claims_split_with_exact_counts():
    """A larger chunk with a planted defect every tenth row splits into exact counts."""
    planted: dict[str, object] = {"status": "PAIDX"}
    rows = [planted if i % 10 == 0 else {} for i in range(1000)]
    result = run("billing_claims", claims(*rows))
    assert (result.valid.num_rows, result.quarantined.num_rows) == (900, 100)


def test_lab_result_is_typed_and_utc():
    """Values become floats, dates and UTC instants; offsets are converted, not dropped."""
    result = run(
        "lab_results",
        labs(
            {
                "collected_at": "2026-11-19T10:15:00+02:00",
                "reported_at": "2026-11-19T07:02:00-05:00",
            }
        ),
    )
    row = result.valid.to_pylist()[0]
    assert row["collected_at"] == datetime.datetime(2026, 11, 19, 8, 15, tzinfo=UTC)
    assert row["reported_at"] == datetime.datetime(2026, 11, 19, 12, 2, tzinfo=UTC)
    assert (row["value"], row["ref_low"], row["ref_high"]) == (5.4, 3.9, 5.5)
    assert row["birth_date"] == datetime.date(1961, 4, 2)
    assert row["source_ref"] == "in#0"


def test_lab_text_is_stripped_and_kept_exactly():
    """Text is whitespace-stripped but otherwise kept, so µmol/L survives; empty means null."""
    result = run(
        "lab_results",
        labs(
            {
                "unit": " µmol/L\n",
                "test_name": "  Créatinine ",
                "value": " 88 ",
                "ref_low": "",
                "ref_high": "  ",
                "birth_date": None,
            }
        ),
    )
    row = result.valid.to_pylist()[0]
    assert (row["unit"], row["test_name"], row["value"]) == ("µmol/L", "Créatinine", 88.0)
    assert (row["ref_low"], row["ref_high"], row["birth_date"]) == (None, None, None)


@pytest.mark.parametrize(
    ("override", "reason", "value"),
    [
        ({"result_id": "  "}, "result_id: required", None),
        ({"patient_id": None}, "patient_id: required", None),
        ({"test_code": "GLU-1"}, "test_code: must be a LOINC code (digits-digit)", "GLU-1"),
        ({"value": "high"}, "value: must be a decimal number", "high"),
        ({"ref_high": "n/a"}, "ref_high: must be a decimal number", "n/a"),
        ({"birth_date": "1961-02-30"}, "birth_date: must be a date YYYY-MM-DD", "1961-02-30"),
        (
            {"collected_at": "2026-11-19T08:15:00"},
            "collected_at: must be ISO-8601 with Z or an offset",
            "2026-11-19T08:15:00",
        ),
        (
            {"reported_at": "2026-11-19T08:00:00Z"},
            "reported_at: must not be before collected_at",
            "2026-11-19T08:00:00Z",
        ),
        (
            {"status": "done"},
            "status: must be one of final, preliminary, corrected, amended, cancelled",
            "done",
        ),
    ],
)
def test_each_lab_rule_quarantines(override, reason, value):
    """A lab result breaking one rule is quarantined with that rule and never its value."""
    result = run("lab_results", labs({}, override))
    assert result.valid["source_ref"].to_pylist() == ["in#0"]
    assert only_reasons(result) == [reason]
    if value is not None:
        assert value not in result.quarantined["reasons"][0].as_py()


def test_lab_duplicate_flag_quarantines_and_raw_is_untouched():
    """A ResultId repeat flagged by the extractor is quarantined, raw text as it arrived."""
    result = run("lab_results", labs({}, {"unit": " µmol/L "}, duplicate={1}))
    assert only_reasons(result) == ["result_id: duplicate within file"]
    raw = json.loads(result.quarantined["raw"][0].as_py())
    assert raw["unit"] == " µmol/L "
    assert "_duplicate" not in raw
    assert "_source_ref" not in raw


def test_lab_row_with_several_broken_rules_lists_all():
    """One lab row breaking three rules carries all three reasons."""
    result = run("lab_results", labs({"value": "x", "status": None, "reported_at": "soon"}))
    assert sorted(only_reasons(result)) == sorted(
        [
            "value: must be a decimal number",
            "status: required",
            "reported_at: must be ISO-8601 with Z or an offset",
        ]
    )


def test_registration_dates_zip_and_phone_are_normalized():
    """Serial, M/D/YYYY and datetime cells become dates; short ZIPs are padded; phones stay text."""
    result = run(
        "patient_registrations",
        registrations(
            {"date_of_birth": "29226", "registration_date": "45000.0", "zip": "2134"},
            {"date_of_birth": "1/2/1980", "registration_date": "2024-03-04T13:14:15", "zip": "501"},
            {"first_name": "  Ann ", "clinic": "", "phone": "(617) 555-0123"},
        ),
    )
    rows = result.valid.to_pylist()
    assert [r["date_of_birth"] for r in rows] == [
        datetime.date(1980, 1, 6),
        datetime.date(1980, 1, 2),
        datetime.date(1980, 2, 3),
    ]
    assert [r["registration_date"] for r in rows] == [
        datetime.date(2023, 3, 15),
        datetime.date(2024, 3, 4),
        datetime.date(2024, 1, 2),
    ]
    assert [r["zip"] for r in rows] == ["02134", "00501", "02134"]
    assert [r["phone"] for r in rows] == ["6175550123", "6175550123", "(617) 555-0123"]
    assert (rows[2]["first_name"], rows[2]["clinic"]) == ("Ann", None)


@pytest.mark.parametrize(
    ("override", "reason", "value"),
    [
        ({"mrn": ""}, "mrn: required", None),
        (
            {"date_of_birth": "31/12/1980"},
            "date_of_birth: must be a date (YYYY-MM-DD, M/D/YYYY or an Excel serial)",
            "31/12/1980",
        ),
        (
            {"date_of_birth": "2026-11-21"},
            "date_of_birth: must be from 1900-01-01 to today",
            "2026-11-21",
        ),
        (
            {"date_of_birth": "1899-12-31"},
            "date_of_birth: must be from 1900-01-01 to today",
            "1899-12-31",
        ),
        ({"sex": "male"}, "sex: must be one of M, F, X, U", "male"),
        ({"zip": "12"}, "zip: must be exactly 5 digits", None),
        ({"zip": "021345"}, "zip: must be exactly 5 digits", "021345"),
        ({"registration_date": None}, "registration_date: required", None),
        (
            {"registration_date": "yesterday"},
            "registration_date: must be a date (YYYY-MM-DD, M/D/YYYY or an Excel serial)",
            "yesterday",
        ),
    ],
)
def test_each_registration_rule_quarantines(override, reason, value):
    """A registration breaking one rule is quarantined with that rule and never its value."""
    result = run("patient_registrations", registrations({}, override))
    assert result.valid["source_ref"].to_pylist() == ["in#0"]
    assert only_reasons(result) == [reason]
    if value is not None:
        assert value not in result.quarantined["reasons"][0].as_py()


def test_registration_duplicate_mrn_quarantines_the_flagged_row():
    """The row the extractor flagged as an MRN repeat is quarantined; the first stays."""
    result = run("patient_registrations", registrations({}, {}, duplicate={1}))
    assert result.valid["source_ref"].to_pylist() == ["in#0"]
    assert only_reasons(result) == ["mrn: duplicate within file"]


def test_birth_date_today_is_accepted():
    """A birth date equal to `today` is within bounds."""
    result = run("patient_registrations", registrations({"date_of_birth": TODAY.isoformat()}))
    assert result.valid.num_rows == 1


@pytest.mark.parametrize(
    ("dataset", "table"),
    [
        ("billing_claims", claims()),
        ("lab_results", labs()),
        ("patient_registrations", registrations()),
    ],
)
def test_empty_chunk_gives_empty_typed_tables(dataset, table):
    """A chunk without rows yields two empty tables of the right schemas."""
    result = run(dataset, table)
    assert (result.valid.num_rows, result.quarantined.num_rows) == (0, 0)


def test_all_null_text_column_is_typed():
    """A column absent from every record still types as text and quarantines nothing extra."""
    result = run("lab_results", labs({"unit": None}, {"unit": None}))
    assert result.valid["unit"].to_pylist() == [None, None]


def test_chunk_missing_a_column_is_fatal():
    """A chunk without a contracted column is an extractor/transform mismatch, not bad data."""
    with pytest.raises(FatalError, match="status"):
        transform_chunk("billing_claims", claims({}).drop_columns("status"))


def test_uncastable_column_is_fatal_without_values():
    """A column that cannot be read as its contracted type fails without quoting values."""
    table = claims({}).set_column(0, "claim_id", pa.array(["CLM-SECRET"]))
    with pytest.raises(FatalError) as info:
        transform_chunk("billing_claims", table)
    assert "CLM-SECRET" not in str(info.value)
    # Arrow's own message quotes the value; it must not ride along as the shown cause.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
