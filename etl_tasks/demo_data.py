"""The demo sources: a Firebird billing database, two partners' lab feed XML, registration Excel.

The billing database is an embedded database file by default, or made through a Firebird
server when the target is a server DSN (`ETL_FIREBIRD_DSN=host/port:path`).

Claims are generated inside Firebird (one EXECUTE BLOCK, one transaction): 1,000,000 rows in
about 15 s, where row-by-row inserts from Python would take minutes. Defects are planted on
claim ids divisible by distinct primes, so the expected quarantine is exact and known.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from etl_tasks.demo_visits import make_visits
from etl_tasks.sources.firebird import FirebirdTarget, connect, create_database

# Firebird types a CASE/DECODE of string literals as CHAR of the longest one, so every text
# expression is TRIMmed, or 'paid' would be stored as 'paid     '.
# Planted claim defects: claim ids divisible by the prime break that rule. The primes'
# pairwise products exceed 1,000,000, so up to that size no claim breaks two; above it a claim
# id divisible by two of them breaks both and is still one quarantined row (see
# `expected_defective_claims`, what a manifest counts).
CLAIM_DEFECTS: dict[str, int] = {
    "amount_not_positive": 1009,
    "cpt_code_length": 1013,
    "bad_status": 1019,
    "missing_patient_id": 1021,
}

_DDL = """CREATE TABLE BILLING_CLAIMS (
    CLAIM_ID BIGINT NOT NULL PRIMARY KEY, PATIENT_ID VARCHAR(20), PROVIDER_NPI CHAR(10),
    SERVICE_DATE DATE, CPT_CODE VARCHAR(5), ICD10_CODE VARCHAR(8), AMOUNT NUMERIC(12,2),
    PAYER VARCHAR(40), STATUS VARCHAR(12), UPDATED_AT TIMESTAMP)"""

_GENERATE = f"""EXECUTE BLOCK (first_id BIGINT = ?, last_id BIGINT = ?) AS
DECLARE i BIGINT;
BEGIN
  i = first_id;
  WHILE (i <= last_id) DO BEGIN
    INSERT INTO BILLING_CLAIMS VALUES (
      :i,
      IIF(MOD(:i, {CLAIM_DEFECTS["missing_patient_id"]}) = 0, NULL,
          'P' || LPAD(MOD(:i * 7919, 250000), 6, '0')),
      '1' || LPAD(MOD(:i * 104729, 999999999), 9, '0'),
      DATEADD(MOD(:i * 13, 730) DAY TO DATE '2024-11-01'),
      TRIM(IIF(MOD(:i, {CLAIM_DEFECTS["cpt_code_length"]}) = 0, '9921',
          DECODE(MOD(:i, 6), 0, '99213', 1, '99214', 2, '80053', 3, '85025', 4, '93000',
                 '36415'))),
      TRIM(DECODE(MOD(:i, 5), 0, 'E11.9', 1, 'I10', 2, 'J06.9', 3, 'M54.5', 'Z00.00')),
      IIF(MOD(:i, {CLAIM_DEFECTS["amount_not_positive"]}) = 0, -MOD(:i, 500) / 10.0,
          MOD(:i * 37, 250000) / 100.0 + 15),
      TRIM(DECODE(MOD(:i, 4), 0, 'Medicare', 1, 'Blue Cross Blue Shield', 2, 'Aetna',
             'Self-pay')),
      TRIM(IIF(MOD(:i, {CLAIM_DEFECTS["bad_status"]}) = 0, 'unknown',
          DECODE(MOD(:i, 4), 0, 'submitted', 1, 'paid', 2, 'denied', 'pending'))),
      DATEADD(:i SECOND TO TIMESTAMP '2026-01-01 00:00:00'));
    i = i + 1;
  END
END"""


def expected_claim_defects(first_id: int, last_id: int) -> dict[str, int]:
    """How many claims in [first_id, last_id] carry each planted defect (a claim with two
    defects is counted under both: these do not add up to quarantined rows)."""
    return {kind: last_id // p - (first_id - 1) // p for kind, p in CLAIM_DEFECTS.items()}


def expected_defective_claims(first_id: int, last_id: int) -> int:
    """How many claims in [first_id, last_id] carry at least one planted defect: the rows a
    run quarantines. Inclusion-exclusion over the primes (they are distinct primes, so a
    claim id is divisible by several exactly when it is divisible by their product)."""
    primes = list(CLAIM_DEFECTS.values())
    total = 0
    for mask in range(1, 1 << len(primes)):
        product, picked = 1, 0
        for bit, p in enumerate(primes):
            if mask >> bit & 1:
                product, picked = product * p, picked + 1
        count = last_id // product - (first_id - 1) // product
        total += count if picked % 2 else -count
    return total


def generate_claims(target: FirebirdTarget, first_id: int, count: int) -> None:
    """Insert `count` claims with ids first_id.. in one transaction, inside Firebird."""
    con = connect(target)
    try:
        cur = con.cursor()
        cur.execute(_GENERATE, (first_id, first_id + count - 1))
        cur.close()
        con.commit()
    finally:
        con.close()


def make_billing_db(target: FirebirdTarget, claims: int) -> None:
    """Create the BILLING_CLAIMS database from scratch with `claims` rows: a file for the
    embedded engine, or through a Firebird server (a `host/port:path` DSN), replacing a
    database already there."""
    if target.embedded:
        Path(target.dsn).unlink(missing_ok=True)
    con = create_database(target, overwrite=True)
    try:
        con.execute_immediate(_DDL)
        con.execute_immediate("CREATE INDEX IX_CLAIMS_UPDATED ON BILLING_CLAIMS (UPDATED_AT)")
        # Firebird answers MAX() from a descending index only; without it each plan scans.
        con.execute_immediate(
            "CREATE DESCENDING INDEX IX_CLAIMS_ID_DESC ON BILLING_CLAIMS (CLAIM_ID)")
        con.execute_immediate(
            "CREATE DESCENDING INDEX IX_CLAIMS_UPDATED_DESC ON BILLING_CLAIMS (UPDATED_AT)")
        con.commit()
    finally:
        con.close()
    if claims:
        generate_claims(target, 1, claims)


def make_demo_data(demo_dir: Path, target: FirebirdTarget, *, claims: int,
                   lab_files: int = 4, lab_records: int = 500, reg_files: int = 3,
                   reg_rows: int = 300, partner_files: int = 2,
                   partner_records: int = 400, visits: int = 5_000) -> dict[str, Any]:
    """Write every demo source under `demo_dir` and a manifest of what was planted."""
    from etl_tasks.demo_files import (
        FileManifest,
        write_lab_feeds,
        write_partner_feeds,
        write_registrations,
    )

    demo_dir.mkdir(parents=True, exist_ok=True)
    make_billing_db(target, claims)
    # The second table (source visits): a text key and WIN1252 text, configuration only.
    make_visits(target, visits)
    manifest: dict[str, Any] = {
        # defects: claims per planted defect; defective_rows: claims with any (the quarantine).
        "billing": {"rows": claims, "defects": expected_claim_defects(1, claims),
                    "defective_rows": expected_defective_claims(1, claims)},
        "visits": {"rows": visits, "defects": {}, "defective_rows": 0}}
    writers: dict[str, Callable[[Path], list[FileManifest]]] = {
        "lab_feeds": lambda inbox: write_lab_feeds(inbox, files=lab_files,
                                                   records_per_file=lab_records),
        "registrations": lambda inbox: write_registrations(inbox, files=reg_files,
                                                           rows_per_file=reg_rows),
        # The second lab partner (source partner_labs), its layout and rules configured.
        "partner_feeds": lambda inbox: write_partner_feeds(inbox, files=partner_files,
                                                           records_per_file=partner_records),
    }
    for name, write in writers.items():
        inbox = demo_dir / name
        shutil.rmtree(inbox, ignore_errors=True)
        inbox.mkdir(parents=True)
        written = write(inbox)
        manifest[name] = [asdict(m) for m in written]
        # The files were written whole (temporary name, then rename): date them past any
        # inbox settle time so that a run right after generation takes them.
        settled = time.time() - 3600
        for path in inbox.iterdir():
            os.utime(path, (settled, settled))
    (demo_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
