"""An .xlsx sheet read by python-calamine in slices gives what the whole sheet gives."""

from __future__ import annotations

import datetime as dt
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openpyxl
import pyarrow as pa
import pytest
import python_calamine

from etl_tasks import demo_files
from etl_tasks.sources import excel, xlsx_slices

HEADER = ["MRN", "First Name", "Last Name", "Date of Birth", "Sex", "ZIP", "Phone",
          "Registration Date", "Clinic", "Insurance ID"]  # fmt: skip


def whole(path: Path, sheet: str) -> list[list[Any]]:
    """python-calamine's rows of the whole sheet, from row 1 and column A, "" as None."""
    book = python_calamine.CalamineWorkbook.from_path(path)
    values = book.get_sheet_by_name(sheet)
    column = values.start[1] if values.start else 0
    return [normal([None] * column + row) for row in values.iter_rows()]


def normal(row: Sequence[Any]) -> list[Any]:
    cells = [None if cell == "" else cell for cell in row]
    while cells and cells[-1] is None:
        cells.pop()
    return cells


def sliced(path: Path, sheet: str) -> list[list[Any]]:
    rows = xlsx_slices.rows(path, sheet)
    assert rows is not None, "the sheet was not sliced"
    result = [normal(row) for row in rows]
    while result and not result[-1]:
        result.pop()
    return result


def batches(path: Path, *, slices: bool, monkeypatch: pytest.MonkeyPatch) -> pa.Table:
    with monkeypatch.context() as patch:
        if not slices:
            patch.setattr(excel, "_SLICED", frozenset())
        return pa.concat_tables(excel.iter_batches(path, batch_rows=97, source="reg"))


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Slices of about 2 KB, so that a small sheet is read in many; counts the slices read."""
    monkeypatch.setattr(xlsx_slices, "SLICE_BYTES", 2_000)
    read = xlsx_slices._read_slice
    counted: list[int] = []

    def counting(*args: Any) -> Any:
        counted.append(1)
        return read(*args)

    monkeypatch.setattr(xlsx_slices, "_read_slice", counting)
    return counted


def mixed_workbook(path: Path) -> Path:
    """Every kind of cell openpyxl writes, with title rows, gaps, a late first column and
    number formats for dates, times and durations."""
    book = openpyxl.Workbook()
    notes = book.active
    notes.title = "Notes"
    notes["B2"] = "no header here"
    data = book.create_sheet("Data")
    data["C1"] = "Clinic registrations export"
    for column, label in enumerate(HEADER, start=2):
        data.cell(row=4, column=column, value=label)
    values: list[Any] = [
        "A1", " padded ", 7, 6175550123, 0.1, -2.5, True, False, dt.date(1961, 4, 2),
        dt.datetime(2026, 11, 3, 9, 30), dt.datetime(2026, 1, 2, 3, 4, 5, 600_000),
        dt.time(9, 30), dt.timedelta(hours=30), "=1+1", "Zoë µmol/L", "line\nbreak", 46329,
        "&<>\"'", "_x000D_", 1e300, -3650,
    ]  # fmt: skip
    row = 5
    for n in range(400):
        if n % 37 == 5:
            row += 3  # blank rows between data rows
        for column in range(2, 12):
            value = values[(n + column * 3) % len(values)]
            cell = data.cell(row=row, column=column, value=value)
            if (n % 11 == 0 and isinstance(value, int | float) and not isinstance(value, bool)
                    and abs(value) < 100_000):
                cell.number_format = ("yyyy-mm-dd", "[h]:mm:ss", "h:mm AM/PM", "0.00")[n % 4]
        row += 1
    data.cell(row=row + 5, column=20, value="far right, far down")
    book.save(path)
    return path


def test_slices_equal_the_whole_sheet_cell_for_cell(tmp_path, small_slices):
    """Every row, cell and type python-calamine gives for the whole sheet, in many slices."""
    path = mixed_workbook(tmp_path / "mixed.xlsx")
    expected = whole(path, "Data")
    assert sliced(path, "Data") == expected
    assert len(small_slices) > 5
    assert {type(cell) for row in expected for cell in row} >= {
        str, float, bool, dt.date, dt.datetime, dt.time, dt.timedelta}


def test_reader_output_is_the_same_sliced_or_whole(tmp_path, monkeypatch, small_slices):
    """The registrations reader gives the same batches, refs and duplicate flags either way."""
    path = mixed_workbook(tmp_path / "mixed.xlsx")
    assert batches(path, slices=True, monkeypatch=monkeypatch).equals(
        batches(path, slices=False, monkeypatch=monkeypatch))
    assert small_slices


def test_demo_workbooks_read_the_same_sliced(tmp_path, monkeypatch, small_slices):
    """The demo uploads (title rows, blank rows, a Notes sheet, planted defects)."""
    for manifest in demo_files.write_registrations(tmp_path, files=3, rows_per_file=150):
        path = tmp_path / manifest.name
        table = batches(path, slices=True, monkeypatch=monkeypatch)
        assert table.num_rows == manifest.rows
        assert table.equals(batches(path, slices=False, monkeypatch=monkeypatch))


def rewrite_sheet(source: Path, target: Path, change: Any) -> Path:
    """A copy of `source` whose first data sheet's XML is passed through `change`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename == "xl/worksheets/sheet2.xml":
                body = change(body)
            dst.writestr(info, body)
    return target


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda xml: xml.replace(b"</row>", b"</row><!-- </row> -->", 1), "a comment"),
        (lambda xml: re.sub(rb'<row r="\d+"', b"<row", xml, count=3), "without its number"),
        (lambda xml: xml.replace(b"</row>", b"</rows>", 1), "not well-formed"),
        (lambda xml: xml.replace(b'<row r="5"', b'<row r="900"', 1), "out of order"),
    ],
    ids=["comment", "unnumbered-rows", "malformed", "out-of-order"],
)
def test_sheets_not_safe_to_cut_are_read_whole(tmp_path, monkeypatch, caplog, change, reason):
    """A comment among the rows, rows without numbers or out of order, XML libxml2 refuses:
    the sheet is read whole by python-calamine, exactly as before slicing, and the log says
    why."""
    path = rewrite_sheet(mixed_workbook(tmp_path / "mixed.xlsx"), tmp_path / "odd.xlsx", change)
    caplog.set_level("INFO", logger=xlsx_slices.__name__)
    assert xlsx_slices.rows(path, "Data") is None
    assert reason in caplog.text
    try:
        expected = batches(path, slices=False, monkeypatch=monkeypatch)
    except Exception as exc:  # noqa: BLE001 - the whole-sheet reader's verdict, whatever it is
        with pytest.raises(type(exc)):
            batches(path, slices=True, monkeypatch=monkeypatch)
    else:
        assert batches(path, slices=True, monkeypatch=monkeypatch).equals(expected)


def test_a_sheet_without_rows_and_the_1904_date_system(tmp_path, small_slices):
    """An empty sheet gives no rows; dates of a 1904 workbook are read as calamine reads them."""
    book = openpyxl.Workbook()
    book.active.title = "Empty"
    dates = book.create_sheet("Dates")
    book.epoch = openpyxl.utils.datetime.CALENDAR_MAC_1904
    for n in range(60):
        dates.cell(row=n + 1, column=1, value=dt.date(1990, 1, 1) + dt.timedelta(days=97 * n))
        dates.cell(row=n + 1, column=2, value=n * 1.25).number_format = "yyyy-mm-dd hh:mm"
    path = tmp_path / "mac.xlsx"
    book.save(path)
    assert (xlsx_slices.rows(path, "Empty") or []) == [] or whole(path, "Empty") == []
    assert sliced(path, "Dates") == whole(path, "Dates")
