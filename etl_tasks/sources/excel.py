"""Patient registration uploads (.xlsx, .xls, .ods): stream data rows as Arrow batches of text.

The header row is found under any title rows and matched case- and space-insensitively. Engines
are tried in the order of OPENERS (python-calamine today; an openpyxl fallback and CSV sidecars
can be appended). Cells become text without losing digits; parsing belongs to the transform.
"""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import python_calamine

from etl_tasks.errors import EtlError, FatalError, SourceFileError, TransientError

CANONICAL = {
    "MRN": "mrn",
    "First Name": "first_name",
    "Last Name": "last_name",
    "Date of Birth": "date_of_birth",
    "Sex": "sex",
    "ZIP": "zip",
    "Phone": "phone",
    "Registration Date": "registration_date",
    "Clinic": "clinic",
    "Insurance ID": "insurance_id",
}
"""Header name as documented -> output column."""
COLUMNS = tuple(CANONICAL.values())
SCHEMA = pa.schema(
    [pa.field(name, pa.string()) for name in COLUMNS]
    + [
        pa.field("_source_ref", pa.string(), nullable=False),
        pa.field("_duplicate", pa.bool_(), nullable=False),
    ]
)
HEADER_SEARCH_ROWS = 20
"""The header must be within this many rows from the top of a sheet."""
EXTENSIONS = frozenset({".xlsx", ".xlsm", ".xls", ".ods"})

Cell = str | int | float | bool | dt.date | dt.datetime | dt.time | dt.timedelta | None


@dataclass(frozen=True)
class Workbook:
    """An opened upload, whichever engine opened it."""

    sheet_names: list[str]
    rows: Callable[[str], Iterator[Sequence[Cell]]]
    """Rows of a sheet from Excel row 1, blank rows included, so position = row number."""
    close: Callable[[], None]


def _open_calamine(path: Path) -> Workbook:
    book = python_calamine.CalamineWorkbook.from_path(path)

    def rows(name: str) -> Iterator[Sequence[Cell]]:
        sheet = book.get_sheet_by_name(name)
        if sheet.start is None:  # an empty sheet has no range to iterate
            return iter(())
        # iter_rows pads the rows above the used range with empty rows (unlike to_python), so
        # the n-th row is Excel row n; columns start at the used range's first column.
        return iter(sheet.iter_rows())

    return Workbook(list(book.sheet_names), rows, book.close)


OPENERS: tuple[Callable[[Path], Workbook], ...] = (_open_calamine,)
"""Engines tried in order until one opens the file."""

_KEYS = {"".join(name.split()).lower(): column for name, column in CANONICAL.items()}
_REQUIRED_KEYS = ("mrn", "dateofbirth")
_SIGNATURES = {b"PK\x03\x04": "zip", b"\xd0\xcf\x11\xe0": "ole"}
_EXPECTED_SIGNATURE = {".xlsx": "zip", ".xlsm": "zip", ".ods": "zip", ".xls": "ole"}
_REEXPORT = "ask the sender to export it again from the spreadsheet program"
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ESTALE,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EIO,
        errno.EINTR,
        errno.ENFILE,
        errno.EMFILE,
        errno.ETIMEDOUT,
    }
)
_OS_ERRNO = re.compile(r"\(os error (\d+)\)")


def iter_batches(
    path: Path, *, batch_rows: int, source: str, sheet: str | None = None, **layout: Any
) -> Iterator[pa.Table]:
    """Yield the data rows under the header as tables of at most `batch_rows` rows (SCHEMA).

    `sheet` names the sheet to read; by default the first sheet that has the header row is.
    Fully blank rows are skipped; `_source_ref` keeps the real Excel row number.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if layout:
        raise FatalError(f"unknown layout options for a workbook: {sorted(layout)}", source=source)
    try:
        yield from _read(path, batch_rows, source, sheet)
    except EtlError:
        raise
    except Exception as exc:
        raise classify(exc, path=path, source=source) from exc
    except BaseException as exc:
        if not _is_panic(exc):
            raise
        raise classify(exc, path=path, source=source) from exc


def classify(
    exc: BaseException, *, path: Path | None = None, source: str | None = None
) -> EtlError:
    """Map an exception met while reading a workbook to the pipeline's error tree."""
    if isinstance(exc, EtlError):
        return exc
    where = str(path) if path is not None else getattr(exc, "filename", None) or "<workbook>"
    # Engine messages are left out of reasons on purpose: they can quote bytes of the file.
    if isinstance(exc, python_calamine.PasswordError):
        reason = "the workbook is password-protected; ask the sender for an unprotected copy"
    elif isinstance(exc, python_calamine.ZipError | zipfile.BadZipFile):
        reason = f"the workbook is not a readable zip archive (truncated or damaged); {_REEXPORT}"
    elif isinstance(exc, python_calamine.XmlError):
        reason = f"the workbook's internal XML is damaged; {_REEXPORT}"
    elif isinstance(exc, python_calamine.CalamineError):
        reason = f"the file cannot be read as a .xlsx, .xls or .ods workbook; {_REEXPORT}"
    elif _is_panic(exc):
        reason = f"the spreadsheet engine crashed on this file; {_REEXPORT}"
    elif isinstance(exc, OSError):
        return _classify_os_error(exc, where, source)
    else:
        return FatalError(
            f"{where}: unexpected {type(exc).__name__} while reading the workbook; "
            "see the traceback",
            source=source,
        )
    return SourceFileError(where, reason, source=source)


def _is_panic(exc: BaseException) -> bool:
    """pyo3 turns a Rust panic (calamine on a hostile file) into a BaseException subclass."""
    return type(exc).__name__ == "PanicException"


def _read(path: Path, batch_rows: int, source: str, sheet: str | None) -> Iterator[pa.Table]:
    _check_signature(path, source)
    book = _open(path)
    try:
        name, header_row, positions, rows = _locate(book, path, source, sheet)
        yield from _batches(path.name, name, header_row, positions, rows, batch_rows)
    finally:
        book.close()


def _open(path: Path) -> Workbook:
    errors: list[Exception] = []
    for opener in OPENERS:
        try:
            return opener(path)
        except Exception as exc:  # noqa: BLE001 - the next engine may cope; the first error is raised
            errors.append(exc)
    raise errors[0]


def _check_signature(path: Path, source: str) -> None:
    """Give a precise reason for the common wrong-file cases before any engine tries."""
    with path.open("rb") as stream:
        head = stream.read(8)
    if not head:
        raise SourceFileError(str(path), f"the file is empty (0 bytes); {_REEXPORT}", source=source)
    expected = _EXPECTED_SIGNATURE.get(path.suffix.lower())
    found = _SIGNATURES.get(head[:4])
    if expected is None or found == expected:
        return
    if found is None:
        what = "plain text (a CSV or report renamed?)" if _looks_like_text(head) else "unknown"
        reason = f"the content is not a {path.suffix} workbook but {what}; {_REEXPORT}"
    elif found == "ole":
        reason = (
            f"the content is an OLE file, not a {path.suffix} workbook: a password-protected "
            f"workbook or a legacy .xls renamed; {_REEXPORT}"
        )
    else:
        reason = f"the content is a zip archive, not a legacy {path.suffix} workbook; {_REEXPORT}"
    raise SourceFileError(str(path), reason, source=source)


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="ignore")  # 8 bytes may cut a character in two
    return bool(text) and all(char.isprintable() or char.isspace() for char in text)


def _locate(
    book: Workbook, path: Path, source: str, wanted: str | None
) -> tuple[str, int, dict[int, str], Iterator[Sequence[Cell]]]:
    """Find the sheet and its header row; return the rows iterator positioned after it."""
    if wanted is not None and wanted not in book.sheet_names:
        raise SourceFileError(
            str(path),
            f"the workbook has no sheet named {wanted!r}; check the sheet option",
            source=source,
        )
    for name in [wanted] if wanted is not None else book.sheet_names:
        rows = book.rows(name)
        for number, row in enumerate(itertools.islice(rows, HEADER_SEARCH_ROWS), start=1):
            keys = ["".join(cell.split()).lower() if isinstance(cell, str) else "" for cell in row]
            if all(key in keys for key in _REQUIRED_KEYS):
                return name, number, _positions(keys, path, source, name, number), rows
    where = f"sheet {wanted!r} does not have" if wanted is not None else "no sheet has"
    raise SourceFileError(
        str(path),
        f"{where} the expected header row (MRN, Date of Birth, ...) within its first "
        f"{HEADER_SEARCH_ROWS} rows; fix the header names or name the sheet to read",
        source=source,
    )


def _positions(keys: list[str], path: Path, source: str, sheet: str, row: int) -> dict[int, str]:
    positions: dict[int, str] = {}
    for index, key in enumerate(keys):
        column = _KEYS.get(key)
        if column is None:
            continue
        if column in positions.values():
            raise SourceFileError(
                str(path),
                f"the header row ({sheet}!row {row}) names the column {key!r} twice; "
                "remove one so that no value is ambiguous",
                source=source,
            )
        positions[index] = column
    return positions


def _batches(
    file_name: str,
    sheet: str,
    header_row: int,
    positions: dict[int, str],
    rows: Iterator[Sequence[Cell]],
    batch_rows: int,
) -> Iterator[pa.Table]:
    index_of = {column: index for index, column in positions.items()}
    picks = [index_of.get(column) for column in COLUMNS]
    mrn_index = index_of.get("mrn", -1)
    seen: set[str] = set()
    pending: list[Sequence[Cell]] = []
    refs: list[str] = []
    duplicates: list[bool] = []
    for number, row in enumerate(rows, start=header_row + 1):
        if not any(cell.strip() if isinstance(cell, str) else cell is not None for cell in row):
            continue  # fully blank rows are layout, not data
        pending.append(row)
        refs.append(f"{file_name}!{sheet}:row={number}")
        key = (cell_text(row[mrn_index]) or "").strip() if 0 <= mrn_index < len(row) else ""
        duplicates.append(key in seen)
        if key:
            seen.add(key)
        if len(pending) >= batch_rows:
            yield _table(pending, picks, refs, duplicates)
            pending, refs, duplicates = [], [], []
    if pending:
        yield _table(pending, picks, refs, duplicates)


def cell_text(value: Cell) -> str | None:
    """Render a cell as text without losing digits: phone 6175550123.0 -> "6175550123"."""
    if isinstance(value, str):
        return value or None  # calamine reports an empty cell as ""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, dt.datetime):  # before date: datetime is a date
        if value.time() == dt.time():
            return value.date().isoformat()
        return value.isoformat(timespec="seconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if value is None:
        return None
    return str(value)  # time, timedelta


def _table(
    rows: list[Sequence[Cell]], picks: list[int | None], refs: list[str], duplicates: list[bool]
) -> pa.Table:
    """Build the batch column by column: one pass per column is faster than one per cell."""
    arrays = [_column(rows, index) for index in picks]
    arrays += [pa.array(refs, pa.string()), pa.array(duplicates, pa.bool_())]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _column(rows: list[Sequence[Cell]], index: int | None) -> pa.Array:
    if index is None:
        return pa.nulls(len(rows), pa.string())
    cells = [row[index] if index < len(row) else None for row in rows]
    # Text cells are the common case; skip the call for them.
    return pa.array(
        [(cell or None) if type(cell) is str else cell_text(cell) for cell in cells], pa.string()
    )


def _classify_os_error(exc: OSError, where: str, source: str | None) -> EtlError:
    number = exc.errno
    if number is None and (match := _OS_ERRNO.search(str(exc))):
        number = int(match.group(1))  # calamine's OSError carries the errno in its message only
    if number in _TRANSIENT_ERRNOS:
        return TransientError(
            f"{where}: the file vanished or could not be read just now "
            f"({errno.errorcode.get(number or 0, 'OS error')}); a retry may succeed",
            source=source,
        )
    if number in (errno.EACCES, errno.EPERM):
        return SourceFileError(
            where, "permission denied; fix the file's permissions and re-run", source=source
        )
    if number == errno.EISDIR:
        return SourceFileError(
            where, "is a directory, not a file; move it out of the inbox", source=source
        )
    return FatalError(
        f"{where}: cannot be read ({type(exc).__name__}); see the traceback", source=source
    )
