"""Turn one staged chunk into typed valid rows and quarantined rows: pure, no IO, no settings.

Each input row ends in exactly one of the two tables. Valid rows take the loader's
OUTPUT_SCHEMAS; a quarantined row keeps a pointer to its source, its broken rules and its raw
values as JSON.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from etl_tasks import checks, datasets
from etl_tasks.datasets import DatasetSpec
from etl_tasks.errors import FatalError
from etl_tasks.validate import (
    BILLING_CLAIMS,
    LAB_RESULTS,
    PATIENT_REGISTRATIONS,
    Report,
    parse_decimal,
    parse_iso_date,
    parse_sheet_date,
    parse_utc_timestamp,
    patient_registrations_schema,
    validate_batch,
)

Dataset = Literal["billing_claims", "lab_results", "patient_registrations"]

_UTC = pa.timestamp("us", tz="UTC")
# Non-ASCII text stays readable in the raw JSON (µmol/L, not \u00b5mol/L).
_RAW_JSON = json.JSONEncoder(ensure_ascii=False)
_LAB_TEXT = ("result_id", "patient_id", "birth_date", "test_code", "test_system", "test_name",
             "value", "unit", "ref_low", "ref_high", "collected_at", "reported_at", "status")
_REGISTRATION_TEXT = ("mrn", "first_name", "last_name", "date_of_birth", "sex", "zip", "phone",
                      "registration_date", "clinic", "insurance_id")
_FILE_MARKERS = [("_source_ref", pa.string()), ("_duplicate", pa.bool_())]

_INPUT_SCHEMAS: dict[str, pa.Schema] = {
    "billing_claims": pa.schema([
        ("claim_id", pa.int64()), ("patient_id", pa.string()), ("provider_npi", pa.string()),
        ("service_date", pa.date32()), ("cpt_code", pa.string()), ("icd10_code", pa.string()),
        ("amount", pa.decimal128(12, 2)), ("payer", pa.string()), ("status", pa.string()),
        ("updated_at", pa.timestamp("us")),
    ]),
    "lab_results": pa.schema([(name, pa.string()) for name in _LAB_TEXT] + _FILE_MARKERS),
    "patient_registrations": pa.schema(
        [(name, pa.string()) for name in _REGISTRATION_TEXT] + _FILE_MARKERS
    ),
}

OUTPUT_SCHEMAS: dict[str, pa.Schema] = {
    "billing_claims": _INPUT_SCHEMAS["billing_claims"].append(pa.field("source_ref", pa.string())),
    "lab_results": pa.schema([
        ("result_id", pa.string()), ("patient_id", pa.string()), ("birth_date", pa.date32()),
        ("test_code", pa.string()), ("test_system", pa.string()), ("test_name", pa.string()),
        ("value", pa.float64()), ("unit", pa.string()), ("ref_low", pa.float64()),
        ("ref_high", pa.float64()), ("collected_at", _UTC), ("reported_at", _UTC),
        ("status", pa.string()), ("source_ref", pa.string()),
    ]),
    "patient_registrations": pa.schema([
        ("mrn", pa.string()), ("first_name", pa.string()), ("last_name", pa.string()),
        ("date_of_birth", pa.date32()), ("sex", pa.string()), ("zip", pa.string()),
        ("phone", pa.string()), ("registration_date", pa.date32()), ("clinic", pa.string()),
        ("insurance_id", pa.string()), ("source_ref", pa.string()),
    ]),
}
"""Typed columns of the valid rows per dataset; the loader creates its tables from these."""

QUARANTINE_SCHEMA = pa.schema([
    ("source_ref", pa.string()),
    ("reasons", pa.string()),  # broken rules, "; "-joined
    ("raw", pa.string()),  # JSON object of the row's input values as text or null
])
"""Columns of the quarantined rows, the same for every dataset."""


@dataclass(frozen=True)
class TransformResult:
    """A chunk split in two: typed valid rows and quarantined rows with their reasons."""

    valid: pa.Table
    quarantined: pa.Table


def transform_chunk(
    dataset: Dataset | str | DatasetSpec, table: pa.Table, *, today: datetime.date | None = None
) -> TransformResult:
    """Validate every row of a staged chunk and split it into typed valid and quarantined rows.

    `dataset` is a built-in's name, or any dataset's spec or name (datasets.py): a declared
    dataset is judged by its rules, a generic table by its key. `today` bounds birth dates
    and `today` in declared date bounds (None: the date at validation).
    """
    if isinstance(dataset, DatasetSpec) or dataset not in _INPUT_SCHEMAS:
        spec = dataset if isinstance(dataset, DatasetSpec) else datasets.lookup(dataset)
        if not spec.builtin:
            verdict = spec.judge(table, today)
            quarantined = _quarantine(table, verdict.source_ref, verdict.failures)
            return TransformResult(valid=verdict.valid, quarantined=quarantined)
        dataset = spec.name
    dataset = cast("Dataset", dataset)
    # Read before _conform keeps only the contract's columns: text that was not valid in
    # the table's character set (a Firebird range's marker) quarantines its claim.
    marked = table.select([c for c in table.column_names if c == checks.UNDECODABLE])
    table = _conform(dataset, table)
    if dataset == "billing_claims":
        source_ref = _claim_refs(table["claim_id"])
        report = validate_batch(_billing_frame(table), BILLING_CLAIMS)
        report = replace(report, failures=checks._undecodable(marked, report.failures))
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(report.failures)] = False
        # The valid rows come from the Arrow table itself, so decimals stay exact.
        valid = table.append_column("source_ref", source_ref).filter(pa.array(keep))
    elif dataset == "lab_results":
        source_ref = table["_source_ref"]
        report = validate_batch(_text_frame(table, _LAB_TEXT), LAB_RESULTS)
        valid = _lab_rows(report, source_ref)
    else:
        source_ref = table["_source_ref"]
        frame = _text_frame(table, _REGISTRATION_TEXT)
        frame["zip"] = _pad_zip(frame["zip"])
        schema = PATIENT_REGISTRATIONS if today is None else patient_registrations_schema(today)
        report = validate_batch(frame, schema)
        valid = _registration_rows(report, source_ref)
    quarantined = _quarantine(table, source_ref, report.failures)
    return TransformResult(valid=valid.cast(OUTPUT_SCHEMAS[dataset]), quarantined=quarantined)


def unchecked(dataset: DatasetSpec, table: pa.Table) -> TransformResult:
    """`ETL_RESILIENCE=off` (benchmarks only): a claims chunk in its output types with its
    pointers, every row taken as valid, none judged. Other datasets are judged as always:
    their typing is their validation."""
    if dataset.name != "billing_claims" or not dataset.builtin:
        return transform_chunk(dataset, table)
    table = _conform("billing_claims", table)
    valid = table.append_column("source_ref", _claim_refs(table["claim_id"]))
    return TransformResult(valid=valid.cast(OUTPUT_SCHEMAS["billing_claims"]),
                           quarantined=QUARANTINE_SCHEMA.empty_table())


def _claim_refs(claim_ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A claim's source pointer, `CLAIM_ID=<id>`."""
    return pc.binary_join_element_wise(
        "CLAIM_ID=", pc.cast(claim_ids, pa.string()), "",
        null_handling="replace", null_replacement="NULL",
    )


def _conform(dataset: Dataset, table: pa.Table) -> pa.Table:
    """The chunk's columns in the input contract's order and types, or a FatalError."""
    expected = _INPUT_SCHEMAS[dataset]
    missing = [name for name in expected.names if name not in table.column_names]
    if missing:
        raise FatalError(f"staged chunk lacks columns {missing}", source=dataset)
    columns = []
    for field in expected:
        try:
            columns.append(pc.cast(table[field.name], field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            # `from None`: Arrow's message may quote the offending value, which is patient data.
            raise FatalError(
                f"staged column {field.name} cannot be read as {field.type}", source=dataset
            ) from None
    return pa.table(columns, schema=expected)


def _billing_frame(table: pa.Table) -> pd.DataFrame:
    """The ruled claim columns for pandera, with a float view of the decimal amount."""
    ruled = pa.table({
        "claim_id": table["claim_id"],
        "patient_id": table["patient_id"],
        "cpt_code": table["cpt_code"],
        # Decimals reach pandas as Python objects (slow); the rule needs the sign only.
        "amount": pc.cast(table["amount"], pa.float64()),
        "status": table["status"],
    })
    return ruled.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def _text_frame(table: pa.Table, columns: tuple[str, ...]) -> pd.DataFrame:
    """Whitespace-stripped text columns (empty = null) plus the extractor's duplicate flag."""
    data = {}
    for name in columns:
        stripped = pc.utf8_trim_whitespace(table[name])
        data[name] = pc.if_else(pc.equal(stripped, ""), None, stripped).to_pandas()
    data["_duplicate"] = pc.fill_null(table["_duplicate"], False).to_pandas()
    return pd.DataFrame(data)


def _pad_zip(zips: pd.Series) -> pd.Series:
    """Left-pad 3- and 4-digit ZIPs with zeros: numeric cells lost their leading zeros."""
    return zips.where(~zips.str.fullmatch(r"[0-9]{3,4}"), zips.str.zfill(5))


def _lab_rows(report: Report, source_ref: pa.ChunkedArray) -> pa.Table:
    """Typed lab rows from the validated text."""
    rows = report.valid
    return pa.table({
        "result_id": _arrow(rows["result_id"]),
        "patient_id": _arrow(rows["patient_id"]),
        "birth_date": _arrow(parse_iso_date(rows["birth_date"]), pa.date32()),
        "test_code": _arrow(rows["test_code"]),
        "test_system": _arrow(rows["test_system"]),
        "test_name": _arrow(rows["test_name"]),
        "value": _arrow(parse_decimal(rows["value"]), pa.float64()),
        "unit": _arrow(rows["unit"]),
        "ref_low": _arrow(parse_decimal(rows["ref_low"]), pa.float64()),
        "ref_high": _arrow(parse_decimal(rows["ref_high"]), pa.float64()),
        "collected_at": _arrow(parse_utc_timestamp(rows["collected_at"]), _UTC),
        "reported_at": _arrow(parse_utc_timestamp(rows["reported_at"]), _UTC),
        "status": _arrow(rows["status"]),
        "source_ref": source_ref.take(rows.index.to_numpy()),
    })


def _registration_rows(report: Report, source_ref: pa.ChunkedArray) -> pa.Table:
    """Typed registration rows from the validated text (ZIP already padded)."""
    rows = report.valid
    columns = {name: _arrow(rows[name]) for name in _REGISTRATION_TEXT}
    columns["date_of_birth"] = _arrow(parse_sheet_date(rows["date_of_birth"]), pa.date32())
    columns["registration_date"] = _arrow(
        parse_sheet_date(rows["registration_date"]), pa.date32()
    )
    columns["source_ref"] = source_ref.take(rows.index.to_numpy())
    return pa.table(columns)


def _arrow(values: pd.Series, type_: pa.DataType | None = None) -> pa.Array:
    return pa.Array.from_pandas(values, type=type_ or pa.string())


def _quarantine(
    table: pa.Table, source_ref: pa.ChunkedArray, failures: dict[int, list[str]]
) -> pa.Table:
    """Quarantined rows: source pointer, "; "-joined reasons, raw input values as JSON."""
    rows = sorted(failures)
    positions = pa.array(rows, type=pa.int64())
    # The `_` columns are the extractor's markers, not source values.
    raw_names = [name for name in table.column_names if not name.startswith("_")]
    raw = table.select(raw_names).take(positions)
    as_text = pa.table({name: pc.cast(raw[name], pa.string()) for name in raw_names})
    return pa.table(
        {
            "source_ref": source_ref.take(positions),
            "reasons": ["; ".join(failures[row]) for row in rows],
            "raw": [_RAW_JSON.encode(values) for values in as_text.to_pylist()],
        },
        schema=QUARANTINE_SCHEMA,
    )


# A reason that is a fact about the row's file (an earlier row had its key), not its values.
_DUPLICATE_IN_FILE = ": duplicate within file"
# And one about the source's bytes (checks._undecodable): the raw text has them replaced.
_UNDECODABLE = ": not valid text in the source's character set"


@dataclass(frozen=True)
class Restaged:
    """Quarantined rows read back from their raw values into a staged chunk."""

    table: pa.Table
    """The rows that could be read back, in input order, in the staged chunk's contract."""
    unreadable: dict[int, list[str]]
    """Input position -> why that row could not be read back (no values quoted)."""


def restage_quarantined(
    dataset: Dataset | str | DatasetSpec, raws: Sequence[str], source_refs: Sequence[str],
    reasons: Sequence[str]
) -> Restaged:
    """Rebuild a staged chunk from quarantined rows, the inverse of their raw JSON, so that
    transform_chunk can judge them again by the current rules.

    A row quarantined as a duplicate within its file stays one (the flag is a fact about the
    file), and so does a row whose text was not valid in the source's character set (its raw
    holds the text with the bad bytes replaced, not what the source holds). A row whose raw
    is not an object of text values, whose values no longer read as the contract's types
    (someone edited them), or, for claims, whose claim id no longer gives its source pointer,
    is left out with that reason. A generic table's `dataset` is its spec with the reflected
    types (`datasets.generic_spec(schema=...)`); its name alone does not know them.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else None
    named = spec.name if spec is not None else str(dataset)
    schema = _INPUT_SCHEMAS.get(named) or (spec or datasets.lookup(named)).input_schema()
    if schema is None:
        raise FatalError(f"rows of dataset {named} cannot be read back: the types of its "
                         "staged columns are not known here", source=named)
    names = [name for name in schema.names if not name.startswith("_")]
    unreadable: dict[int, list[str]] = {}
    values: dict[str, list[str | None]] = {name: [] for name in names}
    for position, raw in enumerate(raws):
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not all(v is None or isinstance(v, str)
                                                for v in row.values()):
            unreadable[position] = ["raw: not an object of the row's values as text"]
            row = {}
        for name in names:
            values[name].append(row.get(name))
    columns: dict[str, pa.Array] = {}
    for name in names:
        columns[name] = _read_back(name, values[name], schema.field(name).type, unreadable)
    refs = pa.array(source_refs, pa.string())
    if named == "billing_claims":
        # The pointer is made from the claim id, and the replay finds rows by their pointer.
        # (A row already left out has its reason; a mismatch would only repeat it.)
        same = pc.fill_null(pc.equal(_claim_refs(columns["claim_id"]), refs), False)
        for mismatch in np.flatnonzero(~same.to_numpy(zero_copy_only=False)):
            unreadable.setdefault(int(mismatch), ["claim_id: must match the source pointer"])
    else:
        if "_source_ref" in schema.names:  # else the pointer is made from the key again
            columns["_source_ref"] = refs
        if "_duplicate" in schema.names:
            columns["_duplicate"] = pa.array([_DUPLICATE_IN_FILE in r for r in reasons],
                                             pa.bool_())
    keep = pa.array([p not in unreadable for p in range(len(raws))], pa.bool_())
    table = pa.table(columns, schema=schema)
    marked = [_undecodable_columns(r) for r in reasons]
    if any(marked):
        table = table.append_column(checks.UNDECODABLE, pa.array(marked, pa.string()))
    return Restaged(table.filter(keep), unreadable)


def _undecodable_columns(reasons: str) -> str | None:
    """The columns a row's reasons say were not valid text in the source's character set,
    as the extractor's UNDECODABLE marker names them ("; "-joined); None for none."""
    names = [rule.removesuffix(_UNDECODABLE) for rule in reasons.split("; ")
             if rule.endswith(_UNDECODABLE)]
    return "; ".join(names) or None


def _read_back(name: str, texts: list[str | None], type_: pa.DataType,
               unreadable: dict[int, list[str]]) -> pa.Array:
    """One column of raw text as `type_`; values that do not read as it are noted by row."""
    try:
        return _cast_text(texts, type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # some value does not read: find which, one by one (a rare, small path)
    readable: list[str | None] = []
    for position, text in enumerate(texts):
        try:
            _cast_text([text], type_)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            # Arrow's message quotes the value (patient data): only the rule is kept.
            unreadable.setdefault(position, []).append(f"{name}: cannot be read as {type_}")
            text = None
        readable.append(text)
    return _cast_text(readable, type_)


def _cast_text(texts: list[str | None], type_: pa.DataType) -> pa.Array:
    """Text as `type_`. Arrow casts no text to a time of day: it is read as that time on
    1970-01-01, then the date is dropped (a reflected TIME column's raw is `HH:MM:SS.ffffff`)."""
    column = pa.array(texts, pa.string())
    if pa.types.is_time(type_):
        instant = pc.cast(pc.binary_join_element_wise("1970-01-01 ", column, ""),
                          pa.timestamp("us"))
        return pc.cast(instant, type_)
    return pc.cast(column, type_)
