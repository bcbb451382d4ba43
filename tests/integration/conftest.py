"""Real services for integration tests: a redis-server, an embedded Firebird database made by
the demo generator, DuckDB files in a temporary folder and real `celery worker` processes.

Nothing is skipped: a missing binary fails with what to install (`make test` installs it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etl_tasks.celery import app, use_redis
from etl_tasks.demo_data import make_demo_data
from etl_tasks.load import duckdb as store
from etl_tasks.local_services import RedisServer, Worker, wait_for_workers
from etl_tasks.resources import get_resources, reset_resources
from tests.integration.fault_stack import FaultStack, fault_stack, make_template


def file_sources(inboxes: str) -> str:
    """The lab feed and registration sources of the tests' pipeline config, their inboxes
    under `inboxes` (the config's own `{data_dir}` placeholder may be in it)."""
    return f"""
[[sources]]
name = "lab_results"
kind = "xml"
location = "{inboxes}/lab_feeds"
schedule = "manual"
chunk_size = 150
settle_s = 1

[[sources]]
name = "registrations"
kind = "excel"
location = "{inboxes}/registrations"
schedule = "manual"
chunk_size = 100
settle_s = 1
"""


PIPELINE = """
[[sources]]
name = "billing"
kind = "firebird"
location = "BILLING_CLAIMS"
schedule = {billing_schedule}
chunk_size = 4000
""" + file_sources("{{data_dir}}/demo")


@dataclass
class Stack:
    """The running services of a test session and the environment pointing at them."""

    root: Path
    env: dict[str, str]
    redis: RedisServer
    manifest: dict[str, Any]
    workers: dict[str, Worker]

    @property
    def duckdb_path(self) -> Path:
        return Path(self.env["ETL_DUCKDB_PATH"])

    def start_worker(self, role: str, name: str | None = None, *extra: str) -> Worker:
        worker = Worker(role, self.env, self.root / "logs" / f"{name or role}.log",
                        list(extra)).start()
        self.workers[name or role] = worker
        return worker

    def firebird(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL on the source database; the rows of a SELECT, [] for a change."""
        with get_resources().firebird_pool.connection() as con:
            cur = con.cursor()
            try:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description else []
            finally:
                cur.close()

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Read the store; wait while the loader holds its write lock for a commit."""
        with store.read_only(self.duckdb_path) as con:
            return con.execute(sql, params or []).fetchall()


def _set_env(env: dict[str, str]) -> None:
    os.environ.update(env)
    reset_resources()
    use_redis(env["ETL_REDIS_URL"])


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    redis_server = RedisServer(root / "redis").start()
    (root / "pipeline.toml").write_text(PIPELINE.format(billing_schedule='"manual"'))
    env = {
        **os.environ,
        "ETL_REDIS_URL": redis_server.url,
        "ETL_DATA_DIR": str(root / "data"),
        "ETL_DUCKDB_PATH": str(root / "data" / "warehouse.duckdb"),
        "ETL_FIREBIRD_DSN": str(root / "data" / "demo" / "billing.fdb"),
        "ETL_FIREBIRD_RUNTIME_DIR": str(root / "data" / ".firebird"),
        "ETL_PIPELINE_CONFIG": str(root / "pipeline.toml"),
        "ETL_STAGE_TTL_S": "3600",
        "ETL_OVERDUE_S": "20",
        "ETL_SUPERVISE_EVERY_S": "2",
    }
    saved = dict(os.environ)
    s = Stack(root, env, redis_server, {}, {})
    try:  # from here on, whatever fails (slow workers, the demo data) stops what started
        _set_env(env)
        s.manifest = make_demo_data(root / "data" / "demo", get_resources().firebird_target,
                                    claims=20_000, lab_files=4, lab_records=200, reg_files=3,
                                    reg_rows=120)
        s.start_worker("fleet", "fleet", "--concurrency", "2")
        s.start_worker("loader")
        s.start_worker("beat")  # the supervisor's schedule
        wait_for_workers(app.control, ["fleet-", "loader-"])
        yield s
    finally:
        for worker in s.workers.values():
            worker.stop()
        redis_server.stop()
        os.environ.clear()
        os.environ.update(saved)
        reset_resources()


@pytest.fixture
def env(stack: Stack) -> Stack:
    """The stack with this process's settings pointed at it."""
    _set_env(stack.env)
    return stack


@pytest.fixture(scope="session")
def fault_template(stack, tmp_path_factory) -> tuple[Path, Path]:
    """A 12,000-claim demo database each fault world copies, and the Firebird runtime folder
    this process uses (every process opening a database must share its lock folder)."""
    lock = os.environ.get("FIREBIRD_LOCK")
    runtime = Path(lock).parent if lock else Path(stack.env["ETL_FIREBIRD_RUNTIME_DIR"])
    path = tmp_path_factory.mktemp("fault-template") / "billing.fdb"
    return make_template(path, runtime), runtime


@pytest.fixture
def world(fault_template, tmp_path) -> Iterator[Callable[..., FaultStack]]:
    """Make this test's FaultStack (options as fault_stack()); stopped when the test ends."""
    template, runtime = fault_template
    made = 0
    with ExitStack() as stacks:
        def make(**options: Any) -> FaultStack:
            nonlocal made
            made += 1
            return stacks.enter_context(fault_stack(tmp_path / f"world{made}", template,
                                                    runtime, **options))

        yield make
