"""Alerts: something an operator should know about now, with a severity.

Every alert is a log line on the `etl.alerts` logger at its severity's level, an event in
Sentry (when ETL_SENTRY_DSN is set) and, when ETL_ALERT_WEBHOOK_URL is set, a JSON POST sent
by a task on the `control` queue (`etl.control.notify`, retried with backoff), so a slow or
dead receiver never holds a run up.

Conditions that stay true (a breached run, a stale source, a stuck run) are *open alerts*,
kept in Redis under one key per source and check: raising one that is already open does
nothing, so a source stale for a day is one alert, not one per check; the check clears it
when the condition ends. Messages name the source and what happens next; like every message
of the pipeline they never carry patient values (only ids, counts and durations).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import redis

Severity = Literal["info", "warning", "critical"]

log = logging.getLogger("etl.alerts")
_LEVELS: dict[Severity, int] = {"info": logging.INFO, "warning": logging.WARNING,
                                "critical": logging.CRITICAL}
_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
OPEN = "etl:alerts:open"  # "<source>:<check>" -> the open alert (JSON)

# Who sends an alert to the webhook: set by the Celery app (tasks.py) so this module stays
# free of Celery; without it (the CLI, tests of plain functions) only log and Sentry.
Notifier = Callable[[dict[str, Any]], None]
_notify: Notifier | None = None


def set_notifier(notify: Notifier | None) -> None:
    global _notify
    _notify = notify


def alert(severity: Severity, message: str, *, source: str | None = None,
          check: str = "event", details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Raise an alert once: log line, Sentry event, webhook. Returns what was sent."""
    payload = {"alert_id": uuid.uuid4().hex, "severity": severity, "source": source,
               "check": check, "message": message, "details": details or {},
               "raised_at": time.time()}
    log.log(_LEVELS[severity], "ALERT %s: %s", severity, message)
    _to_sentry(payload)
    if _notify is not None:
        try:
            _notify(payload)
        except Exception:  # noqa: BLE001 - an alert must never break what raised it
            log.warning("the alert webhook could not be queued (broker unreachable?); the "
                        "alert is in this log only")
    return payload


def _to_sentry(payload: dict[str, Any]) -> None:
    import sentry_sdk  # imported here: only workers initialise it

    if payload["severity"] == "info" or not sentry_sdk.get_client().is_active():
        return
    # Tagged so the scrubber keeps the message: alert messages are built from ids and counts.
    sentry_sdk.capture_message(payload["message"], level=(
        "fatal" if payload["severity"] == "critical" else "warning"),
        tags={"etl_alert": payload["check"], "etl_source": payload["source"] or "-"})


def worst(severities: list[Severity]) -> Severity:
    return max(severities, key=lambda s: _RANK[s])


def raise_open(r: redis.Redis, severity: Severity, message: str, *, source: str, check: str,
               details: dict[str, Any] | None = None, again: bool = False) -> bool:
    """Open the alert `source:check` and raise it, unless it is open already (then nothing,
    or, with `again`, a new alert replaces it: a new breaching run is news). True if raised."""
    field = f"{source}:{check}"
    if not again and r.hexists(OPEN, field):
        return False
    payload = alert(severity, message, source=source, check=check, details=details)
    r.hset(OPEN, field, json.dumps(payload))
    return True


def clear(r: redis.Redis, source: str, check: str) -> bool:
    """The condition ended: the alert is closed (True if one was open)."""
    closed = bool(r.hdel(OPEN, f"{source}:{check}"))
    if closed:
        log.info("ALERT cleared: %s of %s", check, source)
    return closed


def open_alerts(r: redis.Redis) -> list[dict[str, Any]]:
    """Open alerts, worst and newest first."""
    found = [json.loads(v) for v in r.hvals(OPEN)]
    return sorted(found, key=lambda a: (-_RANK[a["severity"]], -a["raised_at"]))
