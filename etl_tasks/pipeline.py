"""The steps of a run the thin Celery tasks call: extract a unit, transform and load a chunk.

Dispatching the next step is injected (`Dispatch`), so these functions know nothing of Celery
and tests can drive them directly. Every step is idempotent: chunk ids are deterministic
within a run, a step whose work is already recorded does nothing, and the loader's ledger
skips a chunk the run already committed. A staged payload that is gone (expired, or lost with
Redis) makes its unit be extracted again, never fails the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from etl_tasks import checkpoints, datasets, faults, staging
from etl_tasks.config import SourceConfig
from etl_tasks.errors import SourceFileError, TransientError
from etl_tasks.load import duckdb as store
from etl_tasks.load.evolve import SchemaChanged
from etl_tasks.load.writer import StoreChain
from etl_tasks.resources import Resources
from etl_tasks.runs import bounds, breakers, items, lease, plan, state, window
from etl_tasks.runs.state import Unit
from etl_tasks.sources import excel, firebird, firebird_keys, xml_feed
from etl_tasks.sources.firebird_schema import TableSchema
from etl_tasks.transform import TransformResult, transform_chunk, unchecked

log = logging.getLogger(__name__)


TABLE_UNITS = ("range", "updated", "table")
"""Units of a Firebird table: read, then validated in the same step."""


class Dispatch(Protocol):
    """Sends the next step of a run: the Celery tasks in production, a list in tests."""

    def extract(self, run_id: str, unit_id: str) -> None: ...
    def transform(self, run_id: str, chunk_id: str) -> None: ...
    def load(self, run_id: str, chunk_id: str) -> None: ...
    def finalize(self, run_id: str) -> None: ...


@dataclass(frozen=True)
class RunContext:
    """What a step needs to know about its run."""

    run_id: str
    src: SourceConfig


def context(res: Resources, run_id: str) -> RunContext | None:
    """The run's source, or None when Redis has no record of the run (a stale message of a
    run whose state Redis lost: dropping it is safe, the next run redoes the work)."""
    data = state.info(res.redis, run_id)
    if "source" not in data:
        log.warning("run %s is unknown (its state was lost); message dropped", run_id)
        return None
    return RunContext(run_id, res.pipeline.source(data["source"]))


def extract_unit(res: Resources, run_id: str, unit_id: str, send: Dispatch) -> int:
    """Read one unit into staged raw chunks; dispatch a transform per chunk. Returns rows."""
    ctx = context(res, run_id)
    r = res.redis
    if ctx is None or state.is_split(r, run_id, unit_id):
        return 0  # nothing to do: a lost run, or a duplicate message
    src, unit = ctx.src, state.unit(r, run_id, unit_id)
    faults.fault_point("extract", unit_id, r)
    chunks: dict[str, int] = {}
    breaker = breakers.for_source(res, src.name)
    if unit.kind in TABLE_UNITS:
        _extract_table(res, ctx, unit, chunks)
    else:
        breaker.check()  # an inbox's failures are counted where it is listed: the plan
        refusal = _extract_file(res, ctx, unit, chunks)
        if refusal is not None:
            # The file is refused whole: nothing of it is loaded, the reason is kept.
            for chunk_id in chunks:
                staging.drop(r, run_id, chunk_id)
            state.reject_file(r, run_id, unit_id, Path(unit.path).name, refusal)
            log.warning("run %s: file %s quarantined: %s", run_id, Path(unit.path).name,
                        refusal)
            send.finalize(run_id)  # no load will follow; the loader checks completeness
            admit_next(res, run_id, send)
            return 0
    # Register before dispatching, so the loader never sees a run as complete too early.
    state.register_chunks(r, run_id, unit_id, chunks)
    if not chunks:
        send.finalize(run_id)
        admit_next(res, run_id, send)  # nothing staged: the slot is free again
    # A table's chunks were validated here (_stage_part); a file's go to the fleet's
    # transforms, in parallel while one process reads the file.
    next_step = send.load if unit.kind in TABLE_UNITS else send.transform
    for chunk_id in chunks:
        next_step(run_id, chunk_id)
    return sum(chunks.values())


def _extract_table(res: Resources, ctx: RunContext, unit: Unit, chunks: dict[str, int]) -> None:
    """Stage a Firebird unit into `chunks`: a key range as one chunk (the unit's id), a table
    without a key in slices of `chunk_size` rows. The columns are the run's (its plan
    reflected them), so every range of a run reads the same ones."""
    src = ctx.src
    recorded = state.info(res.redis, ctx.run_id).get("table_schema")
    parts: list[tuple[str, pa.Table]] = []
    # The source's transient failures count against its breaker; staging's do not, except a
    # table without a key's, staged slice by slice inside (its snapshot must stay open).
    with breakers.for_source(res, src.name).guard(), res.firebird_pool.connection() as con:
        try:
            schema = (TableSchema.from_json(recorded) if recorded
                      else plan.table_schema(con, src))
            key = schema.column(src.key_column) if src.key_column else None
            if unit.kind == "table":
                for n, part in enumerate(firebird_keys.fetch_table(con, schema, src.chunk_size)):
                    _stage_part(res, ctx, unit, f"{unit.unit_id}:{n}", schema, part, chunks)
                return
            changed = schema.column(src.updated_column) if src.updated_column else None
            lo, hi = ((bounds.open_bound(res.sealer, src.name, unit.text_lo),
                       bounds.open_bound(res.sealer, src.name, unit.text_hi))
                      if unit.sampled else (unit.lo, unit.hi))
            parts.append((unit.unit_id, firebird.fetch_range(
                con, schema.table, key.name if key else None, lo, hi, schema=schema,
                updated_column=changed.name if changed else "",
                since=unit.since or None, until=unit.until or None)))
        except MemoryError:
            raise  # not the source's fault: the range is split (runs/split.py)
        except Exception as exc:
            raise firebird.classify(exc, f"table {src.location} {unit.pointer()}") from exc
    for chunk_id, part in parts:
        _stage_part(res, ctx, unit, chunk_id, schema, part, chunks)


def _stage_part(res: Resources, ctx: RunContext, unit: Unit, chunk_id: str,
                schema: TableSchema, part: pa.Table, chunks: dict[str, int]) -> None:
    """Validate one chunk of a Firebird unit where it was read and stage its valid and
    quarantined rows, with their pointers where a text key or no key needs them
    (sources/firebird_keys.row_pointers). Fused with the extract, the raw rows are never
    staged and read back: a zstd encode, a Redis round trip, a decode and a task less per
    chunk (benchmarks/README.md; not measured apart from the faster fetch that landed with
    it). Its `transform` fault point stays, between read and validation."""
    r, ttl = res.redis, res.settings.stage_ttl_s
    part = firebird_keys.row_pointers(part, schema, ctx.src.key_column or None,
                                      res.sealer.keys[0])
    faults.fault_point("transform", chunk_id, r)
    began = time.monotonic()
    result = _transform(res, ctx, part)
    if res.settings.resilience:  # validation time (also inside the extract step's time)
        state.note_stage_time(r, ctx.run_id, "transform", time.monotonic() - began)
    staging.put(r, res.sealer, ctx.run_id, chunk_id, "valid", result.valid, ttl)
    staging.put(r, res.sealer, ctx.run_id, chunk_id, "quarantine", result.quarantined, ttl)
    state.mark_transformed(r, ctx.run_id, chunk_id)
    chunks[chunk_id] = part.num_rows
    if chunk_id != unit.unit_id:  # a long table shows progress per slice
        state.touch(res.redis, ctx.run_id)
        items.heartbeat(res.redis, ctx.run_id, "extract", unit.unit_id)


def _extract_file(res: Resources, ctx: RunContext, unit: Unit,
                  chunks: dict[str, int]) -> str | None:
    """Stage a file's batches into `chunks`; the reason when the file is refused whole."""
    r, src, path = res.redis, ctx.src, Path(unit.path)
    reader = xml_feed if src.kind == "xml" else excel
    # A declared dataset's columns (and its file-unique key) over the readers' built-in ones.
    layout = {**src.layout, **datasets.spec_for(res.pipeline, src).reader_options(src.kind)}
    if src.kind == "excel":
        # The last good copy of an upload is the same name in processed/.
        layout.setdefault("last_good_dir", path.parent / "processed")
    try:
        for index, batch in enumerate(reader.iter_batches(
                path, batch_rows=src.chunk_size, source=src.name, **layout)):
            chunk_id = f"{unit.unit_id}:{index}"
            recovered = (batch.schema.metadata or {}).get(excel.RECOVERED.encode())
            if recovered:
                state.recover_file(r, ctx.run_id, unit.unit_id, recovered.decode())
                batch = batch.replace_schema_metadata(None)
            staging.put(r, res.sealer, ctx.run_id, chunk_id, "raw", batch,
                        res.settings.stage_ttl_s)
            chunks[chunk_id] = batch.num_rows
            state.touch(r, ctx.run_id)  # a long file shows progress per batch
            items.heartbeat(r, ctx.run_id, "extract", unit.unit_id)
    except SourceFileError as exc:
        return exc.reason
    except (TransientError, FileNotFoundError):
        if path.exists():
            raise  # a blip: retried with backoff
        return "the file disappeared before it was read; upload it again"
    return None


def transform_staged(res: Resources, run_id: str, chunk_id: str, send: Dispatch) -> int:
    """Validate a staged raw chunk into staged valid and quarantined rows; returns rows."""
    ctx = context(res, run_id)
    r, ttl = res.redis, res.settings.stage_ttl_s
    if ctx is None or state.is_transformed(r, run_id, chunk_id) or state.is_done(
            r, run_id, chunk_id):
        return 0
    faults.fault_point("transform", chunk_id, r)
    try:
        raw = staging.get(r, res.sealer, run_id, chunk_id, "raw")
    except staging.StagingLost:
        restage(res, run_id, chunk_id, send)
        return 0
    result = _transform(res, ctx, raw)
    staging.put(r, res.sealer, run_id, chunk_id, "valid", result.valid, ttl)
    staging.put(r, res.sealer, run_id, chunk_id, "quarantine", result.quarantined, ttl)
    state.mark_transformed(r, run_id, chunk_id)
    send.load(run_id, chunk_id)
    return int(raw.num_rows)


def _transform(res: Resources, ctx: RunContext, rows: pa.Table) -> TransformResult:
    spec = datasets.spec_for(res.pipeline, ctx.src)
    if not res.settings.resilience:  # ETL_RESILIENCE=off: benchmarks only
        return unchecked(spec, rows)
    return transform_chunk(spec, rows)


def load_staged(res: Resources, chain: StoreChain, run_id: str, chunk_id: str,
                send: Dispatch) -> store.WriteResult | None:
    """Commit a transformed chunk to the first healthy store (or find it committed), then
    advance the run's state. None when nothing was loaded here (a lost run, or the chunk is
    extracted again)."""
    r = res.redis
    if state.is_done(r, run_id, chunk_id):
        return store.WriteResult(0, 0, already_loaded=True)
    ctx = context(res, run_id)
    if ctx is None:
        return None
    src = ctx.src
    result = chain.committed(run_id, chunk_id) if res.settings.resilience else None
    where = "committed"
    if result is None:
        faults.fault_point("load", chunk_id, r)  # before the staged rows are read
        try:
            valid = staging.get(r, res.sealer, run_id, chunk_id, "valid")
            quarantined = staging.get(r, res.sealer, run_id, chunk_id, "quarantine")
        except staging.StagingLost:
            restage(res, run_id, chunk_id, send)
            return None
        try:
            where, result = chain.write(
                source=src.name, table=src.table, dataset=src.dataset,
                entry=_ledger_entry(res, run_id, chunk_id), valid=valid,
                quarantined=quarantined, fault=lambda point: faults.fault_point(point, chunk_id, r))
        except SchemaChanged as exc:
            # Every chunk of the run has the same columns: the run stops here, loading nothing
            # more, instead of dead-lettering chunk after chunk.
            state.fail(r, run_id, f"{exc}; run stopped" + (
                f" (Firebird table {src.location})" if src.kind == "firebird" else ""))
            lease.release(r, src.name, run_id)
            send.finalize(run_id)
            return None
    # Only after the commit: progress, staged payload cleanup, checkpoint, lease.
    state.mark_done(r, run_id, chunk_id, result.loaded, result.quarantined, result.unchanged,
                    where)
    staging.drop(r, run_id, chunk_id)
    admit_next(res, run_id, send)  # a slot of the run's window is free
    if src.kind == "firebird" and res.settings.resilience:
        checkpoints.advance_key(r, src.name, state.units(r, run_id),
                                state.done_chunks(r, run_id),
                                state.info(r, run_id).get("plan_updated_to"))
    lease.renew(r, src.name, run_id, res.settings.run_lease_s)
    if state.is_complete(r, run_id):
        send.finalize(run_id)
    return result


def _ledger_entry(res: Resources, run_id: str, chunk_id: str) -> store.LedgerEntry:
    r = res.redis
    unit = state.unit(r, run_id, state.unit_of(r, run_id, chunk_id) or chunk_id)
    siblings = sum(1 for c, u in state.chunk_units(r, run_id).items() if u == unit.unit_id)
    ranged = unit.kind in ("range", "updated") and not unit.sampled
    return store.LedgerEntry(
        run_id=run_id, chunk_id=chunk_id, unit_id=unit.unit_id, kind=unit.kind,
        key_lo=unit.lo if ranged else None, key_hi=unit.hi if ranged else None,
        # Sealed tokens (runs/bounds.py): enough to rebuild the key mark, no key in clear.
        key_text_lo=unit.text_lo if unit.sampled else None,
        key_text_hi=unit.text_hi if unit.sampled else None,
        file_sha256=unit.sha256 or None, unit_chunks=max(siblings, 1),
        source_version=state.info(r, run_id).get("plan_updated_to"))


def admit_next(res: Resources, run_id: str, send: Dispatch) -> None:
    """Dispatch the held units the run's window admits now (runs/window.py)."""
    for unit_id in window.release(res.redis, run_id, res.settings.stage_window):
        send.extract(run_id, unit_id)


def restage(res: Resources, run_id: str, chunk_id: str, send: Dispatch) -> None:
    """A chunk's staged payload is gone: extract its unit again (the same chunk ids come
    back; chunks already committed are no-ops in the ledger)."""
    r = res.redis
    unit_id = state.unit_of(r, run_id, chunk_id)
    if unit_id is None:
        return
    log.warning("run %s: staged payload of %s is gone; extracting %s again", run_id,
                chunk_id, unit_id)
    state.unsplit(r, run_id, unit_id)
    send.extract(run_id, unit_id)
