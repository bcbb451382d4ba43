"""`etl_quarantine` for operators: list quarantined rows without their values, and replay
them against the current rules after a rule or source fix.

`raw` holds a quarantined row's values (patient data): nothing here returns or logs it. The
replay runs on the loader, the store's only writer: rows that pass now are upserted like any
chunk, removed from quarantine and recorded in the ledger in one transaction, under a chunk
id made from their identity, so a repeated or redelivered replay does nothing twice.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import duckdb
import pyarrow as pa

from etl_tasks.config import SourceConfig
from etl_tasks.datasets import DatasetSpec
from etl_tasks.errors import FatalError, FencedOut, TransientError, safe_reason
from etl_tasks.load import duckdb as store
from etl_tasks.load.fence import WriterFence
from etl_tasks.transform import QUARANTINE_SCHEMA, restage_quarantined, transform_chunk

log = logging.getLogger(__name__)

REPLAY_KIND = "quarantine_replay"
"""The ledger's `kind` of a replay chunk (its `unit_id` is the chunk the rows came from)."""
_IDENTITY = pa.schema([("run_id", pa.string()), ("chunk_id", pa.string()),
                       ("source_ref", pa.string()), ("raw", pa.string())])


def failed_fields(reasons: str) -> list[str]:
    """The fields a quarantined row failed on, from its "; "-joined rules ("amount: ...")."""
    return list(dict.fromkeys(rule.split(":", 1)[0].strip() for rule in split(reasons)))


def split(reasons: str) -> list[str]:
    return [rule for rule in reasons.split("; ") if rule]


def _where(source: str | None, run_id: str | None) -> tuple[str, list[str]]:
    clauses, params = [], []
    for column, value in (("source", source), ("run_id", run_id)):
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def has_table(con: duckdb.DuckDBPyConnection) -> bool:
    return con.execute("SELECT count(*) FROM information_schema.tables "
                       "WHERE table_name = 'etl_quarantine'").fetchone() != (0,)


def summary(con: duckdb.DuckDBPyConnection, source: str | None = None,
            run_id: str | None = None) -> dict[str, dict[str, Any]]:
    """Per source: quarantined rows, rows whose raw values were purged, rows per broken rule
    (a row that broke two rules counts under both), most frequent first."""
    where, params = _where(source, run_id)
    figures: dict[str, dict[str, Any]] = {}
    counts: dict[str, Counter[str]] = {}
    for name, reasons, purged, rows in con.execute(
            "SELECT source, reasons, raw IS NULL, count(*) FROM etl_quarantine" + where
            + " GROUP BY ALL", params).fetchall():
        entry = figures.setdefault(name, {"rows": 0, "raw_purged": 0})
        entry["rows"] += rows
        entry["raw_purged"] += rows if purged else 0
        for rule in split(reasons):
            counts.setdefault(name, Counter())[rule] += rows
    for name in figures:
        figures[name]["by_reason"] = dict(counts.get(name, Counter()).most_common())
    return dict(sorted(figures.items()))


def rows(con: duckdb.DuckDBPyConnection, source: str | None = None, run_id: str | None = None,
         limit: int = 50) -> list[dict[str, Any]]:
    """The newest quarantined rows: where they came from and which rules they broke. The raw
    values are deliberately not selected; only whether they are still kept."""
    where, params = _where(source, run_id)
    cur = con.execute(
        "SELECT source, run_id, chunk_id, source_ref, reasons, raw IS NOT NULL AS raw_kept, "
        "epoch(quarantined_at) AS quarantined_at FROM etl_quarantine" + where
        + " ORDER BY quarantined_at DESC, source, source_ref LIMIT ?", [*params, limit])
    names = [d[0] for d in cur.description]
    found = []
    for row in cur.fetchall():
        entry = dict(zip(names, row, strict=True))
        entry["fields"] = failed_fields(entry["reasons"])
        entry["reasons"] = split(entry["reasons"])
        found.append(entry)
    return found


@dataclass
class ReplayCounts:
    """What a replay did for one source: counts only, never values."""

    examined: int = 0
    """Quarantined rows whose raw values are kept, validated again."""
    loaded: int = 0
    """Passed now and written to the target table."""
    unchanged: int = 0
    """Passed now, but the table already had the row in the same or a newer version (or a
    later load of its key, for datasets without a version): released from quarantine."""
    still_quarantined: int = 0
    """Still break a rule: left in quarantine."""
    reasons_refreshed: int = 0
    """Of those, rows whose broken rules changed (the reasons were rewritten)."""
    purged: int = 0
    """Rows whose raw values were purged (`etl quarantine purge`): they cannot be replayed."""
    chunks: int = 0
    """Replay chunks committed, each with its ledger row."""

    def public(self) -> dict[str, int]:
        return asdict(self)


SpecOf = Callable[[SourceConfig], "DatasetSpec | str"]
"""The dataset a source's held rows are read back with (`runs/plan.replay_spec`); raises an
EtlError when it cannot be had (a generic table's Firebird unreachable, its table gone)."""


def replay_sources(con: duckdb.DuckDBPyConnection, sources: list[SourceConfig],
                   spec_of: SpecOf, fence: WriterFence | None = None) -> dict[str, dict[str, Any]]:
    """`replay` each source in turn; per source its counts and `error`, None when it was
    replayed whole. A source that cannot be replayed (its rows' types unknown, a bug, a
    fatal store error) is reported and the others go on; what it committed stays committed.
    Only a store that is busy or unavailable, or a loader no longer the writer, stops the
    lot: the task is retried, and what is already done is not done twice."""
    done: dict[str, dict[str, Any]] = {}
    for src in sources:
        counts = ReplayCounts()
        try:
            # Only a source with rows to replay needs its spec (a generic table's: Firebird).
            dataset = spec_of(src) if replayable(con, src.name) else src.dataset
        except Exception as exc:  # noqa: BLE001 - this source only; reported, not raised
            done[src.name] = _failed(src.name, counts, exc, "reading its columns' types")
            continue
        try:
            replay(con, source=src.name, dataset=dataset, table=src.table, fence=fence,
                   counts=counts)
        except (TransientError, FencedOut):
            raise
        except Exception as exc:  # noqa: BLE001 - this source only; reported, not raised
            done[src.name] = _failed(src.name, counts, exc, "replaying its rows")
            continue
        done[src.name] = {**counts.public(), "error": None}
    return done


def replayable(con: duckdb.DuckDBPyConnection, source: str) -> bool:
    """Does `source` hold quarantined rows whose raw values are kept?"""
    return con.execute("SELECT count(*) FROM etl_quarantine WHERE source = ? AND raw IS NOT "
                       "NULL", [source]).fetchone() != (0,)


def _failed(source: str, counts: ReplayCounts, exc: Exception, step: str) -> dict[str, Any]:
    reason = safe_reason(exc, f"quarantine replay of {source}")
    # A message of ours or an exception's type: never a value (errors.safe_reason).
    log.error("quarantine replay of %s stopped %s: %s", source, step, reason, exc_info=exc)
    return {**counts.public(), "error": (
        f"source {source}: quarantine replay stopped {step}: {reason}. What was replayed "
        f"stays; fix that, then run `etl quarantine replay --source {source}` again")}


def replay(con: duckdb.DuckDBPyConnection, *, source: str, dataset: str | DatasetSpec,
           table: str, fence: WriterFence | None = None,
           counts: ReplayCounts | None = None) -> ReplayCounts:
    """Validate `source`'s quarantined rows again against the current rules and load those
    that pass into `table`, one chunk per chunk the rows were quarantined from, in the order
    those were committed (so the upsert's newer-version rule sees them in order). Each
    transaction is sealed with `fence`, the loader's (load/fence.py). `dataset` is a name,
    or a spec (a generic table's, with its reflected types); `counts` is added to as the
    replay goes, so a caller sees what was done before a failure."""
    counts = ReplayCounts() if counts is None else counts
    [(counts.purged,)] = con.execute("SELECT count(*) FROM etl_quarantine WHERE source = ? "
                                     "AND raw IS NULL", [source]).fetchall()
    origins = con.execute(
        "SELECT run_id, chunk_id FROM etl_quarantine WHERE source = ? AND raw IS NOT NULL "
        "GROUP BY ALL ORDER BY min(quarantined_at), run_id, chunk_id", [source]).fetchall()
    for run_id, chunk_id in origins:
        held = con.execute(
            # A pointer is unique within a chunk; the rank only guards that assumption, so
            # that no batch holds one row twice (the upsert would insert both).
            "SELECT source_ref, reasons, raw, row_number() OVER (PARTITION BY source_ref "
            "ORDER BY quarantined_at, raw) AS rank FROM etl_quarantine WHERE source = ? AND "
            "run_id = ? AND chunk_id = ? AND raw IS NOT NULL ORDER BY rank, source_ref",
            [source, run_id, chunk_id]).fetchall()
        for _, batch in itertools.groupby(held, key=lambda row: row[3]):
            _replay_batch(con, counts, source, dataset, table, run_id, chunk_id,
                          [row[:3] for row in batch], fence)
    log.info("quarantine replay of %s: %s", source, counts.public())
    return counts


def _replay_batch(con: duckdb.DuckDBPyConnection, counts: ReplayCounts, source: str,
                  dataset: str | DatasetSpec, table: str, run_id: str, chunk_id: str,
                  held: list[tuple[str, str, str]], fence: WriterFence | None) -> None:
    """Judge one chunk's quarantined rows again; commit those that pass with their release
    from quarantine and a ledger row, and rewrite the reasons of those whose rules changed."""
    refs = [ref for ref, _, _ in held]
    reasons = {ref: why for ref, why, _ in held}
    raws = {ref: raw for ref, _, raw in held}
    counts.examined += len(held)
    restaged = restage_quarantined(dataset, list(raws.values()), refs, list(reasons.values()))
    result = transform_chunk(dataset, restaged.table)
    passed = result.valid["source_ref"].to_pylist()
    now = dict(zip(result.quarantined["source_ref"].to_pylist(),
                   result.quarantined["reasons"].to_pylist(), strict=True))
    now.update({refs[p]: "; ".join(why) for p, why in restaged.unreadable.items()})
    if set(passed) | set(now) != set(refs) or len(passed) + len(now) != len(refs):
        # Every row is judged exactly once; anything else is a bug, not a data problem.
        raise FatalError(f"quarantine replay of chunk {chunk_id} lost track of its rows",
                         source=source)
    changed = {ref: why for ref, why in now.items() if why != reasons[ref]}
    counts.still_quarantined += len(now)
    counts.reasons_refreshed += len(changed)

    def settle(tx: duckdb.DuckDBPyConnection) -> None:
        _release(tx, source, run_id, chunk_id, passed, raws)
        _rewrite_reasons(tx, source, run_id, chunk_id, changed, raws)

    if not passed:
        if changed:
            with store.transaction(con, fence):
                settle(con)
        return
    entry = store.LedgerEntry(run_id=store.REPLAY_RUN_ID,
                              chunk_id=_chunk_id(source, run_id, chunk_id, passed, raws),
                              unit_id=chunk_id, kind=REPLAY_KIND)
    name = dataset if isinstance(dataset, str) else dataset.name
    written = store.write_chunk(con, source=source, table=table, dataset=name, entry=entry,
                                valid=result.valid, quarantined=QUARANTINE_SCHEMA.empty_table(),
                                also=settle, fence=fence)
    # Already in the ledger: these very rows were committed and released together, so they
    # cannot still be here; nothing is done twice either way.
    if not written.already_loaded:
        counts.loaded += written.loaded
        counts.unchanged += written.unchanged
        counts.chunks += 1


def _chunk_id(source: str, run_id: str, chunk_id: str, passed: list[str],
              raws: dict[str, str]) -> str:
    """Deterministic: the chunk the rows came from and a digest of the rows (pointer and
    values), so the same rows make the same ledger row however often the replay runs."""
    digest = hashlib.sha256()
    for ref in sorted(passed):
        digest.update(f"{ref}\0{raws[ref]}\0".encode())
    return f"{source}:{run_id}:{chunk_id}:{digest.hexdigest()[:16]}"


def _identities(run_id: str, chunk_id: str, refs: list[str], raws: dict[str, str]) -> pa.Table:
    return pa.table({"run_id": [run_id] * len(refs), "chunk_id": [chunk_id] * len(refs),
                     "source_ref": refs, "raw": [raws[ref] for ref in refs]}, schema=_IDENTITY)


_MATCH = ("q.source = ? AND q.run_id = i.run_id AND q.chunk_id = i.chunk_id AND "
          "q.source_ref = i.source_ref AND q.raw = i.raw")


def _release(con: duckdb.DuckDBPyConnection, source: str, run_id: str, chunk_id: str,
             refs: list[str], raws: dict[str, str]) -> None:
    """Delete the rows that passed from quarantine (inside the chunk's transaction)."""
    if not refs:
        return
    con.register("released", _identities(run_id, chunk_id, refs, raws))
    try:
        row = con.execute(f"DELETE FROM etl_quarantine q USING released i WHERE {_MATCH}",
                          [source]).fetchone()
    finally:
        con.unregister("released")
    if (int(row[0]) if row else 0) != len(refs):
        # Only the loader writes the store, so this means someone edited it meanwhile: the
        # transaction is undone and the replay can simply be run again.
        raise FatalError(f"quarantined rows of chunk {chunk_id} changed during the replay; "
                         "nothing of that chunk was loaded: run `etl quarantine replay` again",
                         source=source)


def _rewrite_reasons(con: duckdb.DuckDBPyConnection, source: str, run_id: str, chunk_id: str,
                     changed: dict[str, str], raws: dict[str, str]) -> None:
    """Rows that still fail, with the rules they break now."""
    if not changed:
        return
    refs = list(changed)
    rewritten = _identities(run_id, chunk_id, refs, raws).append_column(
        "reasons", pa.array([changed[ref] for ref in refs], pa.string()))
    con.register("rewritten", rewritten)
    try:
        con.execute(f"UPDATE etl_quarantine q SET reasons = i.reasons FROM rewritten i "
                    f"WHERE {_MATCH}", [source])
    finally:
        con.unregister("rewritten")
