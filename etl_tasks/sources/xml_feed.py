"""Partner lab feeds (XML): stream record elements out of a file as Arrow batches of text.

The parser is hardened (no entity expansion, no network, no DTD loading, no huge trees) and a
document whose DOCTYPE declares entities is refused whole. Values are kept exactly as written;
stripping and typing belong to the transform.

The layout is configuration, so a new partner is a config entry: `record` is the local name of
the record element and `fields` maps output columns to simple paths below it (`Patient/Id`,
`Test/@code`, `Test` for its text, `@id` for the record's own attribute), matched by local
name in any namespace or none. The output columns are the lab results' (COLUMNS) unless the
source's dataset declares its own (`columns`, then a field's default path is its name).
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
from lxml import etree

from etl_tasks.errors import EtlError, FatalError, SourceFileError
from etl_tasks.sources import files

log = logging.getLogger(__name__)

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
SCHEMA = files.text_schema(COLUMNS)
EXTENSIONS = frozenset({".xml"})
DEFAULT_RECORD = "Result"
DEFAULT_FIELDS: Mapping[str, str] = {
    "result_id": "ResultId",
    "patient_id": "Patient/Id",
    "birth_date": "Patient/BirthDate",
    "test_code": "Test/@code",
    "test_system": "Test/@system",
    "test_name": "Test",
    "value": "Value",
    "unit": "Unit",
    "ref_low": "ReferenceRange/@low",
    "ref_high": "ReferenceRange/@high",
    "collected_at": "CollectedAt",
    "reported_at": "ReportedAt",
    "status": "Status",
}
"""The layout of DESIGN.md: output column -> path relative to the `Result` record."""
OnTruncated = Literal["quarantine_file", "keep_complete_records"]
_NAME = re.compile(r"[A-Za-z_][\w.\-]*\Z")
_PROLOG_BYTES = 64 * 1024
_DOCTYPE = re.compile(r"\s*(?:<\?.*?\?>\s*|<!--.*?-->\s*)*<!DOCTYPE\b", re.DOTALL)


def iter_batches(
    path: Path,
    *,
    batch_rows: int,
    source: str,
    record: str = DEFAULT_RECORD,
    fields: Mapping[str, str] | None = None,
    on_truncated: OnTruncated = "quarantine_file",
    columns: Sequence[str] = COLUMNS,
    duplicate_key: Sequence[str] | None = None,
    **layout: Any,
) -> Iterator[pa.Table]:
    """Yield the file's `record` elements as tables of at most `batch_rows` rows (SCHEMA, or
    the text schema of `columns`).

    `fields` maps output columns to paths below the record (default DEFAULT_FIELDS, or each
    column's own name for other `columns`); columns it leaves out are null. A record whose
    `duplicate_key` values were on an earlier record of the file is flagged `_duplicate`
    (default: ResultId for the lab results' columns).
    Memory stays flat: each record is cleared from the tree once read.
    When the XML breaks off (truncated or damaged; a parser cannot tell the two apart), the
    complete records before the break have already been yielded; then with `on_truncated`
    "quarantine_file" SourceFileError names the line (the caller discards what it got), with
    "keep_complete_records" the reader stops there and logs a warning with the line. A break
    before the first complete record is always a SourceFileError.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if layout:
        raise FatalError(f"unknown layout options for an XML feed: {sorted(layout)}", source=source)
    columns = tuple(columns)
    if duplicate_key is None:
        duplicate_key = ("result_id",) if columns == COLUMNS else ()
    compiled = _compile_layout(record, fields, on_truncated, source, columns,
                               tuple(duplicate_key))
    try:
        yield from _read(path, batch_rows, source, compiled)
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
        return files.classify_os_error(exc, where, source)
    return FatalError(
        f"{where}: unexpected {type(exc).__name__} while reading the XML feed; see the traceback",
        source=source,
    )


def _read(path: Path, batch_rows: int, source: str, layout: _Layout) -> Iterator[pa.Table]:
    if path.stat().st_size == 0:
        raise SourceFileError(
            str(path), "the file is empty (0 bytes); ask the partner to resend it", source=source
        )
    if _prolog_declares_entities(path):
        _refuse(path, source)
    keys = files.DuplicateKeys()
    width = len(layout.columns)
    columns: list[list[str | None]] = [[] for _ in range(width)]
    refs: list[str] = []
    number = 0
    checked = False
    fields, record_attributes = layout.fields, layout.record_attributes
    failure: etree.XMLSyntaxError | None = None
    # Opened as bytes so that libxml2 honours the BOM and the prolog's declared encoding.
    with path.open("rb") as stream:
        events = etree.iterparse(
            stream,
            events=("end",),
            tag=layout.tag,
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
                values: list[str | None] = [None] * width
                for name, attribute_column in record_attributes:
                    values[attribute_column] = elem.get(name)
                _fill(values, elem, fields)
                _release(elem)
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
                refs.append(f"{path.name}#record={number}")
                if len(refs) >= batch_rows:
                    yield _table(columns, refs, keys, layout)
                    columns = [[] for _ in range(width)]
                    refs = []
        except etree.XMLSyntaxError as exc:
            failure = exc
        if not checked and events.root is not None:
            _refuse_entities(events.root.getroottree().docinfo, path, source)
    if refs:
        yield _table(columns, refs, keys, layout)
    if failure is not None:
        if layout.on_truncated == "keep_complete_records" and number > 0:
            line, at_column = _error_position(failure)
            log.warning(
                "%s: the XML breaks off at line %d, column %d; kept the %d complete records "
                "before it (on_truncated=keep_complete_records)",
                path.name,
                line,
                at_column,
                number,
            )
            return
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


@dataclass(frozen=True)
class _Spec:
    """What one element below the record gives: its text, attributes, and deeper fields."""

    text_columns: tuple[int, ...]
    attributes: tuple[tuple[str, int], ...]
    children: _Fields | None


class _Fields:
    """Where each child element's text and attributes go, by tag, cached per namespace.

    Tags are resolved to local names once per distinct tag, not once per element: this
    loop runs for every element of the file.
    """

    def __init__(self, spec: Mapping[str, _Spec]) -> None:
        self._spec = spec
        self._by_tag: dict[Any, _Spec | None] = {}

    def lookup(self, tag: Any) -> _Spec | None:
        try:
            return self._by_tag[tag]
        except KeyError:
            # Entity references and other non-elements have a function as tag.
            found = self._spec.get(tag.rpartition("}")[2]) if isinstance(tag, str) else None
            self._by_tag[tag] = found
            return found


@dataclass(frozen=True)
class _Layout:
    tag: str
    fields: _Fields
    record_attributes: tuple[tuple[str, int], ...]
    on_truncated: OnTruncated
    columns: tuple[str, ...]
    schema: pa.Schema
    key: tuple[int, ...]
    """Positions of the columns whose repeat within the file is flagged."""


class _Node:
    """A path tree under construction: one per element name below the record."""

    def __init__(self) -> None:
        self.text_columns: list[int] = []
        self.attributes: list[tuple[str, int]] = []
        self.children: dict[str, _Node] = {}

    def freeze(self) -> _Fields:
        return _Fields(
            {
                name: _Spec(
                    tuple(node.text_columns),
                    tuple(node.attributes),
                    node.freeze() if node.children else None,
                )
                for name, node in self.children.items()
            }
        )


def _compile_layout(
    record: str, fields: Mapping[str, str] | None, on_truncated: str, source: str,
    columns: tuple[str, ...] = COLUMNS, duplicate_key: tuple[str, ...] = ("result_id",),
) -> _Layout:
    """Check the layout options and turn the field paths into a lookup tree."""

    def bad(message: str) -> FatalError:
        return FatalError(f"XML layout: {message}", source=source)

    if not isinstance(record, str) or not _NAME.match(record):
        raise bad(f"record must be an element's local name, not {record!r}")
    if on_truncated not in get_args(OnTruncated):
        raise bad(f"on_truncated must be one of {list(get_args(OnTruncated))}")
    if fields is None:
        fields = DEFAULT_FIELDS if columns == COLUMNS else {name: name for name in columns}
    if unknown := [name for name in duplicate_key if name not in columns]:
        raise bad(f"the duplicate key names {unknown}, which are not output columns")
    if not isinstance(fields, Mapping) or not fields:
        raise bad("fields must map output columns to paths below the record")
    root = _Node()
    for column, path in fields.items():
        if column not in columns:
            raise bad(f"fields names {column!r}, which is not an output column ({columns})")
        if not isinstance(path, str):
            raise bad(f"the path of {column!r} must be text like 'Patient/Id' or 'Test/@code'")
        steps = path.split("/")
        attribute = steps.pop()[1:] if steps[-1].startswith("@") else None
        names = [*steps, attribute] if attribute is not None else steps
        if not all(_NAME.match(name) for name in names):
            raise bad(
                f"the path of {column!r} ({path!r}) must be local names separated by '/', "
                "optionally ending in @attribute"
            )
        index = columns.index(column)
        node = root
        for name in steps:
            node = node.children.setdefault(name, _Node())
        if attribute is not None:
            node.attributes.append((attribute, index))
        elif node is root:
            raise bad(f"the path of {column!r} is empty")
        else:
            node.text_columns.append(index)
    return _Layout(
        tag="{*}" + record,
        fields=root.freeze(),
        record_attributes=tuple(root.attributes),
        on_truncated=on_truncated,  # type: ignore[arg-type]
        columns=columns,
        schema=SCHEMA if columns == COLUMNS else files.text_schema(columns),
        key=tuple(columns.index(name) for name in duplicate_key),
    )


def _fill(values: list[str | None], elem: Any, fields: _Fields) -> None:
    """Write the fields found among `elem`'s children into `values` (None = absent)."""
    lookup = fields.lookup
    for child in elem:
        spec = lookup(child.tag)
        if spec is None:
            continue
        # Of two elements with the same name the first wins, as with find().
        for column in spec.text_columns:
            if values[column] is None:
                # Present but empty is "", not None; mixed content keeps all its text.
                values[column] = "".join(child.itertext()) if len(child) else child.text or ""
        for name, attribute_column in spec.attributes:
            if values[attribute_column] is None:
                values[attribute_column] = child.get(name)
        if spec.children is not None:
            _fill(values, child, spec.children)


def _release(elem: Any) -> None:
    elem.clear(keep_tail=True)
    # Records already read stay attached to the root unless removed; drop them.
    parent = elem.getparent()
    if parent is not None:
        while elem.getprevious() is not None:
            del parent[0]


def _table(columns: list[list[str | None]], refs: list[str], keys: files.DuplicateKeys,
           layout: _Layout) -> pa.Table:
    arrays = [pa.array(values, pa.string()) for values in columns]
    return files.batch_table(layout.schema, arrays, refs, keys, key=layout.key)


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
