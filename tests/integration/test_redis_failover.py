"""Redis that asks for a password, speaks only TLS, and fails over (issue 10): every Redis
user (broker, result backend, run state, staging, redbeat's lock, the writer lease) reaches
it through redis_conn.py. Real servers on loopback: redis-server with requirepass, TLS with a
CA made by the test, a master and a replica watched by Debian's redis-sentinel, the master
killed with SIGKILL mid-run. Each test ends with the shared oracle.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from etl_tasks.api import run_source
from etl_tasks.celery import app
from etl_tasks.local_services import free_port
from tests.integration.fault_stack import FaultStack, wait_until
from tests.integration.test_faults import check, chunks_done, wait_end
from tests.integration.tls_files import other_ca

pytestmark = pytest.mark.integration

ETL = os.path.join(os.path.dirname(sys.executable), "etl")


def _password() -> str:
    # New each test, so finding it in any output can only be a leak.
    return "pw-" + secrets.token_hex(12)


def _etl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ETL, *args], env=env, capture_output=True, text=True, timeout=120)


def _refused_start(stack: FaultStack, role: str, env: dict[str, str]) -> str:
    """Start `python -m workers.<role>` with `env`: it must exit by itself (not retry for
    ever); its output."""
    done = subprocess.run([sys.executable, "-m", f"workers.{role}"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, f"{role} started with bad Redis settings"
    return done.stdout + done.stderr


@contextmanager
def _flower(stack: FaultStack) -> Iterator[int]:
    port = free_port()
    log = (stack.root / "logs" / "flower.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "workers.flower", f"--port={port}",
                                "--basic-auth=ops:secret"], env=stack.env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        process.kill()
        process.wait()
        log.close()


def _get(url: str) -> str:
    request = urllib.request.Request(url, headers={
        "Authorization": "Basic " + base64.b64encode(b"ops:secret").decode()})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(answer.read().decode())


def _flower_sees_loader(port: int) -> str | None:
    try:
        answer = _get(f"http://127.0.0.1:{port}/api/workers?refresh=1")
    except OSError:
        return None
    return answer if any(w.startswith("loader") for w in json.loads(answer)) else None


def test_password_protected_redis_runs_end_to_end(world):
    """Redis with requirepass (the password in a secrets file): workers started with a wrong
    or no password stop at once naming ETL_REDIS_PASSWORD, and so does the CLI; with it, a
    billing run finishes exact, and the password is in no log, CLI output, `inspect conf`
    answer (Flower's worker config) or Flower page."""
    password = _password()
    stack = world(redis_password=password)
    wrong = {**stack.env, "ETL_REDIS_PASSWORD": "not-" + password}
    missing = {k: v for k, v in stack.env.items() if k != "ETL_REDIS_PASSWORD_FILE"}
    refusals = {
        "fleet, wrong password": _refused_start(stack, "fleet", wrong),
        "beat, no password": _refused_start(stack, "beat", missing),
    }
    for label, env in (("etl run, wrong password", wrong), ("etl run, no password", missing)):
        done = _etl(env, "run", "billing")
        assert done.returncode == 2, (label, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        refusals[label] = done.stdout + done.stderr
    for label, text in refusals.items():
        assert "ETL_REDIS_PASSWORD" in text, (label, text)
        expected = "requires a password" if "no password" in label else "refused the password"
        assert expected in " ".join(text.split()), (label, text)
        assert password not in text, label
    assert stack.redis.get("etl:marker") is None, "a refused start wrote to Redis"

    stack.start_all()
    with _flower(stack) as port:
        summary = wait_end(stack, run_source("billing"), 90)
        assert summary.status == "finished", summary
        check(stack, "redis with requirepass")
        outputs = {"flower /api/workers": wait_until(lambda: _flower_sees_loader(port), 30,
                                                     "Flower to see the loader"),
                   "flower /broker": _get(f"http://127.0.0.1:{port}/broker")}
    for args in (("status", "--json"), ("run", "billing", "--wait", "--json")):
        done = _etl(stack.env, *args)
        assert done.returncode == 0, done.stderr
        outputs["etl " + " ".join(args)] = done.stdout + done.stderr
    assert _leaks(stack, [password], outputs) == []


def _inspect(what: str) -> dict[str, Any] | None:
    try:
        answer: dict[str, Any] | None = getattr(app.control.inspect(timeout=2), what)()
    except redis.ConnectionError as exc:
        # After a failover, a broker connection this process pooled before it fails once.
        print(f"inspect {what}: {type(exc).__name__}: {exc}")
        return None
    return answer


def _leaks(stack: FaultStack, passwords: list[str], outputs: dict[str, str]) -> list[str]:
    """Where any of `passwords` appears: `outputs`, the workers' answers to `inspect conf`
    and `inspect stats` (what Flower shows of a worker), and every log of the stack."""
    for name in ("conf", "stats"):
        answer = wait_until(lambda name=name: _inspect(name), 30, f"an answer to inspect {name}")
        outputs[f"inspect {name}"] = json.dumps(answer)
    assert "redis_password" in outputs["inspect conf"]  # censored, not absent
    for path in sorted((stack.root / "logs").iterdir()):
        outputs[path.name] = path.read_text(errors="replace")
    return [where for where, text in outputs.items() if any(p in text for p in passwords)]


def test_tls_only_redis_runs_end_to_end(world):
    """Redis serving TLS only (rediss://, a CA made by the test, a password too): a billing
    run finishes exact; a plain connection is refused, and a client trusting another CA gets
    an error naming ETL_REDIS_TLS_CA_FILE."""
    stack = world(redis_password=_password(), redis_tls=True)
    assert stack.env["ETL_REDIS_URL"].startswith("rediss://")
    with pytest.raises(redis.ConnectionError):  # the port speaks nothing but TLS
        redis.Redis(port=stack.redis_server.port, socket_timeout=2).ping()
    stack.start_all()
    summary = wait_end(stack, run_source("billing"), 90)
    assert summary.status == "finished", summary
    check(stack, "redis over TLS")
    assert stack.redis_server.tls is not None
    untrusted = {**stack.env, "ETL_REDIS_TLS_CA_FILE": str(other_ca(stack.redis_server.tls))}
    done = _etl(untrusted, "run", "billing")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "ETL_REDIS_TLS_CA_FILE" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("sentinels", [1, 3])
def test_master_killed_mid_run_sentinel_promotes_the_replica(world, sentinels):
    """A master and its replica watched by one redis-sentinel (quorum 1) or three (quorum 2),
    every process reaching Redis through sentinel:// URLs (and the sentinels asking for a
    password of their own): the master killed with SIGKILL after some chunks committed,
    Sentinel promotes the replica, workers, beat and the loader follow it, and the run
    finishes with nothing lost or doubled (writes the old master acknowledged but had not
    replicated are re-driven by the supervisor and kept single by the ledger)."""
    password = _password()
    stack = world(redis_password=password, sentinels=sentinels, chunk_size=1_000)
    assert stack.replica is not None
    assert len(stack.sentinels) == sentinels
    sentinel = stack.sentinels[-1]
    assert sentinel.master_port() == stack.redis_server.port
    stack.start_all()
    started = time.monotonic()
    handle = run_source("billing")
    wait_until(lambda: chunks_done(handle) >= 3, 60, "three committed chunks", 0.02)
    assert handle.summary() is None, "the run ended before the fault"
    committed = chunks_done(handle)
    stack.redis_server.stop(signal.SIGKILL)
    killed_at = stack.mark_fault()
    wait_until(lambda: sentinel.master_port() == stack.replica.port, 30,
               "Sentinel to promote the replica", 0.05)
    failover_s = time.monotonic() - killed_at
    summary = wait_end(stack, handle, 90)
    run_s = time.monotonic() - started
    print(f"sentinel failover ({sentinels} sentinels): master killed after {committed} of 12 "
          f"chunks committed, replica promoted in {failover_s:.1f}s, run ended {summary.status} "
          f"{stack.ended_at - killed_at:.1f}s after the kill, {run_s:.1f}s in all")
    assert summary.status == "finished", summary
    check(stack, f"sentinel failover ({sentinels} sentinels), master killed")
    twice = stack.query("SELECT chunk_id, count(*) FROM etl_load_ledger GROUP BY chunk_id "
                        "HAVING count(*) > 1")
    assert twice == [], f"chunks in the ledger more than once: {twice}"
    # Still served by the promoted replica: the old master stays dead.
    assert stack.redis.info("server")["tcp_port"] == stack.replica.port
    sentinel_password = stack.env["ETL_REDIS_SENTINEL_PASSWORD"]
    assert _leaks(stack, [password, sentinel_password], {}) == []
