"""Helpers shared by the file readers (XML feeds, workbooks): OS errors, schemas, batches.

Nothing here quotes file content: reasons and messages name the file and say what to do.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence

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
    schema: pa.Schema, arrays: list[pa.Array], refs: list[str], duplicates: list[bool]
) -> pa.Table:
    """One batch of `schema` from its data columns and the rows' refs and duplicate flags."""
    arrays = [*arrays, pa.array(refs, pa.string()), pa.array(duplicates, pa.bool_())]
    return pa.Table.from_arrays(arrays, schema=schema)


class DuplicateKeys:
    """Flags a row whose stripped key was seen on an earlier row of the file; "" is no key."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def flag(self, key: str | None) -> bool:
        key = (key or "").strip()
        if not key:
            return False
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


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
