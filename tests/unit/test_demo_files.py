"""The demo generator: manifests match what the readers and the validation rules make of it."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from python_calamine import CalamineWorkbook

from etl_tasks import datasets, demo_files
from etl_tasks.config import Settings, load_pipeline
from etl_tasks.datasets import DatasetSpec
from etl_tasks.demo_files import (
    LAB_DEFECTS,
    PARTNER_DEFECTS,
    REGISTRATION_DEFECTS,
    FileManifest,
)
from etl_tasks.sources import excel, xml_feed
from etl_tasks.transform import Dataset, transform_chunk

# Reason prefixes of etl_tasks.validate -> the defect kind that should have caused them.
LAB_REASONS = {
    "result_id: duplicate": "duplicate_result_id",
    "patient_id: required": "missing_patient_id",
    "test_code: must be a LOINC": "bad_loinc",
    "value: must be a decimal": "non_numeric_value",
    "reported_at: must not be before": "reported_before_collected",
    "status: must be one of": "bad_status",
    "collected_at: must be ISO-8601": "naive_timestamp",
    "reported_at: must be ISO-8601": "naive_timestamp",
}
REGISTRATION_REASONS = {
    "mrn: duplicate": "duplicate_mrn",
    "mrn: required": "missing_mrn",
    # One rule covers both ends of the range; the test merges the two kinds.
    "date_of_birth: must be from 1900-01-01 to today": "dob_out_of_range",
    "sex: must be one of": "bad_sex",
    "zip: must be exactly 5 digits": "bad_zip",
    "registration_date: must be a date": "bad_registration_date",
}
# The second partner's rules are configuration (etl_tasks/pipeline.toml, partner_labs).
PARTNER_REASONS = {
    "observation_id: duplicate within file": "duplicate_observation_id",
    "mrn: required": "missing_mrn",
    "mrn: must be 8 digits": "bad_mrn",
    "birth_date: must be from 1900-01-01 to today": "future_birth_date",
    "loinc: must be a LOINC code": "bad_loinc",
    "value: must be from 0 to 100000": "value_out_of_range",
    "value: must be a decimal number": "non_numeric_value",
    "fasting: must be true or false": "bad_fasting",
    "reported_at: must not be before collected_at": "reported_before_collected",
    "status: must be one of": "bad_status",
}


@pytest.fixture(scope="module")
def inbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inbox")


@pytest.fixture(scope="module")
def lab(inbox: Path) -> list[FileManifest]:
    return demo_files.write_lab_feeds(inbox)


@pytest.fixture(scope="module")
def registrations(inbox: Path) -> list[FileManifest]:
    return demo_files.write_registrations(inbox)


@pytest.fixture(scope="module")
def partner(inbox: Path) -> list[FileManifest]:
    return demo_files.write_partner_feeds(inbox)


def read(path: Path) -> pa.Table:
    reader = xml_feed if path.suffix == ".xml" else excel
    return pa.concat_tables(reader.iter_batches(path, batch_rows=128, source="demo"))


def partner_source() -> tuple[dict[str, object], DatasetSpec]:
    """The packaged config's partner_labs: its reader layout and its dataset."""
    config = load_pipeline(Settings(pipeline_config=None))
    source = config.source("partner_labs")
    spec = datasets.spec_for(config, source)
    return {**source.layout, **spec.reader_options("xml")}, spec


def quarantined_kinds(
    dataset: Dataset | DatasetSpec, table: pa.Table, reasons: dict[str, str]
) -> tuple[Counter[str], int]:
    """Defect kinds behind the quarantined rows (one reason each), and the valid row count."""
    result = transform_chunk(dataset, table)
    kinds: Counter[str] = Counter()
    for text in result.quarantined["reasons"].to_pylist():
        [reason] = text.split("; ")  # exactly one planted defect per row
        kinds[next(kind for prefix, kind in reasons.items() if reason.startswith(prefix))] += 1
    return kinds, result.valid.num_rows


def test_lab_manifests_match_what_the_reader_reads(inbox, lab):
    """Each feed holds as many records as its manifest says, numbered from 1."""
    assert [m.name for m in lab] == [f"lab_feed_00{n}.xml" for n in range(1, 5)]
    for manifest in lab:
        refs = read(inbox / manifest.name)["_source_ref"].to_pylist()
        assert manifest.rows == 500
        assert refs == [f"{manifest.name}#record={n}" for n in range(1, manifest.rows + 1)]


def test_registration_manifests_match_what_the_reader_reads(inbox, registrations):
    """Each workbook holds as many non-blank data rows as its manifest says."""
    assert [m.name for m in registrations] == [f"registrations_00{n}.xlsx" for n in (1, 2, 3)]
    for manifest in registrations:
        assert read(inbox / manifest.name).num_rows == manifest.rows == 300


def test_planted_lab_defects_are_exactly_the_quarantined_rows(inbox, lab):
    """The transform quarantines one row per planted defect, for that defect, and loads the rest."""
    for manifest in lab:
        kinds, valid = quarantined_kinds("lab_results", read(inbox / manifest.name), LAB_REASONS)
        assert kinds == Counter(manifest.defects), manifest.name
        assert valid == manifest.rows - sum(manifest.defects.values())


def test_planted_registration_defects_are_exactly_the_quarantined_rows(inbox, registrations):
    """The transform quarantines one row per planted defect, for that defect, and loads the rest."""
    for manifest in registrations:
        table = read(inbox / manifest.name)
        kinds, valid = quarantined_kinds("patient_registrations", table, REGISTRATION_REASONS)
        expected = Counter(manifest.defects)
        expected["dob_out_of_range"] = expected.pop("future_dob", 0) + expected.pop(
            "dob_before_1900", 0
        )
        assert kinds == +expected, manifest.name
        assert valid == manifest.rows - sum(manifest.defects.values())


def test_planted_partner_defects_are_exactly_what_its_configured_rules_quarantine(inbox,
                                                                                   partner):
    """The second partner's files, read with the packaged config's layout and judged by its
    configured dataset: one quarantined row per planted defect, for that defect."""
    layout, spec = partner_source()
    for manifest in partner:
        table = pa.concat_tables(xml_feed.iter_batches(inbox / manifest.name, batch_rows=128,
                                                       source="demo", **layout))
        assert table.num_rows == manifest.rows
        assert table["_source_ref"][0].as_py() == f"{manifest.name}#record=1"
        kinds, valid = quarantined_kinds(spec, table, PARTNER_REASONS)
        assert kinds == Counter(manifest.defects), manifest.name
        assert valid == manifest.rows - sum(manifest.defects.values())


def test_every_defect_kind_is_planted_across_the_default_files(lab, registrations, partner):
    """Defect kinds are spread over the files, so each default file shows most of them."""
    for manifests, kinds in ((lab, LAB_DEFECTS), (registrations, REGISTRATION_DEFECTS),
                             (partner, PARTNER_DEFECTS)):
        assert set().union(*(m.defects for m in manifests)) == set(kinds)
        assert all(len(m.defects) >= 5 for m in manifests)
        assert all(0 < sum(m.defects.values()) < m.rows // 10 for m in manifests)


def test_feed_variants_cover_namespaces_and_encodings(inbox, lab):
    """Feeds come in UTF-8 with and without a namespace, ISO-8859-1 and UTF-16 with a BOM."""
    raw = {m.name: (inbox / m.name).read_bytes() for m in lab}
    assert b'xmlns="urn:example:lab:v1"' in raw["lab_feed_001.xml"]
    assert b'encoding="ISO-8859-1"' in raw["lab_feed_002.xml"]
    assert b"\xb5mol/L" in raw["lab_feed_002.xml"]  # a single Latin-1 byte for the micro sign
    assert b"xmlns" not in raw["lab_feed_003.xml"]
    assert raw["lab_feed_004.xml"].startswith(b"\xff\xfe<\x00?\x00x\x00m\x00l\x00")
    for manifest in lab:
        assert read(inbox / manifest.name)["unit"][0].as_py() == "µmol/L"


def test_feeds_carry_awkward_but_valid_records(inbox, lab):
    """Missing optional parts, stray whitespace, CDATA, comments and offsets are all present."""
    text = b"".join((inbox / m.name).read_bytes() for m in lab[:3]).decode("latin-1")
    for marker in ("<![CDATA[", "<!--", "+02:00</", "<ResultId> ", "<Value>\n"):
        assert marker in text, marker
    table = pa.concat_tables(read(inbox / m.name) for m in lab)
    assert table["unit"].null_count > 0
    assert table["ref_low"].null_count > 0
    assert table["birth_date"].null_count > 0


def test_registration_layouts_are_awkward(inbox, registrations):
    """Title rows, blank rows, a Notes sheet, lost ZIP zeros and numeric phones all occur."""
    first = read(inbox / "registrations_001.xlsx")
    assert first["_source_ref"][0].as_py() == "registrations_001.xlsx!Registrations:row=4"
    table = pa.concat_tables(read(inbox / m.name) for m in registrations)
    numbers = [int(ref.rsplit("=", 1)[1]) for ref in table["_source_ref"].to_pylist()]
    assert any(b - a > 1 for a, b in itertools.pairwise(numbers))  # blank rows
    zips = table["zip"].to_pylist()
    assert any(z is not None and len(z) == 4 and z.isdigit() for z in zips)
    phones = [p for p in table["phone"].to_pylist() if p]
    assert any(p.isdigit() and len(p) == 10 for p in phones)
    assert not any(p.endswith(".0") for p in phones)
    with CalamineWorkbook.from_path(inbox / "registrations_002.xlsx") as book:
        assert book.sheet_names == ["Registrations", "Notes"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    """Generation is deterministic byte for byte, so content hashes are stable."""
    runs = {}
    for label, seed in (("a", 5), ("b", 5), ("c", 6)):
        folder = tmp_path / label
        demo_files.write_lab_feeds(folder, files=2, records_per_file=40, seed=seed)
        demo_files.write_registrations(folder, files=2, rows_per_file=40, seed=seed)
        runs[label] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert runs["a"] == runs["b"]
    assert all(runs["a"][name] != runs["c"][name] for name in runs["a"])
    assert not any(name.endswith(".part") for name in runs["a"])


def test_small_and_empty_requests(tmp_path):
    """One record plants nothing (a duplicate needs an original); zero files writes nothing."""
    [single] = demo_files.write_lab_feeds(tmp_path / "one", files=1, records_per_file=1)
    assert single == FileManifest("lab_feed_001.xml", 1, {})
    [pair] = demo_files.write_registrations(tmp_path / "two", files=1, rows_per_file=2)
    assert sum(pair.defects.values()) == 1
    assert demo_files.write_lab_feeds(tmp_path / "none", files=0) == []
    assert list((tmp_path / "none").iterdir()) == []
