"""Structured logs: every line of the workers, beat and the CLI goes through one structlog chain.

Stdlib records (ours, Celery's, kombu's) are rendered by structlog's ProcessorFormatter on the
handlers Celery sets up (`hook_celery`, from its `after_setup_*logger` signals) or on stderr
(`setup`, for the CLI and other processes). Each line carries the fields bound for the work at
hand (`bind`: run_id, source, stage, unit_id or chunk_id, task, task_id), as console text or
JSON lines (ETL_LOG_FORMAT). An exception is rendered with its frames and types only, and a
message only where `errors.message_is_safe` allows: a driver's message may quote a value.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog
from structlog.contextvars import bind_contextvars, clear_contextvars, merge_contextvars
from structlog.typing import EventDict, Processor, WrappedLogger

from etl_tasks.errors import safe_traceback

LogFormat = Literal["console", "json"]

_SHARED: list[Processor] = [
    merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
# Loggers Celery gives handlers of their own (not propagating to the root).
_CELERY_LOGGERS = ("celery.task", "celery.redirected", "multiprocessing")


def safe_exception(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Replace `exc_info` by `exception`: the traceback as `errors.safe_traceback` writes it."""
    exc = _exception(event.pop("exc_info", None))
    if exc is not None:
        event["exception"] = safe_traceback(exc)
    return event


def _exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1] if isinstance(exc_info[1], BaseException) else None
    if exc_info is True:  # structlog's log.exception(): the one being handled
        return sys.exc_info()[1]
    return None


def formatter(fmt: LogFormat, *, colors: bool = False) -> structlog.stdlib.ProcessorFormatter:
    """The formatter of every handler: our fields, a safe traceback, console or JSON."""
    renderer: Processor = (structlog.processors.JSONRenderer() if fmt == "json" else
                           structlog.dev.ConsoleRenderer(colors=colors, pad_event_to=0))
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, safe_exception,
                    renderer])


def _structlog_through_stdlib() -> None:
    """structlog's own loggers hand their events to the stdlib handlers (one output)."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger, cache_logger_on_first_use=True)


def adopt(logger: logging.Logger, fmt: LogFormat, *, colors: bool = False) -> None:
    """Give every handler of `logger` our formatter (keeping where it writes)."""
    for handler in logger.handlers:
        handler.setFormatter(formatter(fmt, colors=colors))


def setup(fmt: LogFormat, level: int = logging.INFO) -> None:
    """A process that Celery does not set up (the CLI, Flower): one stderr handler at `level`."""
    _structlog_through_stdlib()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt, colors=fmt == "console" and sys.stderr.isatty()))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def hook_celery(fmt: LogFormat) -> None:
    """Have every Celery process (worker, its pool children, beat) log through our formatter:
    Celery still builds its handlers (its --logfile, its level); we replace their format."""
    from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun

    def adopt_all(logger: logging.Logger, colorize: bool = False, **_: Any) -> None:
        _structlog_through_stdlib()
        colors = bool(colorize) and fmt == "console"
        for log in (logger, *(logging.getLogger(name) for name in _CELERY_LOGGERS)):
            adopt(log, fmt, colors=colors)

    def forget(**_: Any) -> None:
        # After Celery's own "succeeded"/"raised" line, so that line still has the fields.
        clear_contextvars()

    after_setup_logger.connect(adopt_all, weak=False)
    after_setup_task_logger.connect(adopt_all, weak=False)
    task_postrun.connect(forget, weak=False)


def celery_options(fmt: LogFormat) -> list[str]:
    """Celery's global options for a worker or beat entrypoint: with JSON logs, no startup
    banner (plain text on stdout), so every line a collector reads is one JSON object."""
    return ["--quiet"] if fmt == "json" else []


def bind(**fields: Any) -> None:
    """Start a new unit of work: these fields (None ones left out) on every line from now."""
    clear_contextvars()
    bind_contextvars(**{k: v for k, v in fields.items() if v is not None})


def step_fields(stage: str | None, args: tuple[Any, ...]) -> dict[str, Any]:
    """The fields of a task's arguments: (run_id, unit or chunk id) for a step, (run_id,
    source) for a plan, (run_id,) for a finalize. Ids start with their source's name
    (`billing:keys:1-50000`, `lab_results:file:<sha>:0`)."""
    if stage in ("extract", "transform", "load") and len(args) == 2:
        run_id, item = args
        key = "unit_id" if stage == "extract" else "chunk_id"
        return {"run_id": run_id, "source": str(item).split(":", 1)[0], "stage": stage,
                key: item}
    if stage == "plan" and len(args) == 2:
        return {"run_id": args[0], "source": args[1], "stage": stage}
    if args and isinstance(args[0], str):
        return {"run_id": args[0], "stage": stage}
    return {"stage": stage}

