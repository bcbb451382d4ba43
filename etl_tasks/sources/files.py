"""Helpers shared by the file readers (XML feeds, workbooks): OS errors, schemas, batches.

Nothing here quotes file content: reasons and messages name the file and say what to do.
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from etl_tasks.errors import EtlError, FatalError, SourceFileError, TransientError

# Errors of the OS that a later attempt may not see again (file moved under us, NFS blip).
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ESTALE,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EIO,
        errno.EINTR,
        errno.ENFILE,
        errno.EMFILE,
        errno.ETIMEDOUT,
    }
)
_OS_ERRNO = re.compile(r"\(os error (\d+)\)")
# A workbook's CSV sidecar: `upload.csv` (or `.CSV`) beside `upload.xlsx`.
SIDECAR_SUFFIXES = (".csv", ".CSV")


def text_schema(columns: Sequence[str]) -> pa.Schema:
    """The readers' output: every column as text, then `_source_ref` and `_duplicate`."""
    return pa.schema(
        [pa.field(name, pa.string()) for name in columns]
        + [
            pa.field("_source_ref", pa.string(), nullable=False),
            pa.field("_duplicate", pa.bool_(), nullable=False),
        ]
    )


def batch_table(
    schema: pa.Schema, arrays: list[pa.Array], refs: list[str], keys: DuplicateKeys,
    key: int | tuple[int, ...]
) -> pa.Table:
    """One batch of `schema` from its data columns and the rows' refs; `arrays[key]` (or the
    arrays at several positions together) holds the file's row key, checked against every
    earlier row of the file by `keys`. No key: no row is flagged."""
    duplicates = keys.flags(_key_texts(arrays, key))
    arrays = [*arrays, pa.array(refs, pa.string()), pa.array(duplicates, pa.bool_())]
    return pa.Table.from_arrays(arrays, schema=schema)


def _key_texts(arrays: list[pa.Array], key: int | tuple[int, ...]) -> list[str | None]:
    if isinstance(key, int) or len(key) == 1:
        texts: list[str | None] = arrays[key if isinstance(key, int) else key[0]].to_pylist()
        return texts
    if not key:
        return [None] * len(arrays[0])
    # A composite key as one text; the unit separator does not occur in keys, and a row
    # with every part blank has no key.
    parts = [arrays[i].to_pylist() for i in key]
    return [None if all(not (p or "").strip() for p in row)
            else "\x1f".join((p or "").strip() for p in row) for row in zip(*parts, strict=True)]


class DuplicateKeys:
    """Flags a row whose stripped key was seen on an earlier row of the file; "" is no key.

    A file may hold millions of rows, so the keys seen are kept as 16-byte BLAKE2b digests
    in one sorted NumPy array (16 MB per million keys) rather than a set of Python strings
    (about 80 MB per million), and checked a batch at a time. Two distinct keys would share
    a digest with odds of about 1 in 10^26 for a file of a million rows.
    """

    def __init__(self) -> None:
        self._seen = np.empty(0, dtype="S16")

    def flags(self, keys: Sequence[str | None]) -> list[bool]:
        """For each key in file order: was it on an earlier row (this batch or before)?"""
        flags = [False] * len(keys)
        first: dict[bytes, int] = {}  # digest -> index of its first row in this batch
        for index, key in enumerate(keys):
            text = (key or "").strip()
            if not text:
                continue
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in first:
                flags[index] = True
            else:
                first[digest] = index
        if not first:
            return flags
        # NumPy's "S" type drops trailing NUL bytes when comparing, harmless at a fixed width.
        new = np.array(sorted(first), dtype="S16")
        at = np.searchsorted(self._seen, new)
        known = at < len(self._seen)
        known[known] = self._seen[at[known]] == new[known]
        for digest in new[known].tolist():
            flags[first[digest.ljust(16, b"\0")]] = True
        self._seen = np.insert(self._seen, at[~known], new[~known])
        return flags


def classify_os_error(exc: OSError, where: str, source: str | None) -> EtlError:
    """Transient for a vanished or busy file, SourceFileError for permissions, else fatal."""
    number = exc.errno
    if number is None and (match := _OS_ERRNO.search(str(exc))):
        number = int(match.group(1))  # calamine's OSError carries the errno in its message only
    if number in TRANSIENT_ERRNOS:
        return TransientError(
            f"{where}: the file vanished or could not be read just now "
            f"({errno.errorcode.get(number or 0, 'OS error')}); a retry may succeed",
            source=source,
        )
    if number in (errno.EACCES, errno.EPERM):
        return SourceFileError(
            where, "permission denied; fix the file's permissions and re-run", source=source
        )
    if number == errno.EISDIR:
        return SourceFileError(
            where, "is a directory, not a file; move it out of the inbox", source=source
        )
    return FatalError(
        f"{where}: cannot be read ({type(exc).__name__}); see the traceback", source=source
    )


def megabytes(size: int) -> str:
    """A byte count for a reason: whole MB from 10 MB up, one decimal below."""
    value = size / 1_000_000
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"
