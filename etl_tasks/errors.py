"""Errors this package raises on purpose, classified once at each boundary.

EtlError
 ├─ TransientError     retrying later may succeed: a service down, a lock, a full pool
 │   └─ CircuitOpen        the source's circuit breaker is open: not tried until the cool-down
 ├─ FatalError         retrying cannot help: bad config, auth, missing table, corrupt file
 │   └─ SourceFileError    one input file is unreadable or hostile; it is quarantined whole
 └─ DataQualityError   data broke a schema: quarantine and report, never retry

Messages name the source (and file) and say what to do next. They never carry patient values.
"""

from __future__ import annotations


class EtlError(Exception):
    """Base of every error the pipeline raises on purpose."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        prefix = f"[{source}] " if source else ""
        super().__init__(prefix + message)


class TransientError(EtlError):
    """A retry later may succeed; Celery retries these with backoff."""


class CircuitOpen(TransientError):
    """The source failed too often in a row and is left alone for a cool-down; the step is
    retried later (not counted as an attempt), a run planned meanwhile is skipped."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.reason = message
        super().__init__(message, source=source)


class FatalError(EtlError):
    """Retrying cannot help; the task fails visibly and an alert is raised."""


class SourceFileError(FatalError):
    """One input file cannot be used; it is quarantined whole with `reason`."""

    def __init__(self, path: str, reason: str, *, source: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}", source=source)


class DataQualityError(EtlError):
    """Rows broke the validation rules; they are quarantined, never retried."""

    def __init__(self, message: str, *, source: str | None = None, failures: int = 0) -> None:
        self.failures = failures
        super().__init__(message, source=source)


def safe_reason(exc: BaseException, where: str) -> str:
    """A reason to store and show for a failure: an EtlError's own message (written to be
    safe), else only the exception's type, because a library's message may quote a value."""
    if isinstance(exc, EtlError):
        return str(exc)
    return f"{type(exc).__name__} in {where} (details in the worker log)"
