"""Declared datasets judged by their rules (rules.py): column types read from text, the rules
compiled once per dataset to pandera checks, typed rows built from what passed.

A staged chunk's column is text (file readers) or already typed (Firebird). Text is stripped
(empty = null) and parsed once by its column's type; a value that does not parse fails the
type's rule ("value: must be a decimal number") and is null for every other rule, so a row
gets one reason per thing wrong with it. Typed columns are cast to the declared type. Rules
then run on the parsed values, vectorized, in one pandera validation per chunk; the valid
rows keep the parsed values (decimals with a scale exactly, from their text).
"""

from __future__ import annotations

import datetime
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pandas as pd
import pandera.pandas as pa_
import pyarrow as pa
import pyarrow.compute as pc

from etl_tasks.datasets import DatasetConfig
from etl_tasks.errors import FatalError
from etl_tasks.rules import (
    FAMILY,
    Compare,
    InSet,
    NotNull,
    Pattern,
    Range,
    Unique,
    type_parts,
)
from etl_tasks.sources import files
from etl_tasks.validate import (
    parse_decimal,
    parse_iso_date,
    parse_sheet_date,
    parse_utc_timestamp,
    validate_batch,
)

_UTC = pa.timestamp("us", tz="UTC")
_INTEGER = r"[+-]?[0-9]{1,18}"  # int64 holds every 18-digit number
_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "y": True, "n": False,
             "t": True, "f": False, "1": True, "0": False}
# The words of the built-in rules where a type says the same thing, so a dataset declared
# like a built-in one gives the same reasons.
_EXPECTS = {
    "integer": "must be an integer",
    "decimal": "must be a decimal number",
    "date": "must be a date YYYY-MM-DD",
    "sheet_date": "must be a date (YYYY-MM-DD, M/D/YYYY or an Excel serial)",
    "timestamptz": "must be ISO-8601 with Z or an offset",
    "boolean": "must be true or false",
}
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">=": operator.ge, ">": operator.gt}


@dataclass(frozen=True)
class ColumnType:
    """A declared column type: how its text is read, what Arrow type it is stored as."""

    name: str
    precision: int | None = None
    scale: int | None = None

    @classmethod
    def of(cls, text: str) -> ColumnType:
        return cls(*type_parts(text))

    @property
    def family(self) -> str:
        return FAMILY[self.name]

    @property
    def exact(self) -> bool:
        """A decimal with a scale: stored exactly, made from its text, not its float view."""
        return self.scale is not None

    @property
    def arrow(self) -> pa.DataType:
        if self.exact:
            return pa.decimal128(self.precision or 38, self.scale or 0)
        return {"text": pa.string(), "integer": pa.int64(), "decimal": pa.float64(),
                "date": pa.date32(), "sheet_date": pa.date32(), "timestamptz": _UTC,
                "boolean": pa.bool_()}[self.name]

    @property
    def expects(self) -> str:
        if self.exact:
            whole = (self.precision or 0) - (self.scale or 0)
            return (f"must be a decimal number with at most {whole} digits before the point "
                    f"and {self.scale} after")
        return _EXPECTS[self.name]

    def _decimal_pattern(self) -> str:
        whole, scale = (self.precision or 0) - (self.scale or 0), self.scale or 0
        digits = f"0*[0-9]{{1,{whole}}}" if whole else "0*"
        fraction = rf"(?:\.[0-9]{{0,{scale}}}0*)?" if scale else r"(?:\.0*)?"
        return rf"[+-]?(?:{digits}{fraction}|\.[0-9]{{1,{scale}}}0*)" if scale else (
            rf"[+-]?{digits}{fraction}")

    def parse(self, text: pd.Series) -> pd.Series:
        """Stripped text (None = null) as this type's values for the rules; null where a value
        does not read as one. Exact decimals give their float view (rules compare it)."""
        if self.name == "text":
            return text
        if self.name == "integer":
            # Arrow reads no leading "+".
            digits = text.where(text.str.fullmatch(_INTEGER)).str.removeprefix("+")
            # Through Arrow, not float: an 18-digit number keeps every digit.
            array = pc.cast(pa.array(digits, pa.string(), from_pandas=True), pa.int64())
            return pd.Series(array.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get),
                             index=text.index)
        if self.name == "decimal":
            if self.exact:
                text = text.where(text.str.fullmatch(self._decimal_pattern()))
            return parse_decimal(text)
        if self.name == "date":
            return parse_iso_date(text)
        if self.name == "sheet_date":
            return parse_sheet_date(text)
        if self.name == "timestamptz":
            return parse_utc_timestamp(text)
        return text.str.lower().map(_BOOLEANS).astype("boolean")

    def view(self, typed: pa.Array | pa.ChunkedArray) -> pd.Series:
        """An Arrow column already of this type as the values the rules see."""
        if self.exact:
            typed = pc.cast(typed, pa.float64())
        if self.name == "integer":
            return typed.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
        if self.name == "boolean":
            return typed.to_pandas(types_mapper={pa.bool_(): pd.BooleanDtype()}.get)
        series = typed.to_pandas(date_as_object=False)
        return series.dt.as_unit("us") if self.family in ("date", "timestamp") else series


@dataclass(frozen=True)
class Verdict:
    """A judged chunk: typed valid rows (with `source_ref`), failed rows' reasons by input
    position, and every row's source pointer."""

    valid: pa.Table
    failures: dict[int, list[str]]
    source_ref: pa.Array | pa.ChunkedArray


def text_input_schema(columns: tuple[str, ...]) -> pa.Schema:
    """The staged contract of a declared dataset read from files: its columns as text."""
    return files.text_schema(columns)


def key_refs(table: pa.Table, key: tuple[str, ...]) -> pa.Array | pa.ChunkedArray:
    """Each row's pointer: the staged `_source_ref`, else `<KEY>=<value>` (as for claims)."""
    if "_source_ref" in table.column_names:
        return table["_source_ref"]
    if not key:  # no key: the row's place in its chunk
        return pa.array([f"ROW={n}" for n in range(1, table.num_rows + 1)], pa.string())
    parts = [pc.binary_join_element_wise(f"{name.upper()}=", pc.cast(table[name], pa.string()),
                                         "", null_handling="replace", null_replacement="NULL")
             for name in key]
    return parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, ",")


def _text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    stripped = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(stripped, ""), None, stripped)


class Compiled:
    """A declared dataset's types and rules, compiled once; `judge` runs them on a chunk."""

    def __init__(self, config: DatasetConfig) -> None:
        self.config = config
        self.types = {name: ColumnType.of(text) for name, text in config.columns.items()}
        self.file_key = next((tuple(r.columns) for r in config.rules
                              if isinstance(r, Unique) and r.scope == "file"), ())
        self._schemas: dict[datetime.date | None, pa_.DataFrameSchema] = {}

    def schema(self, today: datetime.date | None = None) -> pa_.DataFrameSchema:
        """The pandera schema; `today` fixes date bounds' `today` (None: the validation date,
        read when a chunk is checked, so one schema serves every day)."""
        if today not in self._schemas:
            self._schemas[today] = self._build(today)
        return self._schemas[today]

    def _build(self, today: datetime.date | None) -> pa_.DataFrameSchema:
        checks: dict[str, list[pa_.Check]] = {name: [] for name in self.types}
        frame_checks: list[pa_.Check] = []
        for rule in self.config.rules:
            reason = self._reason(rule)
            if isinstance(rule, NotNull):
                frame_checks.append(_frame_check(self._present(rule.column), reason))
            elif isinstance(rule, Unique):
                frame_checks.append(_frame_check(_unique(rule), reason))
            elif isinstance(rule, Compare):
                frame_checks.append(_frame_check(_compare(rule), reason))
            else:
                checks[rule.column].append(pa_.Check(self._element(rule, today), error=reason))
        columns = {name: pa_.Column(None, checks[name], nullable=True) for name in self.types}
        for name, ctype in self.types.items():
            if ctype.name != "text":  # the values that did not read as their type
                columns[f"{name}:unread"] = pa_.Column(
                    bool, pa_.Check(lambda s: ~s, error=f"{name}: {ctype.expects}"))
        columns["_duplicate"] = pa_.Column(bool)
        return pa_.DataFrameSchema(columns, checks=frame_checks, name=self.config.name)

    def _reason(self, rule: Any) -> str:
        return str(rule.reason(self.types[rule.columns_used()[0]].family))

    def _present(self, column: str) -> Callable[[pd.DataFrame], pd.Series]:
        """A value was given: one that did not read as its type is present (its type's rule
        says what is wrong with it), not missing."""
        if self.types[column].name == "text":
            return lambda df: df[column].notna()
        return lambda df: df[column].notna() | df[f"{column}:unread"]

    def _element(self, rule: Any, today: datetime.date | None) -> Callable[[pd.Series], Any]:
        """A vectorized check of one column's values (nulls pass: not its concern)."""
        if isinstance(rule, InSet):
            text = self.types[rule.column].family == "text"
            allowed = [str(v) for v in rule.values] if text else list(rule.values)
            return lambda s: s.isin(allowed)
        if isinstance(rule, Pattern):
            pattern = re.compile(rule.pattern)
            return lambda s: s.str.fullmatch(pattern)
        if isinstance(rule, Range):
            def within(s: pd.Series) -> pd.Series:
                ok = pd.Series(True, index=s.index)
                for bound, op in ((rule.min, operator.ge), (rule.above, operator.gt),
                                  (rule.max, operator.le), (rule.below, operator.lt)):
                    if bound is not None:
                        ok &= op(s, bound)
                return ok
            return within
        timestamp = self.types[rule.column].family == "timestamp"

        def dated(s: pd.Series) -> pd.Series:
            ok = pd.Series(True, index=s.index)
            if rule.not_before is not None:
                ok &= s >= _instant(rule.not_before, today, timestamp)
            if rule.not_after is not None:
                # A timestamp is "not after" a day until that day's end (UTC).
                day = _instant(rule.not_after, today, timestamp)
                ok &= (s < day + pd.Timedelta(days=1)) if timestamp else (s <= day)
            return ok
        return dated

    def judge(self, table: pa.Table, today: datetime.date | None = None) -> Verdict:
        missing = [name for name in self.types if name not in table.column_names]
        if missing:
            raise FatalError(f"staged chunk lacks columns {missing}", source=self.config.name)
        source_ref = key_refs(table, tuple(self.config.key))
        values: dict[str, pd.Series] = {}
        flags: dict[str, pd.Series] = {}
        exact: dict[str, pa.ChunkedArray] = {}
        for name, ctype in self.types.items():
            column = table[name]
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                text = _text(column)
                values[name] = ctype.parse(text.to_pandas())
                if ctype.name != "text":
                    flags[f"{name}:unread"] = pd.Series(
                        (pc.is_valid(text).to_numpy(zero_copy_only=False)
                         & values[name].isna().to_numpy()), dtype=bool)
                if ctype.exact:
                    exact[name] = text
            else:
                try:
                    typed = pc.cast(column, ctype.arrow)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    # `from None`: Arrow's message may quote the value (patient data).
                    raise FatalError(f"staged column {name} cannot be read as {ctype.name}",
                                     source=self.config.name) from None
                values[name] = ctype.view(typed)
                flags[f"{name}:unread"] = pd.Series(False, index=range(table.num_rows))
                exact[name] = typed
        frame = pd.DataFrame(values).reset_index(drop=True)
        for name, flag in flags.items():
            frame[name] = flag.to_numpy()
        frame["_duplicate"] = self._file_duplicates(table, frame)
        report = validate_batch(frame, self.schema(today))
        failures = _undecodable(table, report.failures)
        rows = report.valid[~report.valid.index.isin(list(failures))]
        positions = pa.array(rows.index.to_numpy(), pa.int64())
        columns = {}
        for name, ctype in self.types.items():
            if name in exact:
                columns[name] = pc.cast(exact[name].take(positions), ctype.arrow)
            else:
                columns[name] = pa.Array.from_pandas(rows[name], type=ctype.arrow)
        columns["source_ref"] = source_ref.take(positions)
        return Verdict(pa.table(columns), failures, source_ref)

    def _file_duplicates(self, table: pa.Table, frame: pd.DataFrame) -> Any:
        """The readers' flag of a repeat earlier in the file; without one (a Firebird chunk)
        a repeat within the chunk."""
        if "_duplicate" in table.column_names:
            return pc.fill_null(table["_duplicate"], False).to_numpy(zero_copy_only=False)
        if not self.file_key:
            return False
        return _repeats(frame, list(self.file_key)).to_numpy()


UNDECODABLE = "_undecodable"
"""A staged marker column (Firebird ranges read in a legacy character set): per row, the
"; "-joined names of its text columns whose bytes were not valid there, or null."""


def _undecodable(table: pa.Table, failures: dict[int, list[str]]) -> dict[int, list[str]]:
    """The failures plus one reason per column a row's UNDECODABLE marker names."""
    if UNDECODABLE not in table.column_names:
        return failures
    marked = table[UNDECODABLE]
    merged = {row: list(reasons) for row, reasons in failures.items()}
    for row in pc.indices_nonzero(pc.is_valid(marked)).to_pylist():
        for name in str(marked[row].as_py()).split("; "):
            merged.setdefault(row, []).append(
                f"{name.lower()}: not valid text in the source's character set")
    return dict(sorted(merged.items()))


def _instant(bound: Any, today: datetime.date | None, timestamp: bool) -> pd.Timestamp:
    day = (today or datetime.datetime.now(datetime.UTC).date()) if bound == "today" else bound
    return pd.Timestamp(day, tz="UTC") if timestamp else pd.Timestamp(day)


def _frame_check(check: Callable[[pd.DataFrame], pd.Series], reason: str) -> pa_.Check:
    # ignore_na off: the check decides about nulls itself (they pass).
    return pa_.Check(check, error=reason, ignore_na=False)


def _repeats(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Rows whose (non-null) values of `columns` appeared on an earlier row; first one wins."""
    return frame.duplicated(subset=columns, keep="first") & frame[columns].notna().all(axis=1)


def _unique(rule: Unique) -> Callable[[pd.DataFrame], pd.Series]:
    if rule.scope == "file":
        return lambda df: ~df["_duplicate"]
    return lambda df: ~_repeats(df, list(rule.columns))


def _compare(rule: Compare) -> Callable[[pd.DataFrame], pd.Series]:
    op = _OPS[rule.op]

    def holds(df: pd.DataFrame) -> pd.Series:
        left, right = df[rule.left], df[rule.right]
        both = (left.notna() & right.notna()).to_numpy(dtype=bool)
        # Compared only where both sides are there (text compared with None would raise).
        ok = pd.Series(True, index=df.index)
        ok[both] = op(left[both], right[both]).to_numpy(dtype=bool)
        return ok
    return holds


@lru_cache(maxsize=64)
def _keyed_schema(key: tuple[str, ...]) -> pa_.DataFrameSchema:
    columns = {name: pa_.Column(None, pa_.Check(lambda s: s.notna(), error=f"{name}: required",
                                                ignore_na=False), nullable=True)
               for name in key}
    duplicate = _frame_check(lambda df: ~_repeats(df, list(key)),
                             f"{', '.join(key)}: duplicate within chunk")
    return pa_.DataFrameSchema(columns, checks=[duplicate], name="generic")


def judge_keyed(table: pa.Table, key: tuple[str, ...]) -> Verdict:
    """A generic table's chunk: its staged types kept as they are; a row whose key is null or
    repeats within the chunk cannot be upserted and is quarantined."""
    missing = [name for name in key if name not in table.column_names]
    if missing:
        raise FatalError(f"staged chunk lacks its key columns {missing}")
    source_ref = key_refs(table, key)
    # Arrow-backed: a 19-digit key stays exact (a float64 view could make two keys equal).
    frame = table.select(list(key)).to_pandas(types_mapper=pd.ArrowDtype)
    if key:
        report = validate_batch(frame, _keyed_schema(key))
        failures, index = report.failures, report.valid.index
    else:  # the whole row is the key: nothing to judge
        failures, index = {}, pd.RangeIndex(table.num_rows)
    failures = _undecodable(table, failures)
    keep = index[~index.isin(list(failures))]
    positions = pa.array(keep.to_numpy(), pa.int64())
    data = table.select([n for n in table.column_names if not n.startswith("_")])
    valid = data.take(positions).append_column("source_ref", source_ref.take(positions))
    return Verdict(valid, failures, source_ref)
