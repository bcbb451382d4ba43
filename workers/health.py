"""Health checks for docker-compose (or any process supervisor): exit 0 when healthy, 1 when
not, within a deadline, with one line saying why.

    python -m workers.health fleet    # a fleet worker of this host answers a ping
    python -m workers.health loader   # a loader of this host answers (the writer or a standby)
    python -m workers.health beat     # a beat runs on this host and Redis answers it
    python -m workers.health http://127.0.0.1:5555/healthcheck   # answers 200 (Flower)

A worker's node name carries the pid of its main process (`fleet-<pid>@<host>`), which the
compose file cannot know: the check finds the processes of this host started as
`-m workers.<role>` in /proc and pings exactly those names. "This host" is this network
namespace: a container, or one of the multi-host test's hosts, whose processes share the
machine's pid space but not its network. A broadcast ping would make every worker of the
fleet answer every host's check, and a host whose own worker died would pass on another's.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path
from types import FrameType

ROLES = ("fleet", "loader", "beat")
PING_TIMEOUT_S = 3.0


def local_pids(role: str) -> list[int]:
    """Processes in this network namespace started as `python -m workers.<role>` (a worker's
    main process and its pool children, which share its command line)."""
    here = os.stat("/proc/self/ns/net").st_ino
    module = f"workers.{role}"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if os.stat(entry / "ns" / "net").st_ino != here:
                continue
        except OSError:
            continue  # exited meanwhile, or not ours to look at
        if any(a == b"-m" and b == module.encode() for a, b in itertools.pairwise(argv)):
            pids.append(int(entry.name))
    return sorted(pids)


def check_worker(role: str) -> str:
    pids = local_pids(role)
    if not pids:
        raise Unhealthy(f"no `python -m workers.{role}` process on this host")
    from etl_tasks import app

    host = socket.gethostname()
    names = [f"{role}-{pid}@{host}" for pid in pids]
    replies = app.control.ping(destination=names, timeout=PING_TIMEOUT_S) or []
    answered = sorted(name for reply in replies for name in reply)
    if not answered:
        raise Unhealthy(f"no answer from {role} worker(s) {', '.join(names[:4])} within "
                        f"{PING_TIMEOUT_S:.0f}s")
    return f"{', '.join(answered)} answered"


def check_beat() -> str:
    if not local_pids("beat"):
        raise Unhealthy("no `python -m workers.beat` process on this host")
    from etl_tasks.resources import get_resources

    get_resources().redis.ping()  # the settings' Redis: password, TLS, Sentinel's master
    return "beat runs; Redis answers"


def check_http(url: str) -> str:
    with urllib.request.urlopen(url, timeout=PING_TIMEOUT_S) as response:
        if response.status != 200:
            raise Unhealthy(f"{url} answered {response.status}")
    return f"{url} answered 200"


class Unhealthy(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workers.health",
        description="Exit 0 when this host's fleet worker, loader or beat is healthy (or a "
        "URL answers 200), 1 otherwise; for compose health checks.")
    parser.add_argument("what", help=f"{', '.join(ROLES)}, or an http:// URL")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="give up (unhealthy) after this many seconds (default 10)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.what not in ROLES and not args.what.startswith(("http://", "https://")):
        parser.error(f"what: one of {', '.join(ROLES)} or an http(s):// URL")

    # A Redis behind a cut link does not refuse, it stays silent: give up on time instead of
    # waiting for TCP's retries, so the supervisor sees "unhealthy", not a hung check.
    def give_up(_signum: int, _frame: FrameType | None) -> None:
        print(f"unhealthy: no answer within {args.timeout:.0f}s", flush=True)
        os._exit(1)

    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    try:
        if args.what in ("fleet", "loader"):
            said = check_worker(args.what)
        elif args.what == "beat":
            said = check_beat()
        else:
            said = check_http(args.what)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer "unhealthy"
        print(f"unhealthy: {exc}" if isinstance(exc, Unhealthy) else
              f"unhealthy: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
    print(f"healthy: {said}", flush=True)


if __name__ == "__main__":
    main()
