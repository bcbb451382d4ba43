"""All three sources through the real fleet and loader, into a real DuckDB file."""

from __future__ import annotations

import pytest

from etl_tasks.api import run_source
from etl_tasks.demo_data import generate_claims
from etl_tasks.resources import get_resources
from etl_tasks.runs import state as runs

pytestmark = pytest.mark.integration

TABLES = {"billing": ("billing_claims", "claim_id"),
          "lab_results": ("lab_results", "result_id, patient_id, test_code"),
          "registrations": ("patient_registrations", "mrn, clinic, registration_date")}


def _source_rows(stack, source):
    m = stack.manifest
    if source == "billing":
        return m["billing"]["rows"], m["billing"]["defective_rows"]
    files = m["lab_feeds" if source == "lab_results" else "registrations"]
    return sum(f["rows"] for f in files), sum(sum(f["defects"].values()) for f in files)


@pytest.fixture(scope="module")
def first_runs(stack):
    """One run of every source, started together as `etl run --all` does."""
    from tests.integration.conftest import _set_env

    _set_env(stack.env)
    handles = [run_source(name) for name in TABLES]
    return {h.source: h.wait(timeout=240) for h in handles}


def test_every_source_row_is_loaded_or_quarantined_once(env, first_runs):
    """DuckDB rows + quarantined rows equal the source rows, per source, with no duplicates."""
    assert env.firebird("SELECT COUNT(*) FROM BILLING_CLAIMS") == [
        (env.manifest["billing"]["rows"],)]
    for source, (table, key) in TABLES.items():
        summary = first_runs[source]
        assert summary.status == "finished", summary.error
        rows, defects = _source_rows(env, source)
        [(stored,)] = env.query(f"SELECT count(*) FROM {table}")
        [(distinct,)] = env.query(f"SELECT count(*) FROM (SELECT DISTINCT {key} FROM {table})")
        [(quarantined,)] = env.query(
            "SELECT count(*) FROM etl_quarantine WHERE source = ?", [source])
        assert (stored, quarantined) == (rows - defects, defects), source
        assert distinct == stored, f"duplicate keys in {table}"
        assert (summary.loaded, summary.quarantined, summary.extracted) == (
            rows - defects, defects, rows)


def test_ledger_lists_every_chunk_once(env, first_runs):
    """The ledger has exactly the chunks each run registered, each once, with their rows."""
    r = get_resources().redis
    for source, summary in first_runs.items():
        chunks = runs.chunk_rows(r, summary.run_id)
        assert len(chunks) > 1, f"{source} should have been cut into several chunks"
        ledger = env.query("SELECT chunk_id, rows_loaded + rows_quarantined + rows_unchanged FROM "
                           "etl_load_ledger WHERE run_id = ?", [summary.run_id])
        assert dict(ledger) == chunks
        assert len(ledger) == len({row[0] for row in ledger})


def test_quarantine_names_the_rule_and_points_at_the_source_row(env, first_runs):
    """Every planted defect ends in quarantine with a reason and a pointer, never a crash."""
    rows = env.query("SELECT source, source_ref, reasons FROM etl_quarantine")
    assert rows
    for source, ref, reasons in rows:
        assert reasons.strip(), f"{source} {ref} has no reason"
        assert ref.startswith("CLAIM_ID=") if source == "billing" else "#" in ref or "!" in ref
    billing = {r for (r,) in env.query(
        "SELECT reasons FROM etl_quarantine WHERE source = 'billing'")}
    for rule in ("amount", "cpt_code", "status", "patient_id"):
        assert any(rule in reason for reason in billing), rule


def test_same_load_message_twice_changes_nothing(env, first_runs):
    """Redelivering a committed chunk's load message is a no-op reported as already loaded."""
    from etl_tasks.tasks import load_task

    summary = first_runs["billing"]
    chunk_id = sorted(runs.chunk_rows(get_resources().redis, summary.run_id))[0]
    before = env.query("SELECT count(*), sum(amount) FROM billing_claims")
    result = load_task.apply_async((summary.run_id, chunk_id)).get(timeout=60)
    assert result["already_loaded"] is True
    assert env.query("SELECT count(*), sum(amount) FROM billing_claims") == before
    [(ledger,)] = env.query("SELECT count(*) FROM etl_load_ledger WHERE run_id = ? AND "
                            "chunk_id = ?", [summary.run_id, chunk_id])
    assert ledger == 1


def test_second_run_without_new_data_loads_nothing(env, first_runs):
    """Running every source again loads nothing, doubles nothing and leaves no file behind."""
    before = {t: env.query(f"SELECT count(*) FROM {t}")[0][0] for t, _ in TABLES.values()}
    again = {h.source: h.wait(timeout=120) for h in [run_source(n) for n in TABLES]}
    for source, summary in again.items():
        assert summary.status == "finished", summary.error
        assert (summary.loaded, summary.quarantined) == (0, 0), source
    # Billing re-reads only its UPDATED_AT look-back window; those rows are unchanged: skipped.
    assert again["billing"].skipped == again["billing"].extracted < 1_000
    for source in ("lab_results", "registrations"):
        # The first run moved its files to processed/: the inbox holds nothing new.
        assert again[source].extracted == 0
        inbox = env.root / "data" / "demo" / ("lab_feeds" if source == "lab_results"
                                                else "registrations")
        names = {f["name"] for f in env.manifest[inbox.name]}
        assert {p.name for p in (inbox / "processed").iterdir()} == names
        assert not [p for p in inbox.iterdir() if p.is_file()]
    after = {t: env.query(f"SELECT count(*) FROM {t}")[0][0] for t, _ in TABLES.values()}
    assert after == before


def test_new_firebird_rows_are_loaded_by_the_next_run(env, first_runs):
    """Claims added at the source after a run are loaded by the next run, and only they."""
    [(before,)] = env.query("SELECT count(*) FROM billing_claims")
    [(max_id,)] = env.firebird("SELECT MAX(CLAIM_ID) FROM BILLING_CLAIMS")
    first_new = max_id + 1
    generate_claims(get_resources().firebird_target, first_new, 2_500)
    summary = run_source("billing").wait(timeout=120)
    assert summary.status == "finished", summary.error
    assert summary.loaded + summary.quarantined == 2_500
    assert summary.extracted == 2_500 + summary.skipped  # plus the look-back re-read
    [(after,)] = env.query("SELECT count(*) FROM billing_claims")
    assert after == before + summary.loaded
    [(new_rows,)] = env.query("SELECT count(*) FROM billing_claims WHERE claim_id >= ?",
                              [first_new])
    assert new_rows == summary.loaded

