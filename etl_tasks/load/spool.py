"""The spool: the last resort when neither DuckDB nor SQLite can take a chunk.

Plain files on local disk, one folder per state, so a crash leaves every chunk in a named
state: `tmp/` (being written: never data), `pending/` (durable, waiting for DuckDB). A chunk
is a folder holding `valid.arrow`, `quarantine.arrow` (Arrow IPC, exact types) and
`entry.json` (its ledger entry). It is written under `tmp/`, every file fsynced, then the
folder renamed into `pending/` and `pending/` fsynced: only then is it committed (FAULTS.md:
a file is durable only after write, fsync, rename and fsync of the directory). A full disk
fails the write cleanly (the half-written folder is removed) and nothing is acknowledged.
Writes hold the spool's lock file and seal its `fence` file before the rename, as a store's
transaction seals its fence table (load/fence.py): a stale loader cannot commit here either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from etl_tasks.errors import EtlError, FatalError, TransientError
from etl_tasks.load.duckdb import LedgerEntry, WriteResult
from etl_tasks.load.fence import WriterFence


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def _name(entry: LedgerEntry) -> str:
    # Commit order first (the replay goes by name), then which chunk of which run.
    safe = entry.chunk_id.replace("/", "_").replace(":", "_")
    return f"{time.time_ns():020d}-{entry.run_id}-{safe}"


def _find(root: Path, entry: LedgerEntry) -> Path | None:
    pending = root / "pending"
    if not pending.is_dir():
        return None
    for folder in pending.iterdir():
        if _entry_of(folder) == (entry.run_id, entry.chunk_id):
            return folder
    return None


def _entry_of(folder: Path) -> tuple[str, str] | None:
    try:
        data = json.loads((folder / "entry.json").read_text())
    except (OSError, ValueError):
        return None
    return data["entry"]["run_id"], data["entry"]["chunk_id"]


@contextlib.contextmanager
def _locked(root: Path, wait_s: float) -> Iterator[None]:
    """The spool's writer lock (flock on `root/.writer.lock`): a commit and its fence check
    are one step, and a writer paused holding it keeps every other out, as DuckDB's file
    lock does; waited for `wait_s`, then the spool is unavailable."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise classify(exc) from exc
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TransientError("the spool is locked by another loader; the chunk "
                                         "was not stored and will be retried",
                                         source="spool") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # and with it the lock


def _seal(root: Path, fence: WriterFence | None) -> None:
    """Raise the spool's fence file to the writer's token (or refuse), under the lock."""
    if fence is None:
        return
    path = root / "fence"
    try:
        stored: int | None = int(path.read_text())
    except FileNotFoundError:
        stored = None
    if fence.admit(stored):
        _write_file(root / ".fence.tmp", str(fence.token).encode())
        os.replace(root / ".fence.tmp", path)
        _fsync_dir(root)
    fence.confirm()


def write_chunk(root: Path, *, source: str, table: str, dataset: str, entry: LedgerEntry,
                valid: pa.Table, quarantined: pa.Table, fence: WriterFence | None = None,
                lock_wait_s: float = 2.0) -> WriteResult:
    """Commit one chunk to the spool, or nothing when it is there already."""
    with _locked(root, lock_wait_s):
        if _find(root, entry) is not None:
            return WriteResult(0, 0, already_loaded=True)
        name = _name(entry)
        tmp = root / "tmp" / name
        try:
            for folder in (root / "tmp", root / "pending"):
                folder.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            _write_file(tmp / "valid.arrow", _ipc(valid))
            _write_file(tmp / "quarantine.arrow", _ipc(quarantined))
            _write_file(tmp / "entry.json", json.dumps({
                "entry": asdict(entry), "source": source, "target_table": table,
                "dataset": dataset}).encode())
            _fsync_dir(tmp)
            _seal(root, fence)
            os.replace(tmp, root / "pending" / name)  # the commit
            _fsync_dir(root / "pending")
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave half a chunk that looks whole
            if isinstance(exc, OSError):
                raise classify(exc) from exc
            raise
    return WriteResult(valid.num_rows, quarantined.num_rows, already_loaded=False)


def is_committed(root: Path, run_id: str, chunk_id: str) -> bool:
    return _find(root, LedgerEntry(run_id=run_id, chunk_id=chunk_id, unit_id="",
                                   kind="")) is not None


def pending(root: Path) -> list[Path]:
    """Committed chunk folders waiting for DuckDB, in commit order."""
    folder = root / "pending"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir())


def read_chunk(folder: Path) -> tuple[dict[str, Any], pa.Table, pa.Table]:
    meta = json.loads((folder / "entry.json").read_text())
    tables = []
    for name in ("valid.arrow", "quarantine.arrow"):
        with pa.memory_map(str(folder / name)) as source:
            tables.append(pa.ipc.open_file(source).read_all())
    return meta, tables[0], tables[1]


def delete_chunk(folder: Path) -> None:
    """Forget a chunk DuckDB has committed."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        _fsync_dir(folder.parent)


def add_record(root: Path, kind: str, payload: dict[str, Any], fence: WriterFence | None = None,
               lock_wait_s: float = 2.0) -> None:
    """A run-side record (a run's row, dead letters) made while both stores were down."""
    folder = root / "records"
    tmp = folder / f".{time.time_ns():020d}.tmp"
    with _locked(root, lock_wait_s):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_file(tmp, json.dumps({"kind": kind, "payload": payload},
                                        default=str).encode())
            _seal(root, fence)
            os.replace(tmp, folder / f"{time.time_ns():020d}.json")
            _fsync_dir(folder)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise classify(exc) from exc
            raise


def records(root: Path) -> list[tuple[Path, str, dict[str, Any]]]:
    folder = root / "records"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        found.append((path, data["kind"], data["payload"]))
    return found


def waiting(root: Path) -> dict[str, int]:
    chunks = pending(root)
    rows = 0
    for folder in chunks:
        for name in ("valid.arrow", "quarantine.arrow"):
            with contextlib.suppress(OSError, pa.ArrowInvalid), \
                    pa.memory_map(str(folder / name)) as source:
                rows += pa.ipc.open_file(source).read_all().num_rows
    return {"chunks": len(chunks), "rows": rows}


def classify(exc: BaseException) -> EtlError:
    if isinstance(exc, EtlError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return TransientError("the spool's disk is full: free space in ETL_SPOOL_DIR; the "
                              "chunk was not stored and will be retried", source="spool")
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, "OS error")
        return TransientError(f"the spool cannot be written ({code}); the chunk was not "
                              "stored and will be retried", source="spool")
    return FatalError(f"spool error {type(exc).__name__}", source="spool")
