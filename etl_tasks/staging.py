"""Chunk payloads staged outside the task messages: zstd Arrow IPC, sealed with AES-GCM
(`sealing.py`), in Redis with a TTL.

Messages carry only run and chunk ids; the rows (patient data) live here, unreadable without
the staging key, until the load commits, then are deleted. A payload that fails
authentication is treated as lost: never data. Keys are scoped by run, so two runs never
read or delete each other's payloads. A payload that is gone before it was used (expired, or
Redis lost it) raises `StagingLost`: the pipeline extracts that unit again rather than
failing the run. A full Redis is a `TransientError` (retried), checked here once for every
stage that stages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import pyarrow as pa
import redis

from etl_tasks.errors import EtlError, TransientError
from etl_tasks.sealing import SealBroken, Sealer

log = logging.getLogger(__name__)

Stage = Literal["raw", "valid", "quarantine"]
# Staging may fill Redis up to this share of its maxmemory; the rest is for the broker's
# queues, results and run state, which must keep working so that loads can free room.
STAGING_SHARE = 0.8
_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


class StagingLost(EtlError):
    """A staged payload is gone; its unit must be extracted again."""


def _key(run_id: str, chunk_id: str, stage: Stage) -> str:
    return f"etl:stage:{run_id}:{chunk_id}:{stage}"


def encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_OPTIONS) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def decode(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """A full Redis (maxmemory reached, `noeviction`) is a transient error: the loader's
    commits free staged payloads, so the step is retried with backoff, never a crash."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as exc:
        raise TransientError(f"Redis is full (maxmemory reached) while staging {what}; "
                             "retried once the loader has committed staged chunks (see "
                             "docs/configuration.md to size Redis)", source="staging") from exc


def _check_room(r: redis.Redis, size: int, what: str) -> None:
    """Refuse to stage past STAGING_SHARE of maxmemory: with `noeviction` a Redis over its
    limit refuses every write, the broker's and the run's bookkeeping too, and the loader
    could not even start the commits that would free it."""
    memory = r.info("memory")
    limit = int(memory.get("maxmemory", 0))
    if limit and int(memory["used_memory"]) + size > limit * STAGING_SHARE:
        raise TransientError(
            f"Redis staging is full ({int(memory['used_memory']) >> 20} MB used of "
            f"{limit >> 20} MB maxmemory) for {what}; retried once the loader has committed "
            "staged chunks (see docs/configuration.md to size Redis)", source="staging")


def put(r: redis.Redis, sealer: Sealer, run_id: str, chunk_id: str, stage: Stage,
        table: pa.Table, ttl_s: int) -> None:
    name, what = _key(run_id, chunk_id, stage), f"the {stage} payload of chunk {chunk_id}"
    payload = sealer.seal(name, encode(table))
    with translate_errors(what):
        _check_room(r, len(payload), what)
        r.set(name, payload, ex=ttl_s)


def get(r: redis.Redis, sealer: Sealer, run_id: str, chunk_id: str, stage: Stage) -> pa.Table:
    name = _key(run_id, chunk_id, stage)
    payload = r.get(name)
    if payload is None:
        raise StagingLost(f"staged {stage} payload of chunk {chunk_id} of run {run_id} is "
                          "gone (expired or lost by Redis); its unit is extracted again")
    try:
        return decode(sealer.open(name, payload))  # type: ignore[arg-type]
    except SealBroken as exc:  # logged without a traceback: the reason is all there is
        log.error("%s; chunk %s of run %s is extracted again", exc, chunk_id, run_id)  # noqa: TRY400
        raise StagingLost(f"staged {stage} payload of chunk {chunk_id} of run {run_id} "
                          "failed authentication; its unit is extracted again") from None


def drop(r: redis.Redis, run_id: str, chunk_id: str) -> None:
    r.delete(*(_key(run_id, chunk_id, stage) for stage in ("raw", "valid", "quarantine")))
