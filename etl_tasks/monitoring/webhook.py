"""The alert webhook: one JSON POST per alert to ETL_ALERT_WEBHOOK_URL.

Sent by the `etl.control.notify` task, so Celery retries a receiver that is down or busy
with backoff while the pipeline goes on. A receiver that refuses the alert (4xx) is told
once: sending it again would not help.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from etl_tasks.errors import FatalError, TransientError

TIMEOUT_S = 5.0


def post(url: str, payload: dict[str, Any]) -> int:
    """POST the alert; its HTTP status. TransientError for what a later try may fix."""
    body = json.dumps(payload, sort_keys=True).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "celery-health-etl-alerts"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        # The URL may carry a token: messages name the status only, never the URL.
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientError(f"the alert webhook answered HTTP {exc.code}; retrying",
                                 source="alerts") from None
        raise FatalError(f"the alert webhook refused the alert with HTTP {exc.code}; check "
                         "ETL_ALERT_WEBHOOK_URL", source="alerts") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TransientError(f"the alert webhook is unreachable ({type(exc).__name__}); "
                             "retrying", source="alerts") from None
