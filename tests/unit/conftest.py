"""A real redis-server for the unit tests of Redis-backed state (breakers, the window,
staging): started once per module on a free port, keeping nothing on disk."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from etl_tasks.local_services import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False,
                         maxmemory="64mb").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def client(redis_url: str) -> Iterator[Callable[[], redis.Redis]]:
    """Make Redis clients (one per "host"), all closed when the test ends; Redis starts
    each test empty."""
    made: list[redis.Redis] = []

    def make() -> redis.Redis:
        made.append(redis.Redis.from_url(redis_url))
        return made[-1]

    make().flushall()
    yield make
    for r in made:
        r.close()
