"""The `etl` command line: make demo data, run the whole demo, enqueue and follow runs."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from etl_tasks.errors import EtlError

if TYPE_CHECKING:
    from etl_tasks.config import Settings
    from etl_tasks.sources.firebird import FirebirdTarget

cli = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
err = Console(stderr=True)
# Piped output (CI logs, files) gets a width that fits the summary table.
out = Console(width=None if sys.stdout.isatty() else 120)


def _settings() -> Settings:
    from etl_tasks.config import get_settings

    return get_settings()


def _firebird_target() -> FirebirdTarget:
    from etl_tasks.resources import get_resources

    return get_resources().firebird_target


@cli.command("staging-key")
def staging_key() -> None:
    """Print a new staging key (base64 of 32 random bytes) for ETL_STAGING_KEYS or the file
    ETL_STAGING_KEY_FILE names. To rotate: put it first on every host, keep the old one after
    it until staged payloads have expired (ETL_STAGE_TTL_S), then drop the old one
    (docs/operations.md)."""
    from etl_tasks.sealing import new_key

    print(new_key())


@cli.command("demo-data")
def demo_data(
    claims: Annotated[int, typer.Option(help="Billing claims to generate in Firebird.")] = 100_000,
    lab_records: Annotated[int, typer.Option(help="Records per lab feed XML file.")] = 500,
    reg_rows: Annotated[int, typer.Option(help="Rows per registration workbook.")] = 300,
) -> None:
    """Create the demo sources (with planted defects) under ETL_DATA_DIR/demo, replacing any."""
    from etl_tasks.demo_data import make_demo_data

    demo_dir = _settings().data_dir / "demo"
    started = time.monotonic()
    with err.status(f"Generating {claims:,} claims, lab feeds and registrations in {demo_dir}"):
        manifest = make_demo_data(demo_dir, _firebird_target(), claims=claims,
                                  lab_records=lab_records, reg_rows=reg_rows)
    err.print(f"Demo data ready in {time.monotonic() - started:.1f}s: "
              f"{manifest['billing']['rows']:,} claims, {len(manifest['lab_feeds'])} lab feeds, "
              f"{len(manifest['partner_feeds'])} second-partner feeds, "
              f"{len(manifest['registrations'])} registration workbooks "
              f"(manifest: {demo_dir / 'manifest.json'})")


def _follow(handles: list, as_json: bool) -> tuple[list, list[str]]:  # type: ignore[type-arg]
    """Show progress of the runs until each ends; return their summaries and, for runs that
    stopped making progress, what to do. Survives Redis restarts (it reconnects)."""
    summaries: dict[str, object] = {}
    stalled: dict[str, str] = {}
    stall_s = _settings().stall_s
    unreachable_since: float | None = None
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("chunks  {task.fields[rows]:>10,} rows {task.fields[note]}"),
                  TimeElapsedColumn(), console=err, transient=as_json,
                  disable=as_json) as bar:
        tasks = {h.run_id: bar.add_task(h.source, total=None, rows=0, note="")
                 for h in handles}
        while len(summaries) + len(stalled) < len(handles):
            for h in handles:
                if h.run_id in summaries or h.run_id in stalled:
                    continue
                summary, p = h.poll()
                if summary is not None:
                    summaries[h.run_id] = summary
                    done = max(p["chunks_total"], 1) if p else 1
                    bar.update(tasks[h.run_id], total=done, completed=done)
                    continue
                if p is None:  # Redis unreachable: say so, keep trying
                    unreachable_since = unreachable_since or time.monotonic()
                    waited = time.monotonic() - unreachable_since
                    bar.update(tasks[h.run_id], note=f"(Redis unreachable {waited:.0f}s)")
                    if waited > stall_s:
                        stalled[h.run_id] = (f"{h.source}: Redis unreachable for {waited:.0f}s;"
                                             f" follow the run again with `etl wait {h.run_id}`")
                    continue
                unreachable_since = None
                idle = time.time() - p["last_progress_at"]
                bar.update(tasks[h.run_id], completed=p["chunks_done"],
                           total=p["chunks_total"] or None, rows=p["loaded"] + p["quarantined"],
                           note=f"(no progress for {idle:.0f}s)" if idle > 15 else "")
                if idle > stall_s:
                    stalled[h.run_id] = (
                        f"{h.source}: run {h.run_id} has made no progress for {idle:.0f}s "
                        f"({p['status']}, {p['chunks_done']} of {p['chunks_total']} chunks); "
                        "check that the fleet, the loader and beat are running, then follow "
                        f"it with `etl wait {h.run_id}`")
            time.sleep(0.2)
    ordered = [summaries[h.run_id] for h in handles if h.run_id in summaries]
    return ordered, list(stalled.values())


def _report(summaries: list, stalled: list[str], *, as_json: bool) -> int:  # type: ignore[type-arg]
    """Print the summaries; exit code 0 all finished, 1 some partial or failed, 3 stalled."""
    if as_json:
        print(json.dumps([s.public() for s in summaries], indent=2))
    else:
        table = Table(title="Run summary")
        for col in ("source", "status", "extracted", "loaded", "quarantined", "skipped",
                    "dead-lettered", "duration s", "quality"):
            table.add_column(col, justify="left" if col in ("source", "status") else "right")
        for s in summaries:
            table.add_row(s.source, s.status, f"{s.extracted:,}", f"{s.loaded:,}",
                          f"{s.quarantined:,}", f"{s.skipped:,}", f"{s.dead_lettered:,}",
                          f"{s.duration_s:.1f}",
                          "-" if s.quality_score is None else f"{s.quality_score:.2%}")
        out.print(table)
        for s in summaries:
            if s.error:
                err.print(f"[red]{s.source}: {s.error}[/red]")
            for d in s.dead_letters:
                err.print(f"[red]{s.source}: dead letter {d['dead_letter_id']} ({d['stage']} "
                          f"{d['pointer']}, {d['attempts']} attempts): {d['reason']}[/red]")
            for f in s.files:
                if f["status"] != "loaded":
                    err.print(f"[yellow]{s.source}: file {f['name']} {f['status']}: "
                              f"{f['reason']}[/yellow]")
    for message in stalled:
        err.print(f"[red]{message}[/red]")
    if stalled:
        return 3
    return 0 if all(s.status == "finished" for s in summaries) else 1


@cli.command()
def run(
    sources: Annotated[list[str] | None, typer.Argument(help="Source names from the "
                                                         "pipeline config.")] = None,
    all_sources: Annotated[bool, typer.Option("--all", help="Run every source.")] = False,
    wait: Annotated[bool, typer.Option(help="Follow the runs to the end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print summaries as JSON.")] = False,
    path: Annotated[Path | None, typer.Option(
        help="File sources: read the files of this folder once, leaving them in place.",
        exists=True, file_okay=False)] = None,
    since: Annotated[datetime | None, typer.Option(
        help="Firebird: also re-read rows updated since this date (backfill a window).")] = None,
    full: Annotated[bool, typer.Option(
        help="Re-read everything; rows already stored in the same version are skipped, "
             "never doubled.")] = False,
    require_workers: Annotated[bool, typer.Option(
        help="Exit 2 without enqueuing when no worker consumes the extract, transform or "
             "load queue (by default it says so and enqueues anyway).")] = False,
) -> None:
    """Enqueue runs on a running fleet (workers started with `python -m workers.fleet` and
    `python -m workers.loader` against ETL_REDIS_URL)."""
    from etl_tasks.api import run_source
    from etl_tasks.resources import get_resources

    names = [s.name for s in get_resources().pipeline.sources] if all_sources else sources
    if not names:
        raise typer.BadParameter("name at least one source, or use --all")
    get_resources().redis_conn.check()  # a wrong password: say so now, not after retries
    missing = _missing_consumers()
    for message in missing:
        err.print(f"[yellow]{message}[/yellow]", soft_wrap=True)
    if missing and require_workers:
        err.print("[red]nothing enqueued (--require-workers)[/red]")
        raise typer.Exit(2)
    if missing:
        err.print("the runs are enqueued and wait for those workers")
    handles = [run_source(name, path=str(path) if path else None, since=since, full=full)
               for name in names]
    if not wait:
        for h in handles:
            out.print(f"{h.source}: run {h.run_id} enqueued (follow it: etl wait {h.run_id})")
        return
    raise typer.Exit(_report(*_follow(handles, as_json), as_json=as_json))


@cli.command("wait")
def wait_cmd(
    run_ids: Annotated[list[str], typer.Argument(help="Run ids (printed by `etl run`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print summaries as JSON.")] = False,
) -> None:
    """Follow runs already started (by `etl run`, beat or a Python shell) to their end.

    Exit code 0 when every run finished, 1 when one ended partial or failed, 3 when one
    stopped making progress for ETL_STALL_S seconds."""
    from etl_tasks.api import follow_run

    handles = [follow_run(run_id) for run_id in run_ids]
    raise typer.Exit(_report(*_follow(handles, as_json), as_json=as_json))


@cli.command("dead-letters")
def dead_letters_cmd(
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Resolved ones too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON.")] = False,
) -> None:
    """List dead letters: work that failed or killed its worker more than ETL_MAX_ATTEMPTS
    times. Each names the source pointer (key range or file) and the reason, never a row.
    Later runs try open ones again once; `etl retry ID` sends one now."""
    from etl_tasks.load import duckdb as store
    from etl_tasks.resources import get_resources
    from etl_tasks.runs import dead_letters

    res = get_resources()
    found: dict[str, dict[str, object]] = {}
    if res.settings.duckdb_path.exists():
        with store.read_only(res.settings.duckdb_path) as con:
            if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = "
                           "'etl_dead_letters'").fetchone() != (0,):
                for entry in store.dead_letters(con, source, None if show_all else "open"):
                    found[str(entry["dead_letter_id"])] = entry
    names = [source] if source else [s.name for s in res.pipeline.sources]
    for name in names:  # letters of runs still in flight are in Redis only
        for entry in dead_letters.open_letters(res.redis, name):
            found.setdefault(entry["dead_letter_id"], {**entry, "status": "open"})
    letters = sorted(found.values(), key=lambda e: -float(e["created_at"]))  # type: ignore[arg-type]
    if as_json:
        print(json.dumps(letters, indent=2, default=str))
        return
    if not letters:
        out.print("No dead letters.")
        return
    table = Table(title="Dead letters")
    for col in ("id", "source", "status", "stage", "where", "attempts", "reason"):
        table.add_column(col)
    for e in letters:
        table.add_row(str(e["dead_letter_id"]), str(e["source"]), str(e["status"]),
                      str(e["stage"]), str(e["pointer"]), str(e["attempts"]), str(e["reason"]))
    out.print(table)


@cli.command()
def retry(
    dead_letter_id: Annotated[str, typer.Argument(help="An id from `etl dead-letters`.")],
    wait: Annotated[bool, typer.Option(help="Follow the run to the end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Send one dead letter's work again, as a run of its own (with fresh attempts). The dead
    letter is resolved when that run loads it."""
    from etl_tasks.api import retry_dead_letter

    handle = retry_dead_letter(dead_letter_id)
    if not wait:
        out.print(f"{handle.source}: run {handle.run_id} enqueued (follow it: etl wait "
                  f"{handle.run_id})")
        return
    raise typer.Exit(_report(*_follow([handle], as_json), as_json=as_json))


@cli.command()
def reconcile(
    sources: Annotated[list[str] | None, typer.Argument(help="Sources (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print balances as JSON.")] = False,
) -> None:
    """Check that every source row is loaded, quarantined, dead-lettered or waiting, counted
    independently (the Firebird table itself; the records of processed files), and that
    each recent run's counts add up. Exit code 1 when something is unexplained."""
    from etl_tasks.load import duckdb as store
    from etl_tasks.reconcile import reconcile as balance_of
    from etl_tasks.resources import get_resources

    res = get_resources()
    chosen = [res.pipeline.source(n) for n in sources] if sources else res.pipeline.sources
    with store.read_only(res.settings.duckdb_path) as con:
        balances = [balance_of(res, con, src) for src in chosen]
    bad = any(b.unexplained or any(r["difference"] for r in b.runs) for b in balances)
    if as_json:
        print(json.dumps([b.public() for b in balances], indent=2, default=str))
        raise typer.Exit(1 if bad else 0)
    table = Table(title="Reconciliation")
    for col in ("source", "source rows", "loaded", "quarantined", "dead-lettered",
                "not yet run", "unexplained"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for b in balances:
        table.add_row(b.source, f"{b.source_rows:,}", f"{b.loaded:,}", f"{b.quarantined:,}",
                      f"{b.dead_lettered:,}", f"{b.not_yet_run:,}", f"{b.unexplained:,}")
    out.print(table)
    for b in balances:
        for line in b.explanations:
            err.print(f"{b.source}: {line}")
    raise typer.Exit(1 if bad else 0)


@cli.command("sources")
def sources_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the sources as JSON.")] = False,
) -> None:
    """The configured sources: kind, table or inbox, dataset and target table, columns (where
    each is read from and its type; a Firebird table's reflected), natural key and version,
    schedule and checkpoint (key and updated marks, or files loaded). Checkpoints are left
    out, with a note, when Redis cannot be reached; a table's columns are the configured ones
    when Firebird cannot be."""
    from redis import RedisError

    from etl_tasks.catalog import checkpoint_text, describe, reflected_schema
    from etl_tasks.config import SourceConfig
    from etl_tasks.resources import get_resources
    from etl_tasks.sources.firebird_schema import TableSchema

    res = get_resources()

    def reflect(source: SourceConfig) -> TableSchema:
        with res.firebird_pool.connection() as con:
            return reflected_schema(con, source)

    try:
        res.redis.ping()
        found = describe(res.pipeline, res.settings, res.redis, reflect)
    except RedisError as exc:
        err.print(f"[yellow]Redis unreachable ({type(exc).__name__}): checkpoints not "
                  "shown[/yellow]")
        found = describe(res.pipeline, res.settings, None, reflect)
    for s in found:
        if s["columns_from"].startswith("config ("):
            err.print(f"[yellow]{s['name']}: columns from the {escape(s['columns_from'])}"
                      "[/yellow]")
    if as_json:
        print(json.dumps(found, indent=2))
        return
    table = Table(title="Sources")
    for col in ("source", "kind", "reads", "into", "key (version)", "schedule", "checkpoint"):
        table.add_column(col)
    for s in found:
        table.add_row(s["name"], s["kind"], s.get("table") or s.get("inbox"),
                      s["target_table"] if s["dataset"] == s["target_table"]
                      else f"{s['target_table']} ({s['dataset']})",
                      f"{', '.join(s['key']) or '(whole row)'} ({s['version'] or '-'})",
                      s["schedule"], checkpoint_text(s["checkpoint"]))
    out.print(table)
    for s in found:
        listed = ", ".join(f"{c['name']} <- {c['from']}" + (f" ({c['type']})" if c["type"]
                                                            else "") for c in s["columns"])
        out.print(f"[bold]{s['name']}[/bold] columns: {escape(listed)}", soft_wrap=True)


@cli.command()
def query(
    sql: Annotated[str, typer.Argument(help="One read-only query (SELECT, WITH ...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    limit: Annotated[int, typer.Option(help="Rows to show in the table.")] = 50,
) -> None:
    """Query the store read-only. While DuckDB is unavailable (another process holds it) a
    fresh cached answer of the same query, else the SQLite fallback, answers; the output says
    which store answered and how old its data is. Writes are refused."""
    from etl_tasks.api import read_data

    answer = read_data(sql)
    if as_json:
        print(json.dumps(answer.public(), indent=2, default=str))
        return
    table = Table(title=f"answered by {answer.store}")
    for name in answer.table.column_names:
        table.add_column(name)
    for row in answer.table.slice(0, limit).to_pylist():
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    out.print(table)
    err.print(f"{answer.table.num_rows:,} row(s) from {answer.store}: {answer.note}")


@cli.command()
def fallbacks(
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """How many chunks and rows wait in the SQLite fallback and the spool for the replay
    into DuckDB (beat runs it every ETL_REPLAY_EVERY_S once DuckDB is healthy)."""
    from etl_tasks.api import fallbacks_waiting

    waiting = fallbacks_waiting()
    if as_json:
        print(json.dumps(waiting, indent=2))
        return
    for store, counts in waiting.items():
        out.print(f"{store}: {counts['chunks']:,} chunk(s), {counts['rows']:,} row(s) waiting")


quarantine_cli = typer.Typer(help="Quarantined rows: their raw values and retention.",
                              no_args_is_help=True)
cli.add_typer(quarantine_cli, name="quarantine")


@quarantine_cli.command("purge")
def quarantine_purge(
    older_than: Annotated[float, typer.Option(
        "--older-than", help="Days; default ETL_QUARANTINE_RAW_DAYS (30).")] = -1.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the loader.")] = 120.0,
) -> None:
    """Drop the raw values (patient data) of quarantined rows older than N days. The rows, the
    broken rules and the source pointers stay, so reconciliation still adds up. Runs on the
    loader (the only writer of the store); beat also runs it every 6 hours."""
    from etl_tasks.tasks import purge_quarantine_raw_task

    days = None if older_than < 0 else older_than
    purged = _loader_answer(purge_quarantine_raw_task.apply_async((days,)), timeout, "purge")
    out.print(f"raw values dropped from {purged:,} quarantined row(s)")


def _loader_answer(result: Any, timeout: float, what: str) -> Any:
    """The loader's answer to a task sent to the `load` queue, or exit 2 saying why none came
    within `timeout` (nothing is lost: a queued or retrying task still runs later)."""
    from celery.exceptions import TimeoutError as NoAnswer

    try:
        answer = result.get(timeout=timeout, propagate=False)
    except NoAnswer:
        state = result.state
        if state == "RETRY":
            why = ("DuckDB is unavailable (another process holds it?); the loader retries "
                   f"the {what} with backoff and does it once DuckDB is free")
        elif state == "STARTED":
            why = f"the loader is still at the {what}; it finishes on its own"
        else:
            why = (f"no loader took the {what}: is `python -m workers.loader` running? It "
                   "stays queued and runs when a loader starts")
        err.print(f"[red]no answer from the loader within {timeout:.0f}s: {why}[/red]")
        raise typer.Exit(2) from None
    if result.failed():
        # Only our own errors are shown with their text: they never quote a value.
        reason = str(answer) if isinstance(answer, EtlError) else (
            f"{type(answer).__name__} (details in the loader's log)")
        err.print(f"[red]the {what} failed on the loader: {escape(reason)}[/red]")
        raise typer.Exit(2)
    return answer


@quarantine_cli.command("list")
def quarantine_list(
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    run: Annotated[str | None, typer.Option(help="Only rows quarantined by this run.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to list (newest first).", min=0)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait while the loader holds the store for a commit.")] = 30.0,
) -> None:
    """Quarantined rows: first a count per broken rule and source, then the newest rows with
    their rules, failed fields, source pointer, run, chunk and time. Values are never shown
    (they are patient data); whether a row's raw values are still kept is."""
    from etl_tasks.errors import TransientError
    from etl_tasks.load import duckdb as store
    from etl_tasks.load import quarantine

    path = _settings().duckdb_path
    try:
        with store.read_only(path, wait) as con:
            held = quarantine.has_table(con)
            summary = quarantine.summary(con, source, run) if held else {}
            rows = quarantine.rows(con, source, run, limit) if held else []
    except TransientError:
        err.print(f"[red]error:[/red] the DuckDB store {path} is busy: its writer (the loader) "
                  f"held it for more than {wait:.0f}s. Retry in a moment, or pass a longer "
                  "--wait.")
        raise typer.Exit(2) from None
    total = sum(figures["rows"] for figures in summary.values())
    if as_json:
        print(json.dumps({"summary": summary, "total": total, "rows": rows}, indent=2))
        return
    if not summary:
        out.print("No quarantined rows.")
        return
    counts = Table(title="Quarantined rows by rule")
    for col in ("source", "rule", "rows"):
        counts.add_column(col, justify="right" if col == "rows" else "left")
    for name, figures in summary.items():
        for rule, n in figures["by_reason"].items():
            counts.add_row(name, escape(rule), f"{n:,}")
        counts.add_row(name, f"(all; raw values purged: {figures['raw_purged']:,})",
                       f"{figures['rows']:,}", end_section=True)
    out.print(counts)
    listed = Table(title=f"Newest {len(rows):,} of {total:,} (--limit)")
    for col in ("quarantined", "source", "pointer", "failed fields", "rules", "run", "chunk"):
        listed.add_column(col)
    for row in rows:
        listed.add_row(datetime.fromtimestamp(row["quarantined_at"]).strftime("%Y-%m-%d %H:%M"),
                       row["source"], escape(row["source_ref"]), ", ".join(row["fields"]),
                       escape("; ".join(row["reasons"])), row["run_id"], escape(row["chunk_id"]))
    out.print(listed)


@quarantine_cli.command("replay")
def quarantine_replay(
    source: Annotated[str | None, typer.Option(help="Only this source (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the loader.")] = 300.0,
) -> None:
    """Validate quarantined rows again by the current rules (after a rule or source fix) and
    load those that pass, exactly once: upserted like any chunk, removed from quarantine and
    recorded in the ledger in one transaction, on the loader. Rows that still fail stay with
    their current rules; rows whose raw values were purged cannot be replayed (counted).
    A source that cannot be replayed (a generic table's Firebird unreachable, its table
    gone) is reported with what to do and the others are replayed; exit 1 then."""
    from etl_tasks.resources import get_resources
    from etl_tasks.tasks import replay_quarantine_task

    if source:
        get_resources().pipeline.source(source)  # an unknown name fails here, not on the loader
    missing = _missing_consumers(queues=("load",))
    if missing:
        for message in missing:
            err.print(f"[red]{message}[/red]", soft_wrap=True)
        err.print("[red]nothing enqueued[/red]")
        raise typer.Exit(2)
    counts = _loader_answer(replay_quarantine_task.apply_async((source,)), timeout, "replay")
    failed = {name: f["error"] for name, f in counts.items() if f.get("error")}
    if as_json:
        print(json.dumps(counts, indent=2))
        if failed:
            raise typer.Exit(1)
        return
    table = Table(title="Quarantine replay")
    columns = {"examined": "examined", "loaded": "loaded", "unchanged": "already stored",
               "still_quarantined": "still quarantined", "reasons_refreshed": "rules changed",
               "purged": "purged (not replayable)"}
    table.add_column("source")
    for title in columns.values():
        table.add_column(title, justify="right")
    for name, figures in counts.items():
        table.add_row(name, *(f"{figures[key]:,}" for key in columns))
    out.print(table)
    for message in failed.values():
        err.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@cli.command()
def demo(
    claims: Annotated[int, typer.Option(help="Claims to generate when the demo data is "
                                        "missing.")] = 100_000,
    fresh: Annotated[bool, typer.Option(help="Regenerate the demo data first.")] = False,
    fleet: Annotated[int, typer.Option(help="Fleet worker processes.")] = os.cpu_count() or 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print summaries as JSON.")] = False,
) -> None:
    """The main job, end to end on the embedded defaults: demo data, a local Redis (unless
    ETL_REDIS_URL is set), a worker fleet, the loader and beat (the supervisor), one run of
    every source."""
    from etl_tasks.celery import app, use_redis
    from etl_tasks.local_services import RedisServer, Worker, wait_for_workers
    from etl_tasks.resources import reset_resources

    settings = _settings()
    # A server DSN is not a local path: its demo data is made only when asked (--fresh).
    if fresh or (_firebird_target().embedded and not Path(settings.firebird_dsn).exists()):
        demo_data(claims=claims)
    started: list = []  # type: ignore[type-arg]
    try:
        if "ETL_REDIS_URL" not in os.environ:
            server = RedisServer(settings.data_dir / ".redis").start()
            started.append(server)
            os.environ["ETL_REDIS_URL"] = server.url
            reset_resources()
            use_redis(server.url)
            err.print(f"Started redis-server at {server.url} (data in "
                      f"{settings.data_dir / '.redis'})")
        logs = settings.data_dir / "logs"
        env = dict(os.environ)
        for role, extra in (("fleet", ["--concurrency", str(fleet)]), ("loader", []),
                            ("beat", [])):
            started.append(Worker(role, env, logs / f"{role}.log", extra).start())
        with err.status("Starting the worker fleet, the loader and beat"):
            wait_for_workers(app.control, ["fleet-", "loader-"])
        err.print(f"Workers up (logs in {logs}); running every source")
        from etl_tasks.api import run_source
        from etl_tasks.resources import get_resources

        handles = [run_source(s.name) for s in get_resources().pipeline.sources]
        code = _report(*_follow(handles, as_json), as_json=as_json)
    finally:
        for proc in reversed(started):
            proc.stop()
    raise typer.Exit(code)


def _status_table(status: dict) -> None:  # type: ignore[type-arg]
    table = Table(title="Pipeline status")
    for col in ("source", "runs", "success", "avg duration s", "last status", "stale for",
                "dead letters"):
        table.add_column(col, justify="left" if col in ("source", "last status") else "right")

    def row(name: str, f: dict) -> None:  # type: ignore[type-arg]
        rate, avg, stale = f["success_rate"], f["average_duration_s"], f["staleness_s"]
        table.add_row(name, f"{len(f['quality_trend']):,}",
                      "-" if rate is None else f"{rate:.0%}",
                      "-" if avg is None else f"{avg:.1f}",
                      f["last_run"]["status"] if f["last_run"] else "-",
                      "-" if stale is None else f"{stale:.0f}s", f"{f['dead_letters']:,}")

    for name, figures in status["sources"].items():
        row(name, figures)
    row("(all)", status["overall"])
    out.print(table)
    for queue in ("extract", "transform", "load", "control"):
        names = status["workers"].get(queue, [])
        out.print(f"{queue} workers: {', '.join(names) if names else '[red]none[/red]'}")
    for fallback, counts in status["overall"]["waiting_in_fallbacks"].items():
        if counts["rows"] or counts["chunks"]:
            out.print(f"{fallback}: {counts['chunks']:,} chunk(s), {counts['rows']:,} row(s) "
                      "waiting for the replay")
    if status.get("runs_from") == "redis":
        out.print("[yellow]DuckDB is held by another process: run figures come from the run "
                  "records in Redis[/yellow]")
    colour = {"critical": "red", "warning": "yellow", "info": "blue"}
    for alert in status["open_alerts"]:
        out.print(f"[{colour[alert['severity']]}]ALERT {alert['severity']}[/]: "
                  f"{escape(alert['message'])}")
    if not status["open_alerts"]:
        out.print("open alerts: none")


@cli.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    last: Annotated[int, typer.Option(help="Runs per source to look at.", min=1)] = 20,
) -> None:
    """The pipeline's health over the last N runs, overall and per source: success rate,
    average duration, quality trend, error patterns, last run (with its time per stage,
    source latency and errors by class), staleness, open alerts, dead letters, rows waiting
    in the fallbacks, and the workers online per queue. Thresholds are set in the pipeline
    config (`[thresholds]`, docs/configuration.md)."""
    from etl_tasks.celery import app
    from etl_tasks.resources import get_resources
    from etl_tasks.status import collect

    res = get_resources()
    figures = collect(res.settings, [s.name for s in res.pipeline.sources], res.redis,
                      app.control, last=last)
    if as_json:
        print(json.dumps(figures, indent=2, default=str))
        return
    _status_table(figures)


@cli.command()
def report(
    html: Annotated[Path, typer.Option("--html", help="Write the page to this file.",
                                       dir_okay=False)],
    last: Annotated[int, typer.Option(help="Runs per source to chart.", min=1)] = 50,
    source: Annotated[list[str] | None, typer.Option(
        "--source", help="Only this source (repeatable).")] = None,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait while the loader holds the store for a commit.")] = 30.0,
) -> None:
    """Write one self-contained HTML page (no script, nothing fetched) charting the last runs
    per source: rows loaded and quarantined, quality, durations, time per stage, quarantine
    reasons; and a table of the last runs. Aggregates only: no row values."""
    from etl_tasks.errors import TransientError
    from etl_tasks.monitoring import report as page

    store_path = _settings().duckdb_path
    try:
        data = page.read(store_path, last, source or [], wait)
    except TransientError:
        err.print(f"[red]error:[/red] the DuckDB store {escape(str(store_path))} is busy: its "
                  f"writer (the loader) held it for more than {wait:.0f}s. Retry in a moment.")
        raise typer.Exit(2) from None
    page.write(html, page.render(data))
    out.print(f"report written to {escape(str(html))}: {len(data.runs):,} runs of "
              f"{len(data.sources)} source(s)")


# Which worker consumes each queue a run needs, and how to start it.
_QUEUE_WORKERS = {"extract": "python -m workers.fleet", "transform": "python -m workers.fleet",
                  "load": "python -m workers.loader"}


def _missing_consumers(timeout: float = 1.5,
                       queues: tuple[str, ...] = tuple(_QUEUE_WORKERS)) -> list[str]:
    """What to tell the operator about each of `queues` (default: those a run needs) that no
    worker consumes."""
    from etl_tasks.celery import app
    from etl_tasks.status import workers_by_queue

    consumed = workers_by_queue(app.control, timeout=timeout)
    # A run needs every role, beat's supervisor too; a lone loader task needs the loader.
    needed = {_QUEUE_WORKERS[q] for q in queues} | (
        {"python -m workers.beat"} if len(queues) > 1 else set())
    messages = []
    for queue in queues:
        command = _QUEUE_WORKERS[queue]
        if not consumed.get(queue):
            others = sorted(needed - {command})
            also = (" (and " + ", ".join(f"`{o}`" for o in others) + ")") if others else ""
            messages.append(f"no worker consumes the {queue} queue: start `{command}`{also}")
    return messages


def main() -> None:
    from kombu.exceptions import OperationalError
    from redis import RedisError

    from etl_tasks.monitoring import logs
    from etl_tasks.resources import get_resources

    try:
        # Warnings and errors of the libraries go to stderr as structured lines; the
        # command's own output (tables, JSON) stays on stdout and the console.
        logs.setup(_settings().log_format, logging.WARNING)
        cli()
    except EtlError as exc:
        # escape: the message starts with its source in brackets ("[duckdb] ..."), which rich
        # would otherwise take for markup and drop.
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    except (RedisError, OperationalError) as exc:
        # A refused password, an unknown master, a failed TLS handshake: the setting to fix
        # rather than a traceback. Redis being down stays an error of its own.
        problem = get_resources().redis_conn.explain(exc)
        if problem is None:
            raise
        err.print(f"[red]error:[/red] {escape(problem)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
