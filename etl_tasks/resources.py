"""The resource layer: connections built from Settings, one set per worker process.

Switching environment is configuration only: the same code gets another Redis, Firebird or
DuckDB path from the environment. Connections are created lazily after the worker forks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import redis

from etl_tasks.config import PipelineConfig, Settings, get_settings, load_pipeline
from etl_tasks.redis_conn import RedisConn, conn_from
from etl_tasks.sealing import Sealer, sealer_from
from etl_tasks.sources.firebird import ConnectionPool, FirebirdTarget


@dataclass
class Resources:
    settings: Settings
    pipeline: PipelineConfig = field(init=False)

    def __post_init__(self) -> None:
        self.pipeline = load_pipeline(self.settings)

    @cached_property
    def redis_conn(self) -> RedisConn:
        """Where Redis is and how to reach it (password, TLS, Sentinel): redis_conn.py."""
        return conn_from(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        # With Sentinel, a client that asks for the master at each (re)connection.
        return self.redis_conn.client(health_check_interval=30)

    @cached_property
    def sealer(self) -> Sealer:
        """The staging keys (sealing.py): staged patient rows are sealed with them."""
        return sealer_from(self.settings)

    @cached_property
    def firebird_target(self) -> FirebirdTarget:
        s = self.settings
        return FirebirdTarget(dsn=s.firebird_dsn, user=s.firebird_user,
                              password=s.firebird_password.get_secret_value(),
                              runtime_dir=s.firebird_runtime_dir)

    @cached_property
    def firebird_pool(self) -> ConnectionPool:
        s = self.settings
        return ConnectionPool(self.firebird_target, s.firebird_pool_size,
                              s.firebird_pool_timeout_s)


_current: Resources | None = None


def get_resources() -> Resources:
    global _current
    if _current is None:
        _current = Resources(get_settings())
    return _current


def reset_resources() -> None:
    """Drop per-process connections (after fork, or when tests change settings)."""
    global _current
    if _current is not None and "firebird_pool" in _current.__dict__:
        _current.firebird_pool.close()
    _current = None
    get_settings.cache_clear()
