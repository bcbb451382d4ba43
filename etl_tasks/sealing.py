"""Staged payloads sealed with AES-GCM: patient rows in Redis (and in its append-only file)
are unreadable without the key, and a payload altered or moved to another key fails
authentication instead of becoming data.

A sealed payload is `b"E1"`, the 4-byte id of the key that sealed it, a 12-byte random nonce,
then the ciphertext with its tag. The Redis key name is the associated data, so a payload
copied under another chunk's name does not open. Keys come from ETL_STAGING_KEYS (comma
separated) or ETL_STAGING_KEY_FILE (one per line), base64 of 32 random bytes
(`etl staging-key` prints a new one): the first seals, every one opens, which is how keys
are rotated (docs/operations.md). Without either, a development setup makes one in
`ETL_DATA_DIR/.secrets/staging.key` (shared by the processes of that host only), and
production refuses to start.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from etl_tasks.config import Settings
from etl_tasks.errors import EtlError, FatalError

_MAGIC = b"E1"
_NONCE = 12


class SealBroken(EtlError):
    """A staged payload failed authentication (altered, truncated, or sealed with a key this
    process does not have): never used as data; its unit is extracted again."""


def new_key() -> str:
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


@dataclass(frozen=True)
class Sealer:
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != 32 for k in self.keys):
            raise FatalError("staging keys must be base64 of 32 bytes each (make one with "
                             "`etl staging-key`)", source="staging")

    def seal(self, name: str, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        key = self.keys[0]
        return _MAGIC + _key_id(key) + nonce + AESGCM(key).encrypt(nonce, data, name.encode())

    def open(self, name: str, blob: bytes) -> bytes:
        if blob[:2] != _MAGIC:
            raise SealBroken(f"staged payload {name} is not sealed; refused", source="staging")
        key_id, nonce = blob[2:6], blob[6:6 + _NONCE]
        for key in self.keys:
            if _key_id(key) == key_id:
                try:
                    return AESGCM(key).decrypt(nonce, blob[6 + _NONCE:], name.encode())
                except InvalidTag:
                    break
        raise SealBroken(f"staged payload {name} failed authentication (altered, or sealed "
                         "with a key this worker does not have: check ETL_STAGING_KEYS on "
                         "every host)", source="staging")


def _decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise FatalError(f"a staging key in {where} is not base64 (make one with `etl "
                         "staging-key`)", source="staging") from exc


def sealer_from(settings: Settings) -> Sealer:
    """The keys the settings name; in development, a generated key file when none is set."""
    if settings.staging_keys is not None:
        texts = settings.staging_keys.get_secret_value().split(",")
        return Sealer(tuple(_decode(t, "ETL_STAGING_KEYS") for t in texts if t.strip()))
    path = settings.staging_key_file
    if path is None:
        if settings.env == "production":
            raise FatalError("no staging key: set ETL_STAGING_KEYS or ETL_STAGING_KEY_FILE "
                             "(the same on every host; make one with `etl staging-key`)",
                             source="staging")
        path = settings.data_dir / ".secrets" / "staging.key"
        _create_once(path)
    try:
        lines = path.read_text().split()
    except OSError as exc:
        raise FatalError(f"cannot read the staging key file {path}: {exc.strerror}",
                         source="staging") from None
    return Sealer(tuple(_decode(line, str(path)) for line in lines))


def _create_once(path: Path) -> None:
    """Make the development key file unless it exists. Each process writes its own temporary
    file and hard-links it into place: the first link wins, and a key in use is never
    replaced (a link fails where the name exists)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".staging-key-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_key() + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
