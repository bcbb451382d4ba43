"""pandera schemas of the three demo datasets, the text forms they accept, and validate_batch().

One rule is one named check, and its name is the reason a quarantined row carries
("amount: must be > 0"). Reasons name the rule, never the value: the values are patient data.
The lab and registration schemas check stripped text with the parsers below, so every value
that passes is one the transform can parse.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa_

from etl_tasks.errors import DataQualityError, FatalError

# [0-9] rather than \d: Python's \d also matches non-ASCII digits that float() would accept.
_DECIMAL = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_ISO_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_ISO_DATETIME = _ISO_DATE + r"T[0-9]{2}:[0-9]{2}:[0-9]{2}"
_OFFSET_TIMESTAMP = (
    _ISO_DATE + r"T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?" + r"(?:Z|[+-][0-9]{2}:?[0-9]{2})"
)
_US_DATE = r"[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}"
# Five digits reach the year 2173; longer digit runs (20240115) are not serials.
_EXCEL_SERIAL = r"[0-9]{1,5}(?:\.0)?"
_EXCEL_EPOCH = pd.Timestamp("1899-12-30")
_LOINC = r"[0-9]{1,5}-[0-9]"

CLAIM_STATUSES = ("submitted", "paid", "denied", "pending")
LAB_STATUSES = ("final", "preliminary", "corrected", "amended", "cancelled")
SEXES = ("M", "F", "X", "U")


@dataclass(frozen=True)
class Report:
    """Rows that passed every rule, and the broken rules of the others by row index."""

    valid: pd.DataFrame
    failures: dict[int, list[str]]

    def raise_if_failed(self, *, source: str | None = None) -> None:
        """FAIL mode: raise DataQualityError counting rows per broken rule (no values)."""
        if not self.failures:
            return
        counts = Counter(reason for reasons in self.failures.values() for reason in reasons)
        summary = ", ".join(f"{reason} ({n})" for reason, n in counts.most_common())
        raise DataQualityError(
            f"{len(self.failures)} rows broke the rules: {summary}",
            source=source,
            failures=len(self.failures),
        )


def parse_decimal(s: pd.Series) -> pd.Series:
    """Plain decimal text (no exponent, nan or inf) as float64; NaN where it is not one."""
    values = s.where(s.str.fullmatch(_DECIMAL)).astype("float64")
    return values.where(np.isfinite(values))


def parse_utc_timestamp(s: pd.Series) -> pd.Series:
    """ISO-8601 text with `Z` or an offset as UTC microseconds; NaT if naive or malformed."""
    offset_only = s.where(s.str.fullmatch(_OFFSET_TIMESTAMP))
    parsed = pd.to_datetime(offset_only, utc=True, format="ISO8601", errors="coerce")
    return parsed.dt.as_unit("us")


def parse_iso_date(s: pd.Series) -> pd.Series:
    """`YYYY-MM-DD` text as a midnight timestamp; NaT if malformed or not a real date."""
    parsed = pd.to_datetime(s.where(s.str.fullmatch(_ISO_DATE)), format="%Y-%m-%d", errors="coerce")
    return parsed.dt.as_unit("us")


def parse_sheet_date(s: pd.Series) -> pd.Series:
    """A spreadsheet cell's date text as midnight; NaT unless one of the accepted forms.

    Forms: `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SS` (time dropped), `M/D/YYYY` (US order), or an
    Excel serial number (days since 1899-12-30).
    """
    serial = s.where(s.str.fullmatch(_EXCEL_SERIAL)).astype("float64")
    parsed = (_EXCEL_EPOCH + pd.to_timedelta(serial, unit="D")).dt.as_unit("us")
    for pattern, fmt in (
        (_ISO_DATE, "%Y-%m-%d"),
        (_ISO_DATETIME, "%Y-%m-%dT%H:%M:%S"),
        (_US_DATE, "%m/%d/%Y"),
    ):
        form = pd.to_datetime(s.where(s.str.fullmatch(pattern)), format=fmt, errors="coerce")
        parsed = parsed.fillna(form.dt.as_unit("us"))
    return parsed.dt.normalize()


def _rule(reason: str, check: Callable[..., Any]) -> pa_.Check:
    """A vectorized check whose failures are reported as `reason`; nulls are not its concern."""
    return pa_.Check(check, error=reason)


def _not_flagged(flags: pd.Series) -> pd.Series:
    return ~flags


def _reported_not_before_collected(df: pd.DataFrame) -> pd.Series:
    # A comparison with NaT is False, so rows with a missing or malformed time pass here:
    # those already fail their own column's rule.
    return ~(parse_utc_timestamp(df["reported_at"]) < parse_utc_timestamp(df["collected_at"]))


def _text(*checks: pa_.Check, required: bool = False) -> pa_.Column:
    return pa_.Column(str, list(checks), nullable=not required)


BILLING_CLAIMS = pa_.DataFrameSchema(
    {
        # First occurrence wins, as for the file sources' duplicate keys.
        "claim_id": pa_.Column("Int64", unique=True, report_duplicates="exclude_first"),
        "patient_id": _text(required=True),
        "cpt_code": _text(
            _rule("cpt_code: must be exactly 5 characters", lambda s: s.str.len() == 5),
            required=True,
        ),
        "amount": pa_.Column("float64", _rule("amount: must be > 0", lambda s: s > 0)),
        "status": _text(
            _rule(f"status: must be one of {', '.join(CLAIM_STATUSES)}",
                  lambda s: s.isin(CLAIM_STATUSES)),
            required=True,
        ),
    },
    name="billing_claims",
)
"""Claims from Firebird, with `amount` as a float view of the decimal (only its sign matters)."""

LAB_RESULTS = pa_.DataFrameSchema(
    {
        "result_id": _text(required=True),
        "_duplicate": pa_.Column(bool, _rule("result_id: duplicate within file", _not_flagged)),
        "patient_id": _text(required=True),
        "birth_date": _text(_rule("birth_date: must be a date YYYY-MM-DD",
                                  lambda s: parse_iso_date(s).notna())),
        "test_code": _text(_rule("test_code: must be a LOINC code (digits-digit)",
                                 lambda s: s.str.fullmatch(_LOINC)), required=True),
        "test_system": _text(),
        "test_name": _text(),
        "value": _text(_rule("value: must be a decimal number",
                             lambda s: parse_decimal(s).notna()), required=True),
        "unit": _text(),
        "ref_low": _text(_rule("ref_low: must be a decimal number",
                               lambda s: parse_decimal(s).notna())),
        "ref_high": _text(_rule("ref_high: must be a decimal number",
                                lambda s: parse_decimal(s).notna())),
        "collected_at": _text(_rule("collected_at: must be ISO-8601 with Z or an offset",
                                    lambda s: parse_utc_timestamp(s).notna()), required=True),
        "reported_at": _text(_rule("reported_at: must be ISO-8601 with Z or an offset",
                                   lambda s: parse_utc_timestamp(s).notna()), required=True),
        "status": _text(_rule(f"status: must be one of {', '.join(LAB_STATUSES)}",
                              lambda s: s.isin(LAB_STATUSES)), required=True),
    },
    checks=[_rule("reported_at: must not be before collected_at", _reported_not_before_collected)],
    name="lab_results",
)
"""Lab results as stripped text (empty = null) plus the extractor's `_duplicate` flag."""


def patient_registrations_schema(today: datetime.date | None = None) -> pa_.DataFrameSchema:
    """The registration schema; `today` bounds birth dates (None: the date at validation)."""
    date_forms = "must be a date (YYYY-MM-DD, M/D/YYYY or an Excel serial)"

    def born_from_1900_to_today(s: pd.Series) -> pd.Series:
        born = parse_sheet_date(s)
        limit = pd.Timestamp(today or datetime.date.today())
        # NaT compares False both ways: a malformed date fails only its form rule.
        return ~((born < pd.Timestamp("1900-01-01")) | (born > limit))

    return pa_.DataFrameSchema(
        {
            "mrn": _text(required=True),
            "_duplicate": pa_.Column(bool, _rule("mrn: duplicate within file", _not_flagged)),
            "first_name": _text(),
            "last_name": _text(),
            "date_of_birth": _text(
                _rule(f"date_of_birth: {date_forms}", lambda s: parse_sheet_date(s).notna()),
                _rule("date_of_birth: must be from 1900-01-01 to today", born_from_1900_to_today),
                required=True,
            ),
            "sex": _text(_rule(f"sex: must be one of {', '.join(SEXES)}",
                               lambda s: s.isin(SEXES)), required=True),
            "zip": _text(_rule("zip: must be exactly 5 digits",
                               lambda s: s.str.fullmatch(r"[0-9]{5}")), required=True),
            "phone": _text(),
            "registration_date": _text(
                _rule(f"registration_date: {date_forms}", lambda s: parse_sheet_date(s).notna()),
                required=True,
            ),
            "clinic": _text(),
            "insurance_id": _text(),
        },
        name="patient_registrations",
    )


PATIENT_REGISTRATIONS = patient_registrations_schema()
"""Registrations as stripped text (empty = null, ZIP padded) plus the `_duplicate` flag."""

# pandera's own names for its built-in checks, as reasons.
_BUILTIN_REASONS = {"not_nullable": "{column}: required",
                    "field_uniqueness": "{column}: duplicate within chunk"}


def validate_batch(df: pd.DataFrame, schema: pa_.DataFrameSchema) -> Report:
    """Check every rule on every row (pandera lazy mode) and list each failed row's reasons.

    A failure that names no row (a missing column, a wrong dtype) means the frame itself does
    not fit the schema; that is a FatalError, since no row can be judged.
    """
    try:
        schema.validate(df, lazy=True)
    except pa_.errors.SchemaErrors as exc:
        cases = exc.failure_cases.sort_index()
    else:
        return Report(valid=df, failures={})
    frame_level = cases[cases["index"].isna()]
    if not frame_level.empty:
        problems = sorted({_frame_problem(c.column, c.check, c.failure_case)
                           for c in frame_level.itertuples()})
        raise FatalError(f"frame does not fit schema {schema.name}: {'; '.join(problems)}")
    failures: dict[int, list[str]] = {}
    # `failure_case` (the offending value) is deliberately never read for row failures.
    # Plain lists: iterating Arrow-backed columns item by item is many times slower.
    rows = zip(cases["column"].tolist(), cases["check"].tolist(), cases["index"].tolist(),
               strict=True)
    for column, check, index in rows:
        template = _BUILTIN_REASONS.get(check)
        reason = template.format(column=column) if template else check
        reasons = failures.setdefault(int(index), [])
        if reason not in reasons:
            reasons.append(reason)
    valid = df[~df.index.isin(list(failures))]
    return Report(valid=valid, failures=failures)


def _frame_problem(column: str, check: str, failure_case: object) -> str:
    """A frame-level failure in words; `failure_case` is read only where it is a column name."""
    if check == "column_in_dataframe":
        return f"missing column {failure_case}"
    # A check that raised has the exception text, which may quote values, as its failure_case.
    return check if check.startswith(f"{column}:") else f"{column}: {check}"
