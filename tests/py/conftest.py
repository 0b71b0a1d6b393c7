"""Fixtures for the runtime tests: a private Redis key namespace per test.

The PostgreSQL fixtures (``db_url``, ``db``) come from tests/conftest.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import e2e_helpers as e2e
import pytest
import redis

from ledgerq import config, dispatch

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc}); start it with "
            "`redis-server --daemonize yes --port 6379 --save '' --appendonly no`"
        )
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A random key namespace; every key in it is deleted after the test."""
    prefix = f"lqtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{{{prefix}}}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def settings(db_url: str, redis_url: str, redis_prefix: str) -> config.Settings:
    return config.Settings(database_url=db_url, redis_url=redis_url, redis_prefix=redis_prefix)


@pytest.fixture
async def dispatcher_redis(settings: config.Settings) -> AsyncIterator[dispatch.Dispatch]:
    """A Dispatch on the test's namespace."""
    d = dispatch.Dispatch.connect(settings.redis_url, settings.redis_prefix)
    yield d
    await d.close()


@pytest.fixture
def deployment(
    tmp_path: Path, db_url: str, redis_url: str, redis_prefix: str
) -> Iterator[e2e.Deployment]:
    """Real ledgerq processes (e2e_helpers.Deployment) on the test's database,
    with the e2e tasks' tables; every process is stopped after the test."""
    with e2e.Deployment(tmp_path, db_url, redis_url, redis_prefix) as d:
        d.create_tables()
        yield d
