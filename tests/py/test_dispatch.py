"""The Redis layer (ledgerq.dispatch): one contract suite, run against a single
Redis node and against a private Redis Cluster alike (the ``cluster`` marked
parameters), plus the score function and the unreachable-Redis errors."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone

import helpers
import pytest
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
from redis.crc import key_slot

from ledgerq import errors
from ledgerq.dispatch import Dispatch, task_member, task_score
from ledgerq.types import PRIORITY_MAX, PRIORITY_MIN, DueTask, TaskId


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> helpers.LocalRedisCluster:
    return helpers.shared_cluster(request.config)


@dataclasses.dataclass
class Backend:
    name: str
    url: str
    cluster: bool
    prefix: str
    dispatch: Dispatch

    def raw(self) -> redis.Redis | redis.RedisCluster:
        """A plain synchronous client on the same Redis, to look behind Dispatch's back."""
        if self.cluster:
            return redis.RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)

    def keys(self) -> list[str]:
        client = self.raw()
        try:
            if isinstance(client, redis.RedisCluster):
                found = client.keys(
                    f"{{{self.prefix}}}*", target_nodes=redis.RedisCluster.ALL_NODES
                )
            else:
                found = client.keys(f"{{{self.prefix}}}*")
            return sorted(k.decode() if isinstance(k, bytes) else k for k in found)
        finally:
            client.close()

    def named(self, client_name: str) -> Dispatch:
        """A Dispatch whose connections carry client_name, to find them in CLIENT LIST."""
        client: aioredis.Redis | aiocluster.RedisCluster
        if self.cluster:
            client = aiocluster.RedisCluster.from_url(
                self.url, client_name=client_name, socket_timeout=None
            )
        else:
            client = aioredis.Redis.from_url(self.url, client_name=client_name)
        return Dispatch(client, self.prefix)

    async def is_blocked(self, client_name: str) -> bool:
        """Whether a connection named client_name is blocked in a command right now."""
        client = self.raw()
        try:
            if isinstance(client, redis.RedisCluster):
                nodes = [n.redis_connection for n in client.get_nodes()]  # type: ignore[no-untyped-call]
            else:
                nodes = [client]
            return any(
                c["name"] == client_name and "b" in c["flags"]
                for node in nodes
                if node is not None
                for c in node.client_list()
            )
        finally:
            client.close()

    def delete_namespace(self) -> None:
        """What FLUSHALL does to this test: every key of its namespace is gone."""
        client = self.raw()
        try:
            for key in self.keys():
                client.delete(key)
        finally:
            client.close()


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def backend(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[Backend]:
    """A Dispatch on a fresh namespace, on a single node or on the cluster."""
    if request.param == "cluster":
        cluster: helpers.LocalRedisCluster = request.getfixturevalue("redis_cluster")
        url, is_cluster = cluster.url, True
    else:
        url, is_cluster = redis_url, False
    dispatch = Dispatch.connect(url, redis_prefix, cluster=is_cluster)
    backend = Backend(request.param, url, is_cluster, redis_prefix, dispatch)
    try:
        yield backend
    finally:
        await dispatch.close()
        if is_cluster:
            backend.delete_namespace()


def due(task_id: int, queue: str = "default", priority: int = 0) -> DueTask:
    return DueTask(TaskId(task_id), queue, priority)


# --- the contract, on both backends ------------------------------------------------


async def test_pop_takes_higher_priority_first_then_older_ids(backend: Backend) -> None:
    d = backend.dispatch
    added = await d.push([due(5), due(3), due(4, priority=2), due(9, priority=-1), due(1)])
    assert added == 5
    assert await d.pop(["default"], 10) == [4, 1, 3, 5, 9]
    assert await d.pop(["default"], 10) == []


async def test_pop_takes_equal_priorities_by_turn_then_run_at_then_id(backend: Backend) -> None:
    d = backend.dispatch
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(task_id: int, queue: str, priority: int, seconds: float, turn: int = 0) -> DueTask:
        return DueTask(
            TaskId(task_id), queue, priority, turn=turn, run_at=t0 + timedelta(seconds=seconds)
        )

    # A retried task keeps its old id but gets a later run_at: it goes behind.
    await d.push([at(1, "a", 0, 30), at(2, "a", 0, 10), at(3, "b", 0, 20), at(4, "a", 5, 99)])
    await d.push([at(5, "b", 0, 10), at(6, "b", 0, 0, turn=1), at(7, "a", 0, -5)])
    assert await d.pop(["a"], 1) == [4]
    assert await d.pop(["a", "b"], 2) == [7, 2]
    assert await d.pop(["b", "a"], 10) == [5, 3, 1, 6]


async def test_push_does_not_add_an_id_already_waiting(backend: Backend) -> None:
    d = backend.dispatch
    assert await d.push([due(1), due(2)]) == 2
    assert await d.push([due(1), due(2, priority=7), due(3)]) == 1
    assert await d.queue_lengths(["default"]) == {"default": 3}
    # The copy already waiting keeps its place: the second push did not re-score it.
    assert await d.pop(["default"], 3) == [1, 2, 3]


async def test_pop_takes_at_most_count(backend: Backend) -> None:
    d = backend.dispatch
    await d.push([due(i) for i in range(1, 8)])
    assert await d.pop(["default"], 3) == [1, 2, 3]
    assert await d.pop(["default"], 0) == []
    assert await d.queue_lengths(["default"]) == {"default": 4}


async def test_pop_honours_priority_across_queues(backend: Backend) -> None:
    d = backend.dispatch
    await d.push([due(1, "a", 0), due(2, "b", 5), due(3, "a", 10), due(4, "b", 0), due(5, "c", 99)])
    assert await d.pop(["a", "b"], 2) == [3, 2]
    assert await d.pop(["b", "a"], 10) == [1, 4]
    # Queue c was never asked for: its id is still there.
    assert await d.queue_lengths(["a", "b", "c"]) == {"a": 0, "b": 0, "c": 1}


async def test_pop_wait_returns_an_id_pushed_while_it_waits(backend: Backend) -> None:
    name = f"waiter-{backend.prefix}"
    waiting = backend.named(name)
    try:
        waiter = asyncio.create_task(waiting.pop_wait(["a", "b"], 5))
        await helpers.eventually(
            lambda: backend.is_blocked(name), deadline_s=5, what="the BZPOPMIN to block"
        )
        await backend.dispatch.push([due(42, "b", 3)])
        assert await asyncio.wait_for(waiter, 5) == 42
    finally:
        await waiting.close()
    assert await backend.dispatch.queue_lengths(["a", "b"]) == {"a": 0, "b": 0}


async def test_pop_wait_returns_none_after_its_timeout(backend: Backend) -> None:
    assert await backend.dispatch.pop_wait(["a"], 0.1) is None


async def test_waiting_reports_which_ids_are_in_their_queues(backend: Backend) -> None:
    d = backend.dispatch
    await d.push([due(1, "a"), due(2, "b"), due(3, "a")])
    await d.pop(["a"], 1)
    assert await d.waiting([due(1, "a"), due(2, "b"), due(3, "a"), due(2, "a"), due(4, "b")]) == [
        False,
        True,
        True,
        False,
        False,
    ]
    assert await d.waiting([]) == []


async def test_epoch_is_stable_until_redis_loses_its_data(backend: Backend) -> None:
    d = backend.dispatch
    first = await d.epoch()
    assert first and await d.epoch() == first
    backend.delete_namespace()
    second = await d.epoch()
    assert second and second != first
    assert await d.epoch() == second


async def test_queue_lengths_count_ids_per_queue(backend: Backend) -> None:
    d = backend.dispatch
    await d.push([due(1, "a"), due(2, "a"), due(3, "b")])
    assert await d.queue_lengths(["a", "b", "empty"]) == {"a": 2, "b": 1, "empty": 0}
    assert await d.queue_lengths([]) == {}


async def test_every_key_is_in_the_namespace_and_one_hash_slot(backend: Backend) -> None:
    d = backend.dispatch
    await d.push([due(1, "a"), due(2, "b.c")])
    await d.epoch()
    keys = backend.keys()
    p = backend.prefix
    assert keys == sorted([f"{{{p}}}:epoch", f"{{{p}}}:queue:a", f"{{{p}}}:queue:b.c"])
    assert d.queue_of_key(f"{{{p}}}:queue:b.c".encode()) == "b.c"
    assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_ping_succeeds_on_a_reachable_redis(backend: Backend) -> None:
    await backend.dispatch.ping()


@pytest.mark.parametrize("cluster", [False, pytest.param(True, marks=pytest.mark.cluster)])
async def test_unreachable_redis_raises_dispatch_unavailable(cluster: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    d = Dispatch.connect(f"redis://127.0.0.1:{port}", f"x-{uuid.uuid4().hex[:6]}",
                         cluster=cluster, timeout_s=1)  # fmt: skip
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            d.ping,
            lambda: d.push([due(1)]),
            lambda: d.pop(["a"], 1),
            lambda: d.pop(["a", "b"], 1),
            lambda: d.pop_wait(["a"], 0.1),
            lambda: d.waiting([due(1)]),
            d.epoch,
            lambda: d.queue_lengths(["a"]),
        ]
        for call in calls:
            with pytest.raises(errors.DispatchUnavailable, match="Redis is unavailable"):
                await call()
    finally:
        await d.close()


# --- the score --------------------------------------------------------------------


def test_task_score_is_minus_the_priority_clamped_to_the_ledgers_range() -> None:
    assert [task_score(p) for p in (10, 0, -5)] == [-10, 0, 5]
    assert task_score(PRIORITY_MAX + 100) == task_score(PRIORITY_MAX) == -PRIORITY_MAX
    assert task_score(PRIORITY_MIN - 100) == task_score(PRIORITY_MIN) == -PRIORITY_MIN


def test_task_member_sorts_bytewise_by_turn_then_run_at_then_id() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ordered = [
        DueTask(TaskId(9), "q", 0, run_at=datetime(1, 1, 1, tzinfo=UTC), turn=-(2**63)),
        DueTask(TaskId(8), "q", 0, run_at=t0, turn=-1),
        DueTask(TaskId(7), "q", 0, run_at=datetime(1969, 12, 31, tzinfo=UTC)),
        DueTask(TaskId(5), "q", 0, run_at=t0),
        DueTask(TaskId(6), "q", 0, run_at=t0),
        DueTask(TaskId(1), "q", 0, run_at=t0 + timedelta(microseconds=1)),
        DueTask(TaskId(2**63 - 1), "q", 0, run_at=datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
        DueTask(TaskId(3), "q", 0, run_at=t0, turn=1),
        DueTask(TaskId(4), "q", 0, run_at=t0, turn=2**63 - 1),
    ]
    members = [task_member(t) for t in ordered]
    assert [m.encode() for m in members] == sorted(m.encode() for m in members)
    assert len(set(members)) == len(members)
    assert {len(m) for m in members} == {50}
    assert members[3] == "8000000000000000|00e30747454c0000|0000000000000005"
    # The same instant in another zone is the same member.
    east = timezone(timedelta(hours=14))
    assert task_member(DueTask(TaskId(5), "q", 0, run_at=t0.astimezone(east))) == members[3]
