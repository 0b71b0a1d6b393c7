"""Junk under the deployment's Redis prefix never halts dispatch: a queue member
that is not a task id (past bigint, say) is dropped with a warning, and a key of
the wrong type is moved aside (quarantined) so every queue keeps flowing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import helpers
import pytest
import redis

from ledgerq import Context, Registry, config
from ledgerq.dispatch import Dispatch
from ledgerq.types import DueTask, TaskId


@pytest.fixture
async def dispatch(redis_url: str, redis_prefix: str) -> AsyncIterator[Dispatch]:
    d = Dispatch.connect(redis_url, redis_prefix)
    try:
        yield d
    finally:
        await d.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def due(task_id: int, queue: str) -> DueTask:
    return DueTask(TaskId(task_id), queue, 0)


async def test_a_member_past_bigint_is_dropped_and_the_real_ids_still_pop(
    dispatch: Dispatch, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await dispatch.push([due(7, "a"), due(8, "b")])
    raw.zadd(dispatch.queue_key("a"), {"99999999999999999999999": 0, "0": 0, "-5": 0})
    with caplog.at_level(logging.WARNING, "ledgerq.dispatch"):
        popped = await dispatch.pop(["a", "b"], 10)
    assert sorted(popped) == [7, 8]
    assert "'99999999999999999999999'" in caplog.text or "b'99999999999999999999999'" in caplog.text


@pytest.mark.parametrize("kind", ["string", "list", "hash"])
async def test_a_queue_key_of_the_wrong_type_is_quarantined_and_every_queue_flows(
    dispatch: Dispatch, raw: redis.Redis, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    junk = dispatch.queue_key("junk")
    {"string": lambda: raw.set(junk, "x"), "list": lambda: raw.rpush(junk, "x"),
     "hash": lambda: raw.hset(junk, "f", "x")}[kind]()  # fmt: skip
    with caplog.at_level(logging.WARNING, "ledgerq.dispatch"):
        await dispatch.push([due(1, "good"), due(2, "junk")])
        assert sorted(await dispatch.pop(["junk", "good"], 10)) == [1, 2]
    assert f"dispatch.quarantined {junk} holds a {kind}, not a zset" in caplog.text
    aside = [k.decode() for k in raw.keys(f"{{{dispatch.prefix}}}:quarantine:queue:junk:*")]
    assert len(aside) == 1 and raw.type(aside[0]).decode() == kind  # kept for inspection


async def test_every_operation_survives_a_wrong_typed_key(
    dispatch: Dispatch, raw: redis.Redis
) -> None:
    for name in ("q1", "q2", "q3", "q4"):
        raw.set(dispatch.queue_key(name), "junk")
    raw.rpush(dispatch.epoch_key(), "junk")
    assert await dispatch.queue_lengths(["q1"]) == {"q1": 0}
    assert await dispatch.waiting([due(1, "q2")]) == [False]
    assert await dispatch.pop_wait(["q3"], 0.05) is None
    assert await dispatch.pop(["q4"], 5) == []
    epoch = await dispatch.epoch()
    assert len(epoch) == 32


async def test_a_worker_serving_a_junked_queue_keeps_running_the_others(
    settings: config.Settings, raw: redis.Redis
) -> None:
    tasks = Registry()

    @tasks.task("job", queue="good")
    async def job(ctx: Context, payload: dict[str, Any]) -> int:
        return int(payload["n"])

    raw.set(f"{{{settings.redis_prefix}}}:queue:bad", "junk")
    async with helpers.running(settings, tasks, queues=["bad", "good"]) as s:
        ids = [await s.enqueue("job", {"n": n}) for n in range(5)]
        done = [await helpers.wait_for_status(s.ledger, t, "SUCCEEDED") for t in ids]
    assert [t.result for t in done] == list(range(5))
