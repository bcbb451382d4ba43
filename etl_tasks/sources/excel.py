"""Patient registration uploads (.xlsx, .xlsm, .xls, .ods): stream data rows as Arrow batches.

Before any engine parses a zip container (.xlsx, .xlsm, .ods) its declared and actual
decompressed sizes are bounded (zip bombs), workbooks that carry macros (an .xlsm, a VBA
project in any workbook, Basic modules or scripts in an .ods) are refused unless allowed
(macros are never run), and empty, renamed, encrypted or truncated files get their own reason.
Then strategies are tried in order, each attempt logged: python-calamine (an .xlsx/.xlsm sheet
in slices of rows, xlsx_slices.py, so that memory does not grow with the sheet; an .xls or .ods
sheet whole), openpyxl (read-only, .xlsx/.xlsm), a CSV sidecar with the same stem
(`upload.csv` beside `upload.xlsx`), and the last good copy of the upload (same name in
`last_good_dir`). A strategy fails when it cannot open the file or finds no header; once one
has found the header its rows are read to the end, and an error there quarantines the file.
If every strategy fails, the reason lists each one's.

The header row is found under any title rows and matched case- and space-insensitively. Cells
become text without losing digits; parsing belongs to the transform. The header names are the
registrations' (CANONICAL) unless the source's dataset declares its own columns; then the
layout's `headers` maps columns to header names (default: the column's name), and the header
row is the one naming every required column.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import itertools
import logging
import lzma
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openpyxl
import pyarrow as pa
import python_calamine
from openpyxl.utils.exceptions import InvalidFileException

from etl_tasks.errors import EtlError, FatalError, SourceFileError
from etl_tasks.sources import files, xlsx_slices

log = logging.getLogger(__name__)

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
SCHEMA = files.text_schema(COLUMNS)
HEADER_SEARCH_ROWS = 20
"""The header must be within this many rows from the top of a sheet."""
EXTENSIONS = frozenset({".xlsx", ".xlsm", ".xls", ".ods"})
MAX_UNCOMPRESSED_BYTES = 500_000_000
"""Default of the `max_uncompressed_bytes` layout option: a workbook's whole unzipped size."""
MAX_RATIO = 100
"""A zip member larger than RATIO_MIN_BYTES may be at most this many times its compressed size."""
RATIO_MIN_BYTES = 1_000_000
MACROS_REFUSED = (
    "macro-enabled workbook refused (set allow_macros to read its data; macros are never run)"
)

Cell = str | int | float | bool | dt.date | dt.datetime | dt.time | dt.timedelta | None


@dataclass(frozen=True)
class Workbook:
    """An opened upload, whichever engine opened it."""

    sheet_names: list[str]
    rows: Callable[[str], Iterator[Sequence[Cell]]]
    """Rows of a sheet from Excel row 1, blank rows included, so position = row number."""
    close: Callable[[], None]


@dataclass(frozen=True)
class _Form:
    """What the header row names and which columns the batches hold."""

    columns: tuple[str, ...]
    keys: dict[str, str]
    """Header name squashed (no spaces, lower case) -> output column."""
    required: tuple[str, ...]
    """Squashed header names that identify the header row."""
    labels: str
    """Those header names as written, for the reason when no row names them."""
    schema: pa.Schema
    key: tuple[int, ...]
    """Positions of the columns whose repeat within the file is flagged."""


@dataclass(frozen=True)
class _Options:
    sheet: str | None
    last_good_dir: Path | None
    max_uncompressed_bytes: int
    allow_macros: bool
    form: _Form


@dataclass(frozen=True)
class _Located:
    """A strategy's success: where the data rows are and how to release the file."""

    ref_prefix: str
    header_row: int
    positions: dict[int, str]
    rows: Iterator[Sequence[Cell]]
    close: Callable[[], None]
    form: _Form


class _Failed(Exception):
    """A strategy cannot read the upload; the next one is tried."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class _Refused(Exception):
    """The upload is refused before any parse (hostile or not allowed); nothing else is tried."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _squash(name: str) -> str:
    return "".join(name.split()).lower()


def _form(columns: Sequence[str], headers: Mapping[str, str] | None,
          required: Sequence[str] | None, duplicate_key: Sequence[str] | None,
          source: str) -> _Form:
    """The header names to find and the columns to give: the registrations' by default."""
    columns = tuple(columns)
    if duplicate_key is None:
        duplicate_key = ("mrn",) if columns == COLUMNS else ()
    if headers is None and columns == COLUMNS:
        labels = {column: label for label, column in CANONICAL.items()}
    else:
        if not isinstance(headers, Mapping | None):
            raise FatalError("headers must map output columns to header names", source=source)
        if unknown := sorted(set(headers or {}) - set(columns)):
            raise FatalError(f"headers names {unknown}, which are not output columns",
                             source=source)
        labels = {column: (headers or {}).get(column, column) for column in columns}
    if required is None:
        required = ("mrn", "date_of_birth") if columns == COLUMNS else columns
    if unknown := sorted((set(required) | set(duplicate_key)) - set(columns)):
        raise FatalError(f"required or duplicate key names {unknown}, which are not output "
                         "columns", source=source)
    required = required or columns
    return _Form(columns, {_squash(labels[c]): c for c in columns},
                 tuple(_squash(labels[c]) for c in required),
                 ", ".join(labels[c] for c in required),
                 SCHEMA if columns == COLUMNS else files.text_schema(columns),
                 tuple(columns.index(c) for c in duplicate_key))


_SIGNATURES = {b"PK\x03\x04": "zip", b"\xd0\xcf\x11\xe0": "ole"}
_EXPECTED_SIGNATURE = {".xlsx": "zip", ".xlsm": "zip", ".ods": "zip", ".xls": "ole"}
_OPENPYXL_SUFFIXES = frozenset({".xlsx", ".xlsm"})
_SLICED = frozenset({".xlsx", ".xlsm"})
"""Suffixes whose sheets python-calamine reads in slices (xlsx_slices.py), not whole."""
_ENCRYPTED_MARKS = ("EncryptedPackage".encode("utf-16-le"), b"EncryptedPackage")
# A legacy .xls keeps its VBA project in an OLE storage of this name (UTF-16 in the directory).
_OLE_MACRO_MARKS = ("_VBA_PROJECT_CUR".encode("utf-16-le"),)
_BASIC_INDEXES = frozenset({"script-lc.xml", "script-lb.xml", "dialog-lc.xml", "dialog-lb.xml"})
_REEXPORT = "ask the sender to export it again from the spreadsheet program"
_CHUNK = 1 << 20
_CSV_DELIMITERS = (",", ";", "\t")
_CSV_ENCODINGS = {"utf-8-sig": "UTF-8", "cp1252": "Windows-1252", "utf-16": "UTF-16"}


# Schema metadata key of batches read from the last good copy; its value is the reason.
RECOVERED = "etl.recovered"


def iter_batches(
    path: Path,
    *,
    batch_rows: int,
    source: str,
    sheet: str | None = None,
    last_good_dir: Path | str | None = None,
    max_uncompressed_bytes: int = MAX_UNCOMPRESSED_BYTES,
    allow_macros: bool = False,
    columns: Sequence[str] = COLUMNS,
    headers: Mapping[str, str] | None = None,
    required: Sequence[str] | None = None,
    duplicate_key: Sequence[str] | None = None,
    **layout: Any,
) -> Iterator[pa.Table]:
    """Yield the data rows under the header as tables of at most `batch_rows` rows (SCHEMA,
    or the text schema of `columns`).

    `sheet` names the sheet to read; by default the first sheet that has the header row is.
    `last_good_dir` holds the last good copy of each upload, by name (the last strategy).
    `headers` maps `columns` to their header names; the header row is the first that names
    every `required` column (default: MRN and Date of Birth, or every column of a declared
    dataset with no required one). A row whose `duplicate_key` values were on an earlier row
    of the file is flagged `_duplicate` (default: MRN for the registrations' columns).
    Fully blank rows are skipped; `_source_ref` keeps the real row number.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if layout:
        raise FatalError(f"unknown layout options for a workbook: {sorted(layout)}", source=source)
    if isinstance(max_uncompressed_bytes, bool) or not isinstance(max_uncompressed_bytes, int):
        raise FatalError("max_uncompressed_bytes must be a whole number of bytes", source=source)
    if max_uncompressed_bytes < 1:
        raise FatalError("max_uncompressed_bytes must be at least 1", source=source)
    options = _Options(
        sheet=sheet,
        last_good_dir=Path(last_good_dir) if last_good_dir is not None else None,
        max_uncompressed_bytes=max_uncompressed_bytes,
        allow_macros=bool(allow_macros),
        form=_form(columns, headers, required, duplicate_key, source),
    )
    try:
        yield from _read(path, batch_rows, source, options)
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
    short = _short_reason(exc)
    if short is not None:
        return SourceFileError(where, f"{short}; {_REEXPORT}", source=source)
    if isinstance(exc, OSError):
        return files.classify_os_error(exc, where, source)
    return FatalError(
        f"{where}: unexpected {type(exc).__name__} while reading the workbook; see the traceback",
        source=source,
    )


def _short_reason(exc: BaseException) -> str | None:
    """Our own words for an engine's error; engine messages can quote bytes of the file."""
    if isinstance(exc, xlsx_slices.SliceError):
        return str(exc)
    if isinstance(exc, python_calamine.PasswordError):
        return "the workbook is password-protected (ask the sender for an unprotected copy)"
    if isinstance(exc, python_calamine.ZipError | zipfile.BadZipFile):
        return "the workbook is not a readable zip archive (truncated or damaged)"
    if isinstance(exc, python_calamine.XmlError):
        return "the workbook's internal XML is damaged"
    if isinstance(exc, python_calamine.CalamineError):
        return "the file cannot be read as a .xlsx, .xls or .ods workbook"
    if isinstance(exc, InvalidFileException):
        return "the file is not a workbook openpyxl can read"
    if isinstance(exc, UnicodeDecodeError):
        return "the text is not UTF-8"
    if isinstance(exc, csv.Error):
        return "the text is not a well-formed CSV"
    if _is_panic(exc):
        return "the spreadsheet engine crashed on this file"
    return None


def _is_panic(exc: BaseException) -> bool:
    """pyo3 turns a Rust panic (calamine on a hostile file) into a BaseException subclass."""
    return type(exc).__name__ == "PanicException"


def _read(path: Path, batch_rows: int, source: str, options: _Options) -> Iterator[pa.Table]:
    try:
        problem = _precheck(path, options)
    except _Refused as exc:
        log.warning("%s: refused before parsing: %s", path.name, exc.reason)
        raise SourceFileError(str(path), exc.reason, source=source) from None
    failures: list[tuple[str, str]] = []
    for name, attempt in _strategies(path, source, options, problem):
        try:
            located = attempt()
        except _Failed as exc:
            log.info("%s: strategy %s failed: %s", path.name, name, exc.reason)
            failures.append((name, exc.reason))
            continue
        log.info("%s: strategy %s succeeded; reading %s", path.name, name, located.ref_prefix)
        # Never a silent swap: batches answered by the last good copy say so, and why.
        recovered = (f"the upload could not be read ({_summary(failures)}); its last good "
                     f"copy was loaded instead" if name == "last good copy" else None)
        try:
            for batch in _batches(located, batch_rows):
                yield (batch.replace_schema_metadata({RECOVERED: recovered})
                       if recovered else batch)
        finally:
            located.close()
        return
    log.warning("%s: every strategy failed", path.name)
    raise SourceFileError(
        str(path),
        f"no strategy could read the upload ({_summary(failures)}); {_REEXPORT}",
        source=source,
    )


def _summary(failures: list[tuple[str, str]]) -> str:
    """`a, b: same reason; c: other reason`: consecutive strategies with one reason merged."""
    parts: list[str] = []
    for reason, group in itertools.groupby(failures, key=lambda failure: failure[1]):
        parts.append(f"{', '.join(name for name, _ in group)}: {reason}")
    return "; ".join(parts)


def _strategies(
    path: Path, source: str, options: _Options, problem: str | None
) -> list[tuple[str, Callable[[], _Located]]]:
    def engine(opener: Callable[[Path], Workbook]) -> Callable[[], _Located]:
        def attempt() -> _Located:
            if opener is _open_openpyxl and path.suffix.lower() not in _OPENPYXL_SUFFIXES:
                raise _Failed("openpyxl reads only .xlsx and .xlsm")
            if problem is not None:
                raise _Failed(problem)
            return _attempt(path, path.name, opener, source, options)

        return attempt

    return [
        ("python-calamine", engine(_open_calamine)),
        ("openpyxl", engine(_open_openpyxl)),
        ("csv sidecar", lambda: _sidecar(path, source, options)),
        ("last good copy", lambda: _last_good(path, source, options)),
    ]


def _attempt(
    path: Path, label: str, opener: Callable[[Path], Workbook], source: str, options: _Options
) -> _Located:
    """Open `path` with one engine and find its header, or raise _Failed."""
    try:
        book = opener(path)
    except BaseException as exc:
        raise _Failed(_failure(exc, path, source)) from exc
    try:
        name, header_row, positions, rows = _locate(book, path, source, options.sheet,
                                                    options.form)
    except SourceFileError as exc:
        book.close()
        raise _Failed(exc.reason) from None
    except BaseException as exc:
        book.close()
        raise _Failed(_failure(exc, path, source)) from exc
    return _Located(f"{label}!{name}", header_row, positions, rows, book.close, options.form)


def _failure(exc: BaseException, path: Path, source: str) -> str:
    """A strategy's short reason, or re-raise what no other strategy can help with."""
    short = _short_reason(exc)
    if short is not None:
        return short
    if isinstance(exc, OSError):
        error = files.classify_os_error(exc, str(path), source)
        if isinstance(error, SourceFileError):
            return error.reason
        raise error from exc
    if isinstance(exc, _Failed):
        return exc.reason
    if isinstance(exc, Exception):
        return f"the engine could not read it ({type(exc).__name__})"
    raise exc


def _open_calamine(path: Path) -> Workbook:
    book = python_calamine.CalamineWorkbook.from_path(path)

    def rows(name: str) -> Iterator[Sequence[Cell]]:
        if path.suffix.lower() in _SLICED and (sliced := xlsx_slices.rows(path, name)):
            return sliced
        sheet = book.get_sheet_by_name(name)
        if sheet.start is None:  # an empty sheet has no range to iterate
            return iter(())
        # iter_rows pads the rows above the used range with empty rows (unlike to_python), so
        # the n-th row is Excel row n; columns start at the used range's first column.
        return iter(sheet.iter_rows())

    return Workbook(list(book.sheet_names), rows, book.close)


def _open_openpyxl(path: Path) -> Workbook:
    if path.suffix.lower() not in _OPENPYXL_SUFFIXES:
        raise _Failed("openpyxl reads only .xlsx and .xlsm")
    with warnings.catch_warnings():
        # openpyxl warns about styles and extensions it does not keep; the data is unaffected.
        warnings.simplefilter("ignore")
        book = openpyxl.load_workbook(
            path, read_only=True, data_only=True, keep_links=False, keep_vba=False
        )

    def rows(name: str) -> Iterator[Sequence[Cell]]:
        # Read-only rows start at row 1 and column A, gaps padded, so position = row number.
        return iter(book[name].iter_rows(values_only=True))

    return Workbook(list(book.sheetnames), rows, book.close)


def _sidecar(path: Path, source: str, options: _Options) -> _Located:
    """`upload.csv` beside `upload.xlsx`: same header search, rows numbered as CSV records.

    Spreadsheet programs save CSV as UTF-8 (often with a BOM), as UTF-16 with a BOM, or in the
    Windows code page of the machine (1252 for Western Europe and the Americas), and with `;`
    instead of `,` where the comma is the decimal mark: the encoding is settled by decoding the
    whole file once, and the separator is the first of `,`, `;`, tab that yields the header.
    """
    candidates = [path.with_suffix(suffix) for suffix in files.SIDECAR_SUFFIXES]
    sidecar = next((candidate for candidate in candidates if candidate.is_file()), None)
    if sidecar is None:
        raise _Failed(f"no {path.stem}.csv beside the file")
    try:
        encoding = _csv_encoding(sidecar)
    except OSError as exc:
        raise _Failed(_failure(exc, sidecar, source)) from exc
    if encoding is None:
        raise _Failed(
            "the text is neither UTF-8 nor Windows-1252; save the CSV again as UTF-8"
        )
    reason = ""
    for delimiter in _CSV_DELIMITERS:
        try:
            stream = sidecar.open(encoding=encoding, newline="")
        except OSError as exc:
            raise _Failed(_failure(exc, sidecar, source)) from exc
        book = Workbook([sidecar.name], _csv_rows(stream, delimiter), stream.close)
        try:
            _name, header_row, positions, rows = _locate(book, sidecar, source, None,
                                                         options.form)
        except SourceFileError as exc:
            stream.close()
            reason = reason or exc.reason  # the comma's reason: the others say the same
            continue
        except Exception as exc:
            stream.close()
            raise _Failed(_failure(exc, sidecar, source)) from exc
        log.info("%s: read as %s, separated by %r", sidecar.name, _CSV_ENCODINGS[encoding],
                 delimiter)  # fmt: skip
        return _Located(sidecar.name, header_row, positions, rows, stream.close, options.form)
    raise _Failed(reason)


def _csv_rows(stream: Any, delimiter: str) -> Callable[[str], Iterator[Sequence[Cell]]]:
    reader = csv.reader(stream, delimiter=delimiter)
    return lambda _name: iter(reader)


def _csv_encoding(path: Path) -> str | None:
    """The codec that decodes the whole file: UTF-16 by its BOM, else UTF-8, else cp1252."""
    with path.open("rb") as stream:
        head = stream.read(2)
    if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        codec = "utf-16"
        return codec if _decodes(path, codec) else None
    return next((codec for codec in ("utf-8-sig", "cp1252") if _decodes(path, codec)), None)


def _decodes(path: Path, codec: str) -> bool:
    decoder = codecs.getincrementaldecoder(codec)()
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _last_good(path: Path, source: str, options: _Options) -> _Located:
    """The copy of this upload kept after its last good load, read by the workbook engines."""
    if options.last_good_dir is None:
        raise _Failed("no last_good_dir configured")
    copy = options.last_good_dir / path.name
    label = f"last-good/{copy.name}"
    try:
        if not copy.is_file():
            raise _Failed(f"no copy of {path.name} in last_good_dir")
        problem = _precheck(copy, options)
    except _Refused as exc:
        raise _Failed(exc.reason) from None
    except OSError as exc:
        raise _Failed(_failure(exc, copy, source)) from exc
    if problem is not None:
        raise _Failed(problem)
    reasons: list[tuple[str, str]] = []
    for name, opener in (("python-calamine", _open_calamine), ("openpyxl", _open_openpyxl)):
        try:
            return _attempt(copy, label, opener, source, options)
        except _Failed as exc:
            reasons.append((name, exc.reason))
    raise _Failed(f"the copy cannot be read either ({_summary(reasons)})")


def _precheck(path: Path, options: _Options) -> str | None:
    """Before any parse: raise _Refused for what must not be read; return why the workbook
    engines cannot read the file (empty, renamed, encrypted, truncated), or None."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    suffix = path.suffix.lower()
    if suffix == ".xlsm" and not options.allow_macros:
        raise _Refused(MACROS_REFUSED)
    with path.open("rb") as stream:
        head = stream.read(8)
    expected = _EXPECTED_SIGNATURE.get(suffix)
    found = _SIGNATURES.get(head[:4])
    if expected is not None and found != expected:
        return _mismatch(path, suffix, head, found)
    if found == "zip":
        return _check_zip(path, options)
    if found == "ole" and not options.allow_macros and _contains_any(path, _OLE_MACRO_MARKS):
        raise _Refused(MACROS_REFUSED)
    return None


def _holds_macros(member: str) -> bool:
    """A zip member that carries macros: Excel's VBA project, an OpenDocument Basic module
    (`Basic/<library>/<module>.xml`; the library index files alone run nothing) or script."""
    name = member.lower()
    if name.endswith("vbaproject.bin") or name.startswith("scripts/"):
        return True
    return name.startswith("basic/") and name.rsplit("/", 1)[-1] not in _BASIC_INDEXES


def _mismatch(path: Path, suffix: str, head: bytes, found: str | None) -> str:
    if found is None:
        what = "plain text (a CSV or report renamed?)" if _looks_like_text(head) else "unknown"
        return f"the content is not a {suffix} workbook but {what}"
    if found == "ole":
        if _contains_any(path, _ENCRYPTED_MARKS):
            return (
                "the workbook is encrypted with a password (an OLE EncryptedPackage); "
                "ask the sender for an unprotected copy"
            )
        return f"the content is an OLE file, not a {suffix} workbook (a legacy .xls renamed?)"
    return f"the content is a zip archive, not a legacy {suffix} workbook"


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="ignore")  # 8 bytes may cut a character in two
    return bool(text) and all(char.isprintable() or char.isspace() for char in text)


def _contains_any(path: Path, marks: Sequence[bytes]) -> bool:
    """Whether any of `marks` occurs in the file, scanned in chunks (bounded memory)."""
    overlap = max(len(mark) for mark in marks) - 1
    tail = b""
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            window = tail + chunk
            if any(mark in window for mark in marks):
                return True
            tail = window[-overlap:]
    return False


def _check_zip(path: Path, options: _Options) -> str | None:
    """Zip-bomb limits on declared sizes, then on the bytes each member really inflates to."""
    limit = options.max_uncompressed_bytes
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return "the workbook is not a readable zip archive (truncated or damaged)"
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        declared = sum(info.file_size for info in members)
        if declared > limit:
            raise _Refused(_too_big(declared, limit))
        for info in members:
            if info.file_size > RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(
                info.compress_size, 1
            ):
                raise _Refused(
                    f"refused: a part of the workbook would decompress "
                    f"{info.file_size // max(info.compress_size, 1):,}:1 "
                    f"({files.megabytes(info.file_size)} MB; limit {MAX_RATIO}:1 on parts over "
                    f"{files.megabytes(RATIO_MIN_BYTES)} MB); a zip bomb or an export gone wrong"
                )
        if not options.allow_macros and any(_holds_macros(info.filename) for info in members):
            raise _Refused(MACROS_REFUSED)
        # Declared sizes can lie: inflate every member once, counting, before an engine does.
        budget = limit
        for info in members:
            try:
                with archive.open(info) as member:
                    while chunk := member.read(_CHUNK):
                        budget -= len(chunk)
                        if budget < 0:
                            raise _Refused(_too_big(limit - budget, limit))
            except (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, ValueError):
                return (
                    "the workbook's zip archive is damaged: a part does not match its recorded "
                    "size or checksum (truncated or tampered)"
                )
            except NotImplementedError:
                return "the workbook's zip archive uses a compression method that is not supported"
            except RuntimeError:
                return "a part of the workbook's zip archive is encrypted"
    return None


def _too_big(size: int, limit: int) -> str:
    return (
        f"refused: the workbook would decompress to {files.megabytes(size)} MB "
        f"(limit {files.megabytes(limit)} MB); a zip bomb or an export gone wrong"
    )


def _locate(
    book: Workbook, path: Path, source: str, wanted: str | None, form: _Form
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
            keys = [_squash(cell) if isinstance(cell, str) else "" for cell in row]
            if all(key in keys for key in form.required):
                return name, number, _positions(keys, path, source, name, number, form), rows
    where = f"sheet {wanted!r} does not have" if wanted is not None else "no sheet has"
    raise SourceFileError(
        str(path),
        f"{where} the expected header row ({form.labels}, ...) within its first "
        f"{HEADER_SEARCH_ROWS} rows; fix the header names or name the sheet to read",
        source=source,
    )


def _positions(keys: list[str], path: Path, source: str, sheet: str, row: int,
               form: _Form) -> dict[int, str]:
    positions: dict[int, str] = {}
    for index, key in enumerate(keys):
        column = form.keys.get(key)
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


def _batches(located: _Located, batch_rows: int) -> Iterator[pa.Table]:
    index_of = {column: index for index, column in located.positions.items()}
    picks = [index_of.get(column) for column in located.form.columns]
    keys = files.DuplicateKeys()
    pending: list[Sequence[Cell]] = []
    refs: list[str] = []
    for number, row in enumerate(located.rows, start=located.header_row + 1):
        if not any(cell.strip() if isinstance(cell, str) else cell is not None for cell in row):
            continue  # fully blank rows are layout, not data
        pending.append(row)
        refs.append(f"{located.ref_prefix}:row={number}")
        if len(pending) >= batch_rows:
            yield _table(pending, picks, refs, keys, located.form)
            pending, refs = [], []
    if pending:
        yield _table(pending, picks, refs, keys, located.form)


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
    rows: list[Sequence[Cell]], picks: list[int | None], refs: list[str],
    keys: files.DuplicateKeys, form: _Form
) -> pa.Table:
    """Build the batch column by column: one pass per column is faster than one per cell."""
    arrays = [_column(rows, index) for index in picks]
    return files.batch_table(form.schema, arrays, refs, keys, key=form.key)


def _column(rows: list[Sequence[Cell]], index: int | None) -> pa.Array:
    if index is None:
        return pa.nulls(len(rows), pa.string())
    cells = [row[index] if index < len(row) else None for row in rows]
    # Text cells are the common case; skip the call for them.
    return pa.array(
        [(cell or None) if type(cell) is str else cell_text(cell) for cell in cells], pa.string()
    )
