"""Partner lab feeds (XML): stream `Result` records out of a file as Arrow batches of text.

The parser is hardened (no entity expansion, no network, no DTD loading, no huge trees) and a
document whose DOCTYPE declares entities is refused whole. Values are kept exactly as written;
stripping and typing belong to the transform.
"""

from __future__ import annotations

import codecs
import errno
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from lxml import etree

from etl_tasks.errors import EtlError, FatalError, SourceFileError, TransientError

COLUMNS = (
    "result_id",
    "patient_id",
    "birth_date",
    "test_code",
    "test_system",
    "test_name",
    "value",
    "unit",
    "ref_low",
    "ref_high",
    "collected_at",
    "reported_at",
    "status",
)
SCHEMA = pa.schema(
    [pa.field(name, pa.string()) for name in COLUMNS]
    + [
        pa.field("_source_ref", pa.string(), nullable=False),
        pa.field("_duplicate", pa.bool_(), nullable=False),
    ]
)
RECORD_TAG = "{*}Result"
"""lxml wildcard: the local name `Result` in any namespace or none."""

# Errors of the OS that a later attempt may not see again (file moved under us, NFS blip).
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
_PROLOG_BYTES = 64 * 1024
_DOCTYPE = re.compile(r"\s*(?:<\?.*?\?>\s*|<!--.*?-->\s*)*<!DOCTYPE\b", re.DOTALL)
_OS_ERRNO = re.compile(r"\(os error (\d+)\)")


def iter_batches(path: Path, *, batch_rows: int, source: str, **layout: Any) -> Iterator[pa.Table]:
    """Yield the file's `Result` records as tables of at most `batch_rows` rows (SCHEMA).

    Memory stays flat: each record is cleared from the tree once read. When the file breaks
    off (truncated, malformed), every complete record before the break has already been
    yielded, then SourceFileError names the line; the caller decides whether those count.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if layout:
        raise FatalError(f"unknown layout options for an XML feed: {sorted(layout)}", source=source)
    try:
        yield from _read(path, batch_rows, source)
    except EtlError:
        raise
    except Exception as exc:
        raise classify(exc, path=path, source=source) from exc


def classify(
    exc: BaseException, *, path: Path | None = None, source: str | None = None
) -> EtlError:
    """Map an exception met while reading a feed to the pipeline's error tree."""
    if isinstance(exc, EtlError):
        return exc
    where = str(path) if path is not None else getattr(exc, "filename", None) or "<xml feed>"
    if isinstance(exc, etree.XMLSyntaxError):
        line, column = _error_position(exc)
        at = f"line {line}, column {column}" if line > 0 else "an unknown line"
        # The libxml2 message is left out on purpose: it can quote bytes of the document.
        return SourceFileError(
            where,
            f"the XML is not well-formed at {at} (a truncated or damaged file, or bytes that "
            "do not match the declared encoding); ask the partner to resend it",
            source=source,
        )
    if isinstance(exc, etree.LxmlError | UnicodeError):
        return SourceFileError(
            where, "the XML parser rejected the file; ask the partner to resend it", source=source
        )
    if isinstance(exc, OSError):
        return _classify_os_error(exc, where, source)
    return FatalError(
        f"{where}: unexpected {type(exc).__name__} while reading the XML feed; see the traceback",
        source=source,
    )


def _read(path: Path, batch_rows: int, source: str) -> Iterator[pa.Table]:
    if path.stat().st_size == 0:
        raise SourceFileError(
            str(path), "the file is empty (0 bytes); ask the partner to resend it", source=source
        )
    if _prolog_declares_entities(path):
        _refuse(path, source)
    seen: set[str] = set()
    columns: list[list[str | None]] = [[] for _ in COLUMNS]
    refs: list[str] = []
    duplicates: list[bool] = []
    number = 0
    checked = False
    fields, patient = _Fields(_RESULT_SPEC), _Fields(_PATIENT_SPEC)
    failure: etree.XMLSyntaxError | None = None
    # Opened as bytes so that libxml2 honours the BOM and the prolog's declared encoding.
    with path.open("rb") as stream:
        events = etree.iterparse(
            stream,
            events=("end",),
            tag=RECORD_TAG,
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
            remove_comments=True,
            remove_pis=True,
        )
        try:
            for _event, elem in events:
                if not checked:
                    # The whole internal DTD subset precedes the root element, so one look suffices.
                    _refuse_entities(elem.getroottree().docinfo, path, source)
                    checked = True
                number += 1
                values: list[str | None] = [None] * len(COLUMNS)
                _fill(values, elem, fields, patient)
                _release(elem)
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
                refs.append(f"{path.name}#record={number}")
                key = (values[0] or "").strip()
                duplicates.append(key in seen)
                if key:
                    seen.add(key)
                if len(refs) >= batch_rows:
                    yield _table(columns, refs, duplicates)
                    columns = [[] for _ in COLUMNS]
                    refs, duplicates = [], []
        except etree.XMLSyntaxError as exc:
            failure = exc
        if not checked and events.root is not None:
            _refuse_entities(events.root.getroottree().docinfo, path, source)
    if refs:
        yield _table(columns, refs, duplicates)
    if failure is not None:
        raise failure


def _prolog_declares_entities(path: Path) -> bool:
    """Look for `<!ENTITY` after a DOCTYPE in the file's head, before libxml2 sees it.

    libxml2 meets a billion-laughs reference with a generic amplification error, so this
    pre-scan is what gives the precise reason; the docinfo check covers larger DTDs.
    """
    with path.open("rb") as stream:
        head = stream.read(_PROLOG_BYTES)
    head = head.removeprefix(codecs.BOM_UTF8)
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        text = head[: len(head) // 2 * 2].decode("utf-16", errors="ignore")
    elif head[:2] in (b"<\0", b"\0<"):
        codec = "utf-16-le" if head[0] else "utf-16-be"
        text = head[: len(head) // 2 * 2].decode(codec, errors="ignore")
    else:
        text = head.decode("latin-1")  # markup is ASCII in every ASCII-compatible encoding
    doctype = _DOCTYPE.match(text)
    return doctype is not None and "<!ENTITY" in text[doctype.end() :]


def _refuse_entities(docinfo: Any, path: Path, source: str) -> None:
    dtd = docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        _refuse(path, source)


def _refuse(path: Path, source: str) -> None:
    raise SourceFileError(
        str(path),
        "the DOCTYPE declares entities (possible entity-expansion or external-entity "
        "attack); the file is refused, ask the partner to send it without a DTD",
        source=source,
    )


class _Fields:
    """Where each child element's text and attributes go, by tag, cached per namespace.

    Tags are resolved to local names once per distinct tag, not once per element: this
    loop runs for every element of the file.
    """

    def __init__(self, spec: Mapping[str, tuple[int, tuple[tuple[str, int], ...]]]) -> None:
        self._spec = spec
        self._by_tag: dict[Any, tuple[int, tuple[tuple[str, int], ...]] | None] = {}

    def lookup(self, tag: Any) -> tuple[int, tuple[tuple[str, int], ...]] | None:
        try:
            return self._by_tag[tag]
        except KeyError:
            # Entity references and other non-elements have a function as tag.
            found = self._spec.get(tag.rpartition("}")[2]) if isinstance(tag, str) else None
            self._by_tag[tag] = found
            return found


_NESTED = -1
_NO_TEXT = -2
# Local name -> (column of its text, ((attribute, column), ...)); _NESTED descends into Patient.
_RESULT_SPEC = {
    "ResultId": (0, ()),
    "Patient": (_NESTED, ()),
    "Test": (5, (("code", 3), ("system", 4))),
    "Value": (6, ()),
    "Unit": (7, ()),
    "ReferenceRange": (_NO_TEXT, (("low", 8), ("high", 9))),
    "CollectedAt": (10, ()),
    "ReportedAt": (11, ()),
    "Status": (12, ()),
}
_PATIENT_SPEC = {"Id": (1, ()), "BirthDate": (2, ())}


def _fill(values: list[str | None], elem: Any, fields: _Fields, patient: _Fields) -> None:
    """Write the fields found among `elem`'s children into `values` (None = absent)."""
    lookup = fields.lookup
    for child in elem:
        spec = lookup(child.tag)
        if spec is None:
            continue
        column, attributes = spec
        if column == _NESTED:
            _fill(values, child, patient, patient)
            continue
        # Of two elements with the same name the first wins, as with find().
        if column != _NO_TEXT and values[column] is None:
            # Present but empty is "", not None; mixed content keeps all its text.
            values[column] = "".join(child.itertext()) if len(child) else child.text or ""
        for name, attribute_column in attributes:
            if values[attribute_column] is None:
                values[attribute_column] = child.get(name)


def _release(elem: Any) -> None:
    elem.clear(keep_tail=True)
    # Records already read stay attached to the root unless removed; drop them.
    parent = elem.getparent()
    if parent is not None:
        while elem.getprevious() is not None:
            del parent[0]


def _table(columns: list[list[str | None]], refs: list[str], duplicates: list[bool]) -> pa.Table:
    arrays = [pa.array(values, pa.string()) for values in columns]
    arrays += [pa.array(refs, pa.string()), pa.array(duplicates, pa.bool_())]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _error_position(exc: Any) -> tuple[int, int]:
    line, column = exc.position
    if line > 0:
        return int(line), int(column)
    # Some errors (an undefined entity) carry their position only in the error log, which
    # may still hold entries of earlier parses: the last entry is this one's.
    for entry in reversed(exc.error_log):
        if entry.line > 0:
            return int(entry.line), int(entry.column)
    return 0, 0


def _classify_os_error(exc: OSError, where: str, source: str | None) -> EtlError:
    number = exc.errno
    if number is None and (match := _OS_ERRNO.search(str(exc))):
        number = int(match.group(1))  # Rust-backed readers put the errno in the message only
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
