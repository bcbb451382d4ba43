"""Alerts: something an operator should know about now, with a severity.

For now an alert is a log line on the `etl.alerts` logger, at the level of its severity, so
whatever collects the workers' logs (and Sentry, for errors) sees it. Messages name the source
and what happens next; like every message of the pipeline they never carry patient values.
"""

from __future__ import annotations

import logging
from typing import Literal

Severity = Literal["info", "warning", "critical"]

log = logging.getLogger("etl.alerts")
_LEVELS: dict[Severity, int] = {"info": logging.INFO, "warning": logging.WARNING,
                                "critical": logging.CRITICAL}


def alert(severity: Severity, message: str) -> None:
    """Raise an alert: today a log line at the severity's level, prefixed `ALERT`."""
    log.log(_LEVELS[severity], "ALERT %s: %s", severity, message)
