"""`etl quarantine list` and `etl quarantine replay` with a real Redis, the real loader worker
(the store's only writer) and a real DuckDB file, after real runs of the demo sources with
their planted defects.

Listing reads the session stack. What changes the store (a "source fix" simulated in
etl_quarantine.raw, replays, purged raw values, a held DuckDB) runs on a private FaultStack
(the `world` fixture): the fixed rows are still bad in the source, so a later run of the
session stack's sources would quarantine them again and other modules' counts would be off."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import duckdb
import pytest
import redis

from etl_tasks.api import run_source
from etl_tasks.demo_files import write_lab_feeds, write_registrations
from etl_tasks.load import duckdb as store
from etl_tasks.load import writer
from etl_tasks.local_services import RedisServer
from etl_tasks.resources import get_resources
from tests.integration import oracle
from tests.integration.conftest import file_sources
from tests.integration.fault_stack import FaultStack

pytestmark = pytest.mark.integration

ETL = os.path.join(os.path.dirname(sys.executable), "etl")
TARGETS = {"billing": "billing_claims", "lab_results": "lab_results",
           "registrations": "patient_registrations"}
AMOUNT = "amount: must be > 0"
CLAIM_STATUS = "status: must be one of submitted, paid, denied, pending"
CPT = "cpt_code: must be exactly 5 characters"
LAB_STATUS = "status: must be one of final, preliminary, corrected, amended, cancelled"
SEX = "sex: must be one of M, F, X, U"


def etl(stack, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ETL, *args], env=env or stack.env, capture_output=True, text=True,
                          timeout=300)


@contextmanager
def writable(stack) -> Iterator[duckdb.DuckDBPyConnection]:
    """The store opened for writing by this process, waiting while the loader commits; the
    loader finds it held meanwhile (it is the one other writer)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            con = duckdb.connect(str(stack.duckdb_path))
            break
        except duckdb.IOException:
            assert time.monotonic() < deadline, "the loader held the store for a minute"
            time.sleep(0.1)
    try:
        yield con
    finally:
        con.close()


# The file sources of a private world, as the session stack configures them; its billing
# source is fault_stack's (a 12,000-claim copy, 11 claims planted with each defect).
FILE_SOURCES = file_sources("{data_dir}")
# Two files of 100 records each: 8 planted defects per source, the kinds' cycle reaching a
# lab result's status (6th kind) and a registration's sex (5th) with a row to spare.
FILES, ROWS = 2, 100


def run_all(names: Iterable[str]) -> None:
    """One run of each source, enqueued together; each must finish."""
    handles = [run_source(name) for name in names]
    for handle in handles:
        summary = handle.wait(timeout=240)
        assert summary.status == "finished", summary.error


@pytest.fixture(scope="module")
def ran(stack):
    """One run of every source (the first of the session, unless other modules ran them)."""
    from tests.integration.conftest import _set_env

    _set_env(stack.env)
    run_all(TARGETS)
    return stack


def demo_world(world: Callable[..., FaultStack], *, files: bool) -> FaultStack:
    """A private stack (fleet and loader, no beat) after one run of its sources: billing,
    and with `files` small lab feeds and registration workbooks written by the demo
    generator into its data dir."""
    stack = world(pipeline_extra=FILE_SOURCES if files else "")
    if files:
        data = stack.root / "data"
        write_lab_feeds(data / "lab_feeds", files=FILES, records_per_file=ROWS)
        write_registrations(data / "registrations", files=FILES, rows_per_file=ROWS)
        settled = time.time() - 3600  # written whole: past the inbox's settle time
        for path in [*(data / "lab_feeds").iterdir(), *(data / "registrations").iterdir()]:
            os.utime(path, (settled, settled))
    stack.start_all(beat=False)
    run_all(TARGETS if files else ["billing"])
    return stack


def held(stack) -> list[tuple[str, str, str, str, str, str | None]]:
    return stack.query("SELECT source, run_id, chunk_id, source_ref, reasons, raw "
                       "FROM etl_quarantine ORDER BY source, source_ref")


def patient_values(rows) -> set[str]:
    """The raw values a leak would show. Left out, and why: claim ids (a claim's pointer is
    `CLAIM_ID=<id>`, shown on purpose), values that are words of a rule's text ("paid" in
    "must be one of submitted, paid, ..."), and short plain numbers or words, which turn up
    by chance in counts, times and hex ids."""
    rules = " ".join(reasons for *_, reasons, _ in rows)
    found = set()
    for *_, raw in rows:
        for column, value in json.loads(raw or "{}").items():
            value = (value or "").strip()
            if column == "claim_id" or len(value) < 4 or value in rules:
                continue
            if re.fullmatch(r"[0-9.+-]+", value) and len(value) < 8:
                continue
            found.add(value)
    return found


def test_list_counts_rules_and_points_at_rows_without_any_value(ran):
    """`etl quarantine list --json` counts rows per rule and source exactly as the store
    holds them and lists every row with its rules, fields and pointer; neither it nor the
    table output contains any of the raw values (patient data) held in etl_quarantine.raw."""
    rows = held(ran)
    expected: dict[str, Counter[str]] = {}
    for source, *_, reasons, _ in rows:
        for rule in reasons.split("; "):
            expected.setdefault(source, Counter())[rule] += 1
    assert set(expected) == set(TARGETS)  # every demo source has planted defects

    done = etl(ran, "quarantine", "list", "--json", "--limit", "100000")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert listed["total"] == len(rows)
    assert {s: f["by_reason"] for s, f in listed["summary"].items()} == {
        s: dict(c) for s, c in expected.items()}
    assert sorted((r["source"], r["run_id"], r["chunk_id"], r["source_ref"],
                   "; ".join(r["reasons"])) for r in listed["rows"]) == sorted(
        row[:5] for row in rows)
    for r in listed["rows"]:
        assert r["fields"], r["source_ref"]
        assert all(any(rule.startswith(f"{field}:") for rule in r["reasons"])
                   for field in r["fields"])
    assert "raw" not in {key for r in listed["rows"] for key in r}

    table = etl(ran, "quarantine", "list", "--source", "registrations", "--limit", "5")
    assert table.returncode == 0, table.stderr
    assert "sex" in table.stdout
    assert "Newest 5 of" in table.stdout
    values = patient_values(rows)
    assert any(re.fullmatch(r"P\d{6}", v) for v in values)  # patient ids are among them
    for value in values:
        assert value not in done.stdout, "a raw value in `etl quarantine list --json`"
        assert value not in table.stdout + table.stderr, "a raw value in the list's table"


def _repair(con, picked: list[tuple], **values: str | None) -> None:
    """A source fix, as the quarantine sees it: the row's values corrected."""
    for source, run_id, chunk_id, ref, _, raw in picked:
        fixed = json.dumps({**json.loads(raw), **values}, ensure_ascii=False)
        con.execute("UPDATE etl_quarantine SET raw = ? WHERE source = ? AND run_id = ? AND "
                    "chunk_id = ? AND source_ref = ?", [fixed, source, run_id, chunk_id, ref])


def _tally(stack) -> dict[str, tuple[int, int, int]]:
    """Per source, counted in DuckDB: target rows, distinct natural keys, quarantined rows."""
    figures = {}
    for source, target in TARGETS.items():
        keys = ", ".join(store.KEYS[target].columns)
        [(rows, distinct)] = stack.query(f"SELECT count(*), (SELECT count(*) FROM (SELECT "
                                         f"DISTINCT {keys} FROM {target})) FROM {target}")
        [(quarantined,)] = stack.query("SELECT count(*) FROM etl_quarantine WHERE source = ?",
                                       [source])
        figures[source] = (int(rows), int(distinct), int(quarantined))
    return figures


def _pick(stack, rows, source: str, rule: str) -> list[tuple]:
    """Quarantined rows of `source` that broke exactly `rule`, and whose pointer the target
    table does not hold (so that each one that passes adds exactly one row)."""
    stored = {ref for (ref,) in stack.query(f"SELECT source_ref FROM {TARGETS[source]}")}
    return [r for r in rows if r[0] == source and r[4] == rule and r[3] not in stored]


def _replay_ledger(stack) -> list[tuple]:
    return stack.query("SELECT chunk_id, source, rows_loaded, rows_unchanged FROM "
                       "etl_load_ledger WHERE run_id = ? ORDER BY chunk_id", [store.REPLAY_RUN_ID])


def test_replay_loads_exactly_the_fixed_rows_once(world):
    """The validation rules are code, so a "source fix" is simulated the way an operator
    would: some quarantined rows' raw values are corrected in DuckDB (claims with a negative
    amount, lab results with an unknown status, registrations with an unknown sex). `etl
    quarantine replay` loads exactly those into the target tables through the loader: target
    rows + quarantined rows are conserved per source, no key is doubled, each replay chunk is
    in the ledger, a claim broken another way gets its new rule, a purged row is counted and
    stays; a second replay changes nothing, and `etl reconcile` and the oracle still balance.
    On a private world: its source rows stay bad while their fixed copies are loaded."""
    stack = demo_world(world, files=True)
    rows = [r for r in held(stack) if r[5] is not None]
    amounts = _pick(stack, rows, "billing", AMOUNT)
    claim_status = _pick(stack, rows, "billing", CLAIM_STATUS)
    labs = _pick(stack, rows, "lab_results", LAB_STATUS)
    sexes = _pick(stack, rows, "registrations", SEX)
    purged = next(r for r in rows if r[0] == "registrations" and r not in sexes)
    assert min(len(amounts), len(claim_status), len(labs), len(sexes)) > 0
    with writable(stack) as con:
        _repair(con, amounts, amount="12.50")
        _repair(con, claim_status[:1], status="paid", cpt_code="123")
        _repair(con, labs, status="final")
        _repair(con, sexes, sex="U")
        con.execute("UPDATE etl_quarantine SET raw = NULL WHERE source = ? AND source_ref = ?",
                    [purged[0], purged[3]])
    fixed = {"billing": amounts, "lab_results": labs, "registrations": sexes}
    [(no_raw,)] = stack.query("SELECT count(*) FROM etl_quarantine WHERE source = "
                              "'registrations' AND raw IS NULL")
    before, ledger_before = _tally(stack), _replay_ledger(stack)

    done = etl(stack, "quarantine", "replay", "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    counts = json.loads(done.stdout)
    after = _tally(stack)
    for source, rows_fixed in fixed.items():
        n = len(rows_fixed)
        assert counts[source]["loaded"] == n, source
        assert counts[source]["unchanged"] == 0, source
        assert after[source][0] == after[source][1], f"a key doubled in {TARGETS[source]}"
        assert after[source][0] - before[source][0] == n, source
        assert before[source][2] - after[source][2] == n, source
        refs = [r[3] for r in rows_fixed]
        assert {ref for (ref,) in stack.query(
            f"SELECT source_ref FROM {TARGETS[source]} WHERE source_ref IN "
            f"({', '.join('?' * n)})", refs)} == set(refs)
        assert stack.query(f"SELECT count(*) FROM etl_quarantine WHERE source = ? AND "
                           f"source_ref IN ({', '.join('?' * n)})", [source, *refs]) == [(0,)]
    assert counts["billing"]["reasons_refreshed"] == 1
    assert stack.query("SELECT reasons FROM etl_quarantine WHERE source = 'billing' AND "
                       "source_ref = ?", [claim_status[0][3]]) == [(CPT,)]
    assert counts["registrations"]["purged"] == no_raw >= 1
    assert stack.query("SELECT count(*) FROM etl_quarantine WHERE source = ? AND "
                       "source_ref = ? AND raw IS NULL", [purged[0], purged[3]]) == [(1,)]
    ledger = _replay_ledger(stack)
    new = [row for row in ledger if row not in ledger_before]
    for source, rows_fixed in fixed.items():
        assert sum(row[2] for row in new if row[1] == source) == len(rows_fixed), source
        assert counts[source]["chunks"] == sum(1 for row in new if row[1] == source)

    again = etl(stack, "quarantine", "replay", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    for source, figures in json.loads(again.stdout).items():
        assert (figures["loaded"], figures["unchanged"], figures["chunks"],
                figures["reasons_refreshed"]) == (0, 0, 0, 0), source
    assert _tally(stack) == after
    assert _replay_ledger(stack) == ledger
    oracle.check(stack, "after two quarantine replays")

    balance = etl(stack, "reconcile", "--json")
    assert balance.returncode == 0, balance.stdout + balance.stderr
    assert all(b["unexplained"] == 0 for b in json.loads(balance.stdout))


def test_a_held_store_makes_the_replay_wait_never_a_fallback(world):
    """While another process holds DuckDB, the replay task is retried with backoff (no
    fallback store gets anything) and `etl quarantine list` says the store is busy; once
    the store is free the retried replay loads the fixed claim. On a private world."""
    from etl_tasks.tasks import replay_quarantine_task

    stack = demo_world(world, files=False)
    [cpt] = [r for r in held(stack) if r[0] == "billing" and r[4] == CPT and r[5]][:1]
    waiting = writer.waiting(get_resources().settings)
    with writable(stack) as con:
        _repair(con, [cpt], cpt_code="99213")
        result = replay_quarantine_task.apply_async(("billing",))
        deadline = time.monotonic() + 30
        while result.state != "RETRY" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result.state == "RETRY"
        busy = etl(stack, "quarantine", "list", "--wait", "1")
        assert busy.returncode == 2
        said = " ".join(busy.stderr.split())  # the console wraps it (at a path's length)
        assert "busy" in said
        assert "Retry in a moment" in said
        assert writer.waiting(get_resources().settings) == waiting
    counts = result.get(timeout=180)
    assert counts["billing"]["loaded"] == 1
    assert stack.query("SELECT cpt_code FROM billing_claims WHERE source_ref = ?",
                       [cpt[3]]) == [("99213",)]
    assert writer.waiting(get_resources().settings) == waiting


def test_replay_without_a_loader_says_what_to_start_and_enqueues_nothing(env, tmp_path):
    """With no worker consuming the load queue, `etl quarantine replay` names the loader to
    start and exits 2 within seconds, leaving nothing queued."""
    server = RedisServer(tmp_path / "redis").start()  # a Redis no worker listens to
    try:
        done = etl(env, "quarantine", "replay", env={**env.env, "ETL_REDIS_URL": server.url})
        queued = redis.Redis.from_url(server.url).llen("load")
    finally:
        server.stop()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "python -m workers.loader" in done.stderr
    assert "nothing enqueued" in done.stderr
    assert queued == 0
