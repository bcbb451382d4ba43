"""What the pipeline reads: each configured source with its kind, table or inbox, columns,
key, schedule and checkpoint (`etl sources`).

Columns are where each one comes from and what type it loads as: for a file source its
layout's field path (XML) or header name (workbook), for a Firebird table its columns as
Firebird declares them (reflected, less `exclude_columns`), or, when Firebird cannot be
reached, what the config names: the claims' columns, a generic table's key and change
columns. Nothing here reads a row.

A table's checkpoint names its key mark's kind: an integer key's mark is the number every
committed key is at or below; a key cut at sampled boundaries (text such as a visit id, an
MRN) has a sealed mark that is never shown (it is a key value), only that it is there and
when it last moved; a table without a key has none (it is read whole each run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import redis

from etl_tasks import checkpoints, datasets
from etl_tasks.config import PipelineConfig, Settings, SourceConfig
from etl_tasks.datasets import DatasetSpec
from etl_tasks.sources.firebird_schema import TableSchema

Reflect = Callable[[SourceConfig], TableSchema]
"""A Firebird table's columns as Firebird declares them (`reflected_schema` on a connection);
raises when it cannot tell."""
KeyKind = Literal["integer", "sampled", "none"]


def describe(pipeline: PipelineConfig, settings: Settings, r: redis.Redis | None,
             reflect: Reflect | None = None) -> list[dict[str, Any]]:
    """One entry per source, in config order; `r` None: checkpoints are not read (null);
    `reflect` None or failing: a Firebird table's columns are what the config names."""
    found = []
    for source in pipeline.sources:
        spec = datasets.spec_for(pipeline, source)
        where = ({"table": source.location} if source.kind == "firebird"
                 else {"inbox": str(source.inbox(settings))})
        listed, origin = columns(source, spec), "config"
        kind = key_kind(source, None)
        if source.kind == "firebird" and spec.config is None and reflect is not None:
            try:
                schema = reflect(source)
            except Exception as exc:  # noqa: BLE001 - unreachable, missing: say so, go on
                origin = f"config (not reflected: {type(exc).__name__})"
            else:
                listed, origin = _listed(schema), "reflection"
                kind = key_kind(source, schema)
        found.append({
            "name": source.name, "kind": source.kind, **where,
            "dataset": spec.name, "target_table": source.table,
            "columns": listed, "columns_from": origin,
            "key": list(spec.key.columns), "version": spec.key.version,
            "schedule": schedule_text(source.schedule),
            "checkpoint": None if r is None else checkpoint(r, source, kind),
        })
    return found


def schedule_text(schedule: float | str) -> str:
    return f"every {schedule:g} s" if isinstance(schedule, float | int) else schedule


def key_kind(source: SourceConfig, schema: TableSchema | None) -> KeyKind | None:
    """How a table's work is cut: by integer keys, at sampled boundaries, or not at all
    (no key column); None when it depends on the key's type and Firebird was not asked."""
    if source.kind != "firebird":
        return None
    if not source.key_column:
        return "none"
    column = schema.column(source.key_column) if schema is not None else None
    if column is None:
        return None
    return "integer" if column.is_integer_key else "sampled"


def checkpoint(r: redis.Redis, source: SourceConfig,
               kind: KeyKind | None = None) -> dict[str, Any]:
    """A table's key mark (its kind, and the number only for an integer key: a sampled mark
    is a sealed key value), when it last moved, and the updated mark; the number of files
    loaded of an inbox. `kind` None: what Redis holds tells (a sampled mark, or an integer
    one above 0), else null."""
    if source.kind != "firebird":
        return {"files_loaded": checkpoints.loaded_file_count(r, source.name)}
    updated = checkpoints.updated_mark(r, source.name)
    advanced = checkpoints.key_advanced_at(r, source.name)
    number = checkpoints.key_high_water(r, source.name)
    if checkpoints.sampled_high_water(r, source.name):
        kind = "sampled"  # committed ranges say so, whatever Firebird answers now
    elif kind is None and number:
        kind = "integer"
    return {"key_mark": number if kind == "integer" else None,
            "key_mark_kind": kind,
            "key_advanced_at": advanced.isoformat() if advanced else None,
            "updated_mark": updated.isoformat() if updated else None}


def checkpoint_text(mark: dict[str, Any] | None) -> str:
    """A checkpoint for the table of `etl sources`: no key value in it."""
    if mark is None:
        return "-"
    if "files_loaded" in mark:
        return f"{mark['files_loaded']:,} files loaded"
    kind = mark["key_mark_kind"]
    parts = [{"integer": f"key <= {mark['key_mark']}", "sampled": "key sampled (sealed)",
              "none": "whole table each run"}.get(kind, "key -")]
    if mark["key_advanced_at"]:
        parts.append(f"moved {mark['key_advanced_at']}")
    parts.append(f"updated <= {mark['updated_mark'] or '-'}")
    return ", ".join(parts)


def reflected_schema(con: Any, source: SourceConfig) -> TableSchema:
    """A Firebird source's columns read from its system tables, as a run would read them."""
    from etl_tasks.sources import firebird_schema

    schema = firebird_schema.reflect(con, source.location, source=source.name)
    return schema.without(source.exclude_columns, source.name)


def _listed(schema: TableSchema) -> list[dict[str, str | None]]:
    return [{"name": c.staged_name, "from": c.name, "type": c.declared}
            for c in schema.columns]


def columns(source: SourceConfig, spec: DatasetSpec) -> list[dict[str, str | None]]:
    """Each column: its name, where it is read from, the type it loads as."""
    if spec.config is not None:
        types = dict(spec.config.columns)
        origins = _origins(source, spec.columns)
    elif spec.builtin:
        from etl_tasks.transform import OUTPUT_SCHEMAS

        schema = OUTPUT_SCHEMAS[spec.name]
        types = {f.name: str(f.type) for f in schema if f.name != "source_ref"}
        origins = _origins(source, tuple(types))
    else:  # generic: the columns are reflected at plan time; the config names two
        named = [source.key_column, source.updated_column]
        return [{"name": name.lower(), "from": name, "type": None} for name in named if name]
    return [{"name": name, "from": origins.get(name), "type": types[name]} for name in types]


def _origins(source: SourceConfig, names: tuple[str, ...]) -> dict[str, str]:
    """Column -> field path (XML), header name (workbook) or Firebird column."""
    from etl_tasks.sources import excel, xml_feed

    if source.kind == "xml":
        default = (xml_feed.DEFAULT_FIELDS if names == xml_feed.COLUMNS
                   else {name: name for name in names})
        return dict(source.layout.get("fields") or default)
    if source.kind == "excel":
        if names == excel.COLUMNS and "headers" not in source.layout:
            return {column: header for header, column in excel.CANONICAL.items()}
        return {name: name for name in names} | dict(source.layout.get("headers") or {})
    return {name: name.upper() for name in names}
