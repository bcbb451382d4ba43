"""Plan a run: take the source's lease, cut the new work since its checkpoint into units.

Firebird: key ranges above the key mark, plus the rows below it whose UPDATED_AT moved since
the updated mark (minus a look-back). Files: inbox files not loaded before (by content hash),
each claimed by this run only. Open dead letters of the source are planned again with one
attempt (the cause may have been fixed); `etl retry` plans exactly one dead letter's work.
A plan is recorded once: a redelivered or re-sent plan finds it recorded and does nothing.
A source whose circuit breaker is open is not planned: the run is skipped with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from etl_tasks import checkpoints, inbox
from etl_tasks.config import SourceConfig
from etl_tasks.errors import CircuitOpen, FatalError
from etl_tasks.monitoring.alerts import alert
from etl_tasks.resources import Resources
from etl_tasks.runs import breakers, dead_letters, lease, state, window
from etl_tasks.runs.state import Unit
from etl_tasks.sources import firebird

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
    skipped, updated_to = 0, None
    try:
        if options.retry:
            units = [_retry_unit(src, options.retry, open_letters)]
        elif src.kind == "firebird":
            with breakers.for_source(res, src.name).guard():
                units, updated_to = _plan_firebird(res, src, options)
        else:
            with breakers.for_source(res, src.name).guard():
                units, skipped = _plan_files(res, src, run_id, options)
    except CircuitOpen as exc:
        _skip(res, run_id, src.name, exc.reason)
        return []
    units = [_one_attempt_if_dead(u, open_letters) for u in units]
    if not state.record_plan(r, run_id, units, skipped, updated_to):
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
                since=str(entry["since"] or ""), until=str(entry["until"] or ""))


def _plan_firebird(res: Resources, src: SourceConfig,
                   options: state.RunOptions) -> tuple[list[Unit], str | None]:
    """New keys above the mark as ranges, plus rows whose UPDATED_AT moved below it."""
    r = res.redis
    after = 0 if options.full else checkpoints.key_high_water(r, src.name)
    since = None if options.full else checkpoints.updated_since(r, src.name, src.lookback_s)
    if options.since is not None:
        since = min(since, options.since) if since else options.since  # never narrower
    if since is None and after > 0:
        since = BEGINNING  # a key mark without an updated mark: check every row below it
    with res.firebird_pool.connection() as con:
        try:
            bounds = firebird.key_bounds(con, src.location, src.key_column, after)
            updated_to = firebird.max_updated(con, src.location, src.updated_column)
            changed = (firebird.updated_bounds(con, src.location, src.key_column,
                                               src.updated_column, since, updated_to, after)
                       if since is not None and after > 0 and updated_to is not None else None)
        except Exception as exc:
            raise firebird.classify(exc, f"table {src.location}") from exc
    units = plan_ranges(src, after, bounds)
    if changed is not None and since is not None and updated_to is not None:
        for u in plan_ranges(src, 0, changed, kind="updated"):
            units.append(replace(u, kind="updated", since=since.isoformat(),
                                 until=updated_to.isoformat()))
    return units, updated_to.isoformat() if updated_to is not None else None


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
