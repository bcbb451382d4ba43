"""Keys that are not integers, and tables without a key.

A key that is not an integer (text such as an MRN or a GUID, a date, a decimal) cannot be
cut by arithmetic: `sample_bounds` has Firebird pick every Nth key in its own order, and the
ranges end there. A table without a key is read whole, in slices of one snapshot
(`fetch_table`). Rows of either get a digest pointer (`row_pointers`) instead of
`<KEY>=<value>`: a text key may be patient data, and a keyless row has no key at all.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from etl_tasks.sources import firebird_text
from etl_tasks.sources.firebird import fetch_range_text, octets, range_condition
from etl_tasks.sources.firebird_schema import TableSchema
from etl_tasks.sources.firebird_text import RANGE_BLOCK_SIZE, quote


def fetch_table(con: Any, schema: TableSchema, rows: int,
                block_size: int = RANGE_BLOCK_SIZE) -> Iterator[pa.Table]:
    """A table without a key in slices of `rows` rows, in its natural order. All in the
    connection's one transaction (a snapshot), so the slices neither overlap nor miss a row
    whatever changes meanwhile."""
    cur = con.cursor()
    try:
        cur.execute(f"SELECT COUNT(*) FROM {quote(schema.table)}")
        total = int(cur.fetchone()[0])
    finally:
        cur.close()
    for first in range(1, total + 1, rows):
        last = min(first + rows - 1, total)
        raw = fetch_range_text(con, schema, None, None, None, rows=(first, last))
        yield firebird_text.parse(raw, schema, where=f"{schema.table} rows {first}-{last}",
                                  block_size=block_size)


def sample_bounds(con: Any, schema: TableSchema, key: str, after: bytes | None, every: int,
                  where: str = "", params: tuple[Any, ...] = ()) -> list[bytes]:
    """Boundaries cutting the rows with key > `after` (and `where`) into ranges of about
    `every` rows: every `every`-th key in key order, then the largest. Text keys come back as
    their exact bytes, other keys as their text. [] when there is no such row."""
    q, value = quote(key), _key_value(schema, key)
    terms, args = range_condition(schema, key, after, None)
    terms += [f"{q} IS NOT NULL"] + ([where] if where else [])
    sql = (f"SELECT v FROM (SELECT {value} AS v, ROW_NUMBER() OVER (ORDER BY {q}) AS n, "
           f"COUNT(*) OVER () AS total FROM {quote(schema.table)} WHERE " + " AND ".join(terms)
           + ") WHERE MOD(n, ?) = 0 OR n = total ORDER BY n")
    cur = con.cursor()
    try:
        cur.execute(sql, [*args, *params, every])
        found = [v if isinstance(v, bytes) else str(v).encode("ascii")
                 for (v,) in cur.fetchall()]
    finally:
        cur.close()
    # A key that repeats (a split column need not be unique) bounds one range only.
    return list(dict.fromkeys(found))


def middle_bound(con: Any, schema: TableSchema, key: str, lo: bytes | None, hi: bytes | None,
                 floor: int) -> bytes | None:
    """A boundary cutting the sampled range (lo, hi] in two parts of about half its rows: the
    key of its middle row in key order, as `sample_bounds` gives keys. None when the range
    holds `floor` rows or fewer, or when no key inside it cuts it (its later rows all share
    the middle key): it cannot be split."""
    q, table, value = quote(key), quote(schema.table), _key_value(schema, key)
    terms, args = range_condition(schema, key, lo, hi)
    where = " AND ".join([*terms, f"{q} IS NOT NULL"])
    cur = con.cursor()
    try:
        cur.execute(f"SELECT v, total FROM (SELECT {value} AS v, ROW_NUMBER() OVER (ORDER BY "
                    f"{q}) AS n, COUNT(*) OVER () AS total FROM {table} WHERE {where}) "
                    "WHERE n = (total + 1) / 2", args)
        found = cur.fetchone()
        if found is None or int(found[1]) <= floor:
            return None
        middle = found[0] if isinstance(found[0], bytes) else str(found[0]).encode("ascii")
        after, params = range_condition(schema, key, middle, hi)
        cur.execute(f"SELECT COUNT(*) FROM {table} WHERE " + " AND ".join(after), params)
        return middle if int(cur.fetchone()[0]) > 0 else None
    finally:
        cur.close()


def _key_value(schema: TableSchema, key: str) -> str:
    """The key as the bounds keep it: a text key's exact bytes, any other key's text."""
    column, q = schema.column(key), quote(key)
    if column is not None and column.is_text:
        return f"CAST({q} AS VARCHAR({octets(column)}) CHARACTER SET OCTETS)"
    return f"CAST({q} AS VARCHAR(64))"


def null_keys(con: Any, schema: TableSchema, key: str) -> int:
    """Rows whose key is NULL: no key range would ever read them."""
    column = schema.column(key)
    if column is not None and column.not_null:
        return 0
    cur = con.cursor()
    try:
        cur.execute(f"SELECT COUNT(*) FROM {quote(schema.table)} WHERE {quote(key)} IS NULL")
        return int(cur.fetchone()[0])
    finally:
        cur.close()


def digest_pointers(schema: TableSchema, key: str | None) -> bool:
    """Do a table's rows get `_source_ref` digests (`row_pointers`): a text key or none."""
    column = schema.column(key) if key else None
    return column is None or column.is_text


def staged_schema(schema: TableSchema, key: str | None) -> pa.Schema:
    """A staged chunk's columns, markers included, as `row_pointers` leaves them."""
    staged = schema.arrow_schema()
    return staged.append(pa.field("_source_ref", pa.string())) if digest_pointers(
        schema, key) else staged


def row_pointers(table: pa.Table, schema: TableSchema, key: str | None,
                 secret: bytes) -> pa.Table:
    """Add `_source_ref`, each row's pointer, where `<KEY>=<value>` will not do: a text key
    may be patient data (an MRN) and a table without a key has no key at all. The pointer is
    then a keyed digest of the key (or of the whole row): stable across runs, so a row read
    again in the same state is recognized, and no value in clear. Other tables keep
    `<KEY>=<value>` (made by the transform, as for claims)."""
    if not digest_pointers(schema, key):
        return table
    column = schema.column(key) if key else None
    label = column.name if column is not None else "ROW"
    names = [column.staged_name] if column is not None else [
        c.staged_name for c in schema.columns]
    refs = [pointer(label, list(v.values()), secret) for v in table.select(names).to_pylist()]
    return table.append_column("_source_ref", pa.array(refs, pa.string()))


def pointer(label: str, values: list[Any], secret: bytes) -> str:
    """A row's digest pointer: `<KEY or ROW>#` and 20 hex digits of an HMAC of its values."""
    return f"{label}#" + hmac.new(secret, repr(values).encode(), "sha256").hexdigest()[:20]
