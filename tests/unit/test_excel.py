"""The registration workbook reader: header search, cell text, blank rows, sheets, broken files."""

from __future__ import annotations

import datetime as dt
import errno
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import openpyxl
import pyarrow as pa
import pytest
import python_calamine

from etl_tasks.errors import FatalError, SourceFileError, TransientError
from etl_tasks.sources import excel

HEADER: list[object] = ["MRN", "First Name", "Last Name", "Date of Birth", "Sex", "ZIP", "Phone",
          "Registration Date", "Clinic", "Insurance ID"]  # fmt: skip


MANIFEST = (
    '<?xml version="1.0" encoding="UTF-8"?><manifest:manifest '
    'xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
    '<manifest:file-entry manifest:full-path="/" '
    'manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/>'
    '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
    "</manifest:manifest>"
)


def workbook(path: Path, sheets: Mapping[str, Sequence[Sequence[object]]]) -> Path:
    """Write `sheets` (name -> rows from Excel row 1) as a real .xlsx file."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for number, row in enumerate(rows, start=1):
            for column, value in enumerate(row, start=1):
                if value is not None:
                    sheet.cell(row=number, column=column, value=value)
    book.save(path)
    return path


def read_all(path: Path, batch_rows: int = 1000, **layout: Any) -> pa.Table:
    batches = list(excel.iter_batches(path, batch_rows=batch_rows, source="reg", **layout))
    return pa.concat_tables(batches) if batches else excel.SCHEMA.empty_table()


def person(mrn: object, **cells: object) -> list[object]:
    """A data row in HEADER order; keyword arguments override cells by output column."""
    values: dict[str, object] = {
        "mrn": mrn, "first_name": "Ana", "last_name": "Diaz", "date_of_birth": "1961-04-02",
        "sex": "F", "zip": "02134", "phone": "617-555-0123", "registration_date": "2026-11-03",
        "clinic": "North End Health", "insurance_id": "BCBS-1",
    }  # fmt: skip
    values.update(cells)
    return list(values.values())


def test_header_under_title_rows_and_real_row_numbers(tmp_path):
    """The header is found under a title and an empty row; refs carry real Excel rows."""
    path = workbook(tmp_path / "reg.xlsx", {"Registrations": [
        ["Clinic registrations export"], [], HEADER, person("A1"), person("A2"),
    ]})  # fmt: skip
    table = read_all(path)
    assert table.schema == excel.SCHEMA
    assert table["mrn"].to_pylist() == ["A1", "A2"]
    assert table["_source_ref"].to_pylist() == [
        "reg.xlsx!Registrations:row=4",
        "reg.xlsx!Registrations:row=5",
    ]


def test_header_names_match_case_and_space_insensitively_in_any_order(tmp_path):
    """`mrn`, ` ZIP `, `date  of BIRTH` and a shuffled order map to the canonical columns."""
    header = ["Clinic", " ZIP ", "mrn", "date  of BIRTH", "SEX", "phone", "Notes"]
    path = workbook(tmp_path / "reg.xlsx", {"S": [
        header, ["North End", "02134", "A1", "1961-04-02", "F", "617", "walk-in"],
    ]})  # fmt: skip
    [row] = read_all(path).to_pylist()
    assert (row["clinic"], row["zip"], row["mrn"]) == ("North End", "02134", "A1")
    assert (row["date_of_birth"], row["sex"], row["phone"]) == ("1961-04-02", "F", "617")
    # Columns the sheet lacks are null; columns nobody asked for are ignored.
    assert row["first_name"] is None
    assert row["insurance_id"] is None


def test_blank_rows_are_skipped_but_do_not_shift_row_numbers(tmp_path):
    """Empty and whitespace-only rows are not data; later rows keep their own numbers."""
    path = workbook(tmp_path / "reg.xlsx", {"S": [
        HEADER, person("A1"), [], [None, "   ", " "], person("A2"), [0],
    ]})  # fmt: skip
    table = read_all(path)
    assert table["_source_ref"].to_pylist() == ["reg.xlsx!S:row=2", "reg.xlsx!S:row=5",
                                                "reg.xlsx!S:row=6"]  # fmt: skip
    assert table["mrn"].to_pylist() == ["A1", "A2", "0"]  # a 0 cell is a value, not blank


def test_cells_become_text_without_losing_digits(tmp_path):
    """Phone and ZIP numbers lose no digit and gain no `.0`; date cells become ISO text."""
    path = workbook(tmp_path / "reg.xlsx", {"S": [HEADER, person(
        1234567, date_of_birth=dt.date(1961, 4, 2), zip=2134, phone=6175550123,
        registration_date=dt.datetime(2026, 11, 3, 9, 30), clinic=1.5, insurance_id=True,
    ), person(
        "A2", date_of_birth=dt.datetime(1961, 4, 2), zip=2134.0, phone=6175550123.0,
        registration_date=46329, sex=None, clinic="", insurance_id="  ",
    ), person("A3", date_of_birth="4/2/1961", registration_date="2026-11-03")]})  # fmt: skip
    rows = read_all(path).to_pylist()
    first, second, third = rows
    assert (first["mrn"], first["zip"], first["phone"]) == ("1234567", "2134", "6175550123")
    assert first["date_of_birth"] == "1961-04-02"
    assert first["registration_date"] == "2026-11-03T09:30:00"
    assert (first["clinic"], first["insurance_id"]) == ("1.5", "true")
    assert (second["zip"], second["phone"]) == ("2134", "6175550123")
    assert second["date_of_birth"] == "1961-04-02"  # midnight datetime -> date form
    assert second["registration_date"] == "46329"  # a serial stays a serial for the transform
    assert (second["sex"], second["clinic"], second["insurance_id"]) == (None, None, "  ")
    assert (third["date_of_birth"], third["registration_date"]) == ("4/2/1961", "2026-11-03")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, None), ("", None), (" x ", " x "), (True, "true"), (False, "false"), (7, "7"),
        (6175550123.0, "6175550123"), (0.1, "0.1"), (-2.5, "-2.5"),
        (dt.date(2026, 1, 2), "2026-01-02"), (dt.datetime(2026, 1, 2), "2026-01-02"),
        (dt.datetime(2026, 1, 2, 3, 4, 5, 600), "2026-01-02T03:04:05"),
        (dt.time(9, 30), "09:30:00"), (dt.timedelta(hours=30), "1 day, 6:00:00"),
    ],
)  # fmt: skip
def test_cell_text(value, text):
    """Each cell type engines return renders as the documented text."""
    assert excel.cell_text(value) == text


def test_duplicate_mrn_spans_batches_and_empty_mrn_never_duplicates(tmp_path):
    """A stripped MRN seen in an earlier batch flags the later row; empty MRNs are not keys."""
    rows = [HEADER] + [person(f"A{n}") for n in range(1, 8)]
    rows += [person(" A2 "), person(None, sex="M"), person("  "), person(None, sex="F")]
    path = workbook(tmp_path / "reg.xlsx", {"S": rows})
    batches = list(excel.iter_batches(path, batch_rows=3, source="reg"))
    assert [batch.num_rows for batch in batches] == [3, 3, 3, 2]
    table = pa.concat_tables(batches)
    flagged = table.filter(table["_duplicate"])["_source_ref"].to_pylist()
    assert flagged == ["reg.xlsx!S:row=9"]


def test_first_sheet_with_the_header_is_read(tmp_path):
    """A notes sheet without the header is passed over for the next sheet."""
    path = workbook(tmp_path / "reg.xlsx", {
        "Notes": [["Export of registrations"], ["MRN is the chart number"]],
        "Data": [HEADER, person("A1")],
        "Later": [HEADER, person("B1")],
    })  # fmt: skip
    assert read_all(path)["_source_ref"].to_pylist() == ["reg.xlsx!Data:row=2"]
    assert read_all(path, sheet="Later")["mrn"].to_pylist() == ["B1"]


def test_named_sheet_must_exist_and_have_the_header(tmp_path):
    """A sheet option naming a missing or headerless sheet is a SourceFileError."""
    path = workbook(tmp_path / "reg.xlsx", {"Notes": [["x"]], "Data": [HEADER]})
    with pytest.raises(SourceFileError, match="no sheet named 'Nope'"):
        read_all(path, sheet="Nope")
    with pytest.raises(SourceFileError, match="sheet 'Notes' does not have the expected header"):
        read_all(path, sheet="Notes")


def test_workbook_without_header_is_a_source_file_error(tmp_path):
    """No sheet with MRN and Date of Birth in its first 20 rows: the file is quarantined."""
    late = [[f"title {n}"] for n in range(20)] + [HEADER, person("A1")]
    path = workbook(tmp_path / "reg.xlsx", {"Notes": [["MRN", "DOB"]], "Data": late})
    with pytest.raises(SourceFileError, match=r"no sheet has the expected header row \(MRN, Date"):
        read_all(path)


def test_header_naming_a_column_twice_is_refused(tmp_path):
    """Two MRN columns would make every row ambiguous."""
    rows: list[list[object]] = [["MRN", "Date of Birth", "mrn"], ["A", "B", "C"]]
    path = workbook(tmp_path / "reg.xlsx", {"S": rows})
    with pytest.raises(SourceFileError, match="'mrn' twice"):
        read_all(path)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.xlsx", b"", "empty"),
        ("renamed.xlsx", b"MRN,First Name,Date of Birth\n1,Ana,1961-04-02\n", "plain text"),
        ("legacy.xlsx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504), "OLE file"),
        ("zipped.xls", b"PK\x03\x04" + bytes(100), "zip archive, not a legacy"),
    ],
)
def test_wrong_kinds_of_file_get_their_own_reason(tmp_path, name, content, reason):
    """Empty files, renamed text, and format/extension mismatches say what they are."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SourceFileError, match=reason):
        read_all(path)


def test_truncated_or_foreign_zip_is_a_source_file_error(tmp_path):
    """A cut-off workbook, or a zip that holds no workbook, cannot be read."""
    whole = workbook(tmp_path / "whole.xlsx", {"S": [HEADER, person("A1")]}).read_bytes()
    cut = tmp_path / "cut.xlsx"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SourceFileError, match="not a readable zip archive"):
        read_all(cut)
    foreign = tmp_path / "foreign.xlsx"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "not a workbook")
    with pytest.raises(SourceFileError, match=r"cannot be read as a \.xlsx"):
        read_all(foreign)


def test_ods_title_rows_keep_row_numbers(tmp_path):
    """An OpenDocument sheet is read the same way, with its real row numbers."""

    def row(*cells: str) -> str:
        return "<table:table-row>" + "".join(
            f'<table:table-cell office:value-type="string"><text:p>{c}</text:p></table:table-cell>'
            for c in cells
        ) + "</table:table-row>"  # fmt: skip

    content = (
        '<?xml version="1.0" encoding="UTF-8"?><office:document-content '
        'xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" '
        'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2">'
        '<office:body><office:spreadsheet><table:table table:name="Uploads">'
        + row("Clinic registrations export") + row("mrn", "date of birth") + row("A1", "4/2/1961")
        + "</table:table></office:spreadsheet></office:body></office:document-content>"
    )  # fmt: skip
    path = tmp_path / "reg.ods"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
        archive.writestr("content.xml", content)
        archive.writestr("META-INF/manifest.xml", MANIFEST)
    [record] = read_all(path).to_pylist()
    assert (record["mrn"], record["date_of_birth"]) == ("A1", "4/2/1961")
    assert record["_source_ref"] == "reg.ods!Uploads:row=3"


def test_missing_file_is_transient(tmp_path):
    """A file that vanished (moved by another worker) may be back on retry."""
    with pytest.raises(TransientError, match="vanished"):
        read_all(tmp_path / "gone.xlsx")


def test_classify_maps_engine_errors_without_quoting_them():
    """Engine errors become SourceFileError with our own words; unknowns are fatal."""
    import python_calamine

    quoted = python_calamine.CalamineError("Invalid OLE (signature P000123)")
    error = excel.classify(quoted, path=Path("a.xlsx"), source="reg")
    assert isinstance(error, SourceFileError)
    assert "P000123" not in str(error)
    assert isinstance(excel.classify(python_calamine.PasswordError("x")), SourceFileError)
    assert isinstance(excel.classify(OSError("No such file (os error 2)")), TransientError)
    assert isinstance(excel.classify(OSError(errno.EACCES, "denied")), SourceFileError)
    assert type(excel.classify(ValueError("x"))) is FatalError


def test_unknown_layout_option_is_fatal(tmp_path):
    """A misspelt layout option is a configuration error, not silently ignored."""
    with pytest.raises(FatalError, match="unknown layout"):
        next(excel.iter_batches(tmp_path / "a.xlsx", batch_rows=10, source="reg", shet="x"))


def write_csv(path: Path, rows: Sequence[Sequence[object]]) -> Path:
    """Write `rows` as a UTF-8 CSV file."""
    path.write_text("\n".join(",".join(str(cell) for cell in row) for row in rows) + "\n")
    return path


def test_openpyxl_reads_when_calamine_fails(tmp_path, monkeypatch, caplog):
    """When calamine cannot open the workbook, openpyxl reads it, and both attempts are logged."""

    def broken(path: Path) -> excel.Workbook:
        raise python_calamine.CalamineError("engine message quoting A1")

    monkeypatch.setattr(excel, "_open_calamine", broken)
    path = workbook(tmp_path / "reg.xlsx", {"S": [["Export"], [], HEADER, person("A1"),
                                                   person("A2", zip=2134)]})  # fmt: skip
    caplog.set_level("INFO", logger=excel.__name__)
    table = read_all(path)
    assert table["mrn"].to_pylist() == ["A1", "A2"]
    assert table["zip"].to_pylist() == ["02134", "2134"]
    assert table["_source_ref"].to_pylist() == ["reg.xlsx!S:row=4", "reg.xlsx!S:row=5"]
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "reg.xlsx: strategy python-calamine failed: the file cannot be read as a .xlsx, .xls "
        "or .ods workbook",
        "reg.xlsx: strategy openpyxl succeeded; reading reg.xlsx!S",
    ]
    assert not any("A1" in message for message in messages)


def test_csv_sidecar_is_read_when_the_workbook_has_no_header(tmp_path, caplog):
    """A workbook without the header falls back to `reg.csv` beside it, rows numbered as CSV."""
    path = workbook(tmp_path / "reg.xlsx", {"S": [["nothing here"]]})
    write_csv(tmp_path / "reg.csv", [["Clinic export"], HEADER, person("A1"), [], person("A1")])
    caplog.set_level("INFO", logger=excel.__name__)
    table = read_all(path)
    assert table["mrn"].to_pylist() == ["A1", "A1"]
    assert table["_duplicate"].to_pylist() == [False, True]
    assert table["_source_ref"].to_pylist() == ["reg.csv:row=3", "reg.csv:row=5"]
    outcomes = [record.getMessage().split(": ", 2)[1] for record in caplog.records]
    assert outcomes == ["strategy python-calamine failed", "strategy openpyxl failed",
                        "read as UTF-8, separated by ','",
                        "strategy csv sidecar succeeded; reading reg.csv"]  # fmt: skip


@pytest.mark.parametrize(
    ("codec", "delimiter", "said"),
    [
        ("utf-8-sig", ";", "UTF-8, separated by ';'"),
        ("cp1252", ",", "Windows-1252, separated by ','"),
        ("cp1252", ";", "Windows-1252, separated by ';'"),
        ("utf-16", "\t", "UTF-16, separated by '\\t'"),
    ],
)
def test_csv_sidecar_in_other_encodings_and_separators(tmp_path, caplog, codec, delimiter, said):
    """Office programs save CSV in the machine's code page and with `;` where the comma is the
    decimal mark: names with accents and the µ survive, every row is read."""
    path = workbook(tmp_path / "reg.xlsx", {"S": [["nothing here"]]})
    rows = [["Export de la clinique"], HEADER,
            person("A1", first_name="Zoë", last_name="Núñez", insurance_id="µ-7"), person("A2")]
    text = "\r\n".join(delimiter.join(str(cell) for cell in row) for row in rows) + "\r\n"
    (tmp_path / "reg.csv").write_bytes(text.encode(codec))
    caplog.set_level("INFO", logger=excel.__name__)
    table = read_all(path)
    assert table.select(["mrn", "first_name", "last_name", "insurance_id", "zip"]).to_pylist() == [
        {"mrn": "A1", "first_name": "Zoë", "last_name": "Núñez", "insurance_id": "µ-7",
         "zip": "02134"},
        {"mrn": "A2", "first_name": "Ana", "last_name": "Diaz", "insurance_id": "BCBS-1",
         "zip": "02134"},
    ]  # fmt: skip
    assert table["_source_ref"].to_pylist() == ["reg.csv:row=3", "reg.csv:row=4"]
    assert f"reg.csv: read as {said}" in [record.getMessage() for record in caplog.records]


def test_csv_sidecar_that_no_codec_decodes_is_a_failed_strategy(tmp_path):
    """Bytes undefined in Windows-1252 and invalid as UTF-8: the sidecar's reason says so."""
    path = workbook(tmp_path / "reg.xlsx", {"S": [["nothing here"]]})
    (tmp_path / "reg.csv").write_bytes(b"MRN,Date of Birth\r\nA1\x81\x8d,1961-04-02\r\n")
    with pytest.raises(SourceFileError) as caught:
        read_all(path)
    assert "csv sidecar: the text is neither UTF-8 nor Windows-1252" in caught.value.reason


def test_last_good_copy_is_read_when_everything_else_fails(tmp_path):
    """A truncated upload without sidecar is replaced by its copy in last_good_dir."""
    good = tmp_path / "good"
    good.mkdir()
    whole = workbook(good / "reg.xlsx", {"S": [HEADER, person("A1"), person("A2")]})
    path = tmp_path / "reg.xlsx"
    path.write_bytes(whole.read_bytes()[:200])
    table = read_all(path, last_good_dir=good)
    assert table["mrn"].to_pylist() == ["A1", "A2"]
    assert table["_source_ref"].to_pylist() == ["last-good/reg.xlsx!S:row=2",
                                                "last-good/reg.xlsx!S:row=3"]  # fmt: skip


def test_all_strategies_failing_lists_each_reason(tmp_path, caplog):
    """The reason names every strategy and why it failed; the last one is logged as a warning."""
    good = tmp_path / "good"
    good.mkdir()
    path = workbook(tmp_path / "reg.xlsx", {"S": [["no header"]]})
    write_csv(tmp_path / "reg.csv", [["still no header"]])
    with pytest.raises(SourceFileError) as caught:
        read_all(path, last_good_dir=good)
    assert caught.value.reason == (
        "no strategy could read the upload (python-calamine, openpyxl, csv sidecar: no sheet has "
        f"the expected header row (MRN, Date of Birth, ...) within its first "
        f"{excel.HEADER_SEARCH_ROWS} rows; fix the header names or name the sheet to read; "
        "last good copy: no copy of reg.xlsx in last_good_dir); ask the sender to export it "
        "again from the spreadsheet program"
    )
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.levelname == "WARNING"] == [
        ("WARNING", "reg.xlsx: every strategy failed")
    ]
    without_dir = tmp_path / "other.ods"
    without_dir.write_bytes(b"")
    with pytest.raises(SourceFileError) as caught:
        read_all(without_dir)
    assert caught.value.reason == (
        "no strategy could read the upload (python-calamine: the file is empty (0 bytes); "
        "openpyxl: openpyxl reads only .xlsx and .xlsm; csv sidecar: no other.csv beside the "
        "file; last good copy: no last_good_dir configured); ask the sender to export it again "
        "from the spreadsheet program"
    )


def zip_with(path: Path, members: Mapping[str, bytes], *, stored: bool = False) -> Path:
    """A zip archive holding `members`, deflated unless `stored`."""
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_declared_size_over_the_limit_is_refused_before_parsing(tmp_path, monkeypatch):
    """A workbook declaring more than max_uncompressed_bytes is refused; no engine is run."""

    def never(path: Path) -> excel.Workbook:
        raise AssertionError("an engine parsed a refused file")

    monkeypatch.setattr(excel, "_open_calamine", never)
    monkeypatch.setattr(excel, "_open_openpyxl", never)
    path = zip_with(tmp_path / "big.xlsx", {"a.bin": bytes(2_000_000), "b.bin": bytes(1_500_000)},
                    stored=True)  # fmt: skip
    write_csv(tmp_path / "big.csv", [HEADER, person("A1")])  # a refusal is final
    with pytest.raises(SourceFileError) as caught:
        read_all(path, max_uncompressed_bytes=3_000_000)
    assert caught.value.reason == (
        "refused: the workbook would decompress to 3.5 MB (limit 3.0 MB); a zip bomb or an "
        "export gone wrong"
    )


def test_high_compression_ratio_is_refused(tmp_path):
    """A member over 1 MB compressed more than 100:1 is refused at the default size limit."""
    path = zip_with(tmp_path / "bomb.ods", {"content.xml": bytes(50_000_000)})
    with pytest.raises(SourceFileError, match=r"^.*refused: a part of the workbook would "
                       r"decompress [\d,]+:1 \(50 MB; limit 100:1"):  # fmt: skip
        read_all(path)


def test_declared_sizes_that_lie_are_caught_by_inflating(tmp_path):
    """A member whose recorded size is smaller than its content fails the streamed check."""
    path = zip_with(tmp_path / "liar.xlsx", {"xl/workbook.xml": b"<a>" + b"x" * 5000 + b"</a>"})
    data = bytearray(path.read_bytes())
    real = (5007).to_bytes(4, "little")
    fake = (10).to_bytes(4, "little")
    assert data.count(real) == 2  # local header and central directory
    path.write_bytes(bytes(data).replace(real, fake))
    with pytest.raises(SourceFileError, match="does not match its recorded size or checksum"):
        read_all(path)


def test_encrypted_workbook_has_its_own_reason(tmp_path):
    """An OLE container holding an EncryptedPackage under a .xlsx name is an encrypted workbook."""
    path = tmp_path / "secret.xlsx"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)
                     + "EncryptedPackage".encode("utf-16-le") + bytes(400))  # fmt: skip
    with pytest.raises(SourceFileError, match="the workbook is encrypted with a password"):
        read_all(path)


def test_macro_enabled_workbook_is_refused_unless_allowed(tmp_path):
    """An .xlsm is refused by default and read (macros never run) with allow_macros."""
    path = workbook(tmp_path / "reg.xlsm", {"S": [HEADER, person("A1")]})
    with pytest.raises(SourceFileError) as caught:
        read_all(path)
    expected = "macro-enabled workbook refused (set allow_macros to read its data; macros are "
    assert caught.value.reason == excel.MACROS_REFUSED == expected + "never run)"
    assert read_all(path, allow_macros=True)["_source_ref"].to_pylist() == ["reg.xlsm!S:row=2"]


def test_vba_project_inside_an_xlsx_is_refused(tmp_path):
    """Macros hidden in a workbook named .xlsx are refused as well."""
    whole = workbook(tmp_path / "whole.xlsx", {"S": [HEADER, person("A1")]})
    path = tmp_path / "hidden.xlsx"
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        target.writestr("xl/vbaProject.bin", b"\x00" * 64)
    with pytest.raises(SourceFileError, match="macro-enabled workbook refused"):
        read_all(path)


def test_legacy_xls_with_a_vba_project_is_refused_unless_allowed(tmp_path):
    """An .xls whose OLE directory names a `_VBA_PROJECT_CUR` storage carries macros. Test
    double: bytes with the OLE signature and that directory name, since no tool here writes
    an .xls with VBA; with allow_macros the file goes on to the engines (which reject it)."""
    path = tmp_path / "reg.xls"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)
                     + "_VBA_PROJECT_CUR".encode("utf-16-le") + bytes(400))  # fmt: skip
    with pytest.raises(SourceFileError) as caught:
        read_all(path)
    assert caught.value.reason == excel.MACROS_REFUSED
    with pytest.raises(SourceFileError) as caught:
        read_all(path, allow_macros=True)
    assert "macro" not in caught.value.reason


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "python-calamine, openpyxl: the file is empty (0 bytes)"),
        (b"MRN,Date of Birth\nA1,1961-04-02\n", "python-calamine, openpyxl: the content is not a "
         ".xlsx workbook but plain text (a CSV or report renamed?)"),
        (b"PK\x03\x04" + bytes(300), "python-calamine, openpyxl: the workbook is not a readable "
         "zip archive (truncated or damaged)"),
    ],
    ids=["empty", "renamed-csv", "truncated-zip"],
)  # fmt: skip
def test_broken_uploads_each_have_their_own_reason(tmp_path, content, reason):
    """Empty, renamed-CSV and truncated uploads name their own problem for both engines."""
    path = tmp_path / "upload.xlsx"
    path.write_bytes(content)
    with pytest.raises(SourceFileError) as caught:
        read_all(path)
    assert caught.value.reason.startswith(f"no strategy could read the upload ({reason}; ")


def test_bad_limit_option_is_fatal(tmp_path):
    """A zero or non-integer max_uncompressed_bytes is a configuration error."""
    for bad in (0, "500MB", True):
        with pytest.raises(FatalError, match="max_uncompressed_bytes"):
            read_all(tmp_path / "a.xlsx", max_uncompressed_bytes=bad)
