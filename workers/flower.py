"""The dashboard: `celery -A etl_tasks flower`, refusing to listen beyond loopback without
authentication.

    python -m workers.flower [--address 0.0.0.0 --basic-auth=user:password] [flower options]

On loopback (the default address) it runs as given; on any other address it needs
`--basic-auth` (or FLOWER_BASIC_AUTH, or an OAuth option) and exits with a message otherwise:
the task list of a patient-data pipeline is not for anyone on the network.
"""

from __future__ import annotations

import os
import sys

from etl_tasks import app
from etl_tasks.config import get_settings
from etl_tasks.monitoring import logs

LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_OPTIONS = ("--basic-auth", "--auth", "--oauth2-key")


def _value(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and index + 1 < len(args):
            return args[index + 1]
    return None


def main(extra: list[str] | None = None) -> None:
    args = sys.argv[1:] if extra is None else extra
    address = _value(args, "--address") or os.environ.get("FLOWER_ADDRESS") or "127.0.0.1"
    authenticated = any(_value(args, name) for name in AUTH_OPTIONS) or any(
        os.environ.get(name) for name in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH"))
    if address not in LOOPBACK and not authenticated:
        print(f"refusing to serve Flower on {address} without authentication: pass "
              "--basic-auth=user:password (or set FLOWER_BASIC_AUTH), or listen on 127.0.0.1",
              file=sys.stderr)
        sys.exit(2)
    if _value(args, "--address") is None:
        args = [f"--address={address}", *args]
    # Flower (tornado) adds no handler of its own when the root logger has one.
    logs.setup(get_settings().log_format)
    app.start(["flower", *args])


if __name__ == "__main__":
    main()
