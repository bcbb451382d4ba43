"""Inbox directories of file sources: which files are ready, who claims them, where they go.

A file still being written (a temporary name, or modified within the settle time) is left
for a later run. A file is claimed by content hash with an atomic Redis SET NX, so exactly one
run on one host takes it. After its load commits it moves to `processed/`; a refused file
moves to `quarantine/` with a small `.reason.txt` beside it.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import redis

# Names that upload tools and editors use while a file is still being written.
TEMPORARY_MARKS = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temporary(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith((".", "~$")) or name.endswith(TEMPORARY_MARKS)


def ready_files(inbox: Path, patterns: tuple[str, ...], settle_s: float,
                now: float | None = None) -> list[Path]:
    """Files matching `patterns` that are complete: not temporary, untouched for settle_s."""
    if not inbox.is_dir():
        return []
    now = time.time() if now is None else now
    found = {p for pattern in patterns for p in inbox.glob(pattern)}
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


def _free_name(folder: Path, name: str, sha256: str) -> Path:
    target = folder / name
    if target.exists():  # same name uploaded again with other content: keep both
        target = folder / f"{Path(name).stem}.{sha256[:12]}{Path(name).suffix}"
    return target


def move_processed(path: Path, sha256: str) -> Path | None:
    """Move a loaded file to `processed/` beside it; None when it is already gone."""
    if not path.exists():
        return None
    folder = path.parent / "processed"
    folder.mkdir(exist_ok=True)
    target = _free_name(folder, path.name, sha256)
    os.replace(path, target)
    return target


def move_quarantined(path: Path, sha256: str, reason: str) -> Path | None:
    """Move a refused file to `quarantine/` with `<name>.reason.txt` saying why."""
    if not path.exists():
        return None
    folder = path.parent / "quarantine"
    folder.mkdir(exist_ok=True)
    target = _free_name(folder, path.name, sha256)
    target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")
    os.replace(path, target)
    return target
