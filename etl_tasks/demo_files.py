"""Synthetic demo inputs with planted defects: partner lab feeds (XML) and registration uploads.

Two lab partners: ACME's feeds (the built-in lab_results layout and rules) and Northside's,
whose layout and rules are configuration only (`partner_labs` and its dataset
`partner_observations` in etl_tasks/pipeline.toml).

A defective record carries exactly one defect, so a manifest's defect counts are exactly the rows
the validation rules of DESIGN.md quarantine; every other record loads, however awkward its
layout. Output is deterministic for a seed, byte for byte. All identifiers and people are made up.
"""

from __future__ import annotations

import codecs
import datetime as dt
import io
import os
import random
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import openpyxl

LAB_DEFECTS = (
    "duplicate_result_id", "missing_patient_id", "bad_loinc", "non_numeric_value",
    "reported_before_collected", "bad_status", "naive_timestamp",
)  # fmt: skip
REGISTRATION_DEFECTS = (
    "duplicate_mrn", "missing_mrn", "future_dob", "dob_before_1900", "bad_sex", "bad_zip",
    "bad_registration_date",
)  # fmt: skip
DEFECT_RATE = 0.04
"""Share of records that carry a planted defect."""
LAB_NAMESPACE = "urn:example:lab:v1"
PARTNER_DEFECTS = (
    "duplicate_observation_id", "missing_mrn", "bad_mrn", "future_birth_date", "bad_loinc",
    "value_out_of_range", "non_numeric_value", "bad_fasting", "reported_before_collected",
    "bad_status",
)  # fmt: skip
PARTNER_NAMESPACE = "urn:example:northside:v2"


@dataclass(frozen=True)
class FileManifest:
    """What one generated file holds and what the pipeline should make of it."""

    name: str
    rows: int
    """Records (lab feeds) or non-blank data rows (registrations) in the file."""
    defects: dict[str, int]
    """Defect kind -> rows expected to be quarantined for it; the other rows load."""


def _plan_defects(
    rng: random.Random, rows: int, kinds: Sequence[str], offset: int
) -> dict[int, str]:
    """Pick defective positions (1-based, never the first, so a duplicate has an original)."""
    if rows < 2:
        return {}
    count = min(rows - 1, max(1, round(rows * DEFECT_RATE)))
    positions = sorted(rng.sample(range(2, rows + 1), count))
    # Kinds continue their cycle from file to file, so every kind shows up across the set.
    return {pos: kinds[(offset + i) % len(kinds)] for i, pos in enumerate(positions)}


def _planned_files(
    rng: random.Random, files: int, rows: int, kinds: Sequence[str]
) -> Iterator[tuple[int, dict[int, str]]]:
    """Each file's index and defect plan, the kinds' cycle continuing from file to file."""
    offset = 0
    for index in range(files):
        plan = _plan_defects(rng, rows, kinds, offset)
        offset += len(plan)
        yield index, plan


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Write beside the target, then rename, so an inbox scan never sees half a file."""
    part = path.with_name(f".{path.name}.part")
    with part.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
    os.replace(part, path)


# --- partner lab feeds --------------------------------------------------------------------

# (LOINC code, name, unit, reference low, reference high, decimals)
_TESTS = (
    ("14682-9", "Creatinine", "µmol/L", 62.0, 106.0, 0),
    ("2345-7", "Glucose", "mmol/L", 3.9, 5.5, 1),
    ("2160-0", "Creatinine", "mg/dL", 0.7, 1.3, 2),
    ("718-7", "Hemoglobin", "g/dL", 12.0, 17.5, 1),
    ("2823-3", "Potassium", "mmol/L", 3.5, 5.1, 1),
    ("2951-2", "Sodium", "mmol/L", 136.0, 145.0, 0),
    ("6690-2", "Leukocytes", "10*3/uL", 4.5, 11.0, 1),
    ("4548-4", "Hemoglobin A1c", "%", 4.0, 5.6, 1),
    ("1742-6", "Alanine aminotransferase", "U/L", 7.0, 56.0, 0),
    ("3016-3", "Thyrotropin", "mIU/L", 0.4, 4.0, 2),
    ("22664-7", "Urea", "µmol/L", 2500.0, 7100.0, 0),
)
_STATUSES = ("final",) * 16 + ("preliminary",) * 2 + ("corrected", "amended", "cancelled")
_OFFSETS = (dt.timedelta(0),) * 5 + (dt.timedelta(hours=2),) * 3 + (dt.timedelta(hours=-5),)
# (Python codec, declared encoding, default namespace); file n uses variant n % 4.
_FEED_VARIANTS = (
    ("utf-8", "UTF-8", LAB_NAMESPACE),
    ("iso-8859-1", "ISO-8859-1", LAB_NAMESPACE),
    ("utf-8", "UTF-8", None),
    ("utf-16", "UTF-16", LAB_NAMESPACE),  # Python's utf-16 codec writes the BOM
)
_FEED_START = dt.datetime(2026, 11, 17, tzinfo=dt.UTC)


def write_lab_feeds(
    inbox: Path, *, files: int = 4, records_per_file: int = 500, seed: int = 7
) -> list[FileManifest]:
    """Write `lab_feed_001.xml`... into `inbox` and return what each file holds."""
    rng = random.Random(seed)
    inbox.mkdir(parents=True, exist_ok=True)
    manifests = []
    for index, plan in _planned_files(rng, files, records_per_file, LAB_DEFECTS):
        codec, declared, namespace = _FEED_VARIANTS[index % len(_FEED_VARIANTS)]
        name = f"lab_feed_{index + 1:03d}.xml"
        lines = _feed_lines(rng, index + 1, records_per_file, plan, declared, namespace)
        _write_atomically(inbox / name, _encode(lines, codec))
        manifests.append(FileManifest(name, records_per_file, dict(Counter(plan.values()))))
    return manifests


def _encode(lines: Iterable[str], codec: str) -> Iterable[bytes]:
    """Encode chunk by chunk; the incremental encoder writes a BOM (UTF-16) only once."""
    encoder = codecs.getincrementalencoder(codec)()
    for line in lines:
        yield encoder.encode(line)
    yield encoder.encode("", final=True)


def _feed_lines(
    rng: random.Random,
    file_no: int,
    records: int,
    plan: dict[int, str],
    declared: str,
    namespace: str | None,
) -> Iterable[str]:
    xmlns = f" xmlns={quoteattr(namespace)}" if namespace else ""
    yield f'<?xml version="1.0" encoding="{declared}"?>\n'
    yield "<!-- Synthetic demo data: no real patients. -->\n"
    yield f'<LabResults{xmlns} partner="ACME-LABS" generated="2026-11-20T06:00:00Z">\n'
    valid_ids: list[str] = []
    for n in range(1, records + 1):
        defect = plan.get(n)
        result_id = f"R-{file_no:03d}-{n:06d}"
        if defect == "duplicate_result_id":
            result_id = rng.choice(valid_ids)
        elif defect is None:
            valid_ids.append(result_id)
        if n % 50 == 0:
            yield f"  <!-- page {n // 50 + 1} -->\n"
        yield _result_xml(rng, result_id, defect, first=n == 1)
    yield "</LabResults>\n"


def _result_xml(rng: random.Random, result_id: str, defect: str | None, *, first: bool) -> str:
    code, name, unit, low, high, decimals = _TESTS[0] if first else rng.choice(_TESTS)
    value = f"{rng.uniform(low * 0.7, high * 1.3):.{decimals}f}"
    collected = _FEED_START + dt.timedelta(minutes=rng.randint(0, 3 * 24 * 60))
    reported = collected + dt.timedelta(minutes=rng.randint(20, 36 * 60))
    status = rng.choice(_STATUSES)
    patient_id: str | None = f"P{rng.randint(1, 99_999):06d}"
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randint(0, 32_500))
    collected_at, reported_at = _timestamp(rng, collected), _timestamp(rng, reported)
    if defect == "missing_patient_id":
        patient_id = rng.choice((None, "", "   "))
    elif defect == "bad_loinc":
        code = rng.choice(("2345", "GLU", "LP-1234", "123456-7", "2345-72"))
    elif defect == "non_numeric_value":
        value = rng.choice(("positive", "see comment", "<0.5", "hemolysed", "5..4"))
    elif defect == "reported_before_collected":
        reported_at = _timestamp(rng, collected - dt.timedelta(minutes=rng.randint(5, 600)))
    elif defect == "bad_status":
        status = rng.choice(("done", "pending", "in-progress", "unknown", "F"))
    elif defect == "naive_timestamp" and rng.random() < 0.5:
        collected_at = collected.strftime("%Y-%m-%dT%H:%M:%S")
    elif defect == "naive_timestamp":
        reported_at = reported.strftime("%Y-%m-%dT%H:%M:%S")

    def pad(text: str) -> str:  # stray whitespace, valid once the transform strips it
        return rng.choice((f" {text} ", f"\n        {text}\n      ", f"{text}\t"))

    awkward = rng.random() < 0.1
    out = ["  <Result>\n", f"    <ResultId>{escape(pad(result_id) if awkward else result_id)}"]
    out.append("</ResultId>\n    <Patient>")
    if patient_id is not None:
        out.append(f"<Id>{escape(patient_id)}</Id>")
    if first or rng.random() > 0.1:  # BirthDate is optional
        out.append(f"<BirthDate>{birth.isoformat()}</BirthDate>")
    test_name = f"<![CDATA[{name}]]>" if rng.random() < 0.05 else escape(name)
    out.append(f'</Patient>\n    <Test code={quoteattr(code)} system="LOINC">{test_name}</Test>\n')
    if rng.random() < 0.02:
        out.append("    <!-- repeated on a second analyser -->\n")
    out.append(f"    <Value>{escape(pad(value) if awkward else value)}</Value>")
    if first or rng.random() > 0.05:  # Unit is optional
        out.append(f"<Unit>{escape(unit)}</Unit>")
    if first or rng.random() > 0.1:  # ReferenceRange is optional
        out.append(f'\n    <ReferenceRange low="{low:.{decimals}f}" high="{high:.{decimals}f}"/>')
    out.append(f"\n    <CollectedAt>{collected_at}</CollectedAt>\n")
    out.append(f"    <ReportedAt>{reported_at}</ReportedAt>\n")
    out.append(f"    <Status>{escape(pad(status) if awkward else status)}</Status>\n  </Result>\n")
    return "".join(out)


def _timestamp(rng: random.Random, moment: dt.datetime) -> str:
    offset = rng.choice(_OFFSETS)
    if not offset:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.astimezone(dt.timezone(offset)).isoformat(timespec="seconds")


# --- a second lab partner, another layout ---------------------------------------------------

_PARTNER_STATUSES = ("final",) * 8 + ("preliminary", "corrected")


def write_partner_feeds(
    inbox: Path, *, files: int = 2, records_per_file: int = 400, seed: int = 13
) -> list[FileManifest]:
    """Write Northside's `northside_001.xml`... into `inbox` and return what each file holds.

    Northside names things its own way: an `Observation` record with its id and status as
    attributes, the MRN and birth date under `Subject`, the LOINC code as an attribute of
    `Code`, value and unit as attributes of `Quantity`, a `Fasting` flag and both times
    under `Times`, all in a prefixed namespace.
    """
    rng = random.Random(seed)
    inbox.mkdir(parents=True, exist_ok=True)
    manifests = []
    for index, plan in _planned_files(rng, files, records_per_file, PARTNER_DEFECTS):
        name = f"northside_{index + 1:03d}.xml"
        lines = _partner_lines(rng, index + 1, records_per_file, plan)
        _write_atomically(inbox / name, _encode(lines, "utf-8"))
        manifests.append(FileManifest(name, records_per_file, dict(Counter(plan.values()))))
    return manifests


def _partner_lines(
    rng: random.Random, file_no: int, records: int, plan: dict[int, str]
) -> Iterable[str]:
    yield '<?xml version="1.0" encoding="UTF-8"?>\n'
    yield "<!-- Synthetic demo data: no real patients. -->\n"
    yield (f"<nd:Delivery xmlns:nd={quoteattr(PARTNER_NAMESPACE)} sender=\"NORTHSIDE-DX\" "
           'sent="2026-11-20T07:00:00Z">\n')
    valid_ids: list[str] = []
    for n in range(1, records + 1):
        defect = plan.get(n)
        observation_id = f"NS-{file_no:03d}-{n:06d}"
        if defect == "duplicate_observation_id":
            observation_id = rng.choice(valid_ids)
        elif defect is None:
            valid_ids.append(observation_id)
        yield _observation_xml(rng, observation_id, defect)
    yield "</nd:Delivery>\n"


def _observation_xml(rng: random.Random, observation_id: str, defect: str | None) -> str:
    code, name, unit, low, high, decimals = rng.choice(_TESTS)
    value = f"{rng.uniform(low * 0.7, high * 1.3):.{decimals}f}"
    collected = _FEED_START + dt.timedelta(minutes=rng.randint(0, 3 * 24 * 60))
    reported = collected + dt.timedelta(minutes=rng.randint(20, 36 * 60))
    collected_at, reported_at = _timestamp(rng, collected), _timestamp(rng, reported)
    mrn: str | None = f"{rng.randint(10_000_000, 99_999_999)}"
    born = (dt.date(1930, 1, 1) + dt.timedelta(days=rng.randint(0, 32_500))).isoformat()
    status = rng.choice(_PARTNER_STATUSES)
    fasting = rng.choice(("yes", "no", "true", "false", "Y", "N"))
    if defect == "missing_mrn":
        mrn = rng.choice((None, "", "  "))
    elif defect == "bad_mrn":
        mrn = rng.choice(("MRN-1234", "1234567", "123456789", "1234567O"))
    elif defect == "future_birth_date":
        born = dt.date(2099, rng.randint(1, 12), rng.randint(1, 28)).isoformat()
    elif defect == "bad_loinc":
        code = rng.choice(("2345", "GLU", "LP-1234", "123456-7"))
    elif defect == "value_out_of_range":
        value = rng.choice(("-1.5", "-0.001", "250000"))
    elif defect == "non_numeric_value":
        value = rng.choice(("positive", "<0.5", "5..4", "1.2345"))
    elif defect == "bad_fasting":
        fasting = rng.choice(("sometimes", "?", "unknown"))
    elif defect == "reported_before_collected":
        reported_at = _timestamp(rng, collected - dt.timedelta(minutes=rng.randint(5, 600)))
    elif defect == "bad_status":
        status = rng.choice(("done", "amended", "F"))
    subject = "" if mrn is None else f"<nd:Mrn>{escape(mrn)}</nd:Mrn>"
    return (f"  <nd:Observation id={quoteattr(observation_id)} status={quoteattr(status)}>\n"
            f"    <nd:Subject>{subject}<nd:Born>{born}</nd:Born></nd:Subject>\n"
            f'    <nd:Code system="http://loinc.org" code={quoteattr(code)}>{escape(name)}'
            "</nd:Code>\n"
            f"    <nd:Quantity value={quoteattr(value)} unit={quoteattr(unit)}/>\n"
            f"    <nd:Fasting>{fasting}</nd:Fasting>\n"
            f"    <nd:Times><nd:Collected>{collected_at}</nd:Collected>"
            f"<nd:Reported>{reported_at}</nd:Reported></nd:Times>\n"
            "  </nd:Observation>\n")


# --- patient registration uploads ---------------------------------------------------------

_HEADERS = (
    "MRN", "First Name", "Last Name", "Date of Birth", "Sex", "ZIP", "Phone",
    "Registration Date", "Clinic", "Insurance ID",
)  # fmt: skip
# File n uses layout n % 3: (title rows above the header, header labels in column order).
_LAYOUTS: tuple[tuple[tuple[tuple[str, ...], ...], tuple[str, ...]], ...] = (
    ((("Clinic registrations export",), ()), _HEADERS),
    ((), ("mrn", "first name", "last name", "date of birth", "sex", " ZIP ", "phone",
          "registration date", "clinic", "insurance id")),
    ((("Clinic registrations export", "generated 2026-11-20"),),
     ("Clinic", "MRN", "LAST NAME", "First  Name", "Date Of Birth", "Sex", "Zip ", "Phone",
      "Registration  Date", "INSURANCE ID")),
)  # fmt: skip
_FIRST = (
    "Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal",
    "Kate", "Luis", "Mei", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
)  # fmt: skip
_LAST = (
    "Adams", "Baker", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ito",
    "Jones", "Khan", "Lopez", "Murphy", "Nguyen", "O'Brien", "Patel", "Rossi", "Smith",
)  # fmt: skip
_ZIPS = ("02134", "02139", "01002", "07030", "00501", "10001", "60614", "94110", "19104")
_CLINICS = ("Riverside Family Clinic", "North End Health", "Harbor Pediatrics", "Elm St Cardiology")
_PAYERS = ("BCBS", "AETNA", "CIGNA", "UHC", "MEDICARE")
_EXCEL_EPOCH = dt.date(1899, 12, 30)
_FIXED_STAMP = (2026, 11, 20, 6, 0, 0)
_CORE_DATES = re.compile(rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:\2>)")


def write_registrations(
    inbox: Path, *, files: int = 3, rows_per_file: int = 300, seed: int = 11
) -> list[FileManifest]:
    """Write `registrations_001.xlsx`... into `inbox` and return what each file holds."""
    rng = random.Random(seed)
    inbox.mkdir(parents=True, exist_ok=True)
    manifests = []
    for index, plan in _planned_files(rng, files, rows_per_file, REGISTRATION_DEFECTS):
        name = f"registrations_{index + 1:03d}.xlsx"
        titles, labels = _LAYOUTS[index % len(_LAYOUTS)]
        book = openpyxl.Workbook(write_only=True)
        sheet = book.create_sheet("Registrations")
        for title in titles:
            sheet.append(list(title))
        sheet.append(list(labels))
        order = [_HEADERS[_key(label)] for label in labels]
        valid_mrns: list[str] = []
        for n in range(1, rows_per_file + 1):
            if n > 1 and rng.random() < 0.02:  # blank rows between data rows: layout, not data
                sheet.append(rng.choice(([], [None, "   "], [" "] * len(labels))))
            row = _registration(rng, index + 1, n, plan.get(n), valid_mrns)
            sheet.append([row[label] for label in order])
        notes = book.create_sheet("Notes")
        notes.append(["Export of the front-desk registrations; walk-ins are entered later."])
        notes.append(["Questions: registrations desk, extension 2104."])
        buffer = io.BytesIO()
        book.save(buffer)
        _write_atomically(inbox / name, [_stable_zip(buffer.getvalue())])
        manifests.append(FileManifest(name, rows_per_file, dict(Counter(plan.values()))))
    return manifests


def _key(label: str) -> int:
    squashed = "".join(label.split()).lower()
    return next(
        i for i, header in enumerate(_HEADERS) if "".join(header.split()).lower() == squashed
    )


def _registration(
    rng: random.Random, file_no: int, n: int, defect: str | None, valid_mrns: list[str]
) -> dict[str, object]:
    mrn = f"{10_000_000 + file_no * 1_000_000 + n * 17 + rng.randint(0, 16)}"
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randint(0, 32_500))
    registered = dt.datetime(2025, 1, 2, 8) + dt.timedelta(minutes=rng.randint(0, 680 * 24 * 60))
    zip_code = rng.choice(_ZIPS)
    row: dict[str, object] = {
        "MRN": int(mrn) if rng.random() < 0.05 else (f" {mrn} " if rng.random() < 0.03 else mrn),
        "First Name": rng.choice(_FIRST),
        "Last Name": rng.choice(_LAST),
        "Date of Birth": _date_cell(rng, birth),
        "Sex": rng.choice(("F", "M") * 9 + ("X", "U", " F ")),
        # A numeric ZIP cell loses its leading zero (02134 -> 2134); the transform pads it back.
        "ZIP": int(zip_code) if rng.random() < 0.5 else zip_code,
        "Phone": _phone(rng),
        "Registration Date": registered if rng.random() < 0.3 else _date_cell(rng, registered),
        "Clinic": rng.choice(_CLINICS),
        "Insurance ID": f"{rng.choice(_PAYERS)}-{rng.randint(100_000_000, 999_999_999)}",
    }
    if defect == "duplicate_mrn":
        row["MRN"] = rng.choice(valid_mrns)
    elif defect == "missing_mrn":
        row["MRN"] = rng.choice((None, "   "))
    elif defect == "future_dob":
        row["Date of Birth"] = _date_cell(
            rng, dt.date(2099, rng.randint(1, 12), rng.randint(1, 28))
        )
    elif defect == "dob_before_1900":
        old = dt.date(rng.randint(1850, 1899), rng.randint(1, 12), rng.randint(1, 28))
        row["Date of Birth"] = rng.choice((old.isoformat(), f"{old.month}/{old.day}/{old.year}"))
    elif defect == "bad_sex":
        row["Sex"] = rng.choice(("Male", "Female", "unknown", "2", "?"))
    elif defect == "bad_zip":
        row["ZIP"] = rng.choice(("ABCDE", 1234567, "9021O", "021345678"))
    elif defect == "bad_registration_date":
        row["Registration Date"] = rng.choice(("next week", "2026-13-45", "13/25/2026", "Nov 3rd"))
    elif defect is None:
        valid_mrns.append(mrn)
    return row


def _date_cell(rng: random.Random, moment: dt.date) -> object:
    """A date as a real date cell, US text, ISO text or an Excel serial number."""
    day = moment.date() if isinstance(moment, dt.datetime) else moment
    form = rng.random()
    if form < 0.4:
        return day
    if form < 0.65:
        return f"{day.month}/{day.day}/{day.year}"
    if form < 0.85:
        return day.isoformat()
    return (day - _EXCEL_EPOCH).days


def _phone(rng: random.Random) -> object:
    area, line = rng.choice(("617", "212", "312", "415")), rng.randint(100, 199)
    form = rng.random()
    if form < 0.5:
        return int(f"{area}5550{line}")  # a numeric cell; must stay 6175550123, not ...0123.0
    if form < 0.8:
        return f"({area}) 555-0{line}"
    return f"{area}-555-0{line}"


def _stable_zip(data: bytes) -> bytes:
    """Pin the timestamps openpyxl writes into the archive: same seed, same bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            if item.filename == "docProps/core.xml":
                body = _CORE_DATES.sub(rb"\g<1>2026-11-20T06:00:00Z\g<3>", body)
            info = zipfile.ZipInfo(item.filename, date_time=_FIXED_STAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, body)
    return out.getvalue()
