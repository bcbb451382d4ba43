"""Firebird tables added by configuration alone (no code), through the real fleet and loader.

Each test makes its tables in a fault world's embedded database (or a database of its own
character set), appends their sources to the world's pipeline config as TOML, runs them and
compares what DuckDB holds with what Firebird returns through a plain cursor.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from etl_tasks.api import run_source
from etl_tasks.load import duckdb as store
from etl_tasks.reconcile import reconcile
from etl_tasks.resources import get_resources
from etl_tasks.sources import firebird
from etl_tasks.sources.firebird import FirebirdTarget

pytestmark = pytest.mark.integration
ETL = os.path.join(os.path.dirname(sys.executable), "etl")


@contextmanager
def _firebird(target: FirebirdTarget, charset: str | None = "UTF8") -> Iterator[Any]:
    """A cursor whose strings arrive in `charset` (Firebird converts declared text to it);
    committed at the end."""
    con = firebird.connect(target, charset=charset)
    try:
        cur = con.cursor()
        yield cur
        cur.close()
        con.commit()
    finally:
        con.close()


def _rows(target: FirebirdTarget, sql: str, charset: str | None = "UTF8") -> list[tuple[Any, ...]]:
    with _firebird(target, charset) as cur:
        cur.execute(sql)
        return [tuple(row) for row in cur.fetchall()]


def _source(name: str, table: str, chunk_size: int, **options: str) -> str:
    lines = [f'name = "{name}"', 'kind = "firebird"', f'location = "{table}"',
             'schedule = "manual"', f"chunk_size = {chunk_size}"]
    lines += [f'{key} = "{value}"' for key, value in options.items()]
    return "\n[[sources]]\n" + "\n".join(lines) + "\n"


def _run(name: str, **options: Any) -> Any:
    return run_source(name, **options).wait(timeout=180)


def _balance(stack: Any, name: str) -> tuple[int, int, int, int, int]:
    """`etl reconcile`'s counts of a source: rows, loaded, quarantined, not yet run,
    unexplained."""
    res = get_resources()
    with store.read_only(stack.duckdb_path) as con:
        b = reconcile(res, con, res.pipeline.source(name))
    return b.source_rows, b.loaded, b.quarantined, b.not_yet_run, b.unexplained


# --- every type ---------------------------------------------------------------------------

EVERY_TYPE = """CREATE TABLE EVERY_TYPE (
    ID INTEGER NOT NULL PRIMARY KEY, C_SMALL SMALLINT, C_INT INTEGER, C_BIG BIGINT,
    C_I128 INT128, C_NUM NUMERIC(12,2), C_DEC DECIMAL(18,4), C_WIDE NUMERIC(30,6),
    C_FLOAT FLOAT, C_DOUBLE DOUBLE PRECISION, C_DATE DATE, C_TIME TIME, C_TS TIMESTAMP,
    C_TSZ TIMESTAMP WITH TIME ZONE, C_CHAR CHAR(8), C_VARCHAR VARCHAR(60),
    C_BLOB BLOB SUB_TYPE TEXT, C_BOOL BOOLEAN)"""
COLUMNS = ["ID", "C_SMALL", "C_INT", "C_BIG", "C_I128", "C_NUM", "C_DEC", "C_WIDE", "C_FLOAT",
           "C_DOUBLE", "C_DATE", "C_TIME", "C_TS", "C_TSZ", "C_CHAR", "C_VARCHAR", "C_BLOB",
           "C_BOOL"]
# Non-text values as SQL literals (Firebird's own parsing), text as parameters.
LITERALS = [
    "12, 123456, 9000000000000000001, 170141183460469231731687303715884105727, 12345.67, "
    "-1234.5678, 123456789012345678901234.123456, 0.1, 0.30000000000000004, DATE '2024-02-29', "
    "TIME '13:45:12.3456', TIMESTAMP '2024-02-29 23:59:59.9999', "
    "TIMESTAMP '2024-06-01 12:00:00.1234 Europe/Berlin'",
    "-32768, -2147483648, -9223372036854775808, -170141183460469231731687303715884105728, "
    "-9999999999.99, 99999999999999.9999, -0.000001, 3.4e38, 1e300, DATE '0001-01-01', "
    "TIME '00:00:00', TIMESTAMP '9999-12-31 23:59:59.9999', "
    "TIMESTAMP '2024-01-01 00:00:00.0001 +05:30'",
    ", ".join(["NULL"] * 13),
    "7, 7, 7, 7, 0.07, 0.0007, 7.000007, 1.17549435e-38, 2.2250738585072014e-308, "
    "DATE '2000-01-01', TIME '12:00:00.0001', TIMESTAMP '2000-01-01 00:00:00', "
    "TIMESTAMP '2000-01-01 00:00:00 UTC'",
]
TEXTS: list[tuple[str | None, str | None, str | None, bool | None]] = [
    ("ab", 'Line1\nLine2, "quoted"; end µ', 'Müller, "Q";\r\nnote', True),
    (" x", "", "", False),  # '' stays '', not NULL; CHAR keeps its leading space
    (None, None, None, None),  # NULL in every column
    ('"', "\n", ',;"', True),
]


def _plant_every_type(target: FirebirdTarget) -> int:
    with _firebird(target) as cur:
        cur.execute(EVERY_TYPE)
    with _firebird(target) as cur:
        for n, (literals, (char, varchar, blob, flag)) in enumerate(
                zip(LITERALS, TEXTS, strict=True), start=1):
            cur.execute(f"INSERT INTO EVERY_TYPE VALUES ({n}, {literals}, ?, ?, ?, ?)",
                        (char, varchar, blob, flag))
        for n in range(5, 41):  # more rows, so the table is cut into several ranges
            cur.execute("INSERT INTO EVERY_TYPE (ID, C_INT, C_VARCHAR, C_TSZ) VALUES "
                        "(?, ?, ?, TIMESTAMP '2025-03-30 01:30:00 Europe/Paris')",
                        (n, n * n, f"row {n}, of 40"))
    return 40


def _as_stored(column: str, value: Any) -> Any:
    """What DuckDB should hold for a value the driver returned: CHAR without its pad, INT128
    as an integer, an instant as UTC."""
    if value is None:
        return None
    if column == "C_CHAR":
        return value.rstrip(" ")
    if column == "C_I128":
        return int(value)
    if column == "C_TSZ":
        return value.astimezone(dt.UTC)
    return value


def test_every_type_loads_value_for_value_as_a_plain_cursor_reads_it(world):
    """A table of every legacy type, added by configuration only, is loaded exactly: exact
    decimals and INT128, doubles to the last bit, dates at both ends of the calendar, times
    to a tenth of a millisecond, instants in UTC, text with newlines, quotes, commas and
    semicolons, NULL in every column apart from empty strings."""
    stack = world(pipeline_extra=_source("every_type", "EVERY_TYPE", 7, key_column="ID"))
    rows = _plant_every_type(stack.firebird_target)
    stack.start_all()

    summary = _run("every_type")
    assert summary.status == "finished", summary.error
    assert (summary.extracted, summary.loaded, summary.quarantined) == (rows, rows, 0)
    assert stack.query("SELECT count(DISTINCT chunk_id) FROM etl_load_ledger WHERE run_id = ?",
                       [summary.run_id]) == [(6,)]  # 40 keys in ranges of 7
    types = dict(stack.query("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'every_type'"))
    assert [types[c.lower()] for c in COLUMNS] == [
        "INTEGER", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "DECIMAL(12,2)",
        "DECIMAL(18,4)", "DECIMAL(30,6)", "FLOAT", "DOUBLE", "DATE", "TIME", "TIMESTAMP",
        "TIMESTAMP WITH TIME ZONE", "VARCHAR", "VARCHAR", "VARCHAR", "BOOLEAN"]

    expected = _rows(stack.firebird_target,
                     f"SELECT {', '.join(COLUMNS)} FROM EVERY_TYPE ORDER BY ID")
    stored = stack.query(f"SELECT {', '.join(c.lower() for c in COLUMNS)} FROM every_type "
                         "ORDER BY id")
    assert len(stored) == len(expected) == rows
    for want, got in zip(expected, stored, strict=True):
        for column, fb_value, duck_value in zip(COLUMNS, want, got, strict=True):
            if column == "C_TSZ" and duck_value is not None:
                duck_value = duck_value.astimezone(dt.UTC)
            assert duck_value == _as_stored(column, fb_value), (want[0], column)
    # The planted text came through Firebird and back exactly (not only equal to itself).
    by_id = {row[0]: row for row in stored}
    assert by_id[1][15:17] == ('Line1\nLine2, "quoted"; end µ', 'Müller, "Q";\r\nnote')
    assert (by_id[2][14], by_id[2][15], by_id[2][16]) == (" x", "", "")
    assert by_id[3][1:] == (None,) * 17
    assert by_id[1][4] == 2**127 - 1
    assert by_id[1][9] == 0.30000000000000004


# --- legacy character sets and a table without a key -----------------------------------

LATIN = """CREATE TABLE LATIN_NOTES (ID INTEGER NOT NULL PRIMARY KEY, NAME VARCHAR(40),
    UNIT VARCHAR(12))"""
LATIN_ROWS = [(1, "Müller", "µmol/L"), (2, "plain", "mmol/L"), (3, "Größe", None),
              (4, "Ærø; \"x\",\ny", "°C")]
CODES = "CREATE TABLE CODES (CODE VARCHAR(10), LABEL VARCHAR(40))"


def test_a_none_database_with_latin1_bytes_reads_right_and_bad_bytes_quarantine_rows(world):
    """A NONE database whose applications wrote Latin-1: read with charset ISO8859_1 every
    value arrives intact; read as UTF8 (the default) the rows whose bytes are not UTF-8 are
    quarantined naming the column, the others load. A table without a key is read whole
    each run, in slices, and never doubles. `etl quarantine replay` reads a generic table's
    held rows back in its reflected types (the run's record is not needed), keeps the rows
    whose bytes were bad, and reports a source whose table cannot be read by name while
    the others are replayed."""
    extra = (_source("latin_right", "LATIN_NOTES", 2, key_column="ID", charset="ISO8859_1")
             + _source("latin_wrong", "LATIN_NOTES", 2, key_column="ID",
                       target_table="latin_wrong")
             + _source("codes", "CODES", 10)
             + _source("codes_keyed", "CODES", 10, key_column="CODE",
                       target_table="codes_keyed"))
    stack = world(pipeline_extra=extra)
    target = stack.firebird_target
    with _firebird(target) as cur:
        cur.execute(LATIN)
        cur.execute(CODES)
    # The application's connection says ISO8859_1; the NONE columns keep its bytes as sent.
    with _firebird(target, "ISO8859_1") as cur:
        cur.executemany("INSERT INTO LATIN_NOTES VALUES (?, ?, ?)", LATIN_ROWS)
    with _firebird(target) as cur:
        # C03 twice, in the same slice of 10: a row with no key is stored once.
        cur.executemany("INSERT INTO CODES VALUES (?, ?)",
                        [(f"C{n:02d}", f"code {n}") for n in range(4)] + [("C03", "code 3")]
                        + [(f"C{n:02d}", f"code {n}") for n in range(4, 25)])
    assert _rows(target, "SELECT CAST(NAME AS VARCHAR(40) CHARACTER SET OCTETS) FROM "
                 "LATIN_NOTES WHERE ID = 1") == [("Müller".encode("latin-1"),)]
    stack.start_all()

    right = _run("latin_right")
    assert right.status == "finished", right.error
    assert stack.query("SELECT id, name, unit FROM latin_notes ORDER BY id") == LATIN_ROWS

    wrong = _run("latin_wrong")
    assert wrong.status == "finished", wrong.error
    assert (wrong.loaded, wrong.quarantined) == (1, 3)
    assert stack.query("SELECT id, name, unit FROM latin_wrong") == [(2, "plain", "mmol/L")]
    reasons = dict(stack.query("SELECT source_ref, reasons FROM etl_quarantine WHERE "
                               "source = 'latin_wrong'"))
    assert reasons == {
        "ID=1": "name: not valid text in the source's character set; unit: not valid text "
                "in the source's character set",
        "ID=3": "name: not valid text in the source's character set",
        "ID=4": "name: not valid text in the source's character set; unit: not valid text "
                "in the source's character set"}
    assert _balance(stack, "latin_wrong") == (4, 1, 3, 0, 0)

    # No key: the whole table each run, in slices of 10 rows; the repeated row is one row.
    first = _run("codes")
    assert first.status == "finished", first.error
    assert (first.extracted, first.loaded, first.skipped) == (26, 25, 1)
    assert stack.query("SELECT count(DISTINCT chunk_id) FROM etl_load_ledger WHERE "
                       "run_id = ?", [first.run_id]) == [(3,)]
    again = _run("codes")
    assert (again.extracted, again.loaded, again.skipped) == (26, 0, 26)
    assert stack.query("SELECT count(*), count(DISTINCT code) FROM codes") == [(25, 25)]
    # The pointer of a row without a key is a digest of its values, never the values.
    assert all(ref.startswith("ROW#") for (ref,) in stack.query("SELECT source_ref FROM codes"))
    assert _balance(stack, "codes") == (26, 25, 0, 0, 0)  # the repeat is explained

    # Keyed by its text code, the repeat of C03 within its chunk is held (the upsert could
    # not place two rows of one key in one chunk).
    keyed = _run("codes_keyed")
    assert (keyed.status, keyed.loaded, keyed.quarantined) == ("finished", 25, 1), keyed.error
    # A column no range can read makes latin_wrong's held rows unreadable; the replay of
    # every source goes on without it. The run records (and their reflected columns) gone
    # from Redis: the replay reflects the tables again.
    with _firebird(target) as cur:
        cur.execute("ALTER TABLE LATIN_NOTES ADD SCAN BLOB SUB_TYPE 0")
    stack.redis.delete(*stack.redis.scan_iter(match="etl:run:*", count=1000))
    done = subprocess.run([ETL, "quarantine", "replay", "--json"], env=stack.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    counts = json.loads(done.stdout)
    held = counts["codes_keyed"]
    assert (held["examined"], held["loaded"] + held["unchanged"], held["still_quarantined"],
            held["error"]) == (1, 1, 0, None)
    assert stack.query("SELECT count(*), count(DISTINCT code) FROM codes_keyed") == [(25, 25)]
    assert (counts["latin_wrong"]["examined"], counts["latin_right"]["error"]) == (0, None)
    assert counts["latin_wrong"]["error"].startswith("source latin_wrong: quarantine replay "
                                                     "stopped reading its columns' types")
    assert "column SCAN of table LATIN_NOTES" in counts["latin_wrong"]["error"]
    assert "etl quarantine replay --source latin_wrong" in counts["latin_wrong"]["error"]
    with _firebird(target) as cur:
        cur.execute("ALTER TABLE LATIN_NOTES DROP SCAN")
    again = subprocess.run([ETL, "quarantine", "replay", "--source", "latin_wrong"],
                           env=stack.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    # Its bytes were not valid UTF-8: the raw text has them replaced, so the rows stay held.
    assert _balance(stack, "latin_wrong") == (4, 1, 3, 0, 0)
    shown = done.stdout + done.stderr + again.stdout + again.stderr
    assert not any(value in shown for value in ("Müller", "Größe", "µmol/L"))


# --- a WIN1252 database keyed by text --------------------------------------------------

VISITS = """CREATE TABLE VISITS (VISIT_ID VARCHAR(24) NOT NULL PRIMARY KEY,
    MRN VARCHAR(16), NAME VARCHAR(60), UNIT CHAR(8), NOTE BLOB SUB_TYPE TEXT,
    CHANGED_AT TIMESTAMP)"""
NAMES = ["Müller", "Ærøskøbing", "Šimon", "O'Brien, \"Jr\"", "Zoë;\nline two", "Lukáš"]


def _visit(n: int, changed: dt.datetime) -> tuple[Any, ...]:
    # Keys that are not integers and not in insertion order, some with WIN1252 letters.
    key = f"V{(n * 7919) % 10_007:05d}" + ("-é" if n % 5 == 0 else "")
    return (key, f"MRN-{n:06d}", NAMES[n % len(NAMES)], "µmol/L" if n % 2 else "€",
            None if n % 7 == 0 else f"Visit {n}: BP 120/80, \"stable\";\r\nfollow up",
            changed)


def test_a_text_keyed_table_in_a_win1252_database_extracts_in_parallel_ranges_once(
        world, fault_template, tmp_path):
    """A WIN1252 database's table keyed by a text visit id is cut at sampled key
    boundaries into ranges extracted in parallel; every row loads once, non-ASCII text
    intact; the bounds are sealed (no visit id in the ledger); the next run reads only what
    is new or changed, above and below the key mark."""
    _, runtime = fault_template
    target = FirebirdTarget(dsn=str(tmp_path / "visits.fdb"), user="SYSDBA",
                            password="masterkey", runtime_dir=runtime)
    firebird.create_database(target, charset="WIN1252").close()
    base = dt.datetime(2026, 3, 1, 8, 0)
    with _firebird(target) as cur:
        cur.execute(VISITS)
    with _firebird(target) as cur:
        cur.executemany("INSERT INTO VISITS VALUES (?, ?, ?, ?, ?, ?)",
                        [_visit(n, base + dt.timedelta(minutes=n)) for n in range(1, 301)])
    assert _rows(target, "SELECT COUNT(*) FROM VISITS") == [(300,)]
    stack = world(appendonly=False, env={"ETL_FIREBIRD_DSN": str(target.dsn)},
                  pipeline_extra=_source(
        "visits", "VISITS", 40, key_column="VISIT_ID", updated_column="CHANGED_AT"))
    stack.start_all()

    first = _run("visits")
    assert first.status == "finished", first.error
    assert (first.extracted, first.loaded, first.quarantined) == (300, 300, 0)
    ledger = stack.query("SELECT unit_id, key_lo, key_text_lo, key_text_hi FROM "
                         "etl_load_ledger WHERE run_id = ? ORDER BY unit_id", [first.run_id])
    assert len(ledger) == 8  # 300 keys, a boundary every 40th
    assert all(lo is None and hi for _, lo, _, hi in ledger)
    keys = [row[0] for row in _rows(target, "SELECT VISIT_ID FROM VISITS")]
    assert not any(key in str(ledger) for key in keys)
    _assert_visits_match(stack, target)

    # New visits above and below the key mark (ids are not in time order), two changed.
    later = base + dt.timedelta(days=1)
    with _firebird(target) as cur:
        cur.executemany("INSERT INTO VISITS VALUES (?, ?, ?, ?, ?, ?)",
                        [_visit(n, later) for n in range(301, 321)])
    # Waiting for the next run, whether their ids fall above the key mark or below it.
    assert _balance(stack, "visits") == (320, 300, 0, 20, 0)
    with _firebird(target) as cur:
        cur.execute("UPDATE VISITS SET NAME = ?, CHANGED_AT = ? WHERE VISIT_ID IN (?, ?)",
                    ("Renamed µ", later, _visit(3, base)[0], _visit(250, base)[0]))
    second = _run("visits")
    assert second.status == "finished", second.error
    assert second.loaded == 22
    assert stack.query("SELECT count(*), count(DISTINCT visit_id) FROM visits") == [(320, 320)]
    assert stack.query("SELECT count(*) FROM visits WHERE name = 'Renamed µ'") == [(2,)]
    _assert_visits_match(stack, target)
    assert _balance(stack, "visits") == (320, 320, 0, 0, 0)
    third = _run("visits")
    assert (third.status, third.loaded) == ("finished", 0)
    mark = stack.redis.hget("etl:checkpoint:visits", "key_sampled")
    assert mark
    assert not any(key in mark for key in keys)
    # `etl sources` says the mark is sampled and sealed, and when it moved: never a key.
    as_json, as_table = (subprocess.run([ETL, "sources", *args], env=stack.env, text=True,
                                        capture_output=True, timeout=60)
                         for args in (["--json"], []))
    for done in (as_json, as_table):
        assert done.returncode == 0, done.stderr
        assert not any(key in done.stdout + done.stderr for key in [*keys, mark])
    [shown] = [s["checkpoint"] for s in json.loads(as_json.stdout) if s["name"] == "visits"]
    assert (shown["key_mark"], shown["key_mark_kind"]) == (None, "sampled")
    assert shown["key_advanced_at"]
    assert "sampled" in as_table.stdout  # "key sampled (sealed)", wrapped in its cell
    assert "(sealed)" in as_table.stdout

    # Redis loses everything: the sealed key mark is rebuilt from the ledger's chain of
    # bounds, so the next run reads only its look-back window again, not the whole table.
    stack.restart_redis()
    after_loss = _run("visits")
    assert after_loss.status == "finished", after_loss.error
    assert stack.redis.hget("etl:checkpoint:visits", "key_sampled") == mark
    assert (after_loss.loaded, after_loss.quarantined) == (0, 0)
    assert after_loss.extracted < 100
    assert stack.query("SELECT count(*) FROM visits") == [(320,)]


def test_a_sampled_range_out_of_memory_is_cut_at_its_middle_key_down_to_the_floor(world):
    """A text-keyed range whose extract runs out of memory is cut at the key of its middle
    row (sampled from Firebird, sealed) like an integer range is halved, down to
    ETL_MIN_SPLIT_KEYS rows; at the floor it is a dead letter (no key in it), the other
    ranges load, and the next run, the fault gone, loads the rest once. The MemoryError is
    injected by a fault point (ETL_FAULT_ACTION=memory): a real one cannot be produced
    reliably, and the split path is the same for both."""
    stack = world(env={"ETL_MIN_SPLIT_KEYS": "10", "ETL_MAX_ATTEMPTS": "1"},
                  pipeline_extra=_source("tags", "TAGS", 20, key_column="TAG"))
    with _firebird(stack.firebird_target) as cur:
        cur.execute("CREATE TABLE TAGS (TAG VARCHAR(12) NOT NULL PRIMARY KEY, N INTEGER)")
    keys = [f"T{(n * 17) % 41:03d}-ä" for n in range(1, 41)]  # not in insertion order
    with _firebird(stack.firebird_target) as cur:
        cur.executemany("INSERT INTO TAGS VALUES (?, ?)", [(k, n) for n, k in enumerate(keys)])
    # Every extract of the second range, and of its parts, raises MemoryError.
    stack.start_all(fleet_env={"ETL_FAULT_POINT": "extract@tags:skeys:2",
                               "ETL_FAULT_ACTION": "memory"})

    first = _run("tags")
    assert first.status == "partial", first.error
    # 20 rows cut at the 10th into two parts of 10: at the floor, each a dead letter.
    assert sorted(d["item"] for d in first.dead_letters) == ["tags:skeys:2.1", "tags:skeys:2.2"]
    assert {d["pointer"] for d in first.dead_letters} == {"sampled key range 2.1",
                                                          "sampled key range 2.2"}
    assert stack.query("SELECT count(*) FROM tags") == [(20,)]
    assert "split into tags:skeys:2.1 and tags:skeys:2.2" in (
        stack.root / "logs" / "fleet.log").read_text()
    dead = stack.query("SELECT * FROM etl_dead_letters")
    assert len(dead) == 2
    assert not any(key in str(dead) or key in str(first) for key in keys)

    stack.start_fleet()  # the fault gone
    second = _run("tags")
    assert second.status == "finished", second.error
    assert stack.query("SELECT count(*), count(DISTINCT tag) FROM tags") == [(40, 40)]
    assert stack.query("SELECT count(*) FROM etl_dead_letters WHERE status = 'open'") == [(0,)]
    assert _balance(stack, "tags") == (40, 40, 0, 0, 0)


def _assert_visits_match(stack: Any, target: FirebirdTarget) -> None:
    expected = [(key, mrn, name, unit.rstrip(" "), note, changed) for
                key, mrn, name, unit, note, changed in _rows(
                    target, "SELECT VISIT_ID, MRN, NAME, UNIT, NOTE, CHANGED_AT FROM VISITS")]
    stored = stack.query("SELECT visit_id, mrn, name, unit, note, changed_at FROM visits")
    assert sorted(stored) == sorted(expected)


# --- a table that changes between runs ---------------------------------------------------

EVOLVE = """CREATE TABLE EVOLVE (ID INTEGER NOT NULL PRIMARY KEY, NAME VARCHAR(20),
    QTY INTEGER, CHANGED_AT TIMESTAMP)"""


def test_a_new_column_appears_and_a_retyped_one_stops_the_run_loading_nothing(world):
    """A column added at the source between two runs is added to the DuckDB table (older rows
    hold NULL in it); a column retyped at the source stops the next run with a message
    naming the source, the table and the column, and nothing of that run is loaded."""
    stack = world(pipeline_extra=_source("evolve", "EVOLVE", 4, key_column="ID",
                                         updated_column="CHANGED_AT"))
    target = stack.firebird_target
    base = dt.datetime(2026, 5, 1)
    with _firebird(target) as cur:
        cur.execute(EVOLVE)
    with _firebird(target) as cur:
        cur.executemany("INSERT INTO EVOLVE VALUES (?, ?, ?, ?)",
                        [(n, f"item {n}", n, base) for n in range(1, 11)])
    stack.start_all()
    first = _run("evolve")
    assert (first.status, first.loaded) == ("finished", 10), first.error

    later = base + dt.timedelta(days=1)
    with _firebird(target) as cur:
        cur.execute("ALTER TABLE EVOLVE ADD NOTE VARCHAR(40)")
    with _firebird(target) as cur:
        cur.execute("UPDATE EVOLVE SET NOTE = 'noted, \"µ\"', CHANGED_AT = ? WHERE ID <= 2",
                    (later,))
        cur.executemany("INSERT INTO EVOLVE VALUES (?, ?, ?, ?, ?)",
                        [(n, f"item {n}", n, later, f"new {n}") for n in (11, 12)])
    second = _run("evolve")
    assert (second.status, second.loaded) == ("finished", 4), second.error
    assert stack.query("SELECT id, note FROM evolve WHERE note IS NOT NULL ORDER BY id") == [
        (1, 'noted, "µ"'), (2, 'noted, "µ"'), (11, "new 11"), (12, "new 12")]
    assert stack.query("SELECT count(*) FROM evolve WHERE note IS NULL") == [(8,)]

    with _firebird(target) as cur:
        cur.execute("ALTER TABLE EVOLVE ALTER QTY TYPE BIGINT")
    with _firebird(target) as cur:
        cur.execute("INSERT INTO EVOLVE VALUES (13, 'item 13', 5000000000, ?, NULL)",
                    (later,))
    third = _run("evolve")
    assert third.status == "failed"
    assert "source evolve: column qty of DuckDB table evolve is INTEGER" in third.error
    assert "BIGINT" in third.error
    assert "EVOLVE" in third.error
    assert "5000000000" not in third.error
    assert stack.query("SELECT count(*), max(id) FROM evolve") == [(12, 12)]
    assert stack.query("SELECT data_type FROM information_schema.columns WHERE "
                       "table_name = 'evolve' AND column_name = 'qty'") == [("INTEGER",)]
    assert stack.query("SELECT count(*) FROM etl_load_ledger WHERE run_id = ?",
                       [third.run_id]) == [(0,)]

