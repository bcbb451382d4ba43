"""A Firebird table's columns and types, read from its system tables at plan time.

`reflect` reads RDB$RELATION_FIELDS joined to RDB$FIELDS (and the column's character set) in
field position order; the plan records the result with the run, so every range of a run reads
the same columns even if the table changes meanwhile. Each Firebird type maps to the Arrow
type its text is parsed as and the DuckDB type of the target column: exact decimals stay
decimals, INT128 becomes HUGEINT, timestamps with a time zone become UTC instants. A type the
range text cannot carry exactly (binary blobs, OCTETS text, arrays) stops the plan naming the
column, which the source can leave out (`exclude_columns`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa

from etl_tasks.errors import FatalError

# RDB$FIELDS.RDB$FIELD_TYPE codes (Firebird's blr types).
SMALLINT, INTEGER, QUAD, FLOAT, DATE, TIME, CHAR, INT64 = 7, 8, 9, 10, 12, 13, 14, 16
BOOLEAN, DECFLOAT16, DECFLOAT34, INT128, DOUBLE = 23, 24, 25, 26, 27
TIME_TZ, TIMESTAMP_TZ, TIMESTAMP, VARCHAR, CSTRING, BLOB = 28, 29, 35, 37, 40, 261
_INTEGERS = {SMALLINT: ("SMALLINT", pa.int16(), 4), INTEGER: ("INTEGER", pa.int32(), 9),
             INT64: ("BIGINT", pa.int64(), 18), INT128: ("INT128", None, 38)}
_TEXT_TYPES = (CHAR, VARCHAR, CSTRING)

DUCKDB_TYPE = b"etl.duckdb_type"
"""Arrow field metadata naming the DuckDB type a staged column is stored as, where DuckDB
would not infer it from the Arrow type (INT128 travels as its exact digits)."""

_REFLECT = """SELECT TRIM(rf.RDB$FIELD_NAME), f.RDB$FIELD_TYPE, f.RDB$FIELD_SUB_TYPE,
    f.RDB$FIELD_SCALE, f.RDB$FIELD_PRECISION, f.RDB$CHARACTER_LENGTH,
    TRIM(cs.RDB$CHARACTER_SET_NAME), f.RDB$DIMENSIONS,
    COALESCE(rf.RDB$NULL_FLAG, f.RDB$NULL_FLAG, 0)
FROM RDB$RELATION_FIELDS rf JOIN RDB$FIELDS f ON f.RDB$FIELD_NAME = rf.RDB$FIELD_SOURCE
LEFT JOIN RDB$CHARACTER_SETS cs ON cs.RDB$CHARACTER_SET_ID = f.RDB$CHARACTER_SET_ID
WHERE rf.RDB$RELATION_NAME = ? ORDER BY rf.RDB$FIELD_POSITION"""


@dataclass(frozen=True)
class Column:
    """One column as RDB$FIELDS describes it; what it becomes is derived from that."""

    name: str  # as Firebird spells it
    type_code: int
    sub_type: int = 0
    scale: int = 0
    precision: int = 0
    length: int = 0  # characters, for CHAR and VARCHAR
    charset: str = ""  # declared character set of text (NONE when undeclared)
    dimensions: int = 0  # an array column has dimensions
    not_null: bool = False

    @property
    def staged_name(self) -> str:
        """The column's name in staged chunks and DuckDB."""
        return self.name.lower()

    @property
    def is_text(self) -> bool:
        """Quoted in the range text: values that may hold commas, quotes and newlines."""
        return self.type_code in _TEXT_TYPES or (self.type_code == BLOB and self.sub_type == 1)

    @property
    def is_integer_key(self) -> bool:
        """Usable for key ranges by arithmetic (lo..hi) rather than sampled boundaries."""
        return self.type_code in (SMALLINT, INTEGER, INT64) and not self.is_decimal

    @property
    def is_decimal(self) -> bool:
        return self.type_code in _INTEGERS and (self.scale < 0 or self.sub_type in (1, 2))

    @property
    def declared(self) -> str:
        """The Firebird type in words, for messages."""
        if self.is_decimal:
            kind = "DECIMAL" if self.sub_type == 2 else "NUMERIC"
            return f"{kind}({self.precision or _INTEGERS[self.type_code][2]},{-self.scale})"
        if self.type_code in _INTEGERS:
            return _INTEGERS[self.type_code][0]
        if self.type_code in _TEXT_TYPES:
            kind = "CHAR" if self.type_code == CHAR else "VARCHAR"
            return f"{kind}({self.length}) CHARACTER SET {self.charset or 'NONE'}"
        if self.type_code == BLOB:
            return f"BLOB SUB_TYPE {self.sub_type}" + (
                f" CHARACTER SET {self.charset or 'NONE'}" if self.sub_type == 1 else "")
        return _NAMES.get(self.type_code, f"type {self.type_code}")

    @property
    def readable(self) -> bool:
        """Can the range text carry its values exactly?"""
        if self.dimensions or self.charset == "OCTETS":
            return False
        if self.type_code == BLOB:
            return self.sub_type == 1
        return self.type_code in _INTEGERS or self.type_code in _ARROW or self.is_text

    @property
    def arrow(self) -> pa.DataType:
        """The staged type: what the column's text is parsed as."""
        if self.is_decimal:
            return pa.decimal128(self.precision or _INTEGERS[self.type_code][2], -self.scale)
        if self.type_code in _INTEGERS:
            # INT128 has 39 digits, past Arrow's 38-digit decimal: staged as its exact digits
            # and stored as HUGEINT (see `duckdb`).
            return _INTEGERS[self.type_code][1] or pa.string()
        return _ARROW.get(self.type_code, pa.string())

    @property
    def duckdb(self) -> str | None:
        """The target type when DuckDB would not infer it from `arrow`."""
        return "HUGEINT" if self.type_code == INT128 and not self.is_decimal else None

    def field(self) -> pa.Field:
        meta = {DUCKDB_TYPE: self.duckdb.encode()} if self.duckdb else None
        return pa.field(self.staged_name, self.arrow, metadata=meta)



_NAMES = {FLOAT: "FLOAT", DOUBLE: "DOUBLE PRECISION", DATE: "DATE", TIME: "TIME",
          TIMESTAMP: "TIMESTAMP", TIME_TZ: "TIME WITH TIME ZONE",
          TIMESTAMP_TZ: "TIMESTAMP WITH TIME ZONE", BOOLEAN: "BOOLEAN",
          DECFLOAT16: "DECFLOAT(16)", DECFLOAT34: "DECFLOAT(34)", QUAD: "QUAD"}
_ARROW: dict[int, pa.DataType] = {
    FLOAT: pa.float32(), DOUBLE: pa.float64(), DATE: pa.date32(),
    # Firebird keeps a tenth of a millisecond; microseconds hold it exactly.
    TIME: pa.time64("us"), TIMESTAMP: pa.timestamp("us"),
    TIMESTAMP_TZ: pa.timestamp("us", tz="UTC"), BOOLEAN: pa.bool_(),
    # No Arrow or DuckDB type holds these exactly: their text is kept ("1.5", "10:00 +02:00").
    DECFLOAT16: pa.string(), DECFLOAT34: pa.string(), TIME_TZ: pa.string(),
}


@dataclass(frozen=True)
class TableSchema:
    """The columns a run reads from a table, in field position order."""

    table: str
    columns: tuple[Column, ...]
    engine_major: int = 5
    """Firebird's major version: before 4 there is no DECFLOAT to print doubles exactly."""
    charset: str = ""
    """The character set the table's text is read in (`SourceConfig.charset`); empty: the
    one its text columns declare when they agree, else UTF8 (see `text_charset`)."""

    @property
    def text_charset(self) -> str:
        """What the range text is decoded with: undeclared (NONE) text is taken to be in it,
        and declared text in another character set is converted to it by Firebird."""
        if self.charset:
            return self.charset.upper()
        declared = {c.charset for c in self.columns if c.is_text} - {"", "NONE"}
        return declared.pop() if len(declared) == 1 else "UTF8"

    def column(self, name: str) -> Column | None:
        """A column by its name in any case (config names are plain identifiers)."""
        for column in self.columns:
            if column.name == name or column.name.upper() == name.upper():
                return column
        return None

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([c.field() for c in self.columns])

    def readable(self, source: str) -> TableSchema:
        """The schema itself, or a FatalError naming the first column the range text cannot
        carry exactly (binary blobs, OCTETS text, arrays)."""
        for column in self.columns:
            if not column.readable:
                raise FatalError(f"source {source}: column {column.name} of table {self.table} "
                                 f"is {column.declared}, which the pipeline cannot read "
                                 "exactly; leave it out with `exclude_columns`", source=source)
        return self

    def without(self, names: list[str], source: str) -> TableSchema:
        """The schema less the excluded columns (each must exist)."""
        dropped = set()
        for name in names:
            column = self.column(name)
            if column is None:
                raise FatalError(f"source {source}: excluded column {name} is not a column of "
                                 f"table {self.table}", source=source)
            dropped.add(column.name)
        kept = tuple(c for c in self.columns if c.name not in dropped)
        return replace(self, columns=kept)

    def to_json(self) -> str:
        return json.dumps({"table": self.table, "engine_major": self.engine_major,
                           "charset": self.charset, "columns": [asdict(c) for c in self.columns]})

    @classmethod
    def from_json(cls, text: str | bytes) -> TableSchema:
        data: dict[str, Any] = json.loads(text)
        return cls(data["table"], tuple(Column(**c) for c in data["columns"]),
                   int(data.get("engine_major", 5)), str(data.get("charset", "")))


def reflect(con: Any, table: str, *, source: str = "firebird") -> TableSchema:
    """Every column of the table from the system tables; a FatalError naming the source and
    table when it has none (there is no such table)."""
    cur = con.cursor()
    try:
        rows = []
        # Unquoted names are stored in upper case: "patient_visits" means PATIENT_VISITS.
        for name in dict.fromkeys((table, table.upper())):
            cur.execute(_REFLECT, (name,))
            rows = cur.fetchall()
            if rows:
                table = name
                break
        cur.execute("SELECT rdb$get_context('SYSTEM', 'ENGINE_VERSION') FROM RDB$DATABASE")
        (version,) = cur.fetchone()
    finally:
        cur.close()
    if not rows:
        raise FatalError(f"source {source}: table {table} does not exist in the Firebird "
                         "database (check the source's location)", source=source)
    return TableSchema(table, tuple(_column(row) for row in rows),
                       int(str(version).split(".")[0]))


def _column(row: tuple[Any, ...]) -> Column:
    name, type_code, sub_type, scale, precision, length, charset, dimensions, not_null = row
    return Column(name=str(name), type_code=int(type_code), sub_type=int(sub_type or 0),
                  scale=int(scale or 0), precision=int(precision or 0), length=int(length or 0),
                  charset=str(charset or ""), dimensions=int(dimensions or 0),
                  not_null=bool(not_null))
