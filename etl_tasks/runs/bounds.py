"""Sampled key bounds, sealed: the ends of key ranges that are not integers.

A text key (an MRN, a visit id) is patient data, and a sampled range's bounds live where
patient data must not be in clear: the run's units and the key checkpoint in Redis, dead
letters, the ledger's rows read by operators' tools. Each bound is sealed with the staging
keys (sealing.py) under one name per source, so a token opens wherever it is copied (from a
unit into the checkpoint, the ledger or a dead letter). The plan seals each boundary once and
gives the same token to the range it ends and the range it starts, so equal tokens mean the
same boundary and the checkpoint walks ranges without opening them.
"""

from __future__ import annotations

import base64

from etl_tasks.sealing import Sealer


def _name(source: str) -> str:
    return f"etl:key-bound:{source}"


def seal(sealer: Sealer, source: str, value: bytes) -> str:
    """A bound as a token (base64 text of the sealed bytes)."""
    return base64.b64encode(sealer.seal(_name(source), value)).decode("ascii")


def open_bound(sealer: Sealer, source: str, token: str) -> bytes | None:
    """The bound a token holds; None for "" (no bound). A token sealed with a key no longer
    configured raises SealBroken."""
    if not token:
        return None
    return sealer.open(_name(source), base64.b64decode(token))
