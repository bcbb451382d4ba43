"""The lab feed reader: namespaces, encodings, batching, duplicates and hostile or broken files."""

from __future__ import annotations

import errno
import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from etl_tasks.errors import FatalError, SourceFileError, TransientError
from etl_tasks.sources import xml_feed

NS = "urn:example:lab:v1"

DESIGN_RECORD = """  <Result>
    <ResultId>R-000001</ResultId>
    <Patient><Id>P000123</Id><BirthDate>1961-04-02</BirthDate></Patient>
    <Test code="2345-7" system="LOINC">Glucose</Test>
    <Value>5.4</Value><Unit>mmol/L</Unit>
    <ReferenceRange low="3.9" high="5.5"/>
    <CollectedAt>2026-11-19T08:15:00Z</CollectedAt>
    <ReportedAt>2026-11-19T12:02:00Z</ReportedAt>
    <Status>final</Status>
  </Result>
"""


def feed(body: str, *, namespace: str | None = NS, encoding: str = "UTF-8") -> str:
    """A whole feed document around `body`."""
    xmlns = f' xmlns="{namespace}"' if namespace else ""
    return (
        f'<?xml version="1.0" encoding="{encoding}"?>\n'
        f'<LabResults{xmlns} partner="ACME-LABS">\n{body}</LabResults>\n'
    )


def record(result_id: str, *, unit: str = "mmol/L") -> str:
    """A minimal complete record."""
    return (
        f"  <Result><ResultId>{result_id}</ResultId><Patient><Id>P000001</Id></Patient>"
        f'<Test code="2345-7" system="LOINC">Glucose</Test><Value>5.4</Value><Unit>{unit}</Unit>'
        "<CollectedAt>2026-11-19T08:15:00Z</CollectedAt>"
        "<ReportedAt>2026-11-19T12:02:00Z</ReportedAt><Status>final</Status></Result>\n"
    )


def write(tmp_path: Path, content: str | bytes, name: str = "feed.xml") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def read_all(path: Path, batch_rows: int = 1000) -> pa.Table:
    batches = list(xml_feed.iter_batches(path, batch_rows=batch_rows, source="lab"))
    return pa.concat_tables(batches) if batches else xml_feed.SCHEMA.empty_table()


def test_reads_the_documented_record_with_its_default_namespace(tmp_path):
    """The record of DESIGN.md comes out as text, field for field, with its source pointer."""
    rows = read_all(write(tmp_path, feed(DESIGN_RECORD))).to_pylist()
    assert rows == [
        {
            "result_id": "R-000001", "patient_id": "P000123", "birth_date": "1961-04-02",
            "test_code": "2345-7", "test_system": "LOINC", "test_name": "Glucose",
            "value": "5.4", "unit": "mmol/L", "ref_low": "3.9", "ref_high": "5.5",
            "collected_at": "2026-11-19T08:15:00Z", "reported_at": "2026-11-19T12:02:00Z",
            "status": "final", "_source_ref": "feed.xml#record=1", "_duplicate": False,
        }
    ]  # fmt: skip


@pytest.mark.parametrize(
    "document",
    [
        feed(DESIGN_RECORD, namespace=None),
        feed(DESIGN_RECORD, namespace="urn:other:lab:v2"),
        feed(DESIGN_RECORD).replace("<LabResults xmlns=", "<lab:LabResults xmlns:lab=")
        .replace("</LabResults>", "</lab:LabResults>").replace("<Result>", "<lab:Result>")
        .replace("</Result>", "</lab:Result>"),
    ],
    ids=["no-namespace", "other-namespace", "prefixed-record"],
)  # fmt: skip
def test_matches_records_by_local_name_whatever_the_namespace(tmp_path, document):
    """Result and its fields are found by local name, in any namespace or none."""
    rows = read_all(write(tmp_path, document)).to_pylist()
    assert len(rows) == 1
    assert rows[0]["result_id"] == "R-000001"
    assert rows[0]["test_code"] == "2345-7"


@pytest.mark.parametrize("codec", ["utf-8", "iso-8859-1", "utf-16"])
def test_declared_encodings_keep_micro_sign(tmp_path, codec):
    """µmol/L survives UTF-8, ISO-8859-1 and UTF-16 with a BOM."""
    declared = {"utf-8": "UTF-8", "iso-8859-1": "ISO-8859-1", "utf-16": "UTF-16"}[codec]
    document = feed(record("R-1", unit="µmol/L"), encoding=declared).encode(codec)
    if codec == "utf-16":
        assert document[:2] in (b"\xff\xfe", b"\xfe\xff")
    rows = read_all(write(tmp_path, document)).to_pylist()
    assert [row["unit"] for row in rows] == ["µmol/L"]


def test_batches_hold_every_record_once_in_order(tmp_path):
    """500 records with batch_rows=128 give four batches and record numbers 1..500."""
    body = "".join(record(f"R-{n}") for n in range(1, 501))
    path = write(tmp_path, feed(body))
    batches = list(xml_feed.iter_batches(path, batch_rows=128, source="lab"))
    assert [batch.num_rows for batch in batches] == [128, 128, 128, 116]
    assert all(batch.schema == xml_feed.SCHEMA for batch in batches)
    table = pa.concat_tables(batches)
    assert table["_source_ref"].to_pylist() == [f"feed.xml#record={n}" for n in range(1, 501)]
    assert table["result_id"].to_pylist() == [f"R-{n}" for n in range(1, 501)]


def test_duplicate_flag_spans_batches_and_ignores_whitespace(tmp_path):
    """A ResultId seen in an earlier batch flags the later record only, stripped for the key."""
    body = "".join(record(f"R-{n}") for n in range(1, 30))
    body += record("  R-3\n") + record("") + record("")
    rows = read_all(write(tmp_path, feed(body)), batch_rows=4).to_pylist()
    flagged = [row["_source_ref"] for row in rows if row["_duplicate"]]
    assert flagged == ["feed.xml#record=30"]
    assert rows[29]["result_id"] == "  R-3\n"  # kept exactly; the transform strips


def test_optional_parts_are_null_and_text_is_kept_exactly(tmp_path):
    """Absent elements are null, empty ones "", whitespace, CDATA and comments are handled."""
    body = (
        "  <!-- a comment between records -->\n  <Result>\n"
        "    <ResultId>\n      R-9 </ResultId><Patient><Id>P1</Id></Patient>\n"
        "    <!-- a comment inside a record -->\n"
        '    <Test code="718-7" system="LOINC"><![CDATA[Hemoglobin <Hb>]]></Test>\n'
        "    <Value>1<!-- split -->2.5</Value><Unit/>\n"
        "    <CollectedAt>2026-11-19T08:15:00+02:00</CollectedAt><Status> final </Status>\n"
        "  </Result>\n"
    )
    [row] = read_all(write(tmp_path, feed(body))).to_pylist()
    assert row["result_id"] == "\n      R-9 "
    assert row["birth_date"] is None
    assert row["test_name"] == "Hemoglobin <Hb>"
    assert row["value"] == "12.5"
    assert row["unit"] == ""
    assert (row["ref_low"], row["ref_high"], row["reported_at"]) == (None, None, None)
    assert row["collected_at"] == "2026-11-19T08:15:00+02:00"
    assert row["status"] == " final "


def test_first_of_repeated_elements_wins(tmp_path):
    """A field element given twice is read from its first occurrence, as find() would."""
    body = record("R-1").replace("<Value>5.4</Value>", "<Value>5.4</Value><Value>9</Value>")
    [row] = read_all(write(tmp_path, feed(body))).to_pylist()
    assert row["value"] == "5.4"


def test_billion_laughs_is_refused_without_expansion(tmp_path):
    """A DOCTYPE declaring nested entities is refused at once, its entities never expanded."""
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    ]
    document = (
        '<?xml version="1.0"?>\n<!DOCTYPE LabResults [\n' + "\n".join(entities) + "\n]>\n"
        + feed(record("&lol9;")).split("\n", 1)[1]
    )  # fmt: skip
    path = write(tmp_path, document)
    started = time.monotonic()
    with pytest.raises(SourceFileError, match="declares entities") as caught:
        read_all(path)
    assert time.monotonic() - started < 5  # 10**9 expansions would take far longer
    assert caught.value.path == str(path)


@pytest.mark.parametrize("codec", ["utf-8", "utf-16"])
def test_external_entity_is_refused(tmp_path, codec):
    """An external entity (XXE) pointing at a local file is refused, never read."""
    document = (
        '<?xml version="1.0"?>\n<!DOCTYPE LabResults [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
        + feed(record("&x;")).split("\n", 1)[1]
    )
    with pytest.raises(SourceFileError, match="declares entities"):
        read_all(write(tmp_path, document.encode(codec)))


def test_entities_after_a_long_internal_subset_are_refused(tmp_path):
    """Entities declared beyond the pre-scanned head are caught by the parsed DTD."""
    padding = "<!-- " + "x" * 100_000 + " -->"
    document = (
        f'<?xml version="1.0"?>\n<!DOCTYPE LabResults [{padding}<!ENTITY x "y">]>\n'
        + feed(record("R-1") + record("&x;")).split("\n", 1)[1]
    )
    with pytest.raises(SourceFileError, match="declares entities"):
        read_all(write(tmp_path, document))


def test_doctype_without_entities_is_read_offline(tmp_path):
    """A DOCTYPE naming an external DTD is accepted and the DTD is not fetched."""
    document = feed(record("R-1")).replace(
        "?>\n", '?>\n<!DOCTYPE LabResults SYSTEM "http://127.0.0.1:9/lab.dtd">\n', 1
    )
    assert read_all(write(tmp_path, document))["result_id"].to_pylist() == ["R-1"]


def test_truncated_file_yields_complete_records_then_names_the_line(tmp_path):
    """The complete records before the cut are yielded, then SourceFileError names the line."""
    document = feed("".join(record(f"R-{n}") for n in range(1, 7)))
    cut = document[: document.index("<Value>", document.index("R-6"))]
    batches = xml_feed.iter_batches(write(tmp_path, cut), batch_rows=2, source="lab")
    seen = [rid for batch in itertools.islice(batches, 3) for rid in batch["result_id"].to_pylist()]
    assert seen == ["R-1", "R-2", "R-3", "R-4", "R-5"]  # the last, partial batch is flushed
    with pytest.raises(SourceFileError, match=f"line {cut.count(chr(10)) + 1}, column"):
        next(batches)


def test_undefined_entity_error_still_names_a_line(tmp_path):
    """An error whose exception lacks a position takes it from lxml's error log."""
    document = feed(record("R-1") + record("&nope;"))
    with pytest.raises(SourceFileError, match="line 4, column"):
        read_all(write(tmp_path, document))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"<LabResults><Result>", "not well-formed"),
        (b"\x00\x01garbage", "not well-formed"),
    ],
    ids=["empty", "unclosed", "garbage"],
)
def test_broken_files_are_source_file_errors(tmp_path, content, reason):
    """Empty, unclosed or garbage files are quarantined whole with a reason."""
    with pytest.raises(SourceFileError, match=reason):
        read_all(write(tmp_path, content))


def test_missing_file_is_transient(tmp_path):
    """A file that vanished (moved by another worker) may be back on retry."""
    with pytest.raises(TransientError, match="vanished"):
        read_all(tmp_path / "gone.xml")


def test_classify_maps_os_errors_and_unknowns():
    """Permission problems quarantine the file; unknown exceptions are fatal, not retried."""
    denied = xml_feed.classify(PermissionError(errno.EACCES, "denied"), path=Path("a.xml"))
    assert isinstance(denied, SourceFileError)
    assert isinstance(xml_feed.classify(OSError(errno.EIO, "io")), TransientError)
    unknown = xml_feed.classify(KeyError("P000123"), source="lab")
    assert type(unknown) is FatalError
    assert "P000123" not in str(unknown)


def test_unknown_layout_option_is_fatal(tmp_path):
    """A misspelt layout option is a configuration error, not silently ignored."""
    with pytest.raises(FatalError, match="unknown layout"):
        next(xml_feed.iter_batches(tmp_path / "a.xml", batch_rows=10, source="lab", sheet="x"))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening local socket; a test asserts that nothing connected to it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def assert_no_connection(sock: socket.socket) -> None:
    """Nothing is waiting in the listener's backlog."""
    with pytest.raises(BlockingIOError):
        sock.accept()


def test_external_entity_pointing_at_a_url_is_refused_offline(tmp_path, listener):
    """An external entity with an http URL is refused and no connection reaches the URL's port."""
    port = listener.getsockname()[1]
    document = (
        f'<?xml version="1.0"?>\n<!DOCTYPE LabResults [<!ENTITY x SYSTEM '
        f'"http://127.0.0.1:{port}/secret">]>\n' + feed(record("&x;")).split("\n", 1)[1]
    )
    with pytest.raises(SourceFileError) as caught:
        read_all(write(tmp_path, document))
    assert "declares entities (possible entity-expansion or external-entity attack)" in (
        caught.value.reason
    )
    assert_no_connection(listener)


def test_external_entities_beyond_the_prescan_are_refused_offline(tmp_path, listener):
    """File and URL entities hidden after a long internal subset are refused, nothing fetched."""
    port = listener.getsockname()[1]
    padding = "<!-- " + "x" * 100_000 + " -->"
    document = (
        f'<?xml version="1.0"?>\n<!DOCTYPE LabResults [{padding}'
        f'<!ENTITY f SYSTEM "file:///etc/passwd"><!ENTITY u SYSTEM "http://127.0.0.1:{port}/">]>\n'
        + feed(record("&f;") + record("&u;")).split("\n", 1)[1]
    )
    with pytest.raises(SourceFileError, match="declares entities"):
        read_all(write(tmp_path, document))
    assert_no_connection(listener)


def test_external_dtd_url_is_never_fetched(tmp_path, listener):
    """A DOCTYPE naming a DTD at a URL is read offline: no connection arrives at that port."""
    port = listener.getsockname()[1]
    document = feed(record("R-1")).replace(
        "?>\n", f'?>\n<!DOCTYPE LabResults SYSTEM "http://127.0.0.1:{port}/lab.dtd">\n', 1
    )
    assert read_all(write(tmp_path, document))["result_id"].to_pylist() == ["R-1"]
    assert_no_connection(listener)


OTHER_PARTNER_FIELDS = {
    "result_id": "@id", "patient_id": "Subject/MRN", "birth_date": "Subject/DOB",
    "test_code": "Analyte/Code", "test_system": "Analyte/Code/@scheme", "test_name": "Analyte/Name",
    "value": "Outcome/Amount", "unit": "Outcome/Amount/@units", "ref_low": "Range/@from",
    "ref_high": "Range/@to", "collected_at": "Times/Drawn", "reported_at": "Times/Released",
    "status": "@state",
}  # fmt: skip


def test_second_partner_layout_gives_the_same_columns(tmp_path):
    """Another partner's element names, mapped by config, yield the same row as DESIGN.md's."""
    document = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<lab:Batch xmlns:lab="urn:partner:two"><lab:Observation id="R-000001" state="final">'
        "<lab:Subject><lab:MRN>P000123</lab:MRN><lab:DOB>1961-04-02</lab:DOB></lab:Subject>"
        '<lab:Analyte><lab:Code scheme="LOINC">2345-7</lab:Code><lab:Name>Glucose</lab:Name>'
        '</lab:Analyte><lab:Outcome><lab:Amount units="mmol/L">5.4</lab:Amount></lab:Outcome>'
        '<lab:Range from="3.9" to="5.5"/><lab:Times><lab:Drawn>2026-11-19T08:15:00Z</lab:Drawn>'
        "<lab:Released>2026-11-19T12:02:00Z</lab:Released></lab:Times></lab:Observation>"
        '<lab:Observation id="R-000001"/></lab:Batch>\n'
    )
    two = xml_feed.iter_batches(write(tmp_path, document, "two.xml"), batch_rows=10, source="two",
                                record="Observation", fields=OTHER_PARTNER_FIELDS)  # fmt: skip
    [table] = list(two)
    design = read_all(write(tmp_path, feed(DESIGN_RECORD)))
    first, second = table.to_pylist()
    assert table.schema == xml_feed.SCHEMA
    assert {**first, "_source_ref": None} == {**design.to_pylist()[0], "_source_ref": None}
    assert first["_source_ref"] == "two.xml#record=1"
    assert second == {**dict.fromkeys(xml_feed.COLUMNS), "result_id": "R-000001",
                      "_source_ref": "two.xml#record=2", "_duplicate": True}  # fmt: skip


def test_fields_left_out_of_a_layout_are_null(tmp_path):
    """A layout mapping only some columns leaves the others null."""
    path = write(tmp_path, feed(DESIGN_RECORD))
    batches = xml_feed.iter_batches(path, batch_rows=10, source="lab",
                                    fields={"result_id": "ResultId", "unit": "Unit"})  # fmt: skip
    [row] = pa.concat_tables(batches).to_pylist()
    assert (row["result_id"], row["unit"], row["patient_id"]) == ("R-000001", "mmol/L", None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"record": "a/b"}, "record must be an element's local name"),
        ({"fields": {"mrn": "Id"}}, "'mrn', which is not an output column"),
        ({"fields": {"unit": "Unit//x"}}, "must be local names separated by '/'"),
        ({"fields": {"unit": "lab:Unit"}}, "must be local names separated by '/'"),
        ({"fields": {}}, "fields must map output columns"),
        ({"on_truncated": "skip"}, "on_truncated must be one of"),
    ],
)
def test_bad_layouts_are_configuration_errors(tmp_path, options, message):
    """A malformed layout option is a FatalError naming the problem."""
    with pytest.raises(FatalError, match=message):
        next(xml_feed.iter_batches(tmp_path / "a.xml", batch_rows=10, source="lab", **options))


def test_truncated_file_keeps_complete_records_when_configured(tmp_path, caplog):
    """With keep_complete_records the records before the cut are yielded, with a warning."""
    document = feed("".join(record(f"R-{n}") for n in range(1, 7)))
    cut = document[: document.index("<Value>", document.index("R-6"))]
    batches = xml_feed.iter_batches(write(tmp_path, cut), batch_rows=2, source="lab",
                                    on_truncated="keep_complete_records")  # fmt: skip
    tables = list(batches)
    assert [table.num_rows for table in tables] == [2, 2, 1]
    assert pa.concat_tables(tables)["result_id"].to_pylist() == [f"R-{n}" for n in range(1, 6)]
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage().startswith(
        f"feed.xml: the XML breaks off at line {cut.count(chr(10)) + 1}, column "
    )
    assert warning.getMessage().endswith(
        "; kept the 5 complete records before it (on_truncated=keep_complete_records)"
    )
    assert "R-" not in warning.getMessage()


def test_truncated_file_is_quarantined_by_default(tmp_path):
    """The default policy raises SourceFileError with the line, after the complete records."""
    document = feed("".join(record(f"R-{n}") for n in range(1, 4)))
    cut = document[: document.index("</Result>", document.index("R-3"))]
    batches = xml_feed.iter_batches(write(tmp_path, cut), batch_rows=10, source="lab")
    assert next(batches)["result_id"].to_pylist() == ["R-1", "R-2"]  # the caller discards these
    with pytest.raises(SourceFileError) as caught:
        next(batches)
    assert f"not well-formed at line {cut.count(chr(10)) + 1}, column" in caught.value.reason


def test_keep_complete_records_still_refuses_a_file_with_none(tmp_path):
    """A file cut before its first complete record is quarantined whatever the policy."""
    cut = feed(record("R-1"))[:120]
    with pytest.raises(SourceFileError, match="not well-formed at line"):
        list(xml_feed.iter_batches(write(tmp_path, cut), batch_rows=10, source="lab",
                                   on_truncated="keep_complete_records"))  # fmt: skip
