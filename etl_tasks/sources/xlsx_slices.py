"""A large .xlsx/.xlsm sheet read by python-calamine in slices of rows, in bounded memory.

python-calamine (0.9.1) has no lazy rows: `get_sheet_by_name` builds the whole sheet in memory
first (about 1 KB per row of ten cells, so hundreds of MB for a few hundred thousand rows). Here
the sheet's XML is cut, between two `</row>` tags, into slices of about SLICE_BYTES; each slice
becomes a small workbook in memory (the original's workbook, relationships, styles and shared
strings parts, and the sheet part made of the original's opening up to `<sheetData>`, the
slice's rows and the closing tags) that python-calamine reads whole. Cell values are therefore
python-calamine's own, and every row keeps its number because every row element states it
(`r`). Memory follows the slice, plus the shared strings part once per slice workbook.

A sheet is sliced only after one pass of libxml2 over its XML (no tree built) has found it
well-formed, with every row numbered and no comment, CDATA section or processing instruction
among its rows (where a `</row>` could hide). Any other sheet is read whole by python-calamine,
as before: `rows` returns None and says why in the log.
"""

from __future__ import annotations

import io
import logging
import operator
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import python_calamine
from lxml import etree

log = logging.getLogger(__name__)

SLICE_BYTES = 4 << 20
"""Bytes of row XML per slice (about 7,500 rows of ten cells with inline strings)."""
_BLOCK = 1 << 20
_PARSER = {"resolve_entities": False, "no_network": True, "load_dtd": False,
           "huge_tree": False}
_NAME = rb"(?:[A-Za-z_][\w.-]*:)?"
_SHEET_DATA = re.compile(rb"<(" + _NAME + rb"sheetData)(?=[\s/>])[^>]*?(/?)>")
_SHEET_DATA_END = re.compile(rb"</" + _NAME + rb"sheetData\s*>")
_ROOT = re.compile(rb"<(" + _NAME + rb"[A-Za-z_][\w.-]*)(?=[\s/>])")
_SHARED_PARTS = ("[Content_Types].xml", "_rels/.rels")


def rows(path: Path, sheet: str) -> Iterator[list[Any]] | None:
    """The sheet's rows from Excel row 1 (gaps as empty rows, cells from column A), read in
    slices; None when the sheet is not one to slice (read it whole instead)."""
    with zipfile.ZipFile(path) as archive:
        names = {name.replace("\\", "/").lower(): name for name in archive.namelist()}
        try:
            found = _sheet_part(archive, names, sheet)
        except etree.LxmlError:
            found = None  # python-calamine opened it: let it read the sheet whole
        if found is None:
            log.info("%s: sheet %r read whole: its part was not found", path.name, sheet)
            return None
        part, folder = found
        member = names.get(part.lower())
        if member is None:
            return None
        with archive.open(member) as stream:
            shape = _inspect(stream)
        if isinstance(shape, str):
            log.info("%s: sheet %r read whole: %s", path.name, sheet, shape)
            return None
        parts = {}
        for name in (*_SHARED_PARTS, f"{folder}workbook.xml", f"{folder}_rels/workbook.xml.rels",
                     f"{folder}styles.xml", f"{folder}sharedStrings.xml"):
            if (original := names.get(name.lower())) is not None:
                parts[original] = archive.read(original)
    return _slices(path, member, sheet, shape, parts)


def _part(archive: zipfile.ZipFile, names: dict[str, str], name: str) -> Any:
    member = names.get(name.lower())
    if member is None:
        return None
    with archive.open(member) as stream:
        return etree.parse(stream, etree.XMLParser(**_PARSER)).getroot()


def _local(elem: Any) -> str:
    return etree.QName(elem).localname if isinstance(elem.tag, str) else ""


def _sheet_part(archive: zipfile.ZipFile, names: dict[str, str],
                sheet: str) -> tuple[str, str] | None:
    """The zip member of a worksheet, found as calamine finds it, and the workbook's folder."""
    package = _part(archive, names, "_rels/.rels")
    if package is None:
        return None
    target = next((rel.get("Target") or "" for rel in package.iter() if _local(rel) ==
                   "Relationship" and (rel.get("Type") or "").endswith("/officeDocument")), None)
    if target is None:
        return None
    folder = target[: target.rfind("/") + 1].removeprefix("/") if "/" in target else ""
    rels = _part(archive, names, f"{folder}_rels/workbook.xml.rels")
    book = _part(archive, names, f"{folder}workbook.xml")
    if rels is None or book is None:
        return None
    targets = {rel.get("Id"): (rel.get("Target") or "", rel.get("Type") or "")
               for rel in rels.iter() if _local(rel) == "Relationship"}
    for elem in book.iter():
        if _local(elem) == "sheet" and elem.get("name") == sheet:
            rel_id = next((v for k, v in elem.attrib.items() if etree.QName(k).localname == "id"),
                          None)
            where, kind = targets.get(rel_id, ("", ""))
            if not where or not kind.endswith("/worksheet"):
                return None
            return (where[1:] if where.startswith("/") else f"{folder}{where}"), folder
    return None


class SliceError(Exception):
    """A slice cannot be read; the reason quotes nothing from the file."""


class _Nothing:
    """A parser target without callbacks: libxml2 checks the document and builds nothing."""

    def close(self) -> None:
        return None


class _Shape:
    def __init__(self, head: bytes, tail: bytes, row_end: bytes) -> None:
        self.head = head
        """The sheet part up to and including its `<sheetData>` tag."""
        self.tail = tail
        """Closing tags for the sheetData and root elements."""
        self.row_end = row_end
        """The rows' end tag, in sheetData's namespace prefix."""


def _inspect(stream: IO[bytes]) -> _Shape | str:
    """Check the sheet in one pass: its shape, or why it is not sliced."""
    parser = etree.XMLParser(target=_Nothing(), **_PARSER)
    head: bytes | None = None
    tail = b""
    pending = b""
    ended = False
    last = 0
    prefix = b""
    row_tags = row_numbers = data_end = _SHEET_DATA_END
    first = stream.read(_BLOCK)
    if first[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in first[:256]:
        return "not an ASCII-compatible encoding"
    while block := first or stream.read(_BLOCK):
        first = b""
        try:
            parser.feed(block)
        except etree.XMLSyntaxError:
            return "its XML is not well-formed"
        text = pending + block
        cut = text.rfind(b">") + 1
        text, pending = text[:cut], text[cut:]
        if head is None:
            if len(text) + len(pending) > 64 * _BLOCK and _SHEET_DATA.search(text) is None:
                return "no sheetData in its first 64 MB"
            if (match := _SHEET_DATA.search(text)) is None:
                pending = text + pending
                continue
            if match.group(2):
                return "no rows"
            root = _ROOT.search(text, 0, match.start())
            while root is not None and text[root.start() + 1:root.start() + 2] in b"?!":
                root = _ROOT.search(text, root.end(), match.start())
            if root is None:
                return "no root element before sheetData"
            head = text[: match.end()]
            tail = b"</" + match.group(1) + b"></" + root.group(1) + b">"
            text = text[match.end():]
            prefix = re.escape(match.group(1)[: match.group(1).rfind(b":") + 1])
            # Rows in sheetData's namespace prefix (a literal start makes the scans fast).
            row_tags = re.compile(rb"<" + prefix + rb"row(?=[\s/>])")
            row_numbers = re.compile(
                rb"<" + prefix + rb"row\s[^>]*?(?<=\s)r\s*=\s*[\"']([0-9]+)[\"']")
            data_end = re.compile(rb"</" + prefix + rb"sheetData\s*>")
        if ended:
            continue
        end = data_end.search(text)
        rows_part = text[: end.start()] if end else text
        if b"<!" in rows_part or b"<?" in rows_part:
            return "a comment, CDATA section or processing instruction among its rows"
        if b":row" in rows_part and not prefix:
            return "rows in another namespace prefix than sheetData"
        numbers = [last, *map(int, row_numbers.findall(rows_part))]
        if len(numbers) - 1 != len(row_tags.findall(rows_part)):
            return "a row without its number (r), or not a plain number"
        if not all(map(operator.lt, numbers, numbers[1:])):
            return "rows out of order"
        last = numbers[-1]
        ended = end is not None
    try:
        parser.close()
    except etree.XMLSyntaxError:
        return "its XML is not well-formed"
    if head is None or not ended:
        return "no complete sheetData"
    qname = _SHEET_DATA.search(head)
    assert qname is not None
    prefix = qname.group(1)[: qname.group(1).rfind(b":") + 1]
    return _Shape(head, tail, b"</" + prefix + b"row>")


def _slices(path: Path, member: str, sheet: str, shape: _Shape,
            parts: dict[str, bytes]) -> Iterator[list[Any]]:
    """Read the sheet slice by slice; yield its rows with empty rows for the gaps."""
    next_row = 0
    shared = len(parts.get(next((n for n in parts if n.lower().endswith("sharedstrings.xml")),
                                ""), b""))
    # Each slice re-reads the shared strings: large ones make slices larger, up to 4 times.
    size = max(SLICE_BYTES, min(shared, 4 * SLICE_BYTES))
    with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
        for chunk in _row_chunks(stream, len(shape.head), size, shape.row_end):
            start, values = _read_slice(member, sheet, shape, parts, chunk)
            if start is None:
                continue
            first, column = start
            if first < next_row:
                raise SliceError("the sheet's rows are not in ascending order")
            while next_row < first:
                yield []
                next_row += 1
            pad = [None] * column
            for row in values:
                yield pad + row if column else row
            next_row = first + len(values)


def _row_chunks(stream: IO[bytes], skip: int, size: int, row_end: bytes) -> Iterator[bytes]:
    """The rows' XML after the first `skip` bytes, cut after a `row_end` tag about every
    `size` bytes, up to the end of sheetData. (Rows closed otherwise, say `</row >`, are never
    cut between: the slice grows until sheetData ends.)"""
    while skip > 0:
        skip -= len(stream.read(min(skip, _BLOCK)))
    buffer = bytearray()
    while True:
        block = stream.read(_BLOCK)
        searched = max(0, len(buffer) - 32)
        buffer += block
        end = _SHEET_DATA_END.search(buffer, searched)
        limit = end.start() if end is not None else len(buffer)
        while limit >= size:
            cut = buffer.rfind(row_end, 0, size)
            if cut <= 0:  # a row longer than a slice: cut after it
                cut = buffer.find(row_end, size, limit)
                if cut < 0:
                    break
            cut += len(row_end)
            yield bytes(buffer[:cut])
            del buffer[:cut]
            limit -= cut
        if end is not None:
            yield bytes(buffer[:limit])
            return
        if not block:
            raise SliceError("the sheet's XML ends inside its rows")


def _read_slice(member: str, sheet: str, shape: _Shape, parts: dict[str, bytes],
                chunk: bytes) -> tuple[tuple[int, int] | None, list[list[Any]]]:
    """python-calamine's values for a slice: its first (row, column) and its rows."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as book:
        for name, data in parts.items():
            book.writestr(name, data)
        book.writestr(member, b"".join((shape.head, chunk, shape.tail)))
    buffer.seek(0)
    workbook = python_calamine.CalamineWorkbook.from_filelike(buffer)
    try:
        values = workbook.get_sheet_by_name(sheet)
        start = values.start
        return start, (values.to_python(skip_empty_area=True) if start is not None else [])
    finally:
        workbook.close()
