"""A target table follows its source's columns: made with their types, grown, never narrowed.

The first chunk creates the table with the chunk's column types as DuckDB reads them (a
DECIMAL(12,2) stays exact, a UTC timestamp is TIMESTAMP WITH TIME ZONE), or the type a
field's metadata names where DuckDB would not infer it (Firebird's INT128 travels as its
digits and is stored as HUGEINT). A later chunk with a column the table lacks adds it (the
source added a column). A column the table has and the chunk lacks (dropped at the source,
or excluded since) or holds in another type (retyped) stops the write with a SchemaChanged
naming the source, table and column: loading on would lose a column's data silently or
mix two meanings in one column.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from etl_tasks.errors import FatalError
from etl_tasks.sources.firebird_schema import DUCKDB_TYPE

BOOKKEEPING = ("_run_id", "_chunk_id", "_loaded_at")
"""The loader's own columns after the data columns."""


class SchemaChanged(FatalError):
    """The source's columns no longer fit its target table (dropped or retyped)."""


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def target_types(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> dict[str, str]:
    """Each column's DuckDB type: the field's metadata, else DuckDB's reading of Arrow's."""
    con.register("_etl_probe", schema.empty_table())
    try:
        inferred = {row[0]: str(row[1]) for row in
                    con.execute("DESCRIBE SELECT * FROM _etl_probe").fetchall()}
    finally:
        con.unregister("_etl_probe")
    types = {}
    for field in schema:
        named = (field.metadata or {}).get(DUCKDB_TYPE)
        types[field.name] = named.decode() if named else inferred[field.name]
    return types


def ensure_table(con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema,
                 source: str = "") -> list[str]:
    """Create `table` for chunks of `schema`, or evolve it; the columns added. Raises
    SchemaChanged for a dropped or retyped column (nothing is altered then)."""
    wanted = target_types(con, schema)
    existing = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
        "AND table_schema = current_schema() ORDER BY ordinal_position", [table]).fetchall()
    if not existing:
        columns = ", ".join(f"{quote(n)} {t}" for n, t in wanted.items())
        con.execute(f"CREATE TABLE {quote(table)} ({columns}, _run_id VARCHAR, "
                    "_chunk_id VARCHAR, _loaded_at TIMESTAMPTZ)")
        return list(wanted)
    have = {str(n): str(t) for n, t in existing if n not in BOOKKEEPING}
    who = f"source {source}: " if source else ""
    for name, stored in have.items():
        if name not in wanted:
            raise SchemaChanged(
                f"{who}column {name} of DuckDB table {table} is no longer in the source's rows "
                "(dropped or excluded at the source); nothing was loaded. Keep it in the "
                f"source, or move {table} aside (ALTER TABLE {table} RENAME TO ...) to start "
                "a new one", source="duckdb")
        if wanted[name] != stored:
            raise SchemaChanged(
                f"{who}column {name} of DuckDB table {table} is {stored} but the source's "
                f"rows now hold {wanted[name]} (retyped at the source); nothing was loaded. "
                f"Change the stored column (ALTER TABLE {table} ALTER {name} TYPE "
                f"{wanted[name]}) if every stored value converts, or move {table} aside",
                source="duckdb")
    added = [name for name in wanted if name not in have]
    for name in added:
        # Rows loaded before the column existed hold NULL in it.
        con.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)} {wanted[name]}")
    return added


def insert_columns(con: duckdb.DuckDBPyConnection, schema: pa.Schema,
                   alias: str = "i") -> tuple[str, str]:
    """The column list and SELECT list that insert a chunk by name (a table's columns may be
    in another order once it has grown), cast where the stored type is not Arrow's."""
    named = {f.name for f in schema if (f.metadata or {}).get(DUCKDB_TYPE)}
    types = target_types(con, schema) if named else {}
    names = ", ".join(quote(f.name) for f in schema)
    values = ", ".join(f"CAST({alias}.{quote(f.name)} AS {types[f.name]})" if f.name in named
                       else f"{alias}.{quote(f.name)}" for f in schema)
    return names, values
