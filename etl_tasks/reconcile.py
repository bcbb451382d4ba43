"""Reconciliation: does every source row end loaded, quarantined, dead-lettered or skipped?

Counted independently of the pipeline's own counters: Firebird sources count the table
itself and the store's rows by key; file sources read the records of the files they moved to
`processed/` again and compare them with the ledger of those files. Per run, the ledger and
the run record must agree: extracted = loaded + quarantined + skipped + dead-lettered. Every
difference is named with what explains it, or flagged as unexplained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import duckdb

from etl_tasks import checkpoints, inbox
from etl_tasks.config import SourceConfig
from etl_tasks.resources import Resources
from etl_tasks.runs import bounds
from etl_tasks.sources import excel, xml_feed
from etl_tasks.sources.firebird_schema import Column, TableSchema


@dataclass
class SourceBalance:
    """One source's balance; `unexplained` is what nothing accounts for (0 when healthy)."""

    source: str
    source_rows: int
    loaded: int
    quarantined: int
    dead_lettered: int
    not_yet_run: int
    unexplained: int
    explanations: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return asdict(self)


def reconcile(res: Resources, con: duckdb.DuckDBPyConnection, src: SourceConfig,
              last_runs: int = 20) -> SourceBalance:
    balance = (_firebird(res, con, src) if src.kind == "firebird" else _files(res, con, src))
    balance.runs = _runs(con, src.name, last_runs)
    bad = [r for r in balance.runs if r["difference"]]
    if bad:
        balance.explanations.append(
            f"{len(bad)} run(s) whose counts do not add up: "
            + ", ".join(r["run_id"] for r in bad))
    return balance


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables")
            .fetchall()}


def _firebird(res: Resources, con: duckdb.DuckDBPyConnection,
              src: SourceConfig) -> SourceBalance:
    from etl_tasks.sources import firebird, firebird_schema, firebird_text

    with res.firebird_pool.connection() as fb:
        try:
            schema = firebird_schema.reflect(fb, src.location, source=src.name)
        except Exception as exc:
            raise firebird.classify(exc) from exc
    column = schema.column(src.key_column) if src.key_column else None
    if column is None or not column.is_integer_key:
        return _by_rows(res, con, src, replace(schema, charset=src.charset), column)
    key = firebird_text.quote(column.name)
    mark = checkpoints.key_high_water(res.redis, src.name)
    with res.firebird_pool.connection() as fb:
        cur = fb.cursor()
        try:
            cur.execute(f"SELECT COUNT(*), COUNT(CASE WHEN {key} > ? THEN 1 END) "
                        f"FROM {src.location}", (mark,))
            total, above = (int(v or 0) for v in cur.fetchone())
            dead = [(int(lo), int(hi)) for lo, hi in con.execute(
                "SELECT key_lo, key_hi FROM etl_dead_letters WHERE source = ? AND status = "
                "'open' AND key_lo IS NOT NULL", [src.name]).fetchall()]
            in_dead = []
            for lo, hi in dead:
                cur.execute(f"SELECT COUNT(*) FROM {src.location} WHERE {key} BETWEEN ? AND ?",
                            (lo, hi))
                in_dead.append((lo, hi, int(cur.fetchone()[0])))
        except Exception as exc:
            raise firebird.classify(exc) from exc
        finally:
            cur.close()
    has_table = src.table in _tables(con)
    staged = column.staged_name
    held = ("SELECT DISTINCT CAST(split_part(source_ref, '=', 2) AS BIGINT) AS k FROM "
            "etl_quarantine WHERE source = ? AND source_ref LIKE ?")
    params = [src.name, f"{column.name}=%"]
    if has_table:
        [(loaded,)] = con.execute(f"SELECT count(DISTINCT {staged}) FROM {src.table}").fetchall()
        [(quarantined,)] = con.execute(
            f"SELECT count(*) FROM ({held}) q WHERE NOT EXISTS (SELECT 1 FROM {src.table} t "
            f"WHERE t.{staged} = q.k)", params).fetchall()
    else:
        loaded = 0
        [(quarantined,)] = con.execute(f"SELECT count(*) FROM ({held})", params).fetchall()
    stored_above = _stored_between(con, src, held, params, mark + 1, None, has_table)
    not_yet_run = max(above - stored_above, 0)
    dead_lettered, explanations = 0, []
    for lo, hi, rows in in_dead:
        if lo > mark:  # above the mark: already counted as not yet run
            continue
        dead_lettered += max(rows - _stored_between(con, src, held, params, lo, hi, has_table), 0)
    if not_yet_run:
        explanations.append(f"{not_yet_run} row(s) above the key checkpoint {mark} not loaded "
                            "yet: the next run reads them (or they sit in a dead range above "
                            "the checkpoint; see `etl dead-letters`)")
    if dead_lettered:
        explanations.append(f"{dead_lettered} row(s) in open dead letters; `etl retry ID`")
    unexplained = total - loaded - quarantined - dead_lettered - not_yet_run
    if unexplained < 0:
        explanations.append(f"{-unexplained} row(s) in the store are no longer in the source "
                            "(deleted there after they were loaded)")
    elif unexplained:
        explanations.append(f"{unexplained} source row(s) are neither loaded, quarantined nor "
                            f"dead-lettered: run `etl run {src.name} --full` and report a bug")
    return SourceBalance(src.name, total, int(loaded), int(quarantined), dead_lettered,
                         not_yet_run, unexplained, explanations)


def _by_rows(res: Resources, con: duckdb.DuckDBPyConnection, src: SourceConfig,
             schema: TableSchema, column: Column | None) -> SourceBalance:
    """A table keyed by text (its pointers are digests, its mark a sealed key) or without a
    key: the source's rows against the store's, matched by pointer digest in Python, since
    neither DuckDB nor Python orders text as Firebird does; rows above the key mark are asked
    of Firebird itself."""
    from etl_tasks.sources import firebird, firebird_keys, firebird_text

    secret = res.sealer.keys[0]
    label = column.name if column is not None else "ROW"
    python = firebird_text.codec(schema.text_charset)
    has_table = src.table in _tables(con)
    held = {ref for (ref,) in con.execute(
        "SELECT DISTINCT source_ref FROM etl_quarantine WHERE source = ?", [src.name]).fetchall()}
    with res.firebird_pool.connection() as fb:
        cur = fb.cursor()
        try:
            cur.execute(f"SELECT COUNT(*) FROM {firebird_text.quote(schema.table)}")
            total = int(cur.fetchone()[0])
            above: list[str] = []
            if column is not None:
                # Waiting for the next run: keys above the mark, and (keys not being in
                # time order) rows whose change column moved past the updated mark.
                token = checkpoints.sampled_high_water(res.redis, src.name)
                terms, args = firebird.range_condition(
                    schema, column.name, bounds.open_bound(res.sealer, src.name, token), None)
                changed = schema.column(src.updated_column) if src.updated_column else None
                changed_since = checkpoints.updated_mark(res.redis, src.name)
                if terms and changed is not None and changed_since is not None:
                    terms = [f"({terms[0]} OR {firebird_text.quote(changed.name)} > ?)"]
                    args.append(changed_since)
                cur.execute(f"SELECT CAST({firebird_text.quote(column.name)} AS VARCHAR("
                            f"{firebird.octets(column)}) CHARACTER SET OCTETS) FROM "
                            f"{firebird_text.quote(schema.table)}"
                            + (" WHERE " + " AND ".join(terms) if terms else ""), args)
                above = [bytes(v).decode(python, "replace") for (v,) in cur.fetchall()]
        except Exception as exc:
            raise firebird.classify(exc) from exc
        finally:
            cur.close()
    explanations = []
    if column is None:
        loaded = _count(con, f"SELECT count(*) FROM {src.table}") if has_table else 0
        quarantined, not_yet_run = len(held), 0
        if total > loaded + quarantined:
            explanations.append(f"{total - loaded - quarantined} row(s) repeat another row of "
                                "the table exactly; a table without a key stores such a row "
                                "once")
            return SourceBalance(src.name, total, loaded, quarantined, 0, 0, 0, explanations)
    else:
        stored = ({str(k) for (k,) in con.execute(
            f"SELECT DISTINCT {column.staged_name} FROM {src.table}").fetchall()}
            if has_table else set())
        loaded = len(stored)
        # Held rows whose key is not stored (a row quarantined, then loaded, counts once).
        quarantined = len(held - {firebird_keys.pointer(label, [k], secret) for k in stored})
        not_yet_run = sum(1 for k in above if k not in stored
                          and firebird_keys.pointer(label, [k], secret) not in held)
        if not_yet_run:
            explanations.append(f"{not_yet_run} row(s) above the key checkpoint or changed "
                                "since the last run, not loaded yet: the next run reads them "
                                "(or they sit in a dead range; see `etl dead-letters`)")
    unexplained = total - loaded - quarantined - not_yet_run
    if unexplained:
        explanations.append(f"{abs(unexplained)} row(s) "
                            + ("in the store are no longer in the source" if unexplained < 0
                               else "are neither loaded, quarantined nor waiting: run "
                               f"`etl run {src.name} --full` and report a bug"))
    return SourceBalance(src.name, total, loaded, quarantined, 0, not_yet_run, unexplained,
                         explanations)


def _count(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    [(count,)] = con.execute(sql).fetchall()
    return int(count)


def _stored_between(con: duckdb.DuckDBPyConnection, src: SourceConfig, held: str,
                    params: list[Any], lo: int, hi: int | None, has_table: bool) -> int:
    """Distinct keys in lo..hi that the store holds, loaded or quarantined."""
    column = src.key_column.lower()
    upper = "" if hi is None else f" AND k <= {int(hi)}"
    loaded = (f"SELECT {column} AS k FROM {src.table} UNION " if has_table else "")
    [(count,)] = con.execute(f"SELECT count(*) FROM ({loaded}{held}) WHERE k >= {int(lo)}{upper}",
                             params).fetchall()
    return int(count)


def _files(res: Resources, con: duckdb.DuckDBPyConnection, src: SourceConfig) -> SourceBalance:
    """Records of the files in processed/ against the ledger rows of those files."""
    folder = src.inbox(res.settings) / "processed"
    reader = xml_feed if src.kind == "xml" else excel
    total = loaded = quarantined = 0
    explanations: list[str] = []
    ledger = {sha: (int(a), int(b), int(c)) for sha, a, b, c in con.execute(
        "SELECT file_sha256, sum(rows_loaded), sum(rows_quarantined), sum(rows_unchanged) "
        "FROM etl_load_ledger WHERE source = ? AND kind = 'file' GROUP BY file_sha256",
        [src.name]).fetchall()} if "etl_load_ledger" in _tables(con) else {}
    unexplained = 0
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() not in inbox.SUFFIXES[src.kind]:
            continue
        records = sum(b.num_rows for b in reader.iter_batches(
            path, batch_rows=50_000, source=src.name,
            **{k: v for k, v in src.layout.items() if k != "last_good_dir"}))
        total += records
        rows = ledger.get(inbox.sha256_file(path))
        if rows is None:
            explanations.append(f"{path.name}: in processed/ but no run's ledger has it")
            unexplained += records
            continue
        loaded, quarantined = loaded + rows[0], quarantined + rows[1]
        # A record stored in the same version by an earlier file counts as unchanged.
        missing = records - sum(rows)
        if missing > 0:
            explanations.append(f"{path.name}: {missing} record(s) not in the ledger")
            unexplained += missing
    waiting = len(inbox.ready_files(src.inbox(res.settings), src.kind, 0.0))
    if waiting:
        explanations.append(f"{waiting} file(s) waiting in the inbox for the next run")
    return SourceBalance(src.name, total, loaded, quarantined, 0, 0, unexplained, explanations)


def _runs(con: duckdb.DuckDBPyConnection, source: str, last: int) -> list[dict[str, Any]]:
    """The last runs' records against their ledger rows: extracted = loaded + quarantined +
    unchanged + dead-lettered, and the record's counts are the ledger's."""
    rows = con.execute(
        "SELECT r.run_id, r.status, r.extracted, r.loaded, r.quarantined, r.skipped, "
        "coalesce(r.dead_lettered, 0), coalesce(sum(l.rows_loaded), 0), "
        "coalesce(sum(l.rows_quarantined), 0), coalesce(sum(l.rows_unchanged), 0) "
        "FROM etl_runs r LEFT JOIN etl_load_ledger l USING (run_id) WHERE r.source = ? "
        "GROUP BY ALL ORDER BY max(r.finished_at) DESC LIMIT ?", [source, last]).fetchall()
    result = []
    for (run_id, status, extracted, loaded, held, skipped, dead, in_ledger, held_in_ledger,
         unchanged) in rows:
        counts = [int(v or 0) for v in (extracted, loaded, held, skipped, dead)]
        difference = 0
        if status != "failed":  # a failed run's record has no counts to check
            difference = (abs(counts[0] - int(in_ledger) - int(held_in_ledger) - int(unchanged)
                              - counts[4])
                          + abs(counts[1] - int(in_ledger)) + abs(counts[2] - int(held_in_ledger)))
        result.append({"run_id": run_id, "status": status, "extracted": counts[0],
                       "loaded": counts[1], "quarantined": counts[2], "skipped": counts[3],
                       "dead_lettered": counts[4], "difference": difference})
    return result
