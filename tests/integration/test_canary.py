"""Patient data stays in the store: a planted canary patient never shows up in any output.

One private stack (its own Redis, Firebird copy, DuckDB, fleet, loader and beat, with JSON
logs, Sentry and the alert webhook pointed at receivers on loopback), real parts only. The
canary is planted in Firebird (a valid claim, a claim that fails validation, a payer with a
newline, a quote and a comma, a legacy table whose text AMOUNT the claims contract cannot read
(Arrow's error quotes it), a table keyed by the MRN itself, cut at sampled key bounds that
must never show, and one whose plan fails beside it), in an XML lab feed and in a
registration workbook (valid rows and rows failing validation), and one step raises on the
canary's chunk through a fault point. Every output is then searched for each canary value.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import openpyxl
import pytest

from etl_tasks.local_services import free_port
from tests.integration.fault_stack import FaultStack, wait_until
from tests.integration.receivers import http_receiver

pytestmark = pytest.mark.integration

NAME, MRN, PHONE, BIRTH = "Zyxcanary Quokkaperson", "CANARY-7731", "+1-555-0199-7731", "1911-11-11"
# Each canary value in the forms an output could take it: any case, other separators, the
# date as US text. "7731" alone would also match ports and pids; it is searched next to the
# rest of the MRN or the phone number.
PATTERNS = {
    "name (first)": r"zyxcanary",
    "name (last)": r"quokka\W{0,3}person",
    "MRN": r"canary\W{0,3}7731",
    "phone": r"555\W{0,3}0199\W{0,3}7731|1\W{0,3}555\W{0,3}0199",
    "birth date": r"1911\W{0,3}11\W{0,3}11|11\W{1,3}11\W{1,3}1911",
}
BREAKER = 'Zyxcanary, "Q"\nQuokkaperson'  # a newline, a quote and a comma in one value
LEGACY_DDL = """CREATE TABLE LEGACY_CLAIMS (
    CLAIM_ID BIGINT NOT NULL PRIMARY KEY, PATIENT_ID VARCHAR(20), PROVIDER_NPI CHAR(10),
    SERVICE_DATE DATE, CPT_CODE VARCHAR(5), ICD10_CODE VARCHAR(8), AMOUNT VARCHAR(20),
    PAYER VARCHAR(40), STATUS VARCHAR(12), UPDATED_AT TIMESTAMP)"""
# A table keyed by text: its key ranges are bounded by sampled keys, here the MRN itself.
TEXT_KEY_DDL = """CREATE TABLE TEXT_KEYED (
    CLAIM_ID VARCHAR(20) NOT NULL PRIMARY KEY, UPDATED_AT TIMESTAMP)"""
# A text key missing in one row beside the MRN: no range could read that row, so the plan
# (a task Sentry watches) fails, having read the MRN's table.
NULL_KEY_DDL = "CREATE TABLE NULL_KEYED (MRN VARCHAR(20), UPDATED_AT TIMESTAMP)"

PIPELINE = """
[[sources]]
name = "billing"
kind = "firebird"
location = "BILLING_CLAIMS"
schedule = "manual"
chunk_size = 2000

[[sources]]
name = "legacy_billing"
kind = "firebird"
location = "LEGACY_CLAIMS"
dataset = "billing_claims"
key_column = "CLAIM_ID"
updated_column = "UPDATED_AT"
target_table = "legacy_claims"
schedule = "manual"
chunk_size = 2000

[[sources]]
name = "text_keyed"
kind = "firebird"
location = "TEXT_KEYED"
key_column = "CLAIM_ID"
updated_column = "UPDATED_AT"
target_table = "text_keyed"
schedule = "manual"

[[sources]]
name = "null_keyed"
kind = "firebird"
location = "NULL_KEYED"
key_column = "MRN"
schedule = "manual"

[[sources]]
name = "lab_results"
kind = "xml"
location = "{data_dir}/inbox/lab"
schedule = "manual"
settle_s = 0

[[sources]]
name = "registrations"
kind = "excel"
location = "{data_dir}/inbox/registrations"
schedule = "manual"
settle_s = 0
"""


def _plant_firebird(stack: FaultStack) -> None:
    """Claims 12001 (valid), 12002 (bad status), 12003 (the CSV breaker as payer, valid); a
    legacy claim whose text AMOUNT the claims contract cannot read; a text key holding the
    MRN; a text key holding the MRN in one row and nothing in another."""
    insert = ("INSERT INTO {table} VALUES (?, ?, '1234567890', ?, '99213', 'I10', ?, ?, ?, "
              "TIMESTAMP '2026-01-01 00:00:00')")
    born = dt.date.fromisoformat(BIRTH)
    for row in ((12001, MRN, born, Decimal("42.50"), NAME, "paid"),
                (12002, MRN, born, Decimal("42.50"), PHONE, "zyxcanary"),
                (12003, MRN, born, Decimal("17.00"), BREAKER, "paid")):
        stack.firebird(insert.format(table="BILLING_CLAIMS"), row)
    stack.firebird(LEGACY_DDL)
    stack.firebird(insert.format(table="LEGACY_CLAIMS"), (1, MRN, born, "12,50", NAME, "paid"))
    stack.firebird(TEXT_KEY_DDL)
    stack.firebird("INSERT INTO TEXT_KEYED VALUES (?, TIMESTAMP '2026-01-01 00:00:00')", (MRN,))
    stack.firebird(NULL_KEY_DDL)
    for mrn in (MRN, None):
        stack.firebird("INSERT INTO NULL_KEYED VALUES (?, TIMESTAMP '2026-01-01 00:00:00')",
                       (mrn,))


def _plant_files(data: Path) -> None:
    """A lab feed (the canary's valid result, and one whose value is the name: not a number)
    and a workbook (the canary, and a second row with the same MRN: a duplicate)."""
    lab = data / "inbox" / "lab"
    lab.mkdir(parents=True)
    results = []
    for n, value in ((1, "5.4"), (2, NAME), (3, "6.1")):
        patient = MRN if n < 3 else "P000003"
        results.append(
            f"<Result><ResultId>R-CANARY-{n}</ResultId><Patient><Id>{patient}</Id>"
            f"<BirthDate>{BIRTH}</BirthDate></Patient><Test code=\"2345-7\" system=\"LOINC\">"
            f"Glucose</Test><Value>{value}</Value><Unit>mmol/L</Unit>"
            "<CollectedAt>2026-11-17T08:00:00Z</CollectedAt>"
            "<ReportedAt>2026-11-17T10:00:00Z</ReportedAt><Status>final</Status></Result>")
    (lab / "canary_feed.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<LabResults>' + "".join(results)
        + "</LabResults>\n")
    registrations = data / "inbox" / "registrations"
    registrations.mkdir(parents=True)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["MRN", "First Name", "Last Name", "Date of Birth", "Sex", "ZIP", "Phone",
                  "Registration Date", "Clinic", "Insurance ID"])
    first, last = NAME.split()
    born = dt.date.fromisoformat(BIRTH)
    sheet.append([MRN, first, last, born, "F", "02134", PHONE, "2026-01-05", "North End Health",
                  "AETNA-123456789"])
    sheet.append(["M-2", "Ana", "Adams", "1970-01-01", "F", "02139", "6175550101",
                  "2026-01-05", "North End Health", "BCBS-123456789"])
    sheet.append([MRN, first, last, "11/11/1911", "Q", "ZYXCA", PHONE, "2026-01-06",
                  "North End Health", "AETNA-123456789"])
    book.save(registrations / "canary_registrations.xlsx")


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A child process writing to `log`, terminated when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _get(url: str, auth: str | None = None) -> str:
    headers = {"Authorization": "Basic " + b64encode(auth.encode()).decode()} if auth else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return r.read().decode("utf-8", "replace")


def _etl(stack: FaultStack, *args: str) -> str:
    """Run the CLI; its stdout and stderr (both outputs someone reads)."""
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, *args], env=stack.env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode in (0, 1), (args, done.returncode, done.stdout, done.stderr)
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


# -- Redis MONITOR -----------------------------------------------------------------------
_QUOTED = re.compile(rb'"((?:\\.|[^"\\])*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}
_BASE64 = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")


def _unescape(arg: bytes) -> bytes:
    """redis-cli's quoting (sdscatrepr) undone: \\xHH, \\n, \\" and friends."""
    out, i = bytearray(), 0
    while i < len(arg):
        if arg[i:i + 1] == b"\\" and i + 1 < len(arg):
            nxt = arg[i + 1:i + 2]
            if nxt == b"x":
                out += bytes([int(arg[i + 2:i + 4], 16)])
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt)
            i += 2
            continue
        out += arg[i:i + 1]
        i += 1
    return bytes(out)


def _readable(text: str, depth: int = 0) -> str:
    """`text` plus whatever base64 inside it decodes to (kombu sends task messages and
    events with a base64 body, inside JSON, sometimes inside JSON again)."""
    found = [text]
    for chunk in _BASE64.findall(text) if depth < 3 else ():
        try:
            decoded = base64.b64decode(chunk + "=" * (-len(chunk) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        found.append(_readable(decoded.decode("utf-8", "replace"), depth + 1))
    return "\n".join(found)


def _monitor_commands(path: Path) -> tuple[str, list[bytes]]:
    """Every command MONITOR saw, decoded; and the staged payloads among them."""
    kept, staged = [], []
    for line in path.read_bytes().splitlines():
        args = [_unescape(a) for a in _QUOTED.findall(line)]
        # Staged payloads (SET etl:stage:<run>:<chunk>:*) are a chunk's patient rows, sealed
        # with AES-GCM (etl_tasks/sealing.py): they are searched like everything else.
        if len(args) >= 3 and args[0].upper() == b"SET" and args[1].startswith(b"etl:stage:"):
            staged.append(args[2])
        kept.append(_readable(b" ".join(args).decode("utf-8", "replace")))
    return "\n".join(kept), staged


def _leaks(outputs: dict[str, str]) -> list[str]:
    """Each (output, canary value) found, with the text around it."""
    found = []
    for where, text in outputs.items():
        for what, pattern in PATTERNS.items():
            for match in re.finditer(pattern, text, re.IGNORECASE):
                around = text[max(0, match.start() - 150):match.end() + 150]
                found.append(f"{what} in {where}: ...{around!r}...")
                break
    return found


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_no_canary_value_leaves_the_store(world):
    """Logs, CLI output, the HTML report, Flower, Redis traffic (sealed staged payloads
    included), results, run records, Sentry, webhook alerts and /metrics hold no canary
    value, while the canary's valid rows are in DuckDB and its failing rows in
    etl_quarantine."""
    with http_receiver() as sentry, http_receiver() as webhook:
        stack: FaultStack = world(env={
            "ETL_SENTRY_DSN": sentry.url.replace("http://", "http://public@") + "/1",
            "ETL_ALERT_WEBHOOK_URL": webhook.url + "/hook",
            "ETL_LOG_FORMAT": "json", "ETL_MAX_ATTEMPTS": "2"})
        (stack.root / "pipeline.toml").write_text(PIPELINE)
        _plant_firebird(stack)
        _plant_files(stack.root / "data")
        logs = stack.root / "logs"
        logs.mkdir(exist_ok=True)
        flower_port, exporter_port = free_port(), free_port()
        with (_process(["redis-cli", "-u", stack.redis_server.url, "monitor"], stack.env,
                       logs / "monitor.txt"),
              _process([sys.executable, "-m", "workers.flower", f"--port={flower_port}",
                        "--basic-auth=ops:secret"], stack.env, logs / "flower.log"),
              _process([sys.executable, "-m", "workers.exporter", "--port", str(exporter_port)],
                       stack.env, logs / "exporter.log")):
            # The fleet raises once on the transform of the canary's range (then succeeds);
            # the loader logs as console lines, the rest as JSON.
            stack.start_all(
                fleet_env={"ETL_FAULT_POINT": "transform:1@billing:keys:12001",
                           "ETL_FAULT_ACTION": "raise"},
                loader_env={"ETL_LOG_FORMAT": "console"})
            wait_until(lambda: _flower_workers(flower_port), 60, "Flower to see the workers")
            outputs = {"etl run --all --wait --json": _etl(stack, "run", "--all", "--wait",
                                                           "--json")}
            # A second run: the dead range is tried again, the text key's mark is used.
            outputs["etl run --all --wait"] = _etl(stack, "run", "--all", "--wait")
            for args in (("status", "--json"), ("status",), ("dead-letters", "--json"),
                         ("dead-letters",), ("reconcile", "billing", "--json"), ("fallbacks",),
                         ("quarantine", "list", "--json"), ("quarantine", "list")):
                outputs["etl " + " ".join(args)] = _etl(stack, *args)
            wait_until(lambda: webhook.bodies, 60, "an alert on the webhook")
            wait_until(lambda: any(b"FatalError" in b or b"Unexpected" in b
                                   for b in sentry.bodies), 60, "a Sentry event")
            time.sleep(1)  # Flower takes in the last events
            auth = "ops:secret"
            outputs["Flower /api/tasks"] = _get(f"http://127.0.0.1:{flower_port}/api/tasks",
                                                auth)
            outputs["Flower /api/workers"] = _get(
                f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", auth)
            outputs["/metrics"] = _get(f"http://127.0.0.1:{exporter_port}/metrics")
            report = stack.root / "report.html"
            outputs["etl report --html"] = _etl(stack, "report", "--html", str(report))
            outputs["report.html"] = report.read_text()
            # Kept beside the logs for whoever reads a failure.
            (logs / "outputs.json").write_text(json.dumps(outputs, indent=1))
            rows = _stored_rows(stack)
            outputs["etl quarantine purge"] = _etl(stack, "quarantine", "purge",
                                                   "--older-than", "0")
        for worker in list(stack.workers):
            stack.workers[worker].stop()
        sentry_bodies = [b.decode("utf-8", "replace") for b in sentry.bodies]
        webhook_bodies = [b.decode("utf-8", "replace") for b in webhook.bodies]

    # The canary really went through: valid rows stored, failing rows quarantined, the
    # breaker read back exactly. Otherwise a clean output would prove nothing.
    assert rows["billing"] == [(12001, MRN, NAME), (12003, MRN, BREAKER)]
    assert len(rows["billing quarantined"]) == 1
    assert rows["lab"] == [("R-CANARY-1", MRN, BIRTH)]
    assert len(rows["lab quarantined"]) == 1
    assert rows["registrations"] == [(MRN, "Zyxcanary", "Quokkaperson")]
    assert len(rows["registrations quarantined"]) == 1
    assert all(MRN in raw for raw in rows["raw"])  # etl_quarantine.raw keeps the values
    assert rows["text_keyed"] == [(MRN,)]  # read through a range bounded by the MRN itself

    monitor, staged = _monitor_commands(logs / "monitor.txt")
    # Seen, and sealed: an Arrow IPC stream would show its schema's column names in clear.
    assert staged
    assert not any(b"patient_id" in payload or b"date_of_birth" in payload for payload in staged)
    assert re.search(r"celery-task-meta-", monitor)
    assert re.search(r"etl:run:", monitor)
    outputs["Redis MONITOR"] = monitor
    for log in sorted(logs.glob("*.log")):
        outputs[f"log {log.name}"] = log.read_text(errors="replace")
    for n, body in enumerate(sentry_bodies):
        outputs[f"Sentry event {n}"] = body
    for n, body in enumerate(webhook_bodies):
        outputs[f"webhook body {n}"] = body
    leaks = _leaks(outputs)
    assert not leaks, "\n".join(leaks)

    # The failures did happen, and were reported in our words.
    status = outputs["etl run --all --wait --json"]
    assert "cannot be read as decimal128(12, 2)" in outputs["etl dead-letters --json"]
    assert "text_keyed" in status
    assert "row(s) of table NULL_KEYED have no MRN" in status
    assert "Unexpected" in outputs["Flower /api/tasks"] or "FatalError" in outputs[
        "Flower /api/tasks"]
    fleet = _json_lines(logs / "fleet.log")
    failed = [line for line in fleet if "failed (attempt" in line["event"]]
    # A range is validated in its extract step: the fault between read and validation
    # fails that step, logged with the range's unit.
    assert any(line.get("stage") == "extract" and line.get("source") == "billing"
               and line.get("unit_id") == "billing:keys:12001-12003" and line.get("run_id")
               for line in failed), failed
    assert any(line.get("logger") == "celery.app.trace" and line.get("run_id")
               and line.get("unit_id") for line in fleet)


def _flower_workers(port: int) -> bool:
    try:
        workers = json.loads(_get(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                                  "ops:secret"))
    except OSError:
        return False
    return any(w.startswith("loader") for w in workers)


def _stored_rows(stack: FaultStack) -> dict[str, list[Any]]:
    """The canary's rows in DuckDB, by where they should be."""
    def q(sql: str) -> list[Any]:
        return stack.query(sql)

    quarantined = ("SELECT source_ref FROM etl_quarantine WHERE source = '{}' AND raw LIKE "
                   "'%CANARY%'")
    return {
        "billing": q("SELECT claim_id, patient_id, payer FROM billing_claims WHERE patient_id = "
                     f"'{MRN}' ORDER BY claim_id"),
        "billing quarantined": [r[0] for r in q(quarantined.format("billing"))],
        "lab": [(r[0], r[1], str(r[2])) for r in q(
            "SELECT result_id, patient_id, birth_date FROM lab_results WHERE patient_id = "
            f"'{MRN}'")],
        "lab quarantined": q(quarantined.format("lab_results")),
        "registrations": q("SELECT mrn, first_name, last_name FROM patient_registrations "
                           f"WHERE mrn = '{MRN}'"),
        "registrations quarantined": q(quarantined.format("registrations")),
        "raw": [r[0] for r in q("SELECT raw FROM etl_quarantine WHERE raw LIKE '%CANARY%'")],
        "text_keyed": q("SELECT claim_id FROM text_keyed"),
    }
