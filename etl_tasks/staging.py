"""Chunk payloads staged outside the task messages: zstd Arrow IPC in Redis with a TTL.

Messages carry only run and chunk ids; the rows (patient data) live here until the load
commits, then are deleted. Keys are scoped by run, so two runs never read or delete each
other's payloads. A payload that is gone before it was used (expired, or Redis lost it) raises
`StagingLost`: the pipeline extracts that unit again rather than failing the run.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import redis

from etl_tasks.errors import EtlError

Stage = Literal["raw", "valid", "quarantine"]
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


def put(r: redis.Redis, run_id: str, chunk_id: str, stage: Stage, table: pa.Table,
        ttl_s: int) -> None:
    r.set(_key(run_id, chunk_id, stage), encode(table), ex=ttl_s)


def get(r: redis.Redis, run_id: str, chunk_id: str, stage: Stage) -> pa.Table:
    payload = r.get(_key(run_id, chunk_id, stage))
    if payload is None:
        raise StagingLost(f"staged {stage} payload of chunk {chunk_id} of run {run_id} is "
                          "gone (expired or lost by Redis); its unit is extracted again")
    return decode(payload)  # type: ignore[arg-type]


def drop(r: redis.Redis, run_id: str, chunk_id: str) -> None:
    r.delete(*(_key(run_id, chunk_id, stage) for stage in ("raw", "valid", "quarantine")))
