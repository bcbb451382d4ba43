"""Finalize a run whose every unit and chunk is settled: the summary from the ledger, dead
letters kept durably, files moved, checkpoints advanced, the lease released.

Runs on the loader (the only DuckDB writer), after the load that completes a run or when the
supervisor finds a complete run not yet finalized. Idempotent: a finalized run is left alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from etl_tasks import checkpoints, inbox
from etl_tasks.load import duckdb as store
from etl_tasks.load.writer import StoreChain
from etl_tasks.monitoring import health
from etl_tasks.resources import Resources
from etl_tasks.runs import dead_letters, lease, state
from etl_tasks.runs.state import RunStatus, Summary, Unit

log = logging.getLogger(__name__)


def finalize_run(res: Resources, chain: StoreChain, run_id: str) -> Summary | None:
    """Summarize and close a complete run; None when it is not complete (or already closed)."""
    r = res.redis
    if not state.is_complete(r, run_id):
        return None
    data = state.info(r, run_id)
    src = res.pipeline.source(data["source"])
    units = state.units(r, run_id)
    chunk_rows = state.chunk_rows(r, run_id)
    chunk_units = state.chunk_units(r, run_id)
    # Counts of every committed chunk, whichever store holds it (DuckDB or a fallback).
    ledger = {c: v[:3] for c, v in state.ledger(r, run_id).items()}
    dead = dead_letters.of_run(r, run_id)
    dead_unit_ids = {e["unit_id"] for e in dead}
    refused, recovered = state.rejected(r, run_id), state.recovered(r, run_id)
    loaded, quarantined, unchanged = _totals(ledger)
    # Skipped: rows the store already had in the same version (a re-read), files already
    # loaded under another name.
    skipped = unchanged + int(data.get("plan_skipped", 0))
    dead_rows = sum(n for c, n in chunk_rows.items()
                    if c not in ledger and chunk_units.get(c) in dead_unit_ids)
    started = float(data.get("started_at") or data.get("created_at") or time.time())
    finished = time.time()
    # Partial: some work dead, the rest loaded. Nothing but dead work is a failed run.
    status: RunStatus = "finished" if not dead else (
        "failed" if units and dead_unit_ids >= {u.unit_id for u in units} else "partial")
    summary = Summary(
        source=src.name, run_id=run_id, status=status,
        extracted=sum(chunk_rows.values()), loaded=loaded, quarantined=quarantined,
        skipped=skipped, dead_lettered=dead_rows,
        duration_s=round(finished - float(data.get("created_at", started)), 3),
        quality_score=_quality(loaded, quarantined),
        files=_file_results(units, refused, recovered, dead_unit_ids, ledger, chunk_units),
        dead_letters=[{k: e[k] for k in ("dead_letter_id", "stage", "item", "pointer",
                                         "reason", "attempts")} for e in dead],
        error=(f"{len(dead)} piece(s) of work dead-lettered after repeated failures; see "
               "`etl dead-letters`" if dead else None),
        metrics=state.metrics(r, run_id))
    chain.record("dead_letters", {"entries": dead},
                 lambda con: store.record_dead_letters(con, dead))
    _resolve_dead_letters(res, chain, run_id, src.name, units, dead_unit_ids, data)
    key_mark = checkpoints.key_high_water(r, src.name) if src.kind == "firebird" else None
    updated = checkpoints.updated_mark(r, src.name)
    _record(chain, summary, started, finished, key_mark, updated)
    _settle_files(res, run_id, src.name, units, refused, recovered, dead_unit_ids, chunk_rows,
                  chunk_units)
    state.finish(r, run_id, summary)
    lease.release(r, src.name, run_id)
    if status != "failed":
        health.note_commit(r, src.name, finished)
    health.check_run(r, res.pipeline, summary.public())
    log.info("run %s of %s %s: %d loaded, %d quarantined, %d skipped, %d dead letters",
             run_id, src.name, summary.status, loaded, quarantined, skipped, len(dead))
    return summary


def record_failed(res: Resources, chain: StoreChain, run_id: str) -> Summary | None:
    """Write the metrics row of a run that failed before it could finish (its plan failed,
    or its source's circuit was open) and alert; None when there is nothing to record."""
    r = res.redis
    if state.status(r, run_id) != "failed" or run_id not in state.unrecorded(r):
        return None
    data = state.info(r, run_id)
    ledger = state.ledger(r, run_id)
    created = float(data.get("created_at") or time.time())
    finished = float(data.get("finished_at") or time.time())
    loaded, quarantined, unchanged = _totals(ledger)
    summary = Summary(
        source=data["source"], run_id=run_id, status="failed",
        extracted=sum(state.chunk_rows(r, run_id).values()), loaded=loaded,
        quarantined=quarantined, skipped=unchanged,
        duration_s=round(finished - created, 3),
        quality_score=_quality(loaded, quarantined),
        error=data.get("error"), metrics=state.metrics(r, run_id))
    _record(chain, summary, float(data.get("started_at") or created), finished, None, None)
    r.srem(state.UNRECORDED, run_id)
    health.check_run(r, res.pipeline, summary.public())
    return summary


def _totals(ledger: dict[str, Any]) -> tuple[int, int, int]:
    """Rows loaded, quarantined and unchanged over a run's committed chunks."""
    return (sum(v[0] for v in ledger.values()), sum(v[1] for v in ledger.values()),
            sum(v[2] for v in ledger.values()))


def _quality(loaded: int, quarantined: int) -> float | None:
    return round(loaded / (loaded + quarantined), 4) if loaded + quarantined else None


def _record(chain: StoreChain, summary: Summary, started: float, finished: float,
            key_mark: int | None, updated: Any) -> None:
    """The run's metrics row, in DuckDB or a fallback (replayed into DuckDB later)."""
    row = {"summary": summary.public(), "started_at": started, "finished_at": finished,
           "key_mark": key_mark, "updated_mark": updated, "metrics": summary.metrics}
    chain.record("run", row, lambda con: store.record_run(
        con, summary.public(), started, finished, key_mark, updated, summary.metrics))


def _resolve_dead_letters(res: Resources, chain: StoreChain, run_id: str,
                          source: str, units: list[Unit], dead_unit_ids: set[str],
                          data: dict[str, str]) -> None:
    """Open dead letters whose work this run has now done, and the updated mark."""
    r = res.redis
    clean = [u for u in units if u.unit_id not in dead_unit_ids]
    updates_done = not any(u.kind == "updated" for u in units if u.unit_id in dead_unit_ids)
    # Sampled ranges start at the key mark, which never passes a dead range: a run whose
    # sampled ranges all committed has read again every key a dead one held.
    sampled = [u for u in units if u.kind == "range" and u.sampled]
    sampled_done = bool(sampled) and all(u in clean for u in sampled)
    done = []
    for entry in dead_letters.open_letters(r, source):
        if entry["run_id"] == run_id:
            continue
        if (any(dead_letters.covers(entry, u) for u in clean)
                or (entry.get("sampled") and entry["kind"] == "range" and sampled_done)
                or (entry["kind"] == "updated" and updates_done and data.get("plan_updated_to"))
                or (state.options(r, run_id).retry == entry["dead_letter_id"] and not
                dead_unit_ids)):
            done.append(entry["dead_letter_id"])
    if done:
        chain.record("resolve", {"ids": done, "run_id": run_id},
                     lambda con: store.resolve_dead_letters(con, done, run_id))
    dead_letters.resolve(r, source, done)
    if updates_done and data.get("plan_updated_to"):
        checkpoints.advance_updated(r, source, data["plan_updated_to"])


def _settle_files(res: Resources, run_id: str, source: str, units: list[Unit],
                  refused: dict[str, dict[str, str]], recovered: dict[str, str],
                  dead_unit_ids: set[str], chunk_rows: dict[str, int],
                  chunk_units: dict[str, str]) -> None:
    """Move loaded files to processed/, refused and recovered ones to quarantine/; a file
    with dead work stays in the inbox for the next run."""
    r = res.redis
    move = not state.options(r, run_id).path  # files given with --path are left in place
    for unit in (u for u in units if u.kind == "file"):
        path = Path(unit.path)
        if unit.unit_id in refused:
            if move:
                inbox.move_quarantined(path, unit.sha256, refused[unit.unit_id]["reason"])
        elif unit.unit_id in recovered:
            if move:  # the corrupt upload is kept for the operator, with why
                inbox.move_quarantined(path, unit.sha256, recovered[unit.unit_id])
        elif unit.unit_id not in dead_unit_ids:
            rows = sum(n for c, n in chunk_rows.items() if chunk_units.get(c) == unit.unit_id)
            checkpoints.mark_file_loaded(r, source, unit.sha256, rows)
            if move:
                inbox.move_processed(path, unit.sha256)
        inbox.release(r, source, unit.sha256)


def _file_results(units: list[Unit], refused: dict[str, dict[str, str]],
                  recovered: dict[str, str], dead_unit_ids: set[str],
                  ledger: dict[str, tuple[int, int, int]],
                  chunk_units: dict[str, str]) -> list[dict[str, Any]]:
    results = []
    for unit in (u for u in units if u.kind == "file"):
        name = Path(unit.path).name
        if unit.unit_id in refused:
            results.append({"unit_id": unit.unit_id, "name": refused[unit.unit_id]["name"],
                            "status": "quarantined", "rows_loaded": 0, "rows_quarantined": 0,
                            "reason": refused[unit.unit_id]["reason"]})
            continue
        entries = [v for c, v in ledger.items() if chunk_units.get(c) == unit.unit_id]
        status, reason = "loaded", None
        if unit.unit_id in dead_unit_ids:
            status, reason = "dead_lettered", "part of the file was dead-lettered"
        elif unit.unit_id in recovered:
            status, reason = "recovered", recovered[unit.unit_id]
        results.append({"unit_id": unit.unit_id, "name": name, "status": status,
                        "rows_loaded": sum(v[0] for v in entries),
                        "rows_quarantined": sum(v[1] for v in entries), "reason": reason})
    return results
