"""validate.py: each rule fails and passes on its own, and reasons never carry values."""

from __future__ import annotations

import datetime

import numpy as np
import pandas as pd
import pandera.pandas as pa_
import pytest

from etl_tasks.errors import DataQualityError, FatalError
from etl_tasks.validate import (
    BILLING_CLAIMS,
    LAB_RESULTS,
    PATIENT_REGISTRATIONS,
    parse_decimal,
    parse_sheet_date,
    parse_utc_timestamp,
    patient_registrations_schema,
    validate_batch,
)

GOOD_CLAIM = {
    "claim_id": 1,
    "patient_id": "P000123",
    "cpt_code": "99213",
    "amount": 125.0,
    "status": "paid",
}
GOOD_LAB = {
    "result_id": "R-1",
    "_duplicate": False,
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
GOOD_REGISTRATION = {
    "mrn": "MRN-1",
    "_duplicate": False,
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
TODAY = datetime.date(2026, 11, 20)


def claims(*rows: dict[str, object]) -> pd.DataFrame:
    """A claims frame as transform builds it: a good row 0, then each override as a row."""
    records = [{**GOOD_CLAIM, "claim_id": i + 2, **row} for i, row in enumerate(rows)]
    frame = pd.DataFrame([GOOD_CLAIM, *records])
    frame["claim_id"] = frame["claim_id"].astype("Int64")
    frame["amount"] = frame["amount"].astype("float64")
    for column in ("patient_id", "cpt_code", "status"):
        frame[column] = frame[column].astype("str")
    return frame


def text_frame(good: dict[str, object], *rows: dict[str, object]) -> pd.DataFrame:
    """A text frame (str columns, bool `_duplicate`): a good row 0, then each override."""
    frame = pd.DataFrame([good] + [{**good, **row} for row in rows])
    for column in frame.columns:
        frame[column] = frame[column].astype(bool if column == "_duplicate" else "str")
    return frame


def test_clean_claims_pass_untouched():
    """A frame that keeps every rule comes back whole with no failures."""
    frame = claims({})
    report = validate_batch(frame, BILLING_CLAIMS)
    assert report.failures == {}
    assert report.valid.equals(frame)


@pytest.mark.parametrize(
    ("override", "reason", "value"),
    [
        ({"amount": 0.0}, "amount: must be > 0", "0.0"),
        ({"amount": -12.5}, "amount: must be > 0", "-12.5"),
        ({"amount": np.nan}, "amount: required", None),
        ({"cpt_code": "9921"}, "cpt_code: must be exactly 5 characters", "9921"),
        ({"cpt_code": "992130"}, "cpt_code: must be exactly 5 characters", "992130"),
        ({"status": "PAIDX"}, "status: must be one of submitted, paid, denied, pending", "PAIDX"),
        ({"patient_id": None}, "patient_id: required", None),
    ],
)
def test_each_claim_rule_fails_alone(override, reason, value):
    """A claim breaking one rule fails with that rule's name and without the value."""
    report = validate_batch(claims(override), BILLING_CLAIMS)
    assert report.failures == {1: [reason]}
    assert list(report.valid.index) == [0]
    if value is not None:
        assert value not in reason


def test_duplicate_claim_id_keeps_first():
    """The second row with a CLAIM_ID already seen fails; the first stays valid."""
    report = validate_batch(claims({"claim_id": 1}, {}), BILLING_CLAIMS)
    assert report.failures == {1: ["claim_id: duplicate within chunk"]}
    assert list(report.valid.index) == [0, 2]


def test_row_breaking_several_rules_gets_every_reason():
    """Lazy validation collects all broken rules of one row, each once."""
    report = validate_batch(
        claims({"amount": -1.0, "cpt_code": "1", "status": "PAIDX", "patient_id": None}),
        BILLING_CLAIMS,
    )
    assert sorted(report.failures[1]) == sorted(
        [
            "amount: must be > 0",
            "cpt_code: must be exactly 5 characters",
            "status: must be one of submitted, paid, denied, pending",
            "patient_id: required",
        ]
    )


def test_frame_missing_a_column_is_fatal():
    """A frame that lacks a ruled column cannot be judged row by row, so it is fatal."""
    with pytest.raises(FatalError, match="status"):
        validate_batch(claims({}).drop(columns="status"), BILLING_CLAIMS)


def test_raise_if_failed_counts_rules_without_values():
    """FAIL mode raises with a count per rule and no patient value."""
    report = validate_batch(claims({"status": "PAIDX"}, {"status": "PAIDX"}), BILLING_CLAIMS)
    with pytest.raises(DataQualityError) as info:
        report.raise_if_failed(source="billing")
    assert info.value.failures == 2
    assert "status: must be one of submitted, paid, denied, pending (2)" in str(info.value)
    assert "PAIDX" not in str(info.value)


def test_raise_if_failed_is_silent_when_all_pass():
    """FAIL mode does nothing when every row passed."""
    validate_batch(claims({}), BILLING_CLAIMS).raise_if_failed()


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"result_id": None}, "result_id: required"),
        ({"_duplicate": True}, "result_id: duplicate within file"),
        ({"patient_id": None}, "patient_id: required"),
        ({"birth_date": "02/04/1961"}, "birth_date: must be a date YYYY-MM-DD"),
        ({"test_code": "2345"}, "test_code: must be a LOINC code (digits-digit)"),
        ({"test_code": "123456-7"}, "test_code: must be a LOINC code (digits-digit)"),
        ({"value": "<0.5"}, "value: must be a decimal number"),
        ({"value": None}, "value: required"),
        ({"ref_low": "low"}, "ref_low: must be a decimal number"),
        ({"ref_high": "1e3"}, "ref_high: must be a decimal number"),
        (
            {"collected_at": "2026-11-19T08:15:00"},
            "collected_at: must be ISO-8601 with Z or an offset",
        ),
        ({"reported_at": "19.11.2026 12:02"}, "reported_at: must be ISO-8601 with Z or an offset"),
        ({"reported_at": "2026-11-19T08:14:59Z"}, "reported_at: must not be before collected_at"),
        (
            {"status": "FINAL"},
            "status: must be one of final, preliminary, corrected, amended, cancelled",
        ),
    ],
)
def test_each_lab_rule_fails_alone(override, reason):
    """A lab result breaking one rule fails with exactly that rule's name."""
    report = validate_batch(text_frame(GOOD_LAB, override), LAB_RESULTS)
    assert report.failures == {1: [reason]}
    assert list(report.valid.index) == [0]


def test_lab_optional_fields_may_be_absent():
    """Absent unit, reference range and birth date are fine."""
    frame = text_frame(
        GOOD_LAB,
        {
            "unit": None,
            "ref_low": None,
            "ref_high": None,
            "birth_date": None,
            "test_system": None,
            "test_name": None,
        },
    )
    assert validate_batch(frame, LAB_RESULTS).failures == {}


def test_report_compares_instants_across_offsets():
    """A report time with another offset is compared as an instant, not as text."""
    frame = text_frame(
        GOOD_LAB,
        {"collected_at": "2026-11-19T10:15:00+02:00", "reported_at": "2026-11-19T08:30:00Z"},
    )
    assert validate_batch(frame, LAB_RESULTS).failures == {}


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"mrn": None}, "mrn: required"),
        ({"_duplicate": True}, "mrn: duplicate within file"),
        (
            {"date_of_birth": "1980-13-01"},
            "date_of_birth: must be a date (YYYY-MM-DD, M/D/YYYY or an Excel serial)",
        ),
        ({"date_of_birth": "2026-11-21"}, "date_of_birth: must be from 1900-01-01 to today"),
        ({"date_of_birth": "12/31/1899"}, "date_of_birth: must be from 1900-01-01 to today"),
        ({"sex": "f"}, "sex: must be one of M, F, X, U"),
        ({"zip": "2134"}, "zip: must be exactly 5 digits"),
        ({"zip": "02134-1234"}, "zip: must be exactly 5 digits"),
        ({"registration_date": None}, "registration_date: required"),
        (
            {"registration_date": "20240102"},
            "registration_date: must be a date (YYYY-MM-DD, M/D/YYYY or an Excel serial)",
        ),
    ],
)
def test_each_registration_rule_fails_alone(override, reason):
    """A registration breaking one rule fails with exactly that rule's name."""
    report = validate_batch(
        text_frame(GOOD_REGISTRATION, override), patient_registrations_schema(TODAY)
    )
    assert report.failures == {1: [reason]}


@pytest.mark.parametrize(
    "born", ["2026-11-20", "1900-01-01", "1/2/1980", "29226", "29226.0", "1980-01-02T23:59:59"]
)
def test_registration_birth_date_forms_and_bounds_pass(born):
    """Every accepted date form passes, and both bounds are inclusive."""
    frame = text_frame(GOOD_REGISTRATION, {"date_of_birth": born})
    assert validate_batch(frame, patient_registrations_schema(TODAY)).failures == {}


def test_registration_constant_bounds_by_the_real_today():
    """The constant schema takes today's date at validation time."""
    later = (datetime.date.today() + datetime.timedelta(days=2)).isoformat()
    frame = text_frame(GOOD_REGISTRATION, {"date_of_birth": later})
    assert validate_batch(frame, PATIENT_REGISTRATIONS).failures == {
        1: ["date_of_birth: must be from 1900-01-01 to today"]
    }


def test_sheet_dates_parse_every_form_to_midnight():
    """Serials count days from 1899-12-30, M/D/YYYY is US order, and times are dropped."""
    text = pd.Series(
        [
            "45000",
            "45000.0",
            "3/4/2024",
            "2024-03-04",
            "2024-03-04T13:14:15",
            "45000.5",
            "2024-02-30",
            None,
        ],
        dtype="str",
    )
    expected = pd.to_datetime(
        ["2023-03-15", "2023-03-15", "2024-03-04", "2024-03-04", "2024-03-04", None, None, None]
    ).as_unit("us")
    assert parse_sheet_date(text).tolist() == pd.Series(expected).tolist()


def test_timestamps_convert_to_utc_and_reject_naive():
    """Offsets and Z become UTC instants; a naive timestamp becomes NaT."""
    parsed = parse_utc_timestamp(
        pd.Series(
            [
                "2026-11-19T10:15:00+02:00",
                "2026-11-19T03:15:00-05:00",
                "2026-11-19T08:15:00Z",
                "2026-11-19T08:15:00",
            ],
            dtype="str",
        )
    )
    assert str(parsed.dtype) == "datetime64[us, UTC]"
    assert parsed[:3].tolist() == [pd.Timestamp("2026-11-19T08:15:00Z")] * 3
    assert parsed[3] is pd.NaT


def test_decimals_reject_exponents_and_specials():
    """Only plain decimal text parses; exponents, nan, inf and commas do not."""
    parsed = parse_decimal(pd.Series(["5.4", "-.5", "+7", "1e3", "nan", "inf", "5,4"], dtype="str"))
    assert parsed[:3].tolist() == [5.4, -0.5, 7.0]
    assert parsed[3:].isna().all()


def test_check_that_raises_is_fatal_without_quoting_values():
    """A rule that crashes is a bug, reported as fatal without the value it crashed on."""

    def as_float(s: pd.Series) -> pd.Series:
        return s.astype("float64") > 0

    schema = pa_.DataFrameSchema({"value": pa_.Column(str, pa_.Check(as_float, error="value: x"))})
    with pytest.raises(FatalError) as info:
        validate_batch(pd.DataFrame({"value": pd.Series(["secret-7"], dtype="str")}), schema)
    assert "value: x" in str(info.value)
    assert "secret-7" not in str(info.value)
    assert info.value.__context__ is None  # pandera's own error text quotes the values


def test_wrong_dtype_is_fatal():
    """A column of the wrong dtype means the frame does not fit the schema at all."""
    frame = claims({})
    frame["amount"] = frame["amount"].astype("str")
    with pytest.raises(FatalError, match="amount"):
        validate_batch(frame, BILLING_CLAIMS)
