"""Workbooks made by another tool than openpyxl: LibreOffice's headless converter.

`make test` installs LibreOffice Calc (Debian's `libreoffice-calc-nogui`); without `soffice`
these tests fail with what to install instead of skipping.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from etl_tasks import demo_files
from etl_tasks.errors import SourceFileError
from etl_tasks.sources import excel
from etl_tasks.transform import transform_chunk

FORMATS = ("xlsx", "xls", "ods")


@pytest.fixture(scope="module")
def soffice() -> str:
    found = shutil.which("soffice") or shutil.which("libreoffice")
    if found is None:
        pytest.fail(
            "LibreOffice is not installed: run `make test` (it installs it) or "
            "`apt-get install --no-install-recommends libreoffice-calc-nogui`"
        )
    return found


@pytest.fixture(scope="module")
def convert(soffice: str, tmp_path_factory: pytest.TempPathFactory):
    profile = tmp_path_factory.mktemp("lo-profile")

    def run(sources: list[Path], fmt: str, outdir: Path, infilter: str | None = None) -> list[Path]:
        command = [soffice, "--headless", "--norestore"]
        command.append(f"-env:UserInstallation={profile.as_uri()}")
        if infilter:
            command.append(f"--infilter={infilter}")
        command += ["--convert-to", fmt, "--outdir", str(outdir), *map(str, sources)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
        made = [outdir / f"{source.stem}.{fmt}" for source in sources]
        missing = [path.name for path in made if not path.is_file()]
        assert not missing, f"soffice made no {missing}: {done.stdout}{done.stderr}"
        return made

    return run


def read(path: Path) -> pa.Table:
    return pa.concat_tables(excel.iter_batches(path, batch_rows=128, source="lo"))


def without_file_name(table: pa.Table) -> list[dict[str, object]]:
    rows = table.to_pylist()
    for row in rows:
        row["_source_ref"] = str(row["_source_ref"]).split("!", 1)[1]
    return rows


@pytest.fixture(scope="module")
def demo_uploads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    inbox = tmp_path_factory.mktemp("demo-uploads")
    return inbox, demo_files.write_registrations(inbox)


@pytest.mark.parametrize("fmt", FORMATS)
def test_demo_uploads_resaved_by_libreoffice_read_the_same(convert, demo_uploads, tmp_path, fmt):
    """The demo workbooks saved again by LibreOffice (title rows, blank rows, a Notes sheet,
    numeric ZIPs and phones, dates of every kind) read cell for cell as the openpyxl originals,
    and the transform quarantines exactly the planted defects."""
    inbox, manifests = demo_uploads
    copies = convert([inbox / m.name for m in manifests], fmt, tmp_path)
    for manifest, copy in zip(manifests, copies, strict=True):
        table = read(copy)
        assert without_file_name(table) == without_file_name(read(inbox / manifest.name))
        result = transform_chunk("patient_registrations", table)
        planted = sum(manifest.defects.values())
        assert (result.valid.num_rows, result.quarantined.num_rows) == (
            manifest.rows - planted,
            planted,
        ), copy.name


CLINIC_EXPORT = """\
North End Health - registrations export,,,,,,,,,
,,,,,,,,,
 mrn ,FIRST NAME,Last  Name,date of birth,Sex,zip,Phone,Registration Date,Clinic,Insurance ID
M-0001,Ana,Diaz,4/2/1961,F,02134,6175550123,11/3/2026,North End Health,BCBS-1
M-0002,Bo,Li,1975-12-31,M,2134,617-555-0199,2026-11-04,North End Health,
,,,,,,,,,
M-0003,Cy,Ng,23000,X,90210,,11/5/2026,North End Health,AET-9
M-0002,Dup,Row,1980-01-01,F,02134,,11/5/2026,North End Health,
,No,Mrn,1980-01-01,F,02134,,11/5/2026,North End Health,
M-0004,Ed,Ray,1/1/1890,M,02134,,11/5/2026,North End Health,
M-0005,Fa,Oz,1990-06-15,Q,02134,,11/5/2026,North End Health,
M-0006,Gi,Po,1990-06-15,U,123456,,11/5/2026,North End Health,
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_csv_export_converted_by_libreoffice(convert, tmp_path, fmt):
    """LibreOffice guesses types on import: ZIP 02134 becomes the number 2134, the phone a
    number, ISO dates real dates, 23000 a serial number. The reader undoes each guess and the
    transform loads 3 rows and quarantines 5, one per planted defect."""
    source = tmp_path / "clinic_export.csv"
    source.write_text(CLINIC_EXPORT, encoding="utf-8")
    outdir = tmp_path / "out"
    # CSV import options: comma, double quote, UTF-8 (76), from line 1, guessed column types,
    # English (US) so that 4/2/1961 is read as a date whatever the machine's locale.
    [path] = convert([source], fmt, outdir, infilter="CSV:44,34,76,1,,1033")
    table = read(path)
    assert table["mrn"].to_pylist() == [
        "M-0001", "M-0002", "M-0003", "M-0002", None, "M-0004", "M-0005", "M-0006",
    ]  # fmt: skip
    assert table["phone"].to_pylist()[:2] == ["6175550123", "617-555-0199"]
    result = transform_chunk("patient_registrations", table)
    valid = result.valid.to_pylist()
    assert [(r["mrn"], r["zip"], str(r["date_of_birth"])) for r in valid] == [
        ("M-0001", "02134", "1961-04-02"),
        ("M-0002", "02134", "1975-12-31"),
        ("M-0003", "90210", "1962-12-20"),
    ]
    rows = {
        ref.rsplit("=", 1)[1]: reasons
        for ref, reasons in zip(
            result.quarantined["source_ref"].to_pylist(),
            result.quarantined["reasons"].to_pylist(),
            strict=True,
        )
    }
    # 1/1/1890 is stored as the serial -3650, which calamine 0.9 returns as a time of day for
    # .xlsx and .xls ("must be a date") and as 1890-01-01 for .ods ("from 1900-01-01 to
    # today"); either way the row is quarantined for its date of birth.
    assert rows.pop("10").startswith("date_of_birth: must be ")
    assert rows == {
        "8": "mrn: duplicate within file",
        "9": "mrn: required",
        "11": "sex: must be one of M, F, X, U",
        "12": "zip: must be exactly 5 digits",
    }


MACRO_BOOK = """\
<?xml version="1.0" encoding="UTF-8"?>
<office:document xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"
 xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"
 xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"
 xmlns:script="urn:oasis:names:tc:opendocument:xmlns:script:1.0"
 xmlns:ooo="http://openoffice.org/2004/office"
 office:version="1.3" office:mimetype="application/vnd.oasis.opendocument.spreadsheet">
 <office:scripts><office:script script:language="ooo:Basic"><ooo:libraries>
  <ooo:library-embedded ooo:name="Standard"><ooo:module ooo:name="Module1">
   <ooo:source-code>Sub Main
  Shell "touch {marker}"
End Sub
</ooo:source-code></ooo:module></ooo:library-embedded>
 </ooo:libraries></office:script></office:scripts>
 <office:body><office:spreadsheet><table:table table:name="Uploads">
{rows}
 </table:table></office:spreadsheet></office:body>
</office:document>
"""


def _fods_row(cells: list[str]) -> str:
    return "<table:table-row>" + "".join(
        f'<table:table-cell office:value-type="string"><text:p>{cell}</text:p></table:table-cell>'
        for cell in cells
    ) + "</table:table-row>"


def test_ods_with_a_basic_macro_is_refused_unless_allowed(convert, tmp_path):
    """LibreOffice stores the document's Basic library as `Basic/Standard/Module1.xml`: such
    an .ods is refused by default; allowed, its data is read and the macro never runs."""
    header = ["MRN", "First Name", "Last Name", "Date of Birth", "Sex", "ZIP", "Phone",
              "Registration Date", "Clinic", "Insurance ID"]  # fmt: skip
    row = ["M-1", "Ana", "Diaz", "1961-04-02", "F", "02134", "", "2026-11-03", "North", ""]
    marker = tmp_path / "macro-ran"
    source = tmp_path / "uploads.fods"
    source.write_text(
        MACRO_BOOK.format(marker=marker, rows=_fods_row(header) + _fods_row(row)), "utf-8"
    )
    [path] = convert([source], "ods", tmp_path / "out")
    with zipfile.ZipFile(path) as archive:
        assert "Basic/Standard/Module1.xml" in archive.namelist()
    with pytest.raises(SourceFileError) as caught:
        read(path)
    assert caught.value.reason == excel.MACROS_REFUSED
    table = pa.concat_tables(
        excel.iter_batches(path, batch_rows=128, source="lo", allow_macros=True)
    )
    assert table.select(["mrn", "zip", "_source_ref"]).to_pylist() == [
        {"mrn": "M-1", "zip": "02134", "_source_ref": "uploads.ods!Uploads:row=2"}
    ]
    assert not marker.exists()


def test_demo_uploads_resaved_by_libreoffice_read_the_same_in_slices(convert, demo_uploads,
                                                                     tmp_path, monkeypatch):
    """LibreOffice's .xlsx (shared strings, its own styles and number formats) read by
    python-calamine in slices of about 2 KB gives the batches of the whole sheet."""
    from etl_tasks.sources import xlsx_slices

    inbox, manifests = demo_uploads
    copies = convert([inbox / m.name for m in manifests], "xlsx", tmp_path)
    monkeypatch.setattr(xlsx_slices, "SLICE_BYTES", 2_000)
    for copy in copies:
        with zipfile.ZipFile(copy) as archive:
            assert "xl/sharedStrings.xml" in archive.namelist()
        sliced = read(copy)
        with monkeypatch.context() as whole:
            whole.setattr(excel, "_SLICED", frozenset())
            assert sliced.equals(read(copy)), copy.name
