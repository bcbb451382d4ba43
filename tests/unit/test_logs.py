"""Log lines carry the work's ids as fields and never a library's message; Celery gets
exceptions without a chained cause."""

from __future__ import annotations

import io
import json
import logging
import traceback
from collections.abc import Iterator

import pytest
from celery.exceptions import Retry
from structlog.contextvars import clear_contextvars

from etl_tasks.errors import FatalError, TransientError, Unexpected, safe_traceback, sanitized
from etl_tasks.monitoring import logs

SECRET = "CANARY-7731"


def _chained() -> FatalError:
    """Our error raised from a library's error that quotes a value, as classify() does."""
    try:
        try:
            int(SECRET)
        except ValueError as exc:
            raise FatalError("key range could not be read", source="billing") from exc
    except FatalError as exc:
        return exc
    raise AssertionError("not raised")


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("tests.logs")
    logger.handlers, logger.propagate = [handler], False
    yield logger, stream
    logger.handlers, logger.propagate = [], True
    clear_contextvars()


def test_a_traceback_keeps_frames_and_types_but_not_a_library_message():
    """The driver's message is withheld, ours is kept, and every frame is still shown."""
    text = safe_traceback(_chained())
    assert SECRET not in text
    assert "ValueError: (message withheld" in text
    assert "etl_tasks.errors.FatalError: [billing] key range could not be read" in text
    assert "direct cause" in text
    assert "int(SECRET)" in text  # the code line: where it happened


def test_celery_gets_our_error_without_its_cause_and_a_library_error_as_unexpected():
    """What Celery logs, stores and broadcasts has no chained driver message."""
    ours = sanitized(_chained(), "etl.plan.run_source")
    assert isinstance(ours, FatalError)
    assert SECRET not in "".join(traceback.format_exception(ours))
    try:
        int(SECRET)
    except ValueError as exc:
        theirs = sanitized(exc, "etl.plan.run_source")
    assert isinstance(theirs, Unexpected)
    assert str(theirs).startswith("ValueError in etl.plan.run_source (its message is withheld")
    rendered = "".join(traceback.format_exception(theirs))
    assert SECRET not in rendered
    assert "int(SECRET)" in rendered  # the original frames are kept


def test_a_retry_keeps_its_type_and_loses_the_chain_of_the_error_it_carries():
    """Celery's Retry stays a Retry (Celery handles it by type); its error's cause is gone."""
    transient = TransientError("Firebird unavailable; will retry", source="firebird")
    transient.__cause__ = ValueError(SECRET)
    retry = Retry(exc=transient, when=2)
    retry.__context__ = transient
    clean = sanitized(retry, "etl.extract.unit")
    assert clean is retry
    assert SECRET not in "".join(traceback.format_exception(clean))
    assert transient.__cause__ is None


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_line_carries_the_bound_fields_and_a_safe_traceback(capture, fmt):
    """Any stdlib record (Celery's too) gets the run's fields; its exception is made safe."""
    logger, stream = capture
    logger.handlers[0].setFormatter(logs.formatter(fmt))
    logs.bind(task="etl.extract.unit", task_id="t-1",
              **logs.step_fields("extract", ("run1", "billing:keys:1-2000")))
    logger.warning("extract of %s failed", "billing:keys:1-2000", exc_info=_chained())
    text = stream.getvalue()
    assert SECRET not in text
    if fmt == "json":
        line = json.loads(text)
        assert line["event"] == "extract of billing:keys:1-2000 failed"
        assert (line["run_id"], line["source"], line["stage"], line["unit_id"]) == (
            "run1", "billing", "extract", "billing:keys:1-2000")
        assert line["level"] == "warning"
        assert "FatalError: [billing] key range could not be read" in line["exception"]
    else:
        first = text.splitlines()[0]
        assert "extract of billing:keys:1-2000 failed" in first
        assert "run_id=run1" in first
        assert "source=billing" in first
        assert "unit_id=billing:keys:1-2000" in first


def test_fields_of_each_kind_of_task():
    """A transform names its chunk, a plan its source, a finalize its run."""
    assert logs.step_fields("transform", ("r", "lab_results:file:ab12:0")) == {
        "run_id": "r", "source": "lab_results", "stage": "transform",
        "chunk_id": "lab_results:file:ab12:0"}
    assert logs.step_fields("plan", ("r", "billing")) == {
        "run_id": "r", "source": "billing", "stage": "plan"}
    assert logs.step_fields("finalize", ("r",)) == {"run_id": "r", "stage": "finalize"}
