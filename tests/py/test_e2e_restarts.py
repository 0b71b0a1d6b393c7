"""End to end: Redis flushed or restarted, PostgreSQL restarted, under real processes.

Guarantee 1 of the README: a task whose enqueue returned runs to a final state
through Redis restarts or FLUSHALL and PostgreSQL restarts. Each test owns the
server it breaks (a private redis-server, a private PostgreSQL cluster), so
flushing or restarting it disturbs nobody else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import e2e_helpers as e2e
import e2e_servers
import pytest

from ledgerq import dispatch, types

pytestmark = pytest.mark.e2e


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[e2e_servers.PrivateRedis]:
    with e2e_servers.PrivateRedis(tmp_path / "redis") as server:
        yield server


def queued_in_redis(server: e2e_servers.PrivateRedis) -> int:
    """Task ids waiting in the server's queues (whatever the key layout)."""
    client = server.client()
    try:
        return sum(int(client.zcard(key)) for key in client.scan_iter(_type="zset"))
    finally:
        client.close()


def record_tasks(count: int, start: int = 0, sleep_s: float = 0) -> list[dict[str, object]]:
    return [
        {"task_type": "e2e.record", "payload": {"n": n, "sleep_s": sleep_s}}
        for n in range(start, start + count)
    ]


def deliver_again(url: str, prefix: str, ids: list[int]) -> int:
    """Push ids to Redis once more, as the dispatcher's sweep does for an id it
    cannot find there (one a worker popped and is about to claim); how many
    were not waiting there already."""

    async def push() -> int:
        async with dispatch.connected(url, prefix) as redis_dispatch:
            tasks = [types.DueTask(types.TaskId(i), "default", 0) for i in ids]
            return await redis_dispatch.push(tasks)

    return asyncio.run(push())


def assert_each_ran_once(d: e2e.Deployment, ids: list[int]) -> None:
    assert d.runs_per_task() == dict.fromkeys(ids, 1), d.diagnostics()
    assert d.query("SELECT count(*) FROM ledgerq.tasks WHERE attempts <> 1") == [(0,)]


def test_flushdb_with_500_tasks_queued_loses_none_and_runs_none_twice(
    tmp_path: Path, db_url: str, private_redis: e2e_servers.PrivateRedis
) -> None:
    with e2e.Deployment(tmp_path, db_url, private_redis.url, "e2e") as d:
        d.extra_diagnostics.append(private_redis.describe)
        d.create_tables()
        d.dispatcher()
        d.reaper()
        ids = d.enqueue_many(record_tasks(500))
        d.wait_statuses({"QUEUED": 500})
        # The dispatcher commits QUEUED, then pushes: wait for the push.
        d.wait_for(lambda: queued_in_redis(private_redis) == 500, "the 500 ids in Redis")

        client = private_redis.client()
        try:
            client.flushdb()
            assert client.dbsize() == 0
        finally:
            client.close()
        d.worker(concurrency=10)
        d.worker(concurrency=10)
        d.wait_for(lambda: d.status_counts().get("SUCCEEDED"), "the first task to succeed")
        # Duplicate deliveries of tasks running, finished or still waiting: claims fence them.
        assert deliver_again(private_redis.url, "e2e", ids) > 0

        d.wait_statuses({"SUCCEEDED": 500}, timeout_s=20)
        d.wait_for(lambda: queued_in_redis(private_redis) == 0, "the duplicates to be popped")
        assert_each_ran_once(d, ids)
        results = dict(d.query("SELECT id, result FROM ledgerq.tasks"))
        assert results == {i: {"n": n, "attempt": 1} for n, i in enumerate(ids)}
        d.check_alive()
        d.assert_logs_clean()


def test_redis_restarted_empty_under_load_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, db_url: str, private_redis: e2e_servers.PrivateRedis
) -> None:
    with e2e.Deployment(tmp_path, db_url, private_redis.url, "e2e") as d:
        d.extra_diagnostics.append(private_redis.describe)
        d.create_tables()
        d.dispatcher()
        d.reaper()
        workers = [d.worker(concurrency=2), d.worker(concurrency=2)]
        ids = d.enqueue_many(record_tasks(150, sleep_s=0.05))
        d.wait_for(lambda: d.status_counts().get("SUCCEEDED", 0) >= 30, "30 tasks to succeed")

        private_redis.kill()
        assert d.status_counts().get("SUCCEEDED", 0) < 150, "Redis went down after the load"
        for worker in workers:
            worker.wait_log("dispatch.unavailable")
        ids += d.enqueue_many(record_tasks(50, start=150, sleep_s=0.05))  # Redis is down
        private_redis.start()

        d.wait_statuses({"SUCCEEDED": 200}, timeout_s=20)
        assert_each_ran_once(d, ids)
        d.check_alive()
        d.assert_logs_clean()


def test_postgres_restarted_under_load_every_task_succeeds_exactly_once(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with (
        e2e_servers.PrivatePostgres() as pg,
        e2e.Deployment(tmp_path, pg.url, redis_url, redis_prefix) as d,
    ):
        d.extra_diagnostics.append(pg.describe)
        d.migrate()
        d.dispatcher()
        d.reaper()
        workers = [d.worker(concurrency=2), d.worker(concurrency=2)]
        batch = [
            {"task_type": "e2e.effect_tx", "payload": {"n": n, "sleep_s": 0.05}} for n in range(160)
        ]
        # A worker still starting when PostgreSQL goes down exits at once, by design.
        for worker in workers:
            worker.wait_log("worker.started")
        ids = d.enqueue_many(batch[:120])
        d.wait_for(lambda: d.status_counts().get("SUCCEEDED", 0) >= 20, "20 tasks to succeed")

        pg.restart()
        d.reconnect()
        assert d.status_counts().get("SUCCEEDED", 0) < 120, "PostgreSQL restarted after the load"
        ids += d.enqueue_many(batch[120:])  # the dispatcher must have reconnected to LISTEN

        d.wait_statuses({"SUCCEEDED": 160}, timeout_s=60)
        succeeded = d.query(
            "SELECT task_id, count(*) FROM ledgerq.attempts WHERE outcome = 'succeeded' "
            "GROUP BY task_id"
        )
        assert dict(succeeded) == dict.fromkeys(ids, 1)
        # once_in_transaction: the effect committed with the completion, exactly once.
        assert d.effects_per_task() == dict.fromkeys(ids, 1), d.diagnostics()
        d.check_alive()
        d.assert_logs_clean()
