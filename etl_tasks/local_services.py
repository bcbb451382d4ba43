"""Processes `etl demo` (and the test suite) start on one machine: redis-server and workers.

In production these run under a supervisor or docker-compose; here they are children of the
command that started them, stopped when it ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from etl_tasks.errors import FatalError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server on a free loopback port, append-only file in `directory`.

    With `appendonly=False` it keeps nothing: a restart starts empty (the fault tests' case).
    """

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    appendonly: bool = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FatalError("redis-server is not installed: run `sudo apt-get install "
                             "redis-server` (or set ETL_REDIS_URL to a running Redis)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory.resolve()), "--appendonly", "yes" if self.appendonly else "no",
             "--appendfsync", "everysec", "--save", "", "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise FatalError(f"redis-server did not start; see "
                                     f"{self.directory / 'redis.log'}") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> RedisServer:
        """kill -9 the server and start it again on the same port and folder: with what its
        append-only file kept, or empty when it keeps none."""
        self.stop(signal.SIGKILL)
        return self.start()


@dataclass
class Worker:
    """A real `celery worker` process of one role (`fleet` or `loader`)."""

    role: str
    env: dict[str, str]
    log_path: Path
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"workers.{self.role}", *self.extra],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: kill it with its children
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # warm shutdown: finish the current task
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """kill -9 the worker and its pool children: the fault a crash produces."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_for_workers(app_control: object, names: list[str], timeout: float = 60) -> None:
    """Block until a worker of each role prefix in `names` answers a ping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app_control.ping(timeout=0.5) or []  # type: ignore[attr-defined]
        seen = {name for reply in replies for name in reply}
        if all(any(s.startswith(prefix) for s in seen) for prefix in names):
            return
    raise FatalError(f"workers {names} did not come up within {timeout:.0f}s; see their logs")
