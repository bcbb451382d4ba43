"""What the pipeline reads: each configured source with its kind, table or inbox, columns,
key, schedule and checkpoint (`etl sources`).

Columns are where each one comes from and what type it loads as: for a file source its
layout's field path (XML) or header name (workbook), for a Firebird table its columns as
Firebird declares them (reflected, less `exclude_columns`), or, when Firebird cannot be
reached, what the config names: the claims' columns, a generic table's key and change
columns. Nothing here reads a row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from etl_tasks import checkpoints, datasets
from etl_tasks.config import PipelineConfig, Settings, SourceConfig
from etl_tasks.datasets import DatasetSpec

Reflect = Callable[[SourceConfig], list[dict[str, str | None]]]
"""A Firebird table's columns as Firebird declares them (`reflected_columns` on a connection);
raises when it cannot tell."""


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
        if source.kind == "firebird" and spec.config is None and reflect is not None:
            try:
                listed, origin = reflect(source), "reflection"
            except Exception as exc:  # noqa: BLE001 - unreachable, missing: say so, go on
                origin = f"config (not reflected: {type(exc).__name__})"
        found.append({
            "name": source.name, "kind": source.kind, **where,
            "dataset": spec.name, "target_table": source.table,
            "columns": listed, "columns_from": origin,
            "key": list(spec.key.columns), "version": spec.key.version,
            "schedule": schedule_text(source.schedule),
            "checkpoint": None if r is None else checkpoint(r, source),
        })
    return found


def schedule_text(schedule: float | str) -> str:
    return f"every {schedule:g} s" if isinstance(schedule, float | int) else schedule


def checkpoint(r: redis.Redis, source: SourceConfig) -> dict[str, Any]:
    """Key mark and updated mark of a table; the number of files loaded of an inbox."""
    if source.kind == "firebird":
        updated = checkpoints.updated_mark(r, source.name)
        return {"key_mark": checkpoints.key_high_water(r, source.name),
                "updated_mark": updated.isoformat() if updated else None}
    return {"files_loaded": checkpoints.loaded_file_count(r, source.name)}


def reflected_columns(con: Any, source: SourceConfig) -> list[dict[str, str | None]]:
    """A Firebird source's columns read from its system tables, as a run would read them."""
    from etl_tasks.sources import firebird_schema

    schema = firebird_schema.reflect(con, source.location, source=source.name)
    schema = schema.without(source.exclude_columns, source.name)
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
