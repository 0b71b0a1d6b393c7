"""The client's hand-off: an enqueue marks the due tasks it creates QUEUED in its own
statement and pushes them to Redis after its commit, past the dispatcher. Nothing is
lost when the push fails or Redis forgets it, nothing runs twice, and a queue that
flow control holds back is never handed off."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import helpers
import psycopg
import pytest
import redis

from ledgerq import AsyncClient, Client, Context, Registry, config
from ledgerq.api.batcher import EnqueueBatcher
from ledgerq.dispatch import Dispatch
from ledgerq.dispatcher import Dispatcher
from ledgerq.ledger import AsyncLedger
from ledgerq.types import NewTask, TaskStatus

Conn = psycopg.Connection[Any]


@pytest.fixture
def registry() -> Registry:
    tasks = Registry()

    @tasks.task("job", queue="default")
    async def job(ctx: Context, payload: dict[str, Any]) -> int:
        return ctx.attempt

    return tasks


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[AsyncLedger]:
    ledger = await AsyncLedger.connect(db_url, max_size=4)
    yield ledger
    await ledger.close()


@pytest.fixture
async def dispatch(settings: config.Settings) -> AsyncIterator[Dispatch]:
    d = Dispatch.connect(settings.redis_url, settings.redis_prefix)
    yield d
    await d.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _status(db: Conn, task_id: int) -> str:
    row = db.execute("SELECT status FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0])


def _unreachable(settings: config.Settings) -> config.Settings:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return config.Settings(
        database_url=settings.database_url,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_prefix=settings.redis_prefix,
    )


def _forget_everything(raw: redis.Redis, prefix: str) -> None:
    """What FLUSHALL does to this test's namespace (its epoch included)."""
    keys = list(raw.scan_iter(match=f"{{{prefix}}}*"))
    assert keys
    raw.delete(*keys)


async def test_hand_off_pushes_at_once_and_the_dispatcher_adds_no_second_copy(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    async with AsyncClient(settings) as client:
        task = await client.enqueue("job")
        (second, third) = await client.enqueue_many([{"task_type": "job"}, {"task_type": "job"}])

    assert [task.status, second.status, third.status] == [TaskStatus.QUEUED] * 3
    assert [_status(db, t.id) for t in (task, second, third)] == ["QUEUED"] * 3
    assert await dispatch.queue_lengths(["default"]) == {"default": 3}
    dispatcher = Dispatcher(ledger, dispatch, database_url=settings.database_url)
    assert await dispatcher.run_once() == 0
    assert await dispatch.pop(["default"], 10) == [task.id, second.id, third.id]


def test_the_blocking_client_hands_off_too(
    settings: config.Settings, raw: redis.Redis, db: Conn
) -> None:
    with Client(settings) as client:
        task = client.enqueue("job", priority=3)
        later = client.enqueue("job", delay=60)
        (many,) = client.enqueue_many([{"task_type": "job", "queue": "other"}])

    assert (task.status, later.status, many.status) == (
        TaskStatus.QUEUED, TaskStatus.PENDING, TaskStatus.QUEUED
    )  # fmt: skip
    assert [_status(db, t.id) for t in (task, later, many)] == ["QUEUED", "PENDING", "QUEUED"]
    queued = raw.zrange(f"{{{settings.redis_prefix}}}:queue:default", 0, -1, withscores=True)
    assert [(m.decode()[-16:], score) for m, score in queued] == [(f"{task.id:016x}", -3.0)]
    assert raw.zcard(f"{{{settings.redis_prefix}}}:queue:other") == 1


async def test_a_task_whose_push_fails_is_delivered_by_the_sweep_and_runs_once(
    settings: config.Settings,
    registry: Registry,
    db: Conn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "ledgerq.dispatch"):
        async with AsyncClient(_unreachable(settings)) as client:
            started = time.monotonic()
            lost = await client.enqueue("job")
            # The failed push pauses hand-offs: the next task goes the dispatcher's way.
            plain = await client.enqueue("job")
            elapsed = time.monotonic() - started
    assert elapsed < 2
    assert (_status(db, lost.id), _status(db, plain.id)) == ("QUEUED", "PENDING")
    assert "dispatch.unavailable handing off 1 task(s)" in caplog.text

    # A dispatcher checks every QUEUED task against Redis when it starts (and
    # every sweep_interval_s those older than recheck_after_s).
    async with helpers.running(settings, registry) as s:
        assert s.dispatcher is not None
        done = await helpers.wait_for_status(s.ledger, lost.id, "SUCCEEDED")
        await helpers.wait_for_status(s.ledger, plain.id, "SUCCEEDED")
        assert s.dispatcher.redelivered == 1
    assert done.result == 1
    assert helpers.attempts(db, lost.id) == [(1, "succeeded", None)]


async def test_a_hand_off_redis_forgets_right_after_still_runs_once(
    settings: config.Settings, registry: Registry, raw: redis.Redis, db: Conn
) -> None:
    async with helpers.running(settings, registry, worker=False) as s:
        assert s.dispatcher is not None
        dispatcher = s.dispatcher

        async def epoch_seen() -> str | None:
            return dispatcher._epoch

        await helpers.eventually(epoch_seen, what="the dispatcher's first epoch check")
        task_id = await s.enqueue("job")
        assert await s.dispatch.queue_lengths(["default"]) == {"default": 1}
        _forget_everything(raw, settings.redis_prefix)

        # The dispatcher sees Redis's new epoch and re-checks every QUEUED task.
        async def pushed_again() -> bool:
            return await s.dispatch.queue_lengths(["default"]) == {"default": 1}

        await helpers.eventually(pushed_again, what="the task pushed again")
        s.start_worker(helpers.worker(registry, s))
        done = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert done.attempts == 1
    assert helpers.attempts(db, task_id) == [(1, "succeeded", None)]


@pytest.mark.parametrize(
    ("paused", "queue_settings"),
    # Any row sends the queue's claims through flow control, even one that limits nothing.
    [(True, "{}"), (False, '{"max_running": 1}'), (False, "{}")],
)
async def test_a_queue_flow_control_holds_back_is_not_handed_off(
    settings: config.Settings,
    registry: Registry,
    dispatch: Dispatch,
    db: Conn,
    paused: bool,
    queue_settings: str,
) -> None:
    db.execute(
        "INSERT INTO ledgerq.queues (queue, paused, settings) VALUES ('held', %s, %s::jsonb)",
        (paused, queue_settings),
    )
    async with AsyncClient(settings) as client:
        held = await client.enqueue("job", queue="held")
        free = await client.enqueue("job", queue="free")
    assert (held.status, free.status) == (TaskStatus.PENDING, TaskStatus.QUEUED)
    assert await dispatch.queue_lengths(["held", "free"]) == {"held": 0, "free": 1}
    async with helpers.running(settings, registry, worker=False, dispatcher=False) as s:
        assert await helpers.worker(registry, s, queues=["held"]).run_once() == 0
    assert _status(db, held.id) == "PENDING"


async def test_an_enqueue_in_the_callers_transaction_is_not_handed_off(
    settings: config.Settings, dispatch: Dispatch, db_url: str, db: Conn
) -> None:
    async with (
        AsyncClient(settings) as client,
        await psycopg.AsyncConnection.connect(db_url) as conn,
    ):
        task = await client.enqueue("job", conn=conn)
        await conn.commit()
    assert _status(db, task.id) == "PENDING"
    assert await dispatch.queue_lengths(["default"]) == {"default": 0}


async def test_hand_off_can_be_turned_off(
    settings: config.Settings, dispatch: Dispatch, db: Conn
) -> None:
    async with AsyncClient(settings, hand_off=False) as client:
        task = await client.enqueue("job", run_at=datetime.now(UTC) - timedelta(seconds=1))
    assert task.status == TaskStatus.PENDING
    assert _status(db, task.id) == "PENDING"
    assert await dispatch.queue_lengths(["default"]) == {"default": 0}


def test_the_dispatcher_is_woken_only_for_tasks_left_pending(
    settings: config.Settings, db_url: str, db: Conn
) -> None:
    db.execute("INSERT INTO ledgerq.queues (queue, paused) VALUES ('held', true)")
    with (
        psycopg.connect(db_url, autocommit=True) as listener,
        Client(settings) as client,
        Client(settings, hand_off=False) as plain_client,
    ):
        listener.execute("LISTEN ledgerq_tasks")
        handed = client.enqueue("job")
        held = client.enqueue("job", queue="held")
        plain = plain_client.enqueue("job")
        # Notifications arrive in commit order: a wake-up for the handed-off
        # task would make three.
        woken = list(listener.notifies(timeout=1, stop_after=3))
    assert (handed.status, held.status, plain.status) == (
        TaskStatus.QUEUED, TaskStatus.PENDING, TaskStatus.PENDING
    )  # fmt: skip
    assert [n.channel for n in woken] == ["ledgerq_tasks"] * 2


async def test_the_apis_batcher_hands_off_single_and_batched_enqueues(
    ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    db.execute("INSERT INTO ledgerq.queues (queue, paused) VALUES ('held', true)")
    batcher = EnqueueBatcher(ledger, dispatch=dispatch, max_in_flight=1)
    news = [NewTask("job", queue="held" if i == 3 else "default") for i in range(6)]
    # One in flight at a time: the first goes alone, the rest gather into a batch.
    tasks = await asyncio.gather(*(batcher.enqueue(new) for new in news))

    statuses = [t.status for t in tasks]
    assert statuses == [TaskStatus.QUEUED] * 3 + [TaskStatus.PENDING] + [TaskStatus.QUEUED] * 2
    assert [_status(db, t.id) for t in tasks] == [s.value for s in statuses]

    async def pushed() -> bool:
        return await dispatch.queue_lengths(["default", "held"]) == {"default": 5, "held": 0}

    await helpers.eventually(pushed, what="the background pushes")
