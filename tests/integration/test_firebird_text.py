"""The Firebird range reader against text values that CSV makes hard, on a real database.

The database is this module's own small embedded Firebird file, used from one spawned child
process: the embedded engine binds its runtime and lock folders once per process, so opening
this file from the pytest process would tie that process to folders other than those the
session's `stack` workers use and break the tests that share the stack's database.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from etl_tasks.demo_data import make_billing_db
from etl_tasks.sources import firebird, firebird_schema, firebird_text
from etl_tasks.sources.firebird import CLAIM_COLUMNS, RANGE_BLOCK_SIZE, FirebirdTarget

pytestmark = pytest.mark.integration

CLAIMS = 3_000
COLUMNS = ", ".join(name for name, _, _ in CLAIM_COLUMNS)

# claim id -> (PATIENT_ID VARCHAR(20), PAYER VARCHAR(40), STATUS VARCHAR(12)) as written.
# Claims 1000-1999 hold newlines but no CR, so that range is read in blocks; every range with a
# CR is read as one block (see parse_range_csv), so claims 2000-2999 and the ends hold CRs.
LF_RANGE, CR_RANGE = (1000, 1999), (2000, 2999)
PLANTED: dict[int, tuple[str | None, str | None, str | None]] = {
    1: ("P1\r\nP2", 'Line1\r\nLine2, "quoted"; end', "a\r\nb"),
    2: ("\n", "\r", "\r\n"),
    777: ('"', '""', ","),
    1000: ("P1\nP2", 'Line1\nLine2, "quoted"; end', "a\nb"),
    1200: ("\n", "\nleading and trailing\n", "\n\n"),
    1500: ("P0\n1,2;3", 'Line1\nLine2, "quoted"; end', 'x"\ny'),
    1501: ("  spaced  ", " ;\n ", ","),
    1502: ("", None, ""),
    1503: (None, "", None),
    1504: ("NULL", 'Mütze µ, "é";\nend', "paid\n"),
    1800: ('"P\n"', "a,b;c\nd\n\ne", '";"'),
    2200: ("P0\r\n1,2;3", 'Line1\nLine2, "quoted"; end', 'x"\r\ny'),
    2201: ("  spaced  ", " ;\r ", "\r\r\n"),
    2202: ("", None, ""),
    2500: ('"P\r"', "a,b;c\rd\ne\r\nf", '";"'),
    CLAIMS: ("last\r", 'Line1\nLine2, "quoted"; end', "\n\n"),
}

# A legacy copy of the table whose AMOUNT is text, read with the columns reflected from
# BILLING_CLAIMS (as if the table changed after the plan), so that a real range fails to
# parse (no BILLING_CLAIMS value can break the CSV): a comma in AMOUNT adds a CSV column, a
# word fails the decimal conversion, and Arrow's message for either quotes the row or value.
CANARY = "P-CANARY-0042"
_LEGACY_DDL = """CREATE TABLE LEGACY_CLAIMS (
    CLAIM_ID BIGINT NOT NULL PRIMARY KEY, PATIENT_ID VARCHAR(20), PROVIDER_NPI CHAR(10),
    SERVICE_DATE DATE, CPT_CODE VARCHAR(5), ICD10_CODE VARCHAR(8), AMOUNT VARCHAR(20),
    PAYER VARCHAR(40), STATUS VARCHAR(12), UPDATED_AT TIMESTAMP)"""
LEGACY_AMOUNTS = {1: "12,50", 2: "twelve fifty"}


def _create(target: FirebirdTarget) -> None:
    """In the child: the demo claims with PLANTED values, and LEGACY_CLAIMS."""
    make_billing_db(target, CLAIMS)
    con = firebird.connect(target)
    try:
        cur = con.cursor()
        for claim_id, (patient, payer, status) in PLANTED.items():
            cur.execute("UPDATE BILLING_CLAIMS SET PATIENT_ID = ?, PAYER = ?, STATUS = ? "
                        "WHERE CLAIM_ID = ?", (patient, payer, status, claim_id))
        cur.execute(_LEGACY_DDL)
        con.commit()
        for claim_id, amount in LEGACY_AMOUNTS.items():
            cur.execute("INSERT INTO LEGACY_CLAIMS VALUES (?, ?, '1234567890', DATE '2025-01-02',"
                        " '99213', 'I10', ?, 'Aetna', 'paid', TIMESTAMP '2026-01-01 00:00:00')",
                        (claim_id, CANARY, amount))
        cur.close()
        con.commit()
    finally:
        con.close()


def _select(target: FirebirdTarget, lo: int, hi: int) -> list[tuple[Any, ...]]:
    """In the child: the rows through the driver, as plainly as possible."""
    con = firebird.connect(target)
    try:
        cur = con.cursor()
        cur.execute(f"SELECT {COLUMNS} FROM BILLING_CLAIMS WHERE CLAIM_ID BETWEEN ? AND ? "
                    "ORDER BY CLAIM_ID", (lo, hi))
        rows = [tuple(row) for row in cur.fetchall()]
        cur.close()
        return rows
    finally:
        con.close()


def _range_csv(target: FirebirdTarget, lo: int, hi: int) -> str | None:
    con = firebird.connect(target)
    try:
        schema = firebird_schema.reflect(con, "BILLING_CLAIMS")
        raw = firebird.fetch_range_text(con, schema, "CLAIM_ID", lo, hi)
        return raw.decode("utf-8") if raw is not None else None
    finally:
        con.close()


def _reflected(target: FirebirdTarget) -> list[tuple[str, Any, bool]]:
    """In the child: BILLING_CLAIMS as reflection sees it (name, staged type, is text)."""
    con = firebird.connect(target)
    try:
        schema = firebird_schema.reflect(con, "BILLING_CLAIMS")
        return [(c.name, c.arrow, c.is_text) for c in schema.columns]
    finally:
        con.close()


def _fetch(target: FirebirdTarget, table: str, lo: int, hi: int,
           block_sizes: list[int]) -> dict[int, Any]:
    """In the child: per block size, fetch_range's rows as tuples, or what it raised. The
    columns read are BILLING_CLAIMS's, as a run's plan recorded them: LEGACY_CLAIMS stands
    for the claims table changed after the plan (its AMOUNT now text)."""
    con = firebird.connect(target)
    results: dict[int, Any] = {}
    try:
        planned = firebird_schema.reflect(con, "BILLING_CLAIMS")
        for block_size in block_sizes:
            try:
                table_ = firebird.fetch_range(con, table, "CLAIM_ID", lo, hi,
                                              schema=replace(planned, table=table),
                                              block_size=block_size)
            except Exception as exc:  # noqa: BLE001 - described to the parent, which asserts
                results[block_size] = {
                    "type": type(exc).__name__, "message": str(exc),
                    "traceback": "".join(traceback.format_exception(exc)),
                    "chained": exc.__cause__ is not None or exc.__context__ is not None}
            else:
                results[block_size] = [tuple(row.values()) for row in table_.to_pylist()]
        return results
    finally:
        con.close()


@dataclass
class TextDb:
    target: FirebirdTarget
    child: ProcessPoolExecutor

    def call(self, fn: Any, *args: Any) -> Any:
        return self.child.submit(fn, self.target, *args).result(timeout=300)


@pytest.fixture(scope="module")
def text_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TextDb]:
    root: Path = tmp_path_factory.mktemp("firebird_text")
    target = FirebirdTarget(dsn=str(root / "billing.fdb"), user="SYSDBA", password="masterkey",
                            runtime_dir=root / ".firebird")
    with ProcessPoolExecutor(max_workers=1,
                             mp_context=multiprocessing.get_context("spawn")) as child:
        db = TextDb(target, child)
        db.call(_create)
        yield db


def _straddling_block_sizes(text: str, values: list[str]) -> list[int]:
    """Block sizes whose first block ends right after a newline inside a quoted value.

    Sizes under 1,000 bytes are left out: Arrow refuses blocks shorter than a row, which
    production blocks (1 MiB, rows of about 110 bytes) never are.
    """
    data = text.encode("utf-8")
    sizes: set[int] = set()
    for value in values:
        quoted = ('"' + value.replace('"', '""') + '"').encode("utf-8")
        start = data.find(quoted)
        assert start >= 0, value
        for index, byte in enumerate(quoted):
            if byte in b"\r\n":
                sizes.update((start + index + 1, start + index + 2))
    return sorted(size for size in sizes if size >= 1_000)


def test_reflection_gives_the_claim_columns(text_db):
    """The claim path is the generic one: reflecting BILLING_CLAIMS gives CLAIM_COLUMNS."""
    assert text_db.call(_reflected) == CLAIM_COLUMNS


def test_every_text_value_reads_back_exactly_as_the_driver_returns_it(text_db):
    """Newlines, CR, quotes, commas, semicolons, spaces, '' and NULL read back exactly."""
    expected = text_db.call(_select, 1, CLAIMS)
    assert len(expected) == CLAIMS
    rows = text_db.call(_fetch, "BILLING_CLAIMS", 1, CLAIMS, [RANGE_BLOCK_SIZE])
    assert rows[RANGE_BLOCK_SIZE] == expected
    by_id = {row[0]: row for row in rows[RANGE_BLOCK_SIZE]}
    for claim_id, (patient, payer, status) in PLANTED.items():
        assert (by_id[claim_id][1], by_id[claim_id][7], by_id[claim_id][8]) == (
            patient, payer, status)


@pytest.mark.parametrize(("lo", "hi"), [LF_RANGE, CR_RANGE], ids=["lf", "cr"])
def test_a_newline_value_where_the_reader_cuts_its_input_reads_back_exactly(text_db, lo, hi):
    """A value whose newline falls exactly where the CSV reader ends a block is read whole."""
    expected = text_db.call(_select, lo, hi)
    text = text_db.call(_range_csv, lo, hi)
    assert ("\r" in text) == ((lo, hi) == CR_RANGE)
    values = [v for claim_id, planted in PLANTED.items() if lo <= claim_id <= hi
              for v in planted if v and ("\n" in v or "\r" in v)]
    straddling = _straddling_block_sizes(text, values)
    assert len(straddling) >= 10
    results = text_db.call(_fetch, "BILLING_CLAIMS", lo, hi,
                           [*straddling, 1_000, 4_096, 65_536, len(text) - 3])
    for block_size, rows in results.items():
        assert rows == expected, f"block_size={block_size}"


def test_a_range_that_cannot_be_parsed_is_fatal_and_never_quotes_a_row(text_db):
    """A range Firebird really returns that Arrow cannot parse (the table changed after the
    plan reflected it) is fatal, naming no value."""
    results = text_db.call(_fetch, "LEGACY_CLAIMS", 1, 1, [RANGE_BLOCK_SIZE])
    columns = results[RANGE_BLOCK_SIZE]
    assert columns["type"] == "FatalError"
    assert columns["message"] == ("[firebird] Firebird range LEGACY_CLAIMS CLAIM_ID 1-1 could "
                                  "not be parsed (CSV parse error: Expected 10 columns, got 11)")
    conversion = text_db.call(_fetch, "LEGACY_CLAIMS", 2, 2, [RANGE_BLOCK_SIZE])[RANGE_BLOCK_SIZE]
    assert conversion["type"] == "FatalError"
    assert "LEGACY_CLAIMS CLAIM_ID 2-2 could not be parsed" in conversion["message"]
    assert ("column AMOUNT holds a value that is not a valid decimal128(12, 2)"
            in conversion["message"])
    for failure in (columns, conversion):
        assert not failure["chained"]
        for secret in (CANARY, "12,50", "twelve fifty", "1234567890"):
            assert secret not in failure["traceback"]


QUOTED_ROWS = 250


def _quoted(target: FirebirdTarget) -> dict[str, Any]:
    """In the child: a WIN1252 table whose values are all quotes (each doubled in the range
    text), so a group of lines sized from the declared length overflows its VARCHAR; what
    fetch_range reads (over a connection like the workers', charset NONE), what the driver
    reads over a UTF8 connection (which also wrote them), and whether the grouped fetch
    overflowed."""
    con = firebird.connect(target, "UTF8")
    try:
        cur = con.cursor()
        cur.execute("CREATE TABLE QUOTED (ID INTEGER NOT NULL PRIMARY KEY, "
                    "T VARCHAR(100) CHARACTER SET WIN1252)")
        con.commit()
        cur.executemany("INSERT INTO QUOTED VALUES (?, ?)",
                        [(n, '"' * 100 if n % 50 else 'Müller, "µ"\n;') for n in
                         range(1, QUOTED_ROWS + 1)])
        con.commit()
        cur.execute("SELECT ID, T FROM QUOTED ORDER BY ID")
        driver = [tuple(row) for row in cur.fetchall()]
    finally:
        con.close()
    con = firebird.connect(target)
    try:
        schema = firebird_schema.reflect(con, "QUOTED")
        group = firebird_text.group_rows(schema)
        line = firebird_text.line_expression(schema)
        try:
            firebird._fetch_groups(con, f'SELECT "ID" / {group} AS g, {line} AS r FROM QUOTED',
                                   [])
            overflowed = False
        except Exception as exc:  # noqa: BLE001 - described to the parent, which asserts
            overflowed = firebird._truncated(exc)
        read = firebird.fetch_range(con, "QUOTED", "ID", 1, QUOTED_ROWS, schema=schema)
        return {"group": group, "overflowed": overflowed, "driver": driver,
                "read": [(row["id"], row["t"]) for row in read.to_pylist()]}
    finally:
        con.close()


def test_a_range_whose_lines_outgrow_their_group_is_read_whole_and_exact(text_db):
    """Lines are fetched in groups sized from the columns' declared lengths; values full of
    quotes (doubled in the text) overflow a group, and the range is then read as one blob:
    every value still arrives exactly, in key order."""
    seen = text_db.call(_quoted)
    assert seen["group"] > 0
    assert seen["overflowed"], "the grouped fetch fit: this test no longer reaches the fallback"
    assert seen["read"] == seen["driver"]
    assert len(seen["read"]) == QUOTED_ROWS


SPARSE_KEYS = [5, 6, 1000, 2**40, 2**62 + 7]


def _bounds(target: FirebirdTarget) -> dict[str, Any]:
    """In the child: key_bounds of a sparse key with a primary key (found by index seeks)
    and of the same keys without any index (MIN and MAX), after several marks."""
    con = firebird.connect(target)
    try:
        cur = con.cursor()
        cur.execute("CREATE TABLE SPARSE_PK (ID BIGINT NOT NULL PRIMARY KEY)")
        cur.execute("CREATE TABLE SPARSE_NO_INDEX (ID BIGINT)")
        con.commit()
        for table in ("SPARSE_PK", "SPARSE_NO_INDEX"):
            cur.executemany(f"INSERT INTO {table} VALUES (?)", [(k,) for k in SPARSE_KEYS])
        con.commit()
        marks = [0, 5, 6, 999, 2**40, 2**62 + 6, 2**62 + 7]
        return {table: [firebird.key_bounds(con, table, "ID", mark) for mark in marks]
                for table in ("SPARSE_PK", "SPARSE_NO_INDEX", "BILLING_CLAIMS")
                if table != "BILLING_CLAIMS"} | {
            "claims": firebird.key_bounds(con, "BILLING_CLAIMS", "CLAIM_ID", 0)}
    finally:
        con.close()


def test_key_bounds_by_index_seeks_equal_min_and_max(text_db):
    """The largest key above the mark is found by seeks on the primary key's index (MAX
    would scan the table): the same bounds as MIN and MAX on an unindexed copy."""
    seen = text_db.call(_bounds)
    expected = [(5, 2**62 + 7), (6, 2**62 + 7), (1000, 2**62 + 7), (1000, 2**62 + 7),
                (2**62 + 7, 2**62 + 7), (2**62 + 7, 2**62 + 7), None]
    assert seen["SPARSE_PK"] == expected
    assert seen["SPARSE_NO_INDEX"] == expected
    assert seen["claims"] == (1, CLAIMS)
