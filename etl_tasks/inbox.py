"""Inbox directories of file sources: which files are ready, who claims them, where they go.

A file still being written (a temporary name, or modified within the settle time) is left
for a later run. A file is claimed by content hash with an atomic Redis SET NX, so exactly one
run on one host takes it. After its load commits it moves to `processed/`; a refused file
moves to `quarantine/` with a small `.reason.txt` beside it. A workbook's CSV sidecar (same
stem, `.csv`) moves with it, so that a later upload of the same name never reads a stale one.
Files of other types are left where they are.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import redis

from etl_tasks.sources import excel, files, xml_feed

# Names that upload tools and editors use while a file is still being written.
TEMPORARY_MARKS = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp")
# File suffixes a source of each kind reads, in any case (Windows uploads say `.XLSX`).
SUFFIXES: dict[str, frozenset[str]] = {"xml": xml_feed.EXTENSIONS, "excel": excel.EXTENSIONS}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temporary(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith((".", "~$")) or name.endswith(TEMPORARY_MARKS)


def ready_files(inbox: Path, kind: str, settle_s: float,
                now: float | None = None) -> list[Path]:
    """Files a source of `kind` reads that are complete: not temporary, untouched for settle_s."""
    try:
        if not inbox.is_dir():
            return []
        found = [path for path in inbox.iterdir() if path.suffix.lower() in SUFFIXES[kind]]
    except OSError as exc:  # a share gone away (EIO, ESTALE, a timeout): counted by the breaker
        error = files.classify_os_error(exc, f"inbox {inbox}", None)
        raise error from exc
    now = time.time() if now is None else now
    ready = []
    for path in sorted(found):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # moved away between the listing and now
        if path.is_file() and not is_temporary(path) and now - stat.st_mtime >= settle_s:
            ready.append(path)
    return ready


def claim(r: redis.Redis, source: str, sha256: str, run_id: str, ttl_s: int) -> bool:
    """Take a file (by content) for this run; False when another run already holds it."""
    key = f"etl:claim:{source}:{sha256}"
    if r.set(key, run_id, nx=True, ex=ttl_s):
        return True
    holder = r.get(key)
    return holder is not None and (holder.decode() if isinstance(holder, bytes)
                                   else str(holder)) == run_id


def release(r: redis.Redis, source: str, sha256: str) -> None:
    r.delete(f"etl:claim:{source}:{sha256}")


def sidecars(path: Path) -> list[Path]:
    """The CSV sidecar(s) of a workbook; none for other files."""
    if path.suffix.lower() not in SUFFIXES["excel"]:
        return []
    return [side for side in map(path.with_suffix, files.SIDECAR_SUFFIXES) if side.is_file()]


def _move(path: Path, folder_name: str, sha256: str) -> Path | None:
    """Move `path` and its sidecars into `folder_name/` beside it, never over another file
    (same name with other content: the target stem gets the hash); None if already gone."""
    if not path.exists():
        return None
    folder = path.parent / folder_name
    folder.mkdir(exist_ok=True)
    companions = sidecars(path)
    stem = path.stem
    if any((folder / moved.name).exists() for moved in [path, *companions]):
        stem = f"{path.stem}.{sha256[:12]}"
    for companion in companions:
        os.replace(companion, folder / (stem + companion.suffix))
    target = folder / (stem + path.suffix)
    os.replace(path, target)
    return target


def move_processed(path: Path, sha256: str) -> Path | None:
    """Move a loaded file to `processed/` beside it; None when it is already gone."""
    return _move(path, "processed", sha256)


def move_quarantined(path: Path, sha256: str, reason: str) -> Path | None:
    """Move a refused file to `quarantine/` with `<name>.reason.txt` saying why."""
    target = _move(path, "quarantine", sha256)
    if target is not None:
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")
    return target
