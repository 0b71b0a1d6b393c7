"""The runtime on a private 3-node Redis Cluster (started once per run, torn
down at its end): a worker end to end through ``redis+cluster://`` settings,
and an idle worker's blocking pop. The Dispatch contract suite runs on the
cluster too, as the ``cluster`` parameters of tests/py/test_dispatch.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import Client, Context, Registry, config
from ledgerq.dispatch import Dispatch
from ledgerq.types import DueTask, TaskId, TaskStatus
from ledgerq.worker import POP_WAIT_S

pytestmark = pytest.mark.cluster

Conn = psycopg.Connection[Any]


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> helpers.LocalRedisCluster:
    return helpers.shared_cluster(request.config)


@pytest.fixture
def cluster_settings(
    db_url: str, redis_cluster: helpers.LocalRedisCluster
) -> Iterator[config.Settings]:
    prefix = f"lqtest-{uuid.uuid4().hex[:12]}"
    host_port = redis_cluster.url.removeprefix("redis://")
    yield config.Settings(
        database_url=db_url, redis_url=f"redis+cluster://{host_port}", redis_prefix=prefix
    )
    redis_cluster.delete_prefix(prefix)


def test_redis_cluster_url_turns_the_cluster_flag_on(cluster_settings: config.Settings) -> None:
    assert cluster_settings.redis_cluster is True
    assert cluster_settings.redis_url.startswith("redis://127.0.0.1:")


async def test_worker_runs_tasks_end_to_end_on_a_cluster(
    cluster_settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("mail.send", queue="mail")
    async def mail(ctx: Context, payload: dict[str, int]) -> dict[str, int]:
        return {"n": payload["n"], "attempt": ctx.attempt}

    @tasks.task("sms.send", queue="sms")
    def sms(ctx: Context, payload: dict[str, int]) -> int:
        return payload["n"] * 10

    async with helpers.running(cluster_settings, tasks) as s:
        assert s.dispatch.client.__class__.__name__ == "RedisCluster"
        mails = [await s.enqueue("mail.send", {"n": n}, priority=n) for n in range(4)]
        smss = [await s.enqueue("sms.send", {"n": n}) for n in range(3)]
        done = [await helpers.wait_for_status(s.ledger, t, "SUCCEEDED") for t in mails + smss]
    assert [t.result for t in done] == [{"n": n, "attempt": 1} for n in range(4)] + [0, 10, 20]
    rows = db.execute(
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'succeeded') FROM ledgerq.attempts"
    ).fetchone()
    assert rows == (7, 7)


async def test_idle_blocking_pop_outlasts_the_cluster_clients_default_read_timeout(
    redis_cluster: helpers.LocalRedisCluster,
) -> None:
    # An idle worker blocks POP_WAIT_S (5 s) at a time; the cluster client's
    # default 5 s read timeout used to cut that off and retry it for ~55 s.
    prefix = f"lqtest-{uuid.uuid4().hex[:12]}"
    d = Dispatch.connect(redis_cluster.url, prefix, cluster=True)
    try:
        assert await d.pop_wait(["idle"], POP_WAIT_S + 0.2) is None
        await d.push([DueTask(TaskId(7), "idle", 0)])
        assert await d.pop_wait(["idle"], 1) == 7
    finally:
        await d.close()
        redis_cluster.delete_prefix(prefix)


async def test_the_blocking_clients_hand_off_reaches_a_cluster(
    cluster_settings: config.Settings,
) -> None:
    with Client(cluster_settings) as client:
        task = client.enqueue("mail.send", {"n": 1}, queue="mail")
    assert task.status == TaskStatus.QUEUED
    s = cluster_settings
    d = Dispatch.connect(s.redis_url, s.redis_prefix, cluster=True)
    try:
        assert await d.pop(["mail"], 10) == [task.id]
    finally:
        await d.close()
