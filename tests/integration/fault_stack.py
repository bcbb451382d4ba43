"""One world per fault test: its own redis-server, Firebird copy, DuckDB file and workers.

A fault test kills things (a pool child, a worker's main process, the loader, redis-server),
so it cannot share the session stack. `FaultStack` starts a redis-server on a free port that
the test owns (kill -9 and restart on the same port, empty or from its append-only file), a
copy of a small demo database, a pipeline config with manual schedules, and the fleet, the
loader and beat as real processes with the stack's environment plus the test's fault points.
With `firebird_server=True` the billing source is a private Firebird server instead (Debian's
firebird3.0-server on a free loopback port, `FaultStack.firebird_server`, to stop, kill and
start again) holding a fresh demo database made through it. Redis can ask for a password
(`redis_password`), speak TLS only (`redis_tls`, a CA and certificate made by the test), and
be a master with a replica watched by `sentinels` redis-sentinel processes, the stack's
processes reaching it through `sentinel://` URLs (`FaultStack.replica`, `.sentinels`).
While the stack is open, `etl_tasks` in the test process points at it; on exit everything is
killed and the previous settings come back, even when the test failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import kombu.pools
import redis

from etl_tasks.celery import app, use_redis
from etl_tasks.config import get_settings
from etl_tasks.load import duckdb as store
from etl_tasks.local_services import (
    FirebirdServer,
    RedisSentinel,
    RedisServer,
    Worker,
    wait_for_workers,
)
from etl_tasks.redis_conn import RedisConn, conn_from
from etl_tasks.resources import reset_resources
from etl_tasks.sources.firebird import FirebirdTarget, connect
from tests.integration.tls_files import make_tls_files

CLAIMS = 12_000
CHUNK_SIZE = 2_000  # six key ranges: billing:keys:1-2000 ... billing:keys:10001-12000
FAST_SUPERVISOR = {"ETL_OVERDUE_S": "5", "ETL_SUPERVISE_EVERY_S": "1"}
# A loader started after its predecessor was killed waits for the dead one's writer lease.
WRITER_LEASE_S = 5

PIPELINE = """
[[sources]]
name = "billing"
kind = "firebird"
location = "{location}"
schedule = {schedule}
chunk_size = {chunk_size}
"""

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (a worker's pool processes), read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Field 4 is the parent pid; the command name before it may hold spaces: split after ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return sorted(children)


def point_process_at(env: dict[str, str]) -> None:
    """Point etl_tasks in this process (settings, Redis, Celery's pools) at `env`'s services."""
    os.environ.clear()
    os.environ.update(env)
    reset_resources()
    use_redis(get_settings().redis_url)
    # Celery and kombu cache connections per URL (a restarted server keeps its URL), the
    # producer pools and the result backend: close and forget them all.
    kombu.pools.reset()
    app._pool = None
    with suppress(AttributeError, KeyError):
        app.__dict__["amqp"]._producer_pool = None
    with suppress(AttributeError):
        del app.control.mailbox.producer_pool
    app._backend_cache = None
    with suppress(AttributeError):
        del app._local.backend


@dataclass
class FaultStack:
    """The services of one fault test; see the module docstring."""

    root: Path
    env: dict[str, str]
    redis_server: RedisServer
    workers: dict[str, Worker] = field(default_factory=dict)
    fault_at: float | None = None
    """time.monotonic() of the injected fault, for the oracle's recovery time."""
    ended_at: float | None = None
    """time.monotonic() when the test saw the run end."""
    firebird_server: FirebirdServer | None = None
    """The source's Firebird server, when the stack has one (else the embedded engine)."""
    replica: RedisServer | None = None
    """With sentinels: the replica of `redis_server` (the master until a failover)."""
    sentinels: list[RedisSentinel] = field(default_factory=list)
    redis_conn: RedisConn | None = None
    """How the stack's processes reach Redis (set once the stack's settings are in place)."""

    # -- processes ------------------------------------------------------------------------
    def start_worker(self, role: str, name: str | None = None, extra_env: dict[str, str] | None
                     = None, args: Sequence[str] = ()) -> Worker:
        """Start `python -m workers.<role>` with the stack env plus `extra_env`."""
        name = name or role
        old = self.workers.get(name)
        if old is not None:
            self.kill(name)
        worker = Worker(role, {**self.env, **(extra_env or {})},
                        self.root / "logs" / f"{name}.log", list(args)).start()
        self.workers[name] = worker
        return worker

    def start_fleet(self, extra_env: dict[str, str] | None = None, name: str = "fleet",
                    wait: bool = True) -> Worker:
        worker = self.start_worker("fleet", name, extra_env, ["--concurrency", "2"])
        if wait:
            # The fleet names itself after its pid: wait for this one, not any live fleet.
            self.wait_for(self.node("fleet", worker))
        return worker

    def start_loader(self, extra_env: dict[str, str] | None = None, wait: bool = True,
                     name: str = "loader") -> Worker:
        """A loader; a second one (another `name`) stands by while the first writes."""
        worker = self.start_worker("loader", name, extra_env)
        if wait:
            self.wait_for(self.node("loader", worker))
        return worker

    @staticmethod
    def node(role: str, worker: Worker) -> str:
        """The start of a worker's Celery name: it names itself after its pid."""
        return f"{role}-{worker.pid}@"

    def start_beat(self) -> Worker:
        return self.start_worker("beat")

    def start_all(self, fleet_env: dict[str, str] | None = None,
                  loader_env: dict[str, str] | None = None, beat: bool = True) -> None:
        """Fleet, loader and beat (the supervisor needs beat), started side by side."""
        fleet = self.start_fleet(fleet_env, wait=False)
        loader = self.start_loader(loader_env, wait=False)
        if beat:
            self.start_beat()
        self.wait_for(self.node("fleet", fleet), self.node("loader", loader))

    def wait_for(self, *names: str, timeout: float = 60) -> None:
        wait_for_workers(app.control, list(names), timeout=timeout)

    def alive(self, name: str) -> bool:
        process = self.workers[name].process
        return process is not None and process.poll() is None

    def pool_children(self, name: str) -> list[int]:
        return child_pids(self.workers[name].pid)

    def kill(self, name: str) -> None:
        """kill -9 a worker's whole process group (main process and pool children)."""
        worker = self.workers[name]
        if worker.process is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=10)

    def mark_fault(self) -> float:
        self.fault_at = time.monotonic()
        return self.fault_at

    def close(self) -> None:
        for name in list(self.workers):
            self.kill(name)
        for server in (*self.sentinels, self.replica, self.redis_server):
            if server is not None:
                server.stop(signal.SIGKILL)
        if self.firebird_server is not None:
            self.firebird_server.kill()

    # -- Redis ----------------------------------------------------------------------------
    @property
    def redis(self) -> redis.Redis:
        """A client of the stack's Redis (its password, TLS; the master of the moment)."""
        assert self.redis_conn is not None
        return self.redis_conn.client(decode_responses=True)

    def restart_redis(self) -> None:
        """kill -9 redis-server and start it on the same port: empty, or from its AOF."""
        self.redis_server.restart()
        point_process_at(self.env)  # drop connections to the old server

    def stage_keys(self, run_id: str = "*", part: str = "*") -> list[str]:
        return list(self.redis.scan_iter(match=f"etl:stage:{run_id}:*:{part}", count=1000))

    # -- stores ---------------------------------------------------------------------------
    @property
    def duckdb_path(self) -> Path:
        return Path(self.env["ETL_DUCKDB_PATH"])

    @property
    def firebird_target(self) -> FirebirdTarget:
        return FirebirdTarget(dsn=self.env["ETL_FIREBIRD_DSN"], user="SYSDBA",
                              password="masterkey",
                              runtime_dir=Path(self.env["ETL_FIREBIRD_RUNTIME_DIR"]))

    def firebird(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL on this stack's copy of the source; the rows of a SELECT, [] for a change."""
        con = connect(self.firebird_target)
        try:
            cur = con.cursor()
            cur.execute(sql, params)
            rows = list(cur.fetchall()) if cur.description else []
            cur.close()
            con.commit()
            return rows
        finally:
            con.close()

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Read the store; wait while the loader holds its write lock for a commit."""
        with store.read_only(self.duckdb_path) as con:
            return con.execute(sql, params or []).fetchall()

    def logs(self) -> str:
        where = f"worker logs in {self.root / 'logs'}, redis log in {self.redis_server.directory}"
        if self.firebird_server is not None:
            where += f", Firebird server log {self.firebird_server.log_path}"
        return where


def make_template(path: Path, runtime_dir: Path, claims: int = CLAIMS) -> Path:
    """A demo Firebird database each fault stack copies (copying is faster than generating)."""
    from etl_tasks.demo_data import make_billing_db

    path.parent.mkdir(parents=True, exist_ok=True)
    make_billing_db(FirebirdTarget(dsn=str(path), user="SYSDBA", password="masterkey",
                                   runtime_dir=runtime_dir), claims)
    return path


@contextmanager
def fault_stack(root: Path, template: Path, runtime_dir: Path, *, appendonly: bool = False,
                location: str = "BILLING_CLAIMS", schedule: str = '"manual"',
                env: dict[str, str] | None = None, chunk_size: int = CHUNK_SIZE,
                maxmemory: str = "256mb", firebird_server: bool = False,
                pipeline_extra: str = "", redis_password: str | None = None,
                redis_tls: bool = False, sentinels: int = 0) -> Iterator[FaultStack]:
    """A FaultStack with Redis up and this process pointed at it; no worker started yet.

    runtime_dir must be the Firebird runtime folder this process already uses (its lock
    folder is shared by every process opening a database). With `firebird_server`, the
    stack's ETL_FIREBIRD_DSN names a CLAIMS-claim database on its own Firebird server.
    `pipeline_extra` is TOML appended to the pipeline config (more sources, thresholds).
    `redis_password` goes to the stack's processes in ETL_REDIS_PASSWORD_FILE; with
    `redis_tls` they get ETL_REDIS_TLS_CA_FILE (and rediss:// or ETL_REDIS_TLS); with
    `sentinels`, sentinel:// URLs and ETL_REDIS_MASTER_NAME, the sentinels asking for the
    password + "-sentinel" when there is a password.
    """
    saved = dict(os.environ)
    data = root / "data"
    data.mkdir(parents=True)
    shutil.copyfile(template, data / "billing.fdb")
    (root / "pipeline.toml").write_text(PIPELINE.format(location=location, schedule=schedule,
                                                        chunk_size=chunk_size)
                                          + pipeline_extra)
    tls = make_tls_files(root / "tls") if redis_tls else None
    server = RedisServer(root / "redis", appendonly=appendonly, maxmemory=maxmemory,
                         password=redis_password, tls=tls)
    base = {k: v for k, v in saved.items() if not k.startswith("ETL_FAULT_")}
    stack_env = {
        **base,
        "ETL_REDIS_URL": server.url,
        "ETL_DATA_DIR": str(data),
        "ETL_DUCKDB_PATH": str(data / "warehouse.duckdb"),
        "ETL_FIREBIRD_DSN": str(data / "billing.fdb"),
        "ETL_FIREBIRD_RUNTIME_DIR": str(runtime_dir),
        "ETL_PIPELINE_CONFIG": str(root / "pipeline.toml"),
        "ETL_STAGE_TTL_S": "3600",
        "ETL_WRITER_LEASE_S": str(WRITER_LEASE_S),
        **FAST_SUPERVISOR,
        **(env or {}),
    }
    stack_env.update(_redis_env(root, server, redis_password, sentinels))
    fb_server = FirebirdServer(root / "firebird") if firebird_server else None
    if fb_server is not None:
        stack_env["ETL_FIREBIRD_DSN"] = (env or {}).get(
            "ETL_FIREBIRD_DSN", fb_server.dsn(fb_server.directory / "billing.fdb"))
    stack = FaultStack(root, stack_env, server, firebird_server=fb_server)
    try:
        server.start()
        if sentinels:
            _start_sentinels(stack, sentinels, redis_password)
        if fb_server is not None:
            from etl_tasks.demo_data import make_billing_db

            fb_server.start()
            make_billing_db(stack.firebird_target, CLAIMS)
        point_process_at(stack_env)
        stack.redis_conn = conn_from(get_settings())
        yield stack
    finally:
        stack.close()
        point_process_at(saved)


SENTINEL_MASTER = "etl"


def _redis_env(root: Path, server: RedisServer, password: str | None,
               sentinels: int) -> dict[str, str]:
    """ETL_REDIS_* for a stack whose Redis has a password, TLS or sentinels."""
    env: dict[str, str] = {}
    if password is not None:
        secret = root / "secrets" / "redis-password"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(password + "\n")  # as a secrets file often ends
        env["ETL_REDIS_PASSWORD_FILE"] = str(secret)
        if sentinels:
            env["ETL_REDIS_SENTINEL_PASSWORD"] = password + "-sentinel"
    if server.tls is not None:
        env.update(ETL_REDIS_TLS="true", ETL_REDIS_TLS_CA_FILE=str(server.tls.ca))
    if sentinels:
        env.update(ETL_REDIS_MASTER_NAME=SENTINEL_MASTER)
    return env


def _start_sentinels(stack: FaultStack, count: int, password: str | None) -> None:
    """A replica of the stack's Redis and `count` sentinels (quorum: a majority) watching
    it; the stack's ETL_REDIS_URL names the sentinels once they know the replica."""
    master = stack.redis_server
    stack.replica = RedisServer(stack.root / "replica", appendonly=master.appendonly,
                                maxmemory=master.maxmemory, password=master.password,
                                tls=master.tls, replica_of=master).start()
    master.wait_replicated()
    for n in range(count):
        stack.sentinels.append(RedisSentinel(
            stack.root / f"sentinel{n}", master, SENTINEL_MASTER, quorum=count // 2 + 1,
            password=None if password is None else password + "-sentinel").start())
    wait_until(lambda: all(s.knows_replicas() for s in stack.sentinels), 30,
               "the sentinels to see the replica")
    stack.env["ETL_REDIS_URL"] = ";".join(s.url for s in stack.sentinels)
