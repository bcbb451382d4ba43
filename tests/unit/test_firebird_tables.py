"""Generic Firebird tables without a database: type mapping, the range text's SQL, its decoding
and parse, sampled key marks in Redis and the target table's evolution in a real DuckDB."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import duckdb
import pyarrow as pa
import pytest

from etl_tasks import checkpoints
from etl_tasks.config import SourceConfig
from etl_tasks.errors import FatalError
from etl_tasks.load import duckdb as store
from etl_tasks.load.evolve import SchemaChanged, ensure_table, insert_columns
from etl_tasks.runs import bounds
from etl_tasks.runs.state import Unit
from etl_tasks.sealing import Sealer
from etl_tasks.sources import firebird_schema as fs
from etl_tasks.sources import firebird_text
from etl_tasks.sources.firebird_schema import Column, TableSchema
from etl_tasks.transform import transform_chunk

COLUMNS = (
    Column("ID", fs.INTEGER, not_null=True),
    Column("AMOUNT", fs.INT64, sub_type=1, scale=-2, precision=12),
    Column("HUGE", fs.INT128),
    Column("RATIO", fs.DOUBLE),
    Column("SEEN_AT", fs.TIMESTAMP_TZ),
    Column("CODE", fs.CHAR, length=4, charset="WIN1252"),
    Column("NOTE", fs.BLOB, sub_type=1, charset="WIN1252"),
    Column("OK", fs.BOOLEAN),
)
SCHEMA = TableSchema("T", COLUMNS)


def test_each_firebird_type_maps_to_an_exact_arrow_type_and_duckdb_type():
    """Decimals keep their scale, INT128 travels as digits for HUGEINT, instants are UTC."""
    types = {c.name: (c.arrow, c.duckdb, c.declared) for c in COLUMNS}
    assert types["AMOUNT"] == (pa.decimal128(12, 2), None, "NUMERIC(12,2)")
    assert types["HUGE"] == (pa.string(), "HUGEINT", "INT128")
    assert types["SEEN_AT"][0] == pa.timestamp("us", tz="UTC")
    assert types["CODE"] == (pa.string(), None, "CHAR(4) CHARACTER SET WIN1252")
    assert Column("D", fs.INTEGER, sub_type=2, scale=0, precision=9).arrow == pa.decimal128(9, 0)
    assert Column("B", fs.BLOB, sub_type=0).readable is False
    assert Column("O", fs.VARCHAR, length=8, charset="OCTETS").readable is False
    assert SCHEMA.column("id") is COLUMNS[0]
    assert SCHEMA.text_charset == "WIN1252"
    assert TableSchema.from_json(SCHEMA.to_json()) == SCHEMA


def test_an_unreadable_or_unknown_column_stops_the_plan_naming_source_table_and_column():
    """A binary blob is refused by name; excluding it, or a name not in the table, is told."""
    schema = TableSchema("T", (*COLUMNS, Column("SCAN", fs.BLOB, sub_type=0)))
    with pytest.raises(FatalError, match=r"source s: column SCAN of table T is BLOB SUB_TYPE 0"):
        schema.readable("s")
    assert schema.without(["scan"], "s").readable("s").column("SCAN") is None
    with pytest.raises(FatalError, match="excluded column NOPE is not a column of table T"):
        schema.without(["NOPE"], "s")


def test_the_line_expression_quotes_text_trims_char_and_prints_exact_values():
    """Text is quoted with quotes doubled, CHAR loses its pad, doubles go through DECFLOAT,
    instants are printed in UTC, and text in another character set is converted."""
    sql = firebird_text.line_expression(SCHEMA)
    assert ("""CASE WHEN "CODE" IS NULL THEN '' ELSE '"' || """
            """REPLACE(TRIM(TRAILING FROM "CODE")""") in sql
    assert 'CAST("RATIO" AS DECFLOAT(34))' in sql
    assert """CAST("SEEN_AT" AT TIME ZONE '+00:00' AS VARCHAR(64)) FROM 1 FOR 24) || 'Z'""" in sql
    utf8 = TableSchema("T", COLUMNS, charset="UTF8")
    assert ('CAST("NOTE" AS BLOB SUB_TYPE TEXT CHARACTER SET UTF8)'
            in firebird_text.line_expression(utf8))
    assert "DECFLOAT" not in firebird_text.line_expression(TableSchema("T", COLUMNS, 3))


def test_the_range_text_parses_to_exact_values_with_null_apart_from_empty():
    """Every type parses back exactly; NULL text is an empty field, '' a quoted one."""
    text = ('1,12.50,-170141183460469231731687303715884105728,0.30000000000000004,'
            '2024-06-01 10:00:00.1234Z,"ab","a,""b"";\nc",TRUE\n'
            '2,,,,,,"",FALSE\n').encode("cp1252")
    table = firebird_text.parse(text, SCHEMA, where="T ID 1-2")
    assert table.to_pylist() == [
        {"id": 1, "amount": Decimal("12.50"), "huge": "-170141183460469231731687303715884105728",
         "ratio": 0.30000000000000004,
         "seen_at": dt.datetime(2024, 6, 1, 10, 0, 0, 123400, tzinfo=dt.UTC),
         "code": "ab", "note": 'a,"b";\nc', "ok": True},
        {"id": 2, "amount": None, "huge": None, "ratio": None, "seen_at": None, "code": None,
         "note": "", "ok": False}]
    assert table.schema.field("huge").metadata == {fs.DUCKDB_TYPE: b"HUGEINT"}


def test_bytes_not_valid_in_the_character_set_mark_their_row_not_the_range():
    """µ and ü in WIN1252 read right; a byte WIN1252 leaves undefined marks only its row
    and column, and a NONE database's Latin-1 read as UTF8 marks every such row."""
    schema = TableSchema("T", (Column("ID", fs.INTEGER), Column("NAME", fs.VARCHAR, length=20)),
                         charset="WIN1252")
    text = '1,"Müller µmol/L"\n2,"bad \x81 byte"\n3,"plain"'.encode("latin-1")
    table = firebird_text.parse(text, schema, where="T")
    assert table["name"].to_pylist()[0] == "Müller µmol/L"
    assert table[firebird_text.UNDECODABLE].to_pylist() == [None, "NAME", None]
    utf8 = firebird_text.parse(text, TableSchema("T", schema.columns), where="T")
    assert utf8[firebird_text.UNDECODABLE].to_pylist() == ["NAME", "NAME", None]
    clean = firebird_text.parse(b'1,"plain"', schema, where="T")
    assert firebird_text.UNDECODABLE not in clean.column_names
    with pytest.raises(FatalError, match="unknown Firebird character set"):
        firebird_text.codec("LATIN9000")


def test_a_claim_whose_text_was_undecodable_is_quarantined_with_the_column_named():
    """The claims dataset honours the marker too: the row is held, its reason names the
    column, never the value."""
    claims = pa.table({
        "claim_id": [1, 2], "patient_id": ["P1", "P\ufffd"], "provider_npi": ["1", "2"],
        "service_date": [dt.date(2025, 1, 1)] * 2, "cpt_code": ["99213"] * 2,
        "icd10_code": ["I10"] * 2, "amount": pa.array([Decimal("1.00")] * 2,
                                                      pa.decimal128(12, 2)),
        "payer": ["Aetna"] * 2, "status": ["paid"] * 2,
        "updated_at": [dt.datetime(2026, 1, 1)] * 2,
        firebird_text.UNDECODABLE: [None, "PATIENT_ID"]})
    result = transform_chunk("billing_claims", claims)
    assert result.valid["claim_id"].to_pylist() == [1]
    assert result.quarantined.select(["source_ref", "reasons"]).to_pylist() == [
        {"source_ref": "CLAIM_ID=2",
         "reasons": "patient_id: not valid text in the source's character set"}]


def test_a_source_names_its_table_key_and_change_column_and_claims_keep_their_defaults():
    """BILLING_CLAIMS keeps CLAIM_ID/UPDATED_AT; another table has neither unless named, and
    a change column without a key is refused."""
    claims = SourceConfig(name="b", kind="firebird", location="BILLING_CLAIMS")
    assert (claims.key_column, claims.updated_column) == ("CLAIM_ID", "UPDATED_AT")
    other = SourceConfig(name="v", kind="firebird", location="VISITS", charset="WIN1252")
    assert (other.key_column, other.updated_column, other.charset) == ("", "", "WIN1252")
    with pytest.raises(ValueError, match="updated_column needs a key_column"):
        SourceConfig(name="v", kind="firebird", location="VISITS", updated_column="AT")


def _sampled(n: int, lo: str, hi: str) -> Unit:
    return Unit(f"v:skeys:{n}", "range", sampled=True, text_lo=lo, text_hi=hi)


def test_a_sampled_key_mark_walks_committed_ranges_by_token_and_stops_at_a_gap(client):
    """The mark moves over the contiguous committed prefix; a range not committed stops it;
    a plan that does not start at the mark moves nothing."""
    r = client()
    units = [_sampled(1, "", "t1"), _sampled(2, "t1", "t2"), _sampled(3, "t2", "t3")]
    assert checkpoints.advance_key(r, "v", units, {"v:skeys:1", "v:skeys:3"}, "2026-01-01") == "t1"
    assert checkpoints.sampled_high_water(r, "v") == "t1"
    assert checkpoints.advance_key(r, "v", units, {"v:skeys:1", "v:skeys:2", "v:skeys:3"},
                                   None) == "t3"
    assert checkpoints.advance_key(r, "v", [_sampled(1, "", "x")], {"v:skeys:1"}, None) == "t3"
    assert checkpoints.key_high_water(r, "v") == 0  # the integer mark is untouched
    assert checkpoints.updated_mark(r, "v") == dt.datetime(2026, 1, 1)


def test_etl_sources_shows_a_sampled_mark_as_sealed_with_when_it_moved_never_its_value(client):
    """`etl sources`' checkpoint names the key mark's kind: an integer key's number, a
    sampled key's mark only as sealed (the token is never shown), none for a table without
    a key; and when the mark last moved."""
    from etl_tasks import catalog

    r = client()
    visits = SourceConfig(name="v", kind="firebird", location="VISITS", key_column="VISIT_ID")
    keyless = SourceConfig(name="c", kind="firebird", location="CODES")
    text_key = TableSchema("VISITS", (Column("VISIT_ID", fs.VARCHAR, length=24),))
    assert catalog.key_kind(visits, text_key) == "sampled"
    assert catalog.key_kind(visits, SCHEMA) is None  # no such column: Firebird cannot say
    assert catalog.checkpoint(r, visits) == {"key_mark": None, "key_mark_kind": None,
                                             "key_advanced_at": None, "updated_mark": None}
    assert catalog.checkpoint(r, visits, "sampled")["key_mark_kind"] == "sampled"
    token = "sealed-token-of-a-visit-id"
    checkpoints.advance_key(r, "v", [_sampled(1, "", token)], {"v:skeys:1"}, "2026-01-01")
    mark = catalog.checkpoint(r, visits)  # Redis alone tells: a sampled mark is there
    assert (mark["key_mark"], mark["key_mark_kind"]) == (None, "sampled")
    moved = dt.datetime.fromisoformat(mark["key_advanced_at"])
    assert abs((dt.datetime.now(dt.UTC) - moved).total_seconds()) < 60
    text = catalog.checkpoint_text(mark)
    assert text.startswith("key sampled (sealed), moved ")
    assert token not in text + str(mark)
    assert catalog.checkpoint_text(catalog.checkpoint(r, keyless, "none")) == (
        "whole table each run, updated <= -")
    claims = SourceConfig(name="b", kind="firebird", location="BILLING_CLAIMS")
    checkpoints.advance_key(r, "b", [Unit("b:keys:1-10", "range", lo=1, hi=10)],
                            {"b:keys:1-10"}, None)
    assert catalog.checkpoint(r, claims)["key_mark"] == 10
    assert catalog.checkpoint_text(catalog.checkpoint(r, claims)).startswith("key <= 10, moved ")


def test_the_sampled_mark_is_rebuilt_from_the_ledger_chain():
    """Rebuilt from committed ranges by token equality (a later fork wins); the updated mark
    is the oldest version along the chain."""
    day = dt.datetime(2026, 1, 1)
    ranges = [("", "a", day), ("a", "b", day + dt.timedelta(days=1)), ("x", "y", day),
              ("b", "c", None)]
    assert checkpoints.sampled_prefix_mark(ranges[:2]) == ("b", day)
    assert checkpoints.sampled_prefix_mark(ranges) == ("c", None)
    assert checkpoints.sampled_prefix_mark([("x", "y", day)]) == ("", None)


def test_bounds_are_sealed_and_open_back():
    """A bound (an MRN) is never stored in clear; its token opens to the exact bytes."""
    sealer = Sealer((b"k" * 32,))
    token = bounds.seal(sealer, "visits", "MRN-0042 Müller".encode())
    assert "MRN" not in token
    assert bounds.open_bound(sealer, "visits", token) == "MRN-0042 Müller".encode()
    assert bounds.open_bound(sealer, "visits", "") is None


def _chunk(**columns: pa.Array) -> pa.Table:
    return pa.table(columns)


def test_the_target_table_takes_the_reflected_types_and_grows_with_a_new_column(tmp_path):
    """Created with exact types (HUGEINT from the digits); a new column is added, and rows
    are inserted by name whatever the column order."""
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    huge = pa.field("huge", pa.string(), metadata={fs.DUCKDB_TYPE: b"HUGEINT"})
    first = pa.table([pa.array([1]), pa.array([Decimal("1.50")], pa.decimal128(12, 2)),
                      pa.array(["170141183460469231731687303715884105727"])],
                     schema=pa.schema([("id", pa.int32()), ("amount", pa.decimal128(12, 2)),
                                       huge]))
    assert ensure_table(con, "t", first.schema, "s") == ["id", "amount", "huge"]
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 't'").fetchall())
    assert (types["amount"], types["huge"]) == ("DECIMAL(12,2)", "HUGEINT")
    grown = first.append_column("note", pa.array(["x"])).select(["note", "huge", "amount", "id"])
    assert ensure_table(con, "t", grown.schema, "s") == ["note"]
    names, values = insert_columns(con, grown.schema)
    con.register("i", grown)
    con.execute(f"INSERT INTO t ({names}) SELECT {values} FROM i i")
    assert con.execute("SELECT id, huge, note FROM t").fetchall() == [
        (1, 170141183460469231731687303715884105727, "x")]


def test_a_dropped_or_retyped_column_stops_the_write_naming_source_table_and_column(tmp_path):
    """Nothing is altered: the message says which column of which table changed how."""
    con = store.connect(tmp_path / "t.duckdb")
    ensure_table(con, "t", _chunk(id=pa.array([1], pa.int32()), n=pa.array([2], pa.int32())
                                  ).schema, "visits")
    with pytest.raises(SchemaChanged, match=r"source visits: column n of DuckDB table t is "
                       r"INTEGER but the source's rows now hold BIGINT"):
        ensure_table(con, "t", _chunk(id=pa.array([1], pa.int32()), n=pa.array([2])).schema,
                     "visits")
    with pytest.raises(SchemaChanged, match=r"column n of DuckDB table t is no longer"):
        ensure_table(con, "t", _chunk(id=pa.array([1], pa.int32())).schema, "visits")
    assert [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 't'").fetchall()][:2] == ["id", "n"]
    with pytest.raises(SchemaChanged):  # through the loader too: nothing committed
        store.write_chunk(
            con, source="visits", table="t", dataset="billing_claims",
            entry=store.LedgerEntry("r", "c", "u", "range"),
            valid=_chunk(id=pa.array([1], pa.int32()), source_ref=pa.array(["ID=1"])),
            quarantined=pa.table({"source_ref": pa.array([], pa.string()),
                                  "reasons": pa.array([], pa.string()),
                                  "raw": pa.array([], pa.string())}))
    assert con.execute("SELECT count(*) FROM etl_load_ledger").fetchall() == [(0,)]


def test_every_reflected_type_survives_the_sqlite_fallback_exactly(tmp_path):
    """A generic table's chunk committed to SQLite while DuckDB is away reads back in its
    exact types (a time of day, an instant, a decimal, INT128's digits with their metadata)."""
    from etl_tasks.load import sqlite as fallback

    schema = TableSchema("T", (*COLUMNS, Column("AT", fs.TIME), Column("ON", fs.DATE),
                               Column("F", fs.FLOAT))).arrow_schema()
    values = [1, Decimal("-12.34"), "-170141183460469231731687303715884105728", 0.1,
              dt.datetime(2024, 6, 1, 10, 0, 0, 123400, tzinfo=dt.UTC), "ab", 'a,"b";\nc',
              True, dt.time(23, 59, 59, 999900), dt.date(1, 1, 1), 3.4e38]
    valid = pa.table([pa.array([v, None], f.type) for v, f in zip(values, schema, strict=True)],
                     schema=schema).append_column("source_ref", pa.array(["ID=1", "ID=2"]))
    quarantined = pa.table({"source_ref": pa.array([], pa.string()),
                            "reasons": pa.array([], pa.string()),
                            "raw": pa.array([], pa.string())})
    with fallback.opened(tmp_path / "f.sqlite") as con:
        fallback.write_chunk(con, source="t", table="t", dataset="source:t",
                             entry=store.LedgerEntry("r", "c", "u", "range"), valid=valid,
                             quarantined=quarantined)
        [item] = fallback.pending(con)
        _, back, _ = fallback.read_chunk(con, item["seq"])
    assert back.equals(valid, check_metadata=True)
    assert back.to_pylist() == valid.to_pylist()
