"""A Firebird range as one text: the expression Firebird writes it with, and its parse.

Reading through firebird-driver row by row costs ~30,000 rows/s; having Firebird build a
range as one CSV text (LIST() of one line per row) and parsing it with Arrow's CSV reader is
faster. The line is generated from the run's TableSchema: text quoted with its quotes
doubled (NULL an empty unquoted field, '' a quoted empty one), CHAR's trailing pad removed,
doubles printed exactly through DECFLOAT(34), timestamps with a time zone as UTC. The text
comes back as bytes (a binary blob), so it is decoded here with the table's character set:
bytes that are not valid in it mark their row in `UNDECODABLE` instead of failing the range.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from etl_tasks.errors import FatalError
from etl_tasks.sources import firebird_schema as fs
from etl_tasks.sources.firebird_schema import Column, TableSchema

UNDECODABLE = "_undecodable"
"""Marker column of a staged range: the names of the row's text columns whose bytes are not
valid in the table's character set ("; "-joined), or null. Only present when some are."""

RANGE_BLOCK_SIZE = 1 << 20
"""Bytes the CSV reader takes at a time (Arrow's default); blocks are parsed in parallel."""

_COLUMN_COUNT = re.compile(r"CSV parse error: (?:Row #\d+: )?Expected \d+ columns, got \d+")
_COLUMN_INDEX = re.compile(r"In CSV column #(\d+): ")
_REPLACEMENT = "\ufffd"

# Firebird character sets and the Python codecs that read them. Undeclared text (NONE) is
# read in the source's configured character set, UTF8 by default.
_CODECS = {"NONE": "utf-8", "UTF8": "utf-8", "UNICODE_FSS": "utf-8", "ASCII": "ascii",
           "KOI8R": "koi8_r", "KOI8U": "koi8_u", "SJIS_0208": "shift_jis",
           "EUCJ_0208": "euc_jp", "BIG_5": "big5", "GB_2312": "gb2312", "KSC_5601": "euc_kr",
           "GBK": "gbk", "GB18030": "gb18030", "TIS620": "tis_620", "CP943C": "cp932"}


def codec(charset: str) -> str:
    """The Python codec of a Firebird character set; a FatalError for one it does not know."""
    name = charset.upper()
    if name in _CODECS:
        return _CODECS[name]
    for prefix, python in (("ISO8859_", "iso8859_"), ("WIN", "cp"), ("DOS", "cp")):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return python + name[len(prefix):]
    raise FatalError(f"unknown Firebird character set {charset!r} (use a Firebird name such "
                     "as UTF8, WIN1252 or ISO8859_1)", source="firebird")


def quote(name: str) -> str:
    """A Firebird identifier, quoted so any reflected name (mixed case, spaces) is exact."""
    return '"' + name.replace('"', '""') + '"'


def column_text(column: Column, schema: TableSchema) -> str:
    """SQL for one field of a row's line: the value's text, quoted if it is text."""
    q = quote(column.name)
    if column.is_text:
        value = f"TRIM(TRAILING FROM {q})" if column.type_code == fs.CHAR else q
        target = schema.text_charset
        if column.charset not in ("", "NONE", target):
            # Declared text in another character set: Firebird converts it to the one the
            # whole text is decoded with. Undeclared (NONE) bytes pass as they are.
            kind = ("BLOB SUB_TYPE TEXT" if column.type_code == fs.BLOB
                    else f"VARCHAR({max(column.length, 1)})")
            value = f"CAST({value} AS {kind} CHARACTER SET {target})"
        # Quote text so commas and quotes survive; NULL stays an empty unquoted field.
        return (f"CASE WHEN {q} IS NULL THEN '' ELSE "
                f"'\"' || REPLACE({value}, '\"', '\"\"') || '\"' END")
    if column.type_code in (fs.FLOAT, fs.DOUBLE) and schema.engine_major >= 4:
        # Firebird prints a double with 16 digits (0.30000000000000004 as 0.3000000000000000);
        # DECFLOAT(34) prints the 17 it needs to read back as the same double.
        return f"COALESCE(CAST({q} AS DECFLOAT(34)), '')"
    if column.type_code == fs.TIMESTAMP_TZ:
        # As UTC: "2024-06-01 10:00:00.1234 +00:00" cut to its first 24 characters, plus Z.
        return (f"COALESCE(SUBSTRING(CAST({q} AT TIME ZONE '+00:00' AS VARCHAR(64)) "
                f"FROM 1 FOR 24) || 'Z', '')")
    return f"COALESCE({q}, '')"


def line_expression(schema: TableSchema) -> str:
    """SQL for a row's line of the range text: its fields joined by commas."""
    return " || ',' || ".join(column_text(c, schema) for c in schema.columns)


GROUP_BYTES = 32_000
"""The VARCHAR a group of lines is fetched as (Firebird's longest is 32,765 bytes)."""
MAX_GROUP_ROWS = 200
"""More lines per group saved nothing more on 50,000-row ranges (measured: 200 best)."""
_NON_TEXT_BYTES = 48  # the longest non-text field: DECFLOAT(34) with its exponent
_BYTES_PER_CHAR = {"UTF8": 4, "UNICODE_FSS": 3, "SJIS_0208": 2, "EUCJ_0208": 3, "BIG_5": 2,
                   "GB_2312": 2, "KSC_5601": 2, "GBK": 2, "GB18030": 4, "CP943C": 2}


def group_rows(schema: TableSchema) -> int:
    """Lines per group when a range is fetched as groups of VARCHAR (0: as one blob).

    Firebird appends each line of one LIST to a blob, and reading that blob through the
    driver costs more than building the lines: a 50,000-row range as one blob took 1.1 to
    1.4 s here, as 250 to 1,000 VARCHAR groups 0.45 to 0.6 s. A group must fit GROUP_BYTES:
    the count comes from the columns' declared lengths (quotes inside values not counted; a
    group that still does not fit fails and the range is read as one blob instead). A table
    with a text blob, or lines too long for a useful group, is read as one blob.
    """
    per_char = _BYTES_PER_CHAR.get(schema.text_charset, 1)
    width = len(schema.columns)  # commas and the line feed
    for column in schema.columns:
        if column.type_code == fs.BLOB:
            return 0
        width += column.length * per_char + 2 if column.is_text else _NON_TEXT_BYTES
    rows = min(GROUP_BYTES // max(width, 1), MAX_GROUP_ROWS)
    return rows if rows >= 8 else 0


@dataclass(frozen=True)
class Decoded:
    """The range text as UTF-8, and whether some bytes were not valid in its character set."""

    data: bytes
    replaced: bool


def decode(data: bytes, charset: str) -> Decoded:
    """The range's bytes as UTF-8. Bytes not valid in `charset` become U+FFFD (their rows are
    marked after the parse): a legacy database's one bad value must not fail its range."""
    python = codec(charset)
    try:
        text = data.decode(python)
    except UnicodeDecodeError:
        # A bad sequence never swallows an ASCII quote, comma or newline after it: the CSV
        # structure survives the replacement.
        return Decoded(data.decode(python, errors="replace").encode("utf-8"), True)
    return Decoded(data if python == "utf-8" else text.encode("utf-8"), False)


def parse(raw: bytes | None, schema: TableSchema, *, where: str,
          block_size: int = RANGE_BLOCK_SIZE) -> pa.Table:
    """Parse a range's text into the schema's staged columns; a failure is a FatalError
    that names `where` and the column, never a row or value.

    Text values are quoted and may hold LF, CR, quotes, commas and semicolons.
    `newlines_in_values` keeps the reader from ending a block inside a quoted value (without
    it, a newline in a value where a block ends breaks the parse). Arrow (26) still drops the
    LF of a CRLF inside a value when its input blocks split between the CR and the LF, so
    text with a CR anywhere is read as one block. Either way the parse takes 10 to 15 ms per
    50,000-row range (2 to 5 ms more than without these guards), next to about 900 ms for
    Firebird to build the text.
    """
    arrow = schema.arrow_schema()
    if not raw:
        return arrow.empty_table()
    decoded = decode(raw, schema.text_charset)
    # Arrow (26) reads an empty last field of a last line with no line feed after it as ''
    # instead of null: the text always ends with one.
    data = decoded.data if decoded.data.endswith(b"\n") else decoded.data + b"\n"
    if b"\r" in data:
        block_size = max(block_size, len(data) + 1)
    # Parsed as plain types; field metadata (the DuckDB type of INT128) is put back after.
    plain = pa.schema([pa.field(f.name, f.type) for f in arrow])
    try:
        table = pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(column_names=plain.names, block_size=block_size),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types={f.name: f.type for f in plain},
                strings_can_be_null=True, quoted_strings_can_be_null=False),
        ).select(plain.names)
    except pa.ArrowException as exc:
        reason = _failure_reason(exc, schema)
    else:
        table = table.cast(arrow)
        return _mark_undecodable(table, schema) if decoded.replaced else table
    # Raised out here, so that neither __cause__ nor __context__ carries Arrow's message (and
    # the row in it) into a traceback, a log or a Sentry event.
    raise FatalError(f"Firebird range {where} could not be parsed ({reason})", source="firebird")


def _mark_undecodable(table: pa.Table, schema: TableSchema) -> pa.Table:
    """Add UNDECODABLE: per row, its text columns holding a replaced byte."""
    names: list[list[str]] = [[] for _ in range(table.num_rows)]
    for column in schema.columns:
        if pa.types.is_string(column.arrow):
            hits = pc.fill_null(pc.match_substring(table[column.staged_name], _REPLACEMENT),
                                False)
            for row in pc.indices_nonzero(hits).to_pylist():
                names[row].append(column.name)
    marker = pa.array(["; ".join(n) if n else None for n in names], pa.string())
    return table.append_column(UNDECODABLE, marker)


def _failure_reason(exc: BaseException, schema: TableSchema) -> str:
    """What Arrow's message says went wrong, without the row or value it quotes."""
    message = str(exc)
    if found := _COLUMN_COUNT.match(message):
        return found.group(0)
    if (found := _COLUMN_INDEX.match(message)) and int(found.group(1)) < len(schema.columns):
        column = schema.columns[int(found.group(1))]
        return f"column {column.name} holds a value that is not a valid {column.arrow}"
    return type(exc).__name__
