"""Plan a run: take the source's lease, cut the new work since its checkpoint into units.

Firebird: the table's columns reflected (recorded with the run, so every range reads the
same ones), key ranges above the key mark (integer keys by arithmetic, any other key at
boundaries sampled from the table), plus the rows below it whose change column moved since
the updated mark (minus a look-back); a table without a key is one unit, read whole.
Files: inbox files not loaded before (by content hash), each claimed by this run only.
Open dead letters of the source are planned again with one attempt (the cause may have been
fixed); `etl retry` plans exactly one dead letter's work.
A plan is recorded once: a redelivered or re-sent plan finds it recorded and does nothing.
A source whose circuit breaker is open is not planned: the run is skipped with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from etl_tasks import checkpoints, datasets, inbox
from etl_tasks.config import SourceConfig
from etl_tasks.datasets import DatasetSpec
from etl_tasks.errors import CircuitOpen, FatalError
from etl_tasks.monitoring.alerts import alert
from etl_tasks.resources import Resources
from etl_tasks.runs import bounds, breakers, dead_letters, lease, state, window
from etl_tasks.runs.state import Unit
from etl_tasks.sealing import Sealer
from etl_tasks.sources import firebird, firebird_keys, firebird_schema, firebird_text
from etl_tasks.sources.firebird_schema import TableSchema

log = logging.getLogger(__name__)

# Rows below the key mark when no updated mark is known (rebuilt from an old ledger).
BEGINNING = datetime(1900, 1, 1)


def plan_ranges(src: SourceConfig, after: int, bounds: tuple[int, int] | None,
                kind: str = "keys") -> list[Unit]:
    """Cut the keys above `after` up to the largest into ranges of `chunk_size` keys.

    The first range starts right after the mark (not at the smallest key found), so that
    committed ranges are contiguous and the mark can be rebuilt from the ledger alone.
    """
    if bounds is None:
        return []
    lo, hi = bounds
    units, start = [], max(lo, after + 1)
    first = after + 1 if kind == "keys" else start
    for begin in range(start, hi + 1, src.chunk_size):
        end = min(begin + src.chunk_size - 1, hi)
        low = first if begin == start else begin
        units.append(Unit(f"{src.name}:{kind}:{low}-{end}", "range", lo=low, hi=end))
    return units


def plan_run(res: Resources, run_id: str, source: str,
             dispatch_extract: Callable[[str, str], None],
             dispatch_finalize: Callable[[str], None]) -> list[Unit]:
    """Plan the run (once) and dispatch the extracts its window admits; [] when there was
    nothing to do here (already planned, the source busy or its circuit open)."""
    src = res.pipeline.source(source)
    r = res.redis
    if state.is_planned(r, run_id):
        return []  # a redelivered plan: the supervisor watches the recorded one
    state.begin_planning(r, run_id)
    holder = lease.acquire(r, src.name, run_id, res.settings.run_lease_s)
    if holder is not None:
        state.fail(r, run_id, f"source {src.name} already has run {holder} in progress; "
                              "this run was not started (try again when it finishes)",
                   record=False)
        return []
    options = state.options(r, run_id)
    open_letters = dead_letters.open_letters(r, src.name)
    skipped, updated_to, schema = 0, None, None
    try:
        if options.retry:
            units = [_retry_unit(src, options.retry, open_letters)]
        elif src.kind == "firebird":
            with breakers.for_source(res, src.name).guard():
                units, updated_to, schema = _plan_firebird(res, src, options)
        else:
            with breakers.for_source(res, src.name).guard():
                units, skipped = _plan_files(res, src, run_id, options)
    except CircuitOpen as exc:
        _skip(res, run_id, src.name, exc.reason)
        return []
    units = [_one_attempt_if_dead(u, open_letters) for u in units]
    if not state.record_plan(r, run_id, units, skipped, updated_to,
                             schema.to_json() if schema else None):
        return []
    log.info("planned run %s of %s: %d units", run_id, src.name, len(units))
    if not units:
        dispatch_finalize(run_id)
    # The first `stage_window` units; each commit admits the next (runs/window.py).
    for unit_id in window.release(r, run_id, res.settings.stage_window):
        dispatch_extract(run_id, unit_id)
    return units


def _skip(res: Resources, run_id: str, source: str, reason: str) -> None:
    """The source's circuit is open: the run fails at once with why, frees the source, and
    leaves the work to the next run (the checkpoints did not move)."""
    reason = f"{reason}; the next run catches up from the checkpoint"
    state.fail(res.redis, run_id, reason)
    lease.release(res.redis, source, run_id)
    alert("warning", f"run {run_id} of {source} skipped: {reason}")


def _one_attempt_if_dead(unit: Unit, open_letters: list[dict[str, object]]) -> Unit:
    if any(dead_letters.overlaps(e, unit) for e in open_letters):
        return replace(unit, max_attempts=1)
    return unit


def _retry_unit(src: SourceConfig, dead_letter_id: str,
                open_letters: list[dict[str, object]]) -> Unit:
    entry = next((e for e in open_letters if e["dead_letter_id"] == dead_letter_id), None)
    if entry is None:
        raise FatalError(f"no open dead letter {dead_letter_id}; list them with "
                         "`etl dead-letters`", source=src.name)
    # A unit id of its own: the work is the dead letter's, the attempts start afresh.
    return Unit(f"{entry['unit_id']}:retry", entry["kind"],  # type: ignore[arg-type]
                lo=int(entry["key_lo"] or 0), hi=int(entry["key_hi"] or 0),  # type: ignore[call-overload]
                path=str(entry["path"] or ""), sha256=str(entry["sha256"] or ""),
                since=str(entry["since"] or ""), until=str(entry["until"] or ""),
                sampled=bool(entry.get("sampled")), text_lo=str(entry.get("text_lo") or ""),
                text_hi=str(entry.get("text_hi") or ""))


def _plan_firebird(res: Resources, src: SourceConfig, options: state.RunOptions
                   ) -> tuple[list[Unit], str | None, TableSchema]:
    """The table's columns as they are now, and its work: new keys above the mark as
    ranges, plus rows whose change column moved below it; a table without a key whole."""
    with res.firebird_pool.connection() as con:
        try:
            schema = table_schema(con, src)
            key = schema.column(src.key_column) if src.key_column else None
            if key is None:
                return [Unit(f"{src.name}:table", "table")], None, schema
            if key.is_integer_key:
                units, updated_to = _integer_ranges(res, con, src, schema, options)
            else:
                units, updated_to = _sampled_ranges(res, con, src, schema, options)
        except Exception as exc:
            raise firebird.classify(exc, f"table {src.location}") from exc
    return units, updated_to, schema


def reflected(con: Any, src: SourceConfig) -> TableSchema:
    """The source's table reflected, less its excluded columns, read in its character set;
    a FatalError naming the source, table and column that cannot be read."""
    schema = firebird_schema.reflect(con, src.location, source=src.name)
    schema = replace(schema.without(src.exclude_columns, src.name), charset=src.charset)
    schema.readable(src.name)
    firebird_text.codec(schema.text_charset)  # an unknown character set stops the plan
    return schema


def table_schema(con: Any, src: SourceConfig) -> TableSchema:
    """`reflected`, checked for a run: a FatalError naming the source, table and column for
    a key or change column that is not there, a clash of names, or keys that are NULL."""
    schema = reflected(con, src)
    where = f"source {src.name}: "
    for role, name in (("key_column", src.key_column), ("updated_column", src.updated_column)):
        if name and schema.column(name) is None:
            raise FatalError(f"{where}{role} {name} is not a column of table {schema.table}",
                             source=src.name)
    staged = [c.staged_name for c in schema.columns]
    for name in staged:
        if name == "source_ref" or staged.count(name) > 1:
            raise FatalError(f"{where}column {name} of table {schema.table} clashes with "
                             "another column or the store's source_ref; leave it out with "
                             "`exclude_columns`", source=src.name)
    if src.key_column and (empty := firebird_keys.null_keys(con, schema, src.key_column)):
        raise FatalError(f"{where}{empty} row(s) of table {schema.table} have no "
                         f"{src.key_column}: no key range would read them (choose a key "
                         "column set in every row)", source=src.name)
    return schema


def replay_spec(res: Resources, src: SourceConfig) -> DatasetSpec:
    """The dataset spec the quarantine replay reads `src`'s held rows back with: a generic
    table's carries the types of its columns as Firebird declares them now (reflected again
    through the pool: the run's record may be gone, and rows held before a column was added
    read back with it null, as the target table holds it); any other source's is its
    configured one. A FatalError or TransientError says why it cannot be had."""
    spec = datasets.spec_for(res.pipeline, src)
    if not spec.generic:
        return spec
    try:
        with res.firebird_pool.connection() as con:
            schema = reflected(con, src)
    except Exception as exc:
        raise firebird.classify(exc, f"table {src.location}") from exc
    staged = firebird_keys.staged_schema(schema, src.key_column or None)
    return replace(spec, generic_schema=staged)


def _integer_ranges(res: Resources, con: Any, src: SourceConfig, schema: TableSchema,
                    options: state.RunOptions) -> tuple[list[Unit], str | None]:
    """New keys above the mark as ranges, plus rows whose change column moved below it."""
    r = res.redis
    key = firebird_text.quote(_name(schema, src.key_column))
    after = 0 if options.full else checkpoints.key_high_water(r, src.name)
    since = _since(res, src, options, bool(after))
    bounds = firebird.key_bounds(con, schema.table, key, after)
    updated_to = changed = None
    if src.updated_column:
        changed_column = firebird_text.quote(_name(schema, src.updated_column))
        updated_to = firebird.max_updated(con, schema.table, changed_column)
        if since is not None and after > 0 and updated_to is not None:
            changed = firebird.updated_bounds(con, schema.table, key, changed_column, since,
                                              updated_to, after)
    units = plan_ranges(src, after, bounds)
    if changed is not None and since is not None and updated_to is not None:
        for u in plan_ranges(src, 0, changed, kind="updated"):
            units.append(replace(u, kind="updated", since=since.isoformat(),
                                 until=updated_to.isoformat()))
    return units, updated_to.isoformat() if updated_to is not None else None


def _sampled_ranges(res: Resources, con: Any, src: SourceConfig, schema: TableSchema,
                    options: state.RunOptions) -> tuple[list[Unit], str | None]:
    """As _integer_ranges for a key that is not an integer: the ranges end at every
    `chunk_size`-th key above the mark (sampled from the table in key order), so they still
    extract in parallel; the bounds are sealed (the keys may be patient data)."""
    r, key = res.redis, _name(schema, src.key_column)
    mark = "" if options.full else checkpoints.sampled_high_water(r, src.name)
    after = bounds.open_bound(res.sealer, src.name, mark)
    since = _since(res, src, options, bool(mark))
    found = firebird_keys.sample_bounds(con, schema, key, after, src.chunk_size)
    units = _cut(res.sealer, src, "skeys", "range", mark, found)
    if not src.updated_column:
        return units, None
    changed = firebird_text.quote(_name(schema, src.updated_column))
    updated_to = firebird.max_updated(con, schema.table, changed)
    if since is not None and after is not None and updated_to is not None:
        below, params = firebird.range_condition(schema, key, None, after)
        window = f"{changed} > ? AND {changed} <= ? AND " + " AND ".join(below)
        found = firebird_keys.sample_bounds(con, schema, key, None, src.chunk_size, window,
                                       (since, updated_to, *params))
        units += [replace(u, since=since.isoformat(), until=updated_to.isoformat())
                  for u in _cut(res.sealer, src, "supdated", "updated", "", found)]
    return units, updated_to.isoformat() if updated_to is not None else None


def middle_token(res: Resources, run_id: str, unit: Unit, floor: int) -> str | None:
    """The sealed boundary that cuts a sampled range in halves (`split.halves`), from the
    table in the run's recorded columns; None when it cannot be cut (`floor` rows or fewer,
    no key inside it, the run's record gone, Firebird not answering: it is then retried or
    dead-lettered as any failure)."""
    info = state.info(res.redis, run_id)
    recorded, name = info.get("table_schema"), info.get("source")
    try:
        src = res.pipeline.source(str(name))
        if not recorded or not src.key_column:
            return None
        schema = TableSchema.from_json(recorded)
        lo, hi = (bounds.open_bound(res.sealer, src.name, t) for t in (unit.text_lo,
                                                                        unit.text_hi))
        with res.firebird_pool.connection() as con:
            found = firebird_keys.middle_bound(con, schema, _name(schema, src.key_column),
                                               lo, hi, floor)
    except Exception as exc:  # noqa: BLE001 - not cut now; the failure takes its course
        log.warning("run %s: %s could not be cut in halves (%s)", run_id, unit.unit_id,
                    firebird.classify(exc, f"range {unit.unit_id}"))
        return None
    return bounds.seal(res.sealer, src.name, found) if found is not None else None


def _cut(sealer: Sealer, src: SourceConfig, label: str, kind: str, start: str,
         found: list[bytes]) -> list[Unit]:
    """Sampled ranges: (start, b1], (b1, b2], ... each boundary sealed once, so the range it
    ends and the range it starts hold the same token (checkpoints walk them by equality)."""
    tokens = [bounds.seal(sealer, src.name, b) for b in found]
    ends = [start, *tokens]
    return [Unit(f"{src.name}:{label}:{n}", kind, sampled=True,  # type: ignore[arg-type]
                 text_lo=ends[n - 1], text_hi=ends[n]) for n in range(1, len(ends))]


def _since(res: Resources, src: SourceConfig, options: state.RunOptions,
           has_mark: bool) -> datetime | None:
    """Where the run's window of changed rows starts (None: no window)."""
    since = None if options.full else checkpoints.updated_since(res.redis, src.name,
                                                                src.lookback_s)
    if options.since is not None:
        since = min(since, options.since) if since else options.since  # never narrower
    if since is None and has_mark:
        since = BEGINNING  # a key mark without an updated mark: check every row below it
    return since


def _name(schema: TableSchema, name: str) -> str:
    """A configured column name as the table spells it (checked by table_schema)."""
    column = schema.column(name)
    assert column is not None
    return column.name


def _plan_files(res: Resources, src: SourceConfig, run_id: str,
                options: state.RunOptions) -> tuple[list[Unit], int]:
    """Ready inbox files not loaded before (by content), each claimed by this run only."""
    r, skipped = res.redis, 0
    folder = Path(options.path) if options.path else src.inbox(res.settings)
    settle = 0.0 if options.path else src.settle_s  # an operator's folder is taken as is
    units, seen = [], set()
    for path in inbox.ready_files(folder, src.kind, settle):
        try:
            sha = inbox.sha256_file(path)
        except FileNotFoundError:
            continue  # moved away since the listing; a later run sees where it went
        rows = checkpoints.loaded_file_rows(r, src.name, sha)
        if rows is not None:
            skipped += rows  # same content already loaded, under any name
            if not options.path:
                inbox.move_processed(path, sha)
        elif sha not in seen and inbox.claim(r, src.name, sha, run_id,
                                             res.settings.run_lease_s):
            seen.add(sha)
            units.append(Unit(f"{src.name}:file:{sha[:16]}", "file",
                              path=str(path.resolve()), sha256=sha))
    return units, skipped
