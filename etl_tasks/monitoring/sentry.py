"""Sentry for the workers: Celery's integration, started in every worker process, with patient
data kept out by construction.

No local variables, no default PII, no request bodies, no breadcrumbs (they carry log
messages), and an exception's message is kept only for the pipeline's own errors (`EtlError`,
written never to quote a value): any other exception is sent with its type only, because a
library's message may quote a row. Task arguments are ids only by design.
"""

from __future__ import annotations

from typing import Any

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration

from etl_tasks.config import Settings
from etl_tasks.errors import (
    DataQualityError,
    EtlError,
    FatalError,
    SourceFileError,
    TransientError,
    Unexpected,
)

# Exception types whose messages are safe to send (the error tree in errors.py).
SAFE_TYPES = frozenset(cls.__name__ for cls in (EtlError, TransientError, FatalError,
                                                SourceFileError, DataQualityError,
                                                Unexpected)) | {
    "CircuitOpen", "StagingLost", "RunStalled"}


def scrub(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Remove what could carry a patient value before an event leaves the process."""
    for exc in event.get("exception", {}).get("values", []):
        if exc.get("type") not in SAFE_TYPES:
            exc["value"] = ""
        for frame in (exc.get("stacktrace") or {}).get("frames", []):
            frame.pop("vars", None)  # belt and braces: local variables are off anyway
    event.pop("breadcrumbs", None)
    event.pop("request", None)
    tags = event.get("tags") or {}
    alert = isinstance(tags, dict) and "etl_alert" in tags  # alerts: ids and counts only
    if ("logentry" in event or "message" in event) and not alert:
        event.pop("logentry", None)
        event["message"] = "(log message withheld)"
    return event


def init_sentry(settings: Settings) -> bool:
    """Start Sentry in this process when ETL_SENTRY_DSN is set; False when it is not."""
    if settings.sentry_dsn is None:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(), environment=settings.env,
        integrations=[CeleryIntegration()], send_default_pii=False,
        include_local_variables=False, max_request_body_size="never", max_breadcrumbs=0,
        before_send=scrub)  # type: ignore[arg-type]
    return True
