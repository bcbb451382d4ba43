"""Plain orchestration the thin Celery tasks call: plan -> extract -> transform -> load.

Dispatching the next step is injected (a callable), so these functions know nothing of Celery
and tests can drive them directly. Every step is idempotent: chunk ids are deterministic
(source + key range, or file hash + index) and the loader's ledger skips committed chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from etl_tasks import checkpoints, inbox, runs, staging
from etl_tasks.config import SourceConfig
from etl_tasks.errors import SourceFileError
from etl_tasks.load import duckdb as store
from etl_tasks.resources import Resources
from etl_tasks.sources import excel, firebird, xml_feed
from etl_tasks.transform import transform_chunk

log = logging.getLogger(__name__)

Dispatch = Callable[[str, str], None]  # (run_id, unit or chunk id)

def plan_ranges(src: SourceConfig, after: int, bounds: tuple[int, int] | None) -> list[runs.Unit]:
    """Cut the new keys (above the checkpoint) into ranges of at most chunk_size keys."""
    if bounds is None:
        return []
    lo, hi = bounds
    units = []
    for start in range(max(lo, after + 1), hi + 1, src.chunk_size):
        end = min(start + src.chunk_size - 1, hi)
        units.append(runs.Unit(f"{src.name}:keys:{start}-{end}", "range", lo=start, hi=end))
    return units


def plan_run(res: Resources, run_id: str, source: str, dispatch_extract: Dispatch,
             dispatch_finalize: Callable[[str], None]) -> list[runs.Unit]:
    """Plan the new work of a source since its checkpoint and dispatch one extract per unit."""
    src = res.pipeline.source(source)
    r = res.redis
    holder = runs.acquire_lock(r, src.name, run_id, res.settings.run_lock_ttl_s)
    if holder is not None and holder != run_id:
        runs.fail(r, run_id, f"source {src.name} already has run {holder} in progress; "
                             "this run was not started (try again when it finishes)")
        return []
    options = runs.options(r, run_id)
    skipped = 0
    if src.kind == "firebird":
        units = _plan_firebird(res, src, run_id, options)
    else:
        units, skipped = _plan_files(res, src, run_id, options)
    runs.start(r, run_id, units, skipped)
    log.info("planned run %s of %s: %d units", run_id, src.name, len(units))
    if not units:
        dispatch_finalize(run_id)
    for unit in units:
        dispatch_extract(run_id, unit.unit_id)
    return units


def _plan_firebird(res: Resources, src: SourceConfig, run_id: str,
                   options: runs.RunOptions) -> list[runs.Unit]:
    """New keys above the mark as ranges, plus rows whose UPDATED_AT moved below it."""
    r = res.redis
    after = 0 if options.full else checkpoints.key_high_water(r, src.name)
    since = options.since or (None if options.full else checkpoints.updated_since(
        r, src.name, src.lookback_s))
    with res.firebird_pool.connection() as con:
        bounds = firebird.key_bounds(con, src.location, src.key_column, after)
        updated_to = firebird.max_updated(con, src.location, src.updated_column)
        changed = (firebird.updated_bounds(con, src.location, src.key_column,
                                           src.updated_column, since, updated_to, after)
                   if since is not None and after > 0 and updated_to is not None else None)
    units = plan_ranges(src, after, bounds)
    if options.full:  # a full re-read is new work: its chunk ids must not hit the ledger
        units = [runs.Unit(f"{u.unit_id}:full-{run_id[:12]}", "range", lo=u.lo, hi=u.hi)
                 for u in units]
    if changed is not None and since is not None and updated_to is not None:
        window = f"{since:%Y%m%dT%H%M%S%f}-{updated_to:%Y%m%dT%H%M%S%f}"
        for u in plan_ranges(src, 0, changed):
            units.append(runs.Unit(f"{src.name}:updated:{window}:{u.lo}-{u.hi}", "updated",
                                   lo=u.lo, hi=u.hi, since=since.isoformat(),
                                   until=updated_to.isoformat()))
    if updated_to is not None:
        r.hset(runs.key(run_id), "plan_updated_to", updated_to.isoformat())
    return units


def _plan_files(res: Resources, src: SourceConfig, run_id: str,
                options: runs.RunOptions) -> tuple[list[runs.Unit], int]:
    """Ready inbox files not loaded before (by content), each claimed by this run only."""
    r, skipped = res.redis, 0
    folder = Path(options.path) if options.path else src.inbox(res.settings)
    settle = 0.0 if options.path else src.settle_s  # an operator's folder is taken as is
    units, seen = [], set()
    for path in inbox.ready_files(folder, src.kind, settle):
        sha = inbox.sha256_file(path)
        rows = checkpoints.loaded_file_rows(r, src.name, sha)
        if rows is not None:
            skipped += rows  # same content already loaded, under any name
            if not options.path:
                inbox.move_processed(path, sha)
        elif sha not in seen and inbox.claim(r, src.name, sha, run_id,
                                             res.settings.run_lock_ttl_s):
            seen.add(sha)
            units.append(runs.Unit(f"{src.name}:file:{sha[:16]}", "file",
                                   path=str(path.resolve()), sha256=sha))
    return units, skipped


def extract_unit(res: Resources, run_id: str, unit_id: str, dispatch_chunk: Dispatch,
                 dispatch_finalize: Callable[[str], None]) -> int:
    """Read one unit into staged raw chunks; dispatch transform+load for each. Returns rows."""
    r, ttl = res.redis, res.settings.stage_ttl_s
    src = res.pipeline.source(runs.info(r, run_id)["source"])
    unit = runs.unit(r, run_id, unit_id)
    chunks: dict[str, int] = {}
    if unit.kind in ("range", "updated"):
        with res.firebird_pool.connection() as con:
            try:
                table = firebird.fetch_range(
                    con, src.location, src.key_column, unit.lo, unit.hi,
                    updated_column=src.updated_column,
                    since=unit.since or None, until=unit.until or None)
            except Exception as exc:
                raise firebird.classify(exc) from exc
        staging.put(r, unit_id, "raw", table, ttl)
        chunks[unit_id] = table.num_rows
    else:
        reader = xml_feed if src.kind == "xml" else excel
        path = Path(unit.path)
        layout = dict(src.layout)
        if src.kind == "excel":
            # The last good copy of an upload is the same name in processed/.
            layout.setdefault("last_good_dir", path.parent / "processed")
        try:
            for index, batch in enumerate(reader.iter_batches(
                    path, batch_rows=src.chunk_size, source=src.name, **layout)):
                chunk_id = f"{unit_id}:{index}"
                staging.put(r, chunk_id, "raw", batch, ttl)
                chunks[chunk_id] = batch.num_rows
        except (SourceFileError, FileNotFoundError) as exc:
            # The file is refused whole: nothing of it is loaded, the reason is kept.
            reason = (exc.reason if isinstance(exc, SourceFileError)
                      else "the file disappeared before it was read; upload it again")
            for chunk_id in chunks:
                staging.drop(r, chunk_id)
            runs.reject_file(r, run_id, unit_id, path.name, reason)
            log.warning("run %s: file %s quarantined: %s", run_id, path.name, reason)
            dispatch_finalize(run_id)  # no load will follow; the loader checks completeness
            return 0
    # Register before dispatching, so the loader never sees a run as complete too early.
    runs.register_chunks(r, run_id, unit_id, chunks)
    if not chunks:
        dispatch_finalize(run_id)
    for chunk_id in chunks:
        dispatch_chunk(run_id, chunk_id)
    return sum(chunks.values())


def transform_staged(res: Resources, run_id: str, chunk_id: str) -> tuple[int, int]:
    """Validate a staged raw chunk into staged valid and quarantined rows."""
    r, ttl = res.redis, res.settings.stage_ttl_s
    src = res.pipeline.source(runs.info(r, run_id)["source"])
    result = transform_chunk(src.dataset, staging.get(r, chunk_id, "raw"))  # type: ignore[arg-type]
    staging.put(r, chunk_id, "valid", result.valid, ttl)
    staging.put(r, chunk_id, "quarantine", result.quarantined, ttl)
    return result.valid.num_rows, result.quarantined.num_rows


def load_staged(res: Resources, con: duckdb.DuckDBPyConnection, run_id: str,
                chunk_id: str) -> store.WriteResult:
    """Commit a transformed chunk (or skip it if the ledger has it), then advance state."""
    r = res.redis
    src = res.pipeline.source(runs.info(r, run_id)["source"])
    if store.ledger_rows(con, [chunk_id]):
        result = store.WriteResult(0, 0, already_loaded=True)
    else:
        result = store.write_chunk(
            con, source=src.name, table=src.table, dataset=src.dataset, run_id=run_id,
            chunk_id=chunk_id, valid=staging.get(r, chunk_id, "valid"),
            quarantined=staging.get(r, chunk_id, "quarantine"))
    # Only after the commit: progress, staged payload cleanup, checkpoint.
    runs.mark_done(r, run_id, chunk_id, result.loaded, result.quarantined)
    staging.drop(r, chunk_id)
    if src.kind == "firebird":
        checkpoints.advance_key(r, src.name, runs.units(r, run_id), runs.done_chunks(r, run_id))
    if runs.is_complete(r, run_id):
        finalize_run(res, con, run_id)
    return result


def finalize_run(res: Resources, con: duckdb.DuckDBPyConnection, run_id: str) -> runs.Summary:
    """Summarize a complete run from the ledger, record metrics, release the source."""
    r = res.redis
    data = runs.info(r, run_id)
    src = res.pipeline.source(data["source"])
    chunk_rows = runs.chunk_rows(r, run_id)
    ledger = store.ledger_rows(con, list(chunk_rows))
    mine = [v for v in ledger.values() if v[0] == run_id]
    loaded = sum(v[1] for v in mine)
    quarantined = sum(v[2] for v in mine)
    # Skipped: rows of chunks an earlier run committed, rows the store already had in the
    # same version (a re-read), and files already loaded.
    skipped = sum(v[1] + v[2] + v[3] for v in ledger.values() if v[0] != run_id)
    skipped += sum(v[3] for v in mine)
    skipped += int(data.get("plan_skipped", 0))
    started = float(data.get("started_at") or data.get("created_at") or time.time())
    finished = time.time()
    file_units = [u for u in runs.units(r, run_id) if u.kind == "file"]
    refused = runs.rejected(r, run_id)
    files = _file_results(file_units, refused, ledger)
    summary = runs.Summary(
        source=src.name, run_id=run_id, status="finished", extracted=sum(chunk_rows.values()),
        loaded=loaded, quarantined=quarantined, skipped=skipped,
        duration_s=round(finished - float(data.get("created_at", started)), 3),
        quality_score=round(loaded / (loaded + quarantined), 4) if loaded + quarantined else None,
        files=files)
    store.record_run(con, summary.public(), started, finished)
    move = not runs.options(r, run_id).path  # files given with --path are left in place
    for unit in file_units:
        if unit.unit_id in refused:
            if move:
                inbox.move_quarantined(Path(unit.path), unit.sha256,
                                       refused[unit.unit_id]["reason"])
        else:
            rows = sum(n for cid, n in chunk_rows.items() if cid.startswith(unit.unit_id + ":"))
            checkpoints.mark_file_loaded(r, src.name, unit.sha256, rows)
            if move:
                inbox.move_processed(Path(unit.path), unit.sha256)
        inbox.release(r, src.name, unit.sha256)
    if data.get("plan_updated_to"):
        checkpoints.advance_updated(r, src.name, data["plan_updated_to"])
    runs.finish(r, run_id, summary)
    runs.release_lock(r, src.name, run_id)
    log.info("run %s of %s finished: %d loaded, %d quarantined, %d skipped", run_id,
             src.name, loaded, quarantined, skipped)
    return summary


def _file_results(file_units: list[runs.Unit], rejected: dict[str, dict[str, str]],
                  ledger: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for unit in file_units:
        if unit.unit_id in rejected:
            results.append({"unit_id": unit.unit_id, "name": rejected[unit.unit_id]["name"],
                            "status": "quarantined", "rows_loaded": 0, "rows_quarantined": 0,
                            "reason": rejected[unit.unit_id]["reason"]})
            continue
        entries = [v for cid, v in ledger.items() if cid.startswith(unit.unit_id + ":")]
        results.append({"unit_id": unit.unit_id, "name": Path(unit.path).name,
                        "status": "loaded", "rows_loaded": sum(v[1] for v in entries),
                        "rows_quarantined": sum(v[2] for v in entries), "reason": None})
    return results
