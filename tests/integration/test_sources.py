"""Sources in the real world: inbox lifecycle, duplicate uploads, files still being written,
`etl run --path`, and Firebird rows updated after they were loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from etl_tasks.api import run_source
from etl_tasks.demo_files import write_lab_feeds, write_registrations
from etl_tasks.resources import get_resources

pytestmark = pytest.mark.integration


def _settle(*paths):
    past = time.time() - 60
    for path in paths:
        os.utime(path, (past, past))


@pytest.fixture
def lab_inbox(env):
    inbox = env.root / "data" / "demo" / "lab_feeds"
    inbox.mkdir(parents=True, exist_ok=True)
    return inbox


def test_loaded_file_moves_to_processed_and_a_broken_one_to_quarantine(env, lab_inbox,
                                                                        tmp_path):
    """After the commit a good file is in processed/, a truncated one in quarantine/ with a
    reason file, and the good file's rows are loaded while the other's are not."""
    made = write_lab_feeds(tmp_path, files=2, records_per_file=40, seed=101)
    good, broken = (tmp_path / m.name for m in made)
    shutil.copy(good, lab_inbox / "partner_good.xml")
    data = broken.read_bytes()
    (lab_inbox / "partner_cut.xml").write_bytes(data[: len(data) // 2])
    _settle(lab_inbox / "partner_good.xml", lab_inbox / "partner_cut.xml")
    summary = run_source("lab_results").wait(timeout=90)
    assert summary.status == "finished", summary.error
    files = {f["name"]: f for f in summary.files}
    assert files["partner_good.xml"]["status"] == "loaded"
    assert (files["partner_good.xml"]["rows_loaded"] + files["partner_good.xml"][
        "rows_quarantined"]) == made[0].rows
    assert files["partner_cut.xml"]["status"] == "quarantined"
    assert "line" in files["partner_cut.xml"]["reason"]
    assert (lab_inbox / "processed" / "partner_good.xml").exists()
    assert (lab_inbox / "quarantine" / "partner_cut.xml").exists()
    reason = (lab_inbox / "quarantine" / "partner_cut.xml.reason.txt").read_text()
    assert reason.strip() == files["partner_cut.xml"]["reason"]
    refs = env.query("SELECT count(*) FROM lab_results WHERE source_ref LIKE 'partner_cut.xml#%'")
    assert refs == [(0,)]


def test_same_content_under_another_name_is_loaded_once(env, lab_inbox, tmp_path):
    """Uploading the same bytes again under a new name loads nothing and reports it skipped."""
    made = write_lab_feeds(tmp_path, files=1, records_per_file=30, seed=202)
    src = tmp_path / made[0].name
    shutil.copy(src, lab_inbox / "upload_a.xml")
    _settle(lab_inbox / "upload_a.xml")
    first = run_source("lab_results").wait(timeout=90)
    assert first.loaded + first.quarantined == made[0].rows
    shutil.copy(src, lab_inbox / "upload_b_same_bytes.xml")
    _settle(lab_inbox / "upload_b_same_bytes.xml")
    second = run_source("lab_results").wait(timeout=90)
    assert (second.loaded, second.quarantined, second.skipped) == (0, 0, made[0].rows)
    assert (lab_inbox / "processed" / "upload_b_same_bytes.xml").exists()


def test_a_file_still_being_written_is_left_for_a_later_run(env, lab_inbox, tmp_path):
    """A temporary name or a file modified within the settle time is not picked up."""
    made = write_lab_feeds(tmp_path, files=1, records_per_file=20, seed=303)
    shutil.copy(tmp_path / made[0].name, lab_inbox / "incoming.xml.part")
    _settle(lab_inbox / "incoming.xml.part")
    shutil.copy(tmp_path / made[0].name, lab_inbox / "fresh.xml")  # mtime: now
    summary = run_source("lab_results").wait(timeout=90)
    assert summary.extracted == 0
    assert (lab_inbox / "incoming.xml.part").exists()
    assert (lab_inbox / "fresh.xml").exists()
    os.rename(lab_inbox / "incoming.xml.part", lab_inbox / "incoming.xml")
    _settle(lab_inbox / "incoming.xml")
    time.sleep(1.2)  # fresh.xml settles too (settle_s = 1 in the test pipeline)
    summary = run_source("lab_results").wait(timeout=90)
    # The same content twice (two names) is one unit: loaded once.
    assert summary.extracted == made[0].rows
    assert not (lab_inbox / "fresh.xml").exists()


def test_etl_run_path_lists_every_file_and_leaves_the_folder_alone(env, tmp_path):
    """`etl run SOURCE --path DIR --wait --json` reports each file and moves nothing."""
    folder = tmp_path / "batch"
    made = write_lab_feeds(folder, files=3, records_per_file=25, seed=404)
    (folder / "not_xml.xml").write_text("this is not XML at all")
    before = sorted(p.name for p in folder.iterdir())
    etl = os.path.join(os.path.dirname(sys.executable), "etl")
    done = subprocess.run([etl, "run", "lab_results", "--path", str(folder), "--wait",
                           "--json"], env=env.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [summary] = json.loads(done.stdout)
    files = {f["name"]: f for f in summary["files"]}
    assert set(files) == {m.name for m in made} | {"not_xml.xml"}
    for m in made:
        f = files[m.name]
        assert f["status"] == "loaded"
        assert (f["rows_loaded"], f["rows_quarantined"]) == (
            m.rows - sum(m.defects.values()), sum(m.defects.values()))
    assert files["not_xml.xml"]["status"] == "quarantined"
    assert files["not_xml.xml"]["reason"]
    assert summary["loaded"] == sum(f["rows_loaded"] for f in files.values())
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_claim_updated_at_the_source_is_loaded_again_as_its_new_version(env):
    """A row updated after it was loaded replaces its stored version: new values, no double."""
    run_source("billing").wait(timeout=120)  # nothing pending before the update
    [(count_before,)] = env.query("SELECT count(*) FROM billing_claims")
    ids = [r[0] for r in env.query(
        "SELECT claim_id FROM billing_claims ORDER BY claim_id LIMIT 5 OFFSET 10")]
    marks = ",".join("?" * len(ids))
    env.firebird(f"UPDATE BILLING_CLAIMS SET AMOUNT = 12345.67, STATUS = 'paid', "
             f"UPDATED_AT = DATEADD(1 DAY TO (SELECT MAX(UPDATED_AT) FROM BILLING_CLAIMS)) "
             f"WHERE CLAIM_ID IN ({marks})", ids)
    summary = run_source("billing").wait(timeout=120)
    assert summary.status == "finished", summary.error
    assert summary.loaded == len(ids)
    rows = env.query(f"SELECT claim_id, amount, status FROM billing_claims "
                     f"WHERE claim_id IN ({marks})", ids)
    assert sorted(rows) == [(i, Decimal("12345.67"), "paid") for i in sorted(ids)]
    assert env.query("SELECT count(*) FROM billing_claims") == [(count_before,)]


def test_since_and_full_reread_without_duplicates(env):
    """`--since` backfills a window and `--full` re-reads everything; nothing is doubled."""
    [(count_before,)] = env.query("SELECT count(*) FROM billing_claims")
    [(q_before,)] = env.query("SELECT count(*) FROM etl_quarantine WHERE source = 'billing'")
    backfill = run_source("billing", since=datetime(2026, 1, 1) - timedelta(days=1)).wait(
        timeout=180)
    assert backfill.status == "finished", backfill.error
    assert backfill.extracted >= count_before
    assert (backfill.loaded, backfill.quarantined) == (0, 0)
    full = run_source("billing", full=True).wait(timeout=180)
    assert full.status == "finished", full.error
    assert full.extracted == count_before + q_before
    assert (full.loaded, full.quarantined, full.skipped) == (0, 0, full.extracted)
    assert env.query("SELECT count(*) FROM billing_claims") == [(count_before,)]
    assert env.query("SELECT count(*) FROM etl_quarantine WHERE source = 'billing'") == [
        (q_before,)]


def test_a_full_firebird_pool_is_a_transient_error_not_a_crash(env):
    """When every pooled connection is busy past the wait timeout, the caller gets a
    TransientError (which tasks retry with backoff) instead of waiting forever or crashing."""
    from etl_tasks.errors import TransientError
    from etl_tasks.sources.firebird import ConnectionPool

    pool = ConnectionPool(get_resources().firebird_target, size=1, timeout=0.2)
    try:
        with pool.connection(), pytest.raises(TransientError, match="pool exhausted"), \
                pool.connection():
            pass
        with pool.connection() as con:  # released: usable again
            assert con is not None
    finally:
        pool.close()


CLAIM_RACE = """
import sys, time
import redis
from etl_tasks import inbox
url, at = sys.argv[1], float(sys.argv[2])
r = redis.Redis.from_url(url)
time.sleep(max(0.0, at - time.time()))
print(inbox.claim(r, "lab_results", "f" * 64, sys.argv[3], 60))
"""


def test_a_file_is_claimed_by_exactly_one_of_many_hosts(env):
    """Eight processes (standing in for hosts) claim the same content at the same instant
    against the one Redis: exactly one wins."""
    at = time.time() + 2
    racers = [subprocess.Popen([sys.executable, "-c", CLAIM_RACE, env.env["ETL_REDIS_URL"],
                                str(at), f"run-{n}"], env=env.env, stdout=subprocess.PIPE,
                               text=True) for n in range(8)]  # fmt: skip
    answers = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert sorted(answers) == ["False"] * 7 + ["True"]


def test_two_runs_of_one_inbox_at_once_load_each_file_once(env, lab_inbox, tmp_path):
    """Two runs of the source enqueued together (as from two hosts' shells): one takes the
    inbox, the other is refused or finds nothing; every row lands exactly once."""
    drained = run_source("lab_results").wait(timeout=120)  # what other tests left in the inbox
    assert drained.status == "finished", drained.error
    made = write_lab_feeds(tmp_path, files=3, records_per_file=60, seed=505)
    for m in made:
        shutil.copy(tmp_path / m.name, lab_inbox / f"race_{m.name}")
        _settle(lab_inbox / f"race_{m.name}")
    first, second = run_source("lab_results"), run_source("lab_results")
    summaries = [first.wait(timeout=120), second.wait(timeout=120)]
    finished = [s for s in summaries if s.status == "finished" and s.extracted]
    assert len(finished) == 1, [(s.status, s.extracted, s.error) for s in summaries]
    for other in summaries:
        if other is not finished[0]:
            assert other.extracted == 0
            assert other.status == "finished" or "in progress" in (other.error or "")
    planted = sum(sum(m.defects.values()) for m in made)
    total = sum(m.rows for m in made)
    assert (finished[0].loaded, finished[0].quarantined) == (total - planted, planted)
    loaded = env.query("SELECT count(*), count(DISTINCT source_ref) FROM lab_results "
                       "WHERE source_ref LIKE 'race_%'")  # fmt: skip
    assert loaded == [(total - planted, total - planted)]
    quarantined = env.query("SELECT count(*) FROM etl_quarantine WHERE source_ref LIKE 'race_%'")
    assert quarantined == [(planted,)]


def test_workbooks_of_any_case_move_with_their_sidecars_and_other_files_stay(env, tmp_path):
    """`CLINIC.XLSX` is read like `.xlsx`; a workbook's CSV sidecar moves with it to
    processed/ or quarantine/; a PDF and a CSV that is nobody's sidecar are left alone."""
    inbox_dir = env.root / "data" / "demo" / "registrations"
    [made] = write_registrations(tmp_path, files=1, rows_per_file=40, seed=606)
    shutil.copy(tmp_path / made.name, inbox_dir / "CLINIC.XLSX")
    (inbox_dir / "CLINIC.csv").write_text("not read: the workbook itself is readable\n")
    (inbox_dir / "broken.xlsx").write_bytes((tmp_path / made.name).read_bytes()[:300])
    (inbox_dir / "broken.csv").write_text("no header here\n")
    (inbox_dir / "scan.pdf").write_bytes(b"%PDF-1.4 a scanned consent form")
    (inbox_dir / "standalone.csv").write_text("MRN,Date of Birth\nA1,1961-04-02\n")
    names = ["CLINIC.XLSX", "CLINIC.csv", "broken.xlsx", "broken.csv", "scan.pdf",
             "standalone.csv"]  # fmt: skip
    _settle(*(inbox_dir / name for name in names))
    summary = run_source("registrations").wait(timeout=120)
    assert summary.status == "finished", summary.error
    files = {f["name"]: f for f in summary.files}
    assert not {"scan.pdf", "standalone.csv", "CLINIC.csv", "broken.csv"} & set(files)
    planted = sum(made.defects.values())
    assert (files["CLINIC.XLSX"]["status"], files["CLINIC.XLSX"]["rows_loaded"],
            files["CLINIC.XLSX"]["rows_quarantined"]) == ("loaded", made.rows - planted, planted)
    assert files["broken.xlsx"]["status"] == "quarantined"
    assert "csv sidecar" in files["broken.xlsx"]["reason"]
    left = sorted(p.name for p in inbox_dir.iterdir() if p.is_file())
    assert [name for name in left if name in names] == ["scan.pdf", "standalone.csv"]
    assert (inbox_dir / "processed" / "CLINIC.XLSX").is_file()
    assert (inbox_dir / "processed" / "CLINIC.csv").is_file()
    assert (inbox_dir / "quarantine" / "broken.xlsx").is_file()
    assert (inbox_dir / "quarantine" / "broken.csv").is_file()
    assert (inbox_dir / "quarantine" / "broken.xlsx.reason.txt").is_file()


def test_a_corrupt_reupload_answered_by_its_last_good_copy_is_reported_recovered(env, tmp_path):
    """A workbook re-uploaded corrupt under the name of one already loaded is answered by the
    copy in processed/, reported `recovered` with the reason (never `loaded`), and the
    corrupt upload is kept in quarantine/ with why."""
    inbox_dir = env.root / "data" / "demo" / "registrations"
    [made] = write_registrations(tmp_path, files=1, rows_per_file=30, seed=707)
    shutil.copy(tmp_path / made.name, inbox_dir / "monthly.xlsx")
    _settle(inbox_dir / "monthly.xlsx")
    first = run_source("registrations").wait(timeout=120)
    assert {f["name"]: f["status"] for f in first.files}["monthly.xlsx"] == "loaded"
    (inbox_dir / "monthly.xlsx").write_bytes((tmp_path / made.name).read_bytes()[:400])
    _settle(inbox_dir / "monthly.xlsx")
    second = run_source("registrations").wait(timeout=120)
    assert second.status == "finished", second.error
    [entry] = [f for f in second.files if f["name"] == "monthly.xlsx"]
    assert entry["status"] == "recovered"
    assert "last good copy" in entry["reason"]
    # The copy's rows replace themselves (registrations have no version: the later wins).
    [before] = [f for f in first.files if f["name"] == "monthly.xlsx"]
    assert (entry["rows_loaded"], entry["rows_quarantined"]) == (
        before["rows_loaded"], before["rows_quarantined"])
    [(rows, keys)] = env.query("SELECT count(*), count(DISTINCT (mrn, clinic, "
                               "registration_date)) FROM patient_registrations")
    assert rows == keys
    kept = inbox_dir / "quarantine" / "monthly.xlsx"
    assert kept.is_file()
    assert kept.stat().st_size == 400
    assert "last good copy" in (inbox_dir / "quarantine" / "monthly.xlsx.reason.txt").read_text()


def test_a_file_that_vanishes_before_it_is_read_is_quarantined_at_once(env, lab_inbox, tmp_path):
    """A planned file deleted before its extract is refused with its reason on the first
    attempt, not retried as a transient error. Drives the plain step functions (no worker
    in between, so the window between plan and extract is exact)."""
    from etl_tasks import pipeline
    from etl_tasks.runs import lease, state
    from etl_tasks.runs.plan import plan_run

    run_source("lab_results").wait(timeout=120)  # drain what other tests left
    made = write_lab_feeds(tmp_path, files=1, records_per_file=10, seed=808)
    shutil.copy(tmp_path / made[0].name, lab_inbox / "gone.xml")
    _settle(lab_inbox / "gone.xml")

    class Recorder:
        def __init__(self):
            self.sent = []

        def __getattr__(self, stage):
            return lambda *args: self.sent.append((stage, *args))

    res = get_resources()
    run_id = state.new_run_id()
    state.create(res.redis, run_id, "lab_results")
    sent = Recorder()
    try:
        [unit] = plan_run(res, run_id, "lab_results", sent.extract, sent.finalize)
        (lab_inbox / "gone.xml").unlink()
        assert pipeline.extract_unit(res, run_id, unit.unit_id, sent) == 0
        rejected = state.rejected(res.redis, run_id)[unit.unit_id]
        assert rejected["name"] == "gone.xml"
        assert "disappeared" in rejected["reason"]
        assert ("finalize", run_id) in sent.sent
    finally:
        state.fail(res.redis, run_id, "test run driven by hand")
        lease.release(res.redis, "lab_results", run_id)
