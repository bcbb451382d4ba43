"""Errors this package raises on purpose, classified once at each boundary.

EtlError
 ├─ TransientError     retrying later may succeed: a service down, a lock, a full pool
 │   └─ CircuitOpen        the source's circuit breaker is open: not tried until the cool-down
 ├─ FatalError         retrying cannot help: bad config, auth, missing table, corrupt file
 │   ├─ SourceFileError    one input file is unreadable or hostile; it is quarantined whole
 │   └─ Unexpected         an exception no boundary classified, kept by its type only
 ├─ FencedOut          this loader is not the single writer (any more): its write was refused
 └─ DataQualityError   data broke a schema: quarantine and report, never retry

Messages name the source (and file) and say what to do next. They never carry patient values.
A library's message may (a driver's conversion error quotes the value), so it never leaves
the process: `sanitized` is what Celery gets, `safe_traceback` what a log line shows.
"""

from __future__ import annotations

import traceback


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


class FencedOut(EtlError):
    """This process does not hold the writer lease (or no longer does): the transaction it
    was about to commit is rolled back and its message goes back to the `load` queue for the
    writer. Not a failure of the work (no attempt is counted), and never a reason to step
    down to a fallback store: a stale writer must not write those either."""


class DataQualityError(EtlError):
    """Rows broke the validation rules; they are quarantined, never retried."""

    def __init__(self, message: str, *, source: str | None = None, failures: int = 0) -> None:
        self.failures = failures
        super().__init__(message, source=source)


class Unexpected(FatalError):
    """Stands in for an exception no boundary classified: its type and where, never its
    message (which may quote a row). Raised with the original's frames, so a traceback still
    shows where it happened."""

    def __init__(self, type_name: str, where: str) -> None:
        self.type_name = type_name
        super().__init__(f"{type_name} in {where} (its message is withheld: it may quote a "
                         "value; the worker log shows where it was raised)")


# Libraries whose exceptions never see a row: their messages (a refused connection, a time
# limit, a lost worker) are safe and too useful to an operator to withhold.
_SAFE_MODULES = ("celery.", "billiard.", "kombu.", "redis.", "amqp.")
_SAFE_BUILTINS = (MemoryError, TimeoutError, ConnectionError)


def message_is_safe(exc: BaseException) -> bool:
    """May this exception's message be shown (logged, stored, sent)? Ours are written to be;
    infrastructure errors never see a row; any other library's message may quote a value."""
    if isinstance(exc, (EtlError, *_SAFE_BUILTINS)):
        return True
    if type(exc).__module__.startswith(_SAFE_MODULES):
        inner = getattr(exc, "exc", None)  # celery's Retry repeats the error it retries
        return not isinstance(inner, BaseException) or message_is_safe(inner)
    return False


def safe_reason(exc: BaseException, where: str) -> str:
    """A reason to store and show for a failure: an EtlError's own message (written to be
    safe), else only the exception's type, because a library's message may quote a value."""
    if isinstance(exc, EtlError):
        return str(exc)
    return str(Unexpected(type(exc).__name__, where))


def sanitized(exc: BaseException, where: str) -> BaseException:
    """`exc` fit to hand to Celery, which logs it, stores it with its traceback in the result
    backend and sends both to Flower: no chained cause or context (`raise ... from exc` keeps a
    driver's message there), and an exception whose message is not safe becomes `Unexpected`
    with the same frames. Celery's own types (Retry, Ignore, time limits) are kept."""
    if not message_is_safe(exc):
        exc = Unexpected(type(exc).__name__, where).with_traceback(exc.__traceback__)
    for link in (exc, getattr(exc, "exc", None)):  # and the error a Retry carries
        if isinstance(link, BaseException):
            link.__cause__ = link.__context__ = None
            link.__suppress_context__ = True
    return exc


def safe_traceback(exc: BaseException) -> str:
    """A traceback of `exc` and the exceptions it was raised from or during: every frame (file,
    line, code), each exception's type, and only the messages `message_is_safe` allows."""
    chain: list[tuple[BaseException, str]] = []  # newest first, with how it led to the next
    link: BaseException | None = exc
    joint = ""
    while link is not None and all(link is not seen for seen, _ in chain):
        chain.append((link, joint))
        if link.__cause__ is not None:
            link, joint = link.__cause__, _CAUSE
        elif link.__context__ is not None and not link.__suppress_context__:
            link, joint = link.__context__, _CONTEXT
        else:
            link = None
    parts: list[str] = []
    for link, joint in reversed(chain):
        kind = type(link)
        name = kind.__qualname__ if kind.__module__ == "builtins" else (
            f"{kind.__module__}.{kind.__qualname__}")
        message = str(link) if message_is_safe(link) else "(message withheld: it may quote a value)"
        parts += ["Traceback (most recent call last):\n",
                  *traceback.format_list(traceback.extract_tb(link.__traceback__)),
                  f"{name}: {message}\n" if message else f"{name}\n"]
        if joint:
            parts.append(f"\n{joint}\n\n")
    return "".join(parts).rstrip("\n")


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"
