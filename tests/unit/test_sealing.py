"""Sealed staging payloads: AES-GCM with the Redis key name as associated data."""

from __future__ import annotations

import os
import stat

import pytest

from etl_tasks.config import Settings
from etl_tasks.errors import FatalError
from etl_tasks.sealing import SealBroken, Sealer, new_key, sealer_from

NAME = "etl:stage:run1:billing:keys:1-100:raw"
ROWS = b"P000123|Quokkaperson|1911-11-11"


def test_a_sealed_payload_opens_only_under_its_own_name_and_untouched():
    sealer = Sealer((os.urandom(32),))
    blob = sealer.seal(NAME, ROWS)
    assert ROWS not in blob
    assert b"P000123" not in blob
    assert sealer.open(NAME, blob) == ROWS
    with pytest.raises(SealBroken, match="failed authentication"):
        sealer.open(NAME.replace("1-100", "101-200"), blob)  # copied under another chunk
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(SealBroken):
        sealer.open(NAME, bytes(flipped))
    with pytest.raises(SealBroken, match="not sealed"):
        sealer.open(NAME, b"ARROW1" + ROWS)  # a plain payload is refused, not read


def test_rotation_new_key_seals_old_keys_still_open_and_a_stranger_key_does_not():
    old, new = os.urandom(32), os.urandom(32)
    sealed_before = Sealer((old,)).seal(NAME, ROWS)
    rotated = Sealer((new, old))
    assert rotated.open(NAME, sealed_before) == ROWS
    assert Sealer((new,)).open(NAME, rotated.seal(NAME, ROWS)) == ROWS
    with pytest.raises(SealBroken, match="key this worker does not have"):
        Sealer((new,)).open(NAME, sealed_before)


def test_keys_from_settings(tmp_path):
    a, b = new_key(), new_key()
    from_env = sealer_from(Settings(staging_keys=f"{a}, {b}", data_dir=tmp_path))
    assert len(from_env.keys) == 2
    key_file = tmp_path / "keys"
    key_file.write_text(f"{b}\n{a}\n")
    from_file = sealer_from(Settings(staging_key_file=key_file, data_dir=tmp_path))
    assert from_file.open(NAME, from_env.seal(NAME, ROWS)) == ROWS
    with pytest.raises(FatalError, match="not base64"):
        sealer_from(Settings(staging_keys="not a key!", data_dir=tmp_path))
    with pytest.raises(FatalError, match="32 bytes"):
        sealer_from(Settings(staging_keys="c2hvcnQ=", data_dir=tmp_path))


def test_development_makes_one_private_key_file_and_production_refuses_without_keys(tmp_path):
    first = sealer_from(Settings(data_dir=tmp_path))
    path = tmp_path / ".secrets" / "staging.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = sealer_from(Settings(data_dir=tmp_path))  # another process of the same host
    assert again.open(NAME, first.seal(NAME, ROWS)) == ROWS
    assert [p.name for p in path.parent.iterdir()] == ["staging.key"]  # no temporary left
    with pytest.raises(FatalError, match="ETL_STAGING_KEYS"):
        sealer_from(Settings(env="production", data_dir=tmp_path / "prod"))
