"""Chunk payloads staged outside the task messages: zstd Arrow IPC in Redis with a TTL.

Messages carry only run and chunk ids; the rows (patient data) live here until the load
commits, then are deleted. A payload that expired before its load is a fatal error for that
chunk: the source must be run again (chunk ids are deterministic, nothing is doubled).
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import redis

from etl_tasks.errors import FatalError

Stage = Literal["raw", "valid", "quarantine"]
_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def _key(chunk_id: str, stage: Stage) -> str:
    return f"etl:stage:{chunk_id}:{stage}"


def encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_OPTIONS) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def decode(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def put(r: redis.Redis, chunk_id: str, stage: Stage, table: pa.Table, ttl_s: int) -> None:
    r.set(_key(chunk_id, stage), encode(table), ex=ttl_s)


def get(r: redis.Redis, chunk_id: str, stage: Stage) -> pa.Table:
    payload = r.get(_key(chunk_id, stage))
    if payload is None:
        raise FatalError(f"staged {stage} payload of chunk {chunk_id} is missing (expired or "
                         "already loaded); run the source again to re-extract it")
    return decode(payload)  # type: ignore[arg-type]


def drop(r: redis.Redis, chunk_id: str) -> None:
    r.delete(*(_key(chunk_id, stage) for stage in ("raw", "valid", "quarantine")))
