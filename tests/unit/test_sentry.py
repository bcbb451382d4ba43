"""Sentry events are scrubbed of anything that could carry a patient value."""

from __future__ import annotations

from etl_tasks.monitoring.sentry import scrub


def test_a_library_exception_keeps_its_type_and_loses_its_message():
    """A third-party exception's message (it may quote a row) is dropped; ours is kept, and
    local variables, breadcrumbs and log messages never leave."""
    event = {
        "exception": {"values": [
            {"type": "ArrowInvalid", "value": "CSV parse error: 3 columns: P000123,Jane,1961",
             "stacktrace": {"frames": [{"function": "f", "vars": {"row": "P000123"}}]}},
            {"type": "FatalError", "value": "[billing] table BILLING_CLAIMS does not exist"},
        ]},
        "breadcrumbs": {"values": [{"message": "row P000123 quarantined"}]},
        "logentry": {"message": "patient %s", "params": ["P000123"]},
    }
    scrubbed = scrub(event)
    assert "P000123" not in repr(scrubbed)
    first, second = scrubbed["exception"]["values"]
    assert (first["type"], first["value"]) == ("ArrowInvalid", "")
    assert second["value"] == "[billing] table BILLING_CLAIMS does not exist"


def test_our_stand_in_for_a_library_error_keeps_its_message():
    """`Unexpected` (what Celery logs for an unclassified exception) names the type and the
    task, never the library's message, so its message is sent."""
    event = {"exception": {"values": [
        {"type": "Unexpected", "value": "ValueError in etl.plan.run_source (its message is "
                                        "withheld: it may quote a value; ...)"}]}}
    assert scrub(event)["exception"]["values"][0]["value"].startswith("ValueError in etl.plan")
