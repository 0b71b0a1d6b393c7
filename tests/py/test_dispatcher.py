"""The Dispatcher: due PENDING tasks to Redis, woken by NOTIFY, several at once,
and the sweep that re-checks QUEUED tasks against Redis (and after Redis lost
its data). Driven through run_once()/sweep(), or run() awaited on ledger states."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import config, errors
from ledgerq.dispatch import Dispatch, task_member
from ledgerq.dispatcher import Dispatcher
from ledgerq.ledger import AsyncLedger
from ledgerq.types import DueTask, NewTask, TaskId

Conn = psycopg.Connection[Any]


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[AsyncLedger]:
    ledger = await AsyncLedger.connect(db_url, max_size=8)
    yield ledger
    await ledger.close()


@pytest.fixture
async def dispatch(settings: config.Settings) -> AsyncIterator[Dispatch]:
    d = Dispatch.connect(settings.redis_url, settings.redis_prefix)
    yield d
    await d.close()


async def enqueue(ledger: AsyncLedger, n: int = 1, **fields: Any) -> list[int]:
    return [tid for tid, _, _ in await ledger.enqueue_many([NewTask("job", **fields)] * n)]


def statuses(db: Conn) -> dict[str, int]:
    return dict(db.execute("SELECT status, count(*) FROM ledgerq.tasks GROUP BY status").fetchall())


@contextlib.asynccontextmanager
async def serving(dispatcher: Dispatcher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(dispatcher.run(), name="test-dispatcher")
    try:
        yield task
    finally:
        dispatcher.stop()
        await asyncio.wait_for(task, helpers.DEADLINE_S)


async def listening(db: Conn) -> bool:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN ledgerq_tasks'"
    ).fetchone()
    return row == (1,)


# --- run_once ------------------------------------------------------------------------


async def test_run_once_hands_due_tasks_to_redis_in_batches(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    due = await enqueue(ledger, 7, queue="mail", priority=2)
    later = await enqueue(ledger, 2, run_at=_in(3600))
    dispatcher = Dispatcher(ledger, dispatch, database_url=settings.database_url, batch_size=3)
    assert await dispatcher.run_once() == 7
    assert dispatcher.dispatched == 7
    assert statuses(db) == {"QUEUED": 7, "PENDING": 2}
    assert await dispatch.queue_lengths(["mail", "default"]) == {"mail": 7, "default": 0}
    assert await dispatch.pop(["mail"], 10) == due
    assert await dispatcher.run_once() == 0
    row = db.execute("SELECT array_agg(id ORDER BY id) FROM ledgerq.tasks WHERE status = 'PENDING'")
    assert row.fetchone() == (later,)


async def test_failed_push_is_kept_and_pushed_when_redis_is_back(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    task_ids = await enqueue(ledger, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = Dispatch.connect(f"redis://127.0.0.1:{port}", settings.redis_prefix, timeout_s=1)
    try:
        dispatcher = Dispatcher(ledger, nowhere, database_url=settings.database_url)
        with pytest.raises(errors.DispatchUnavailable):
            await dispatcher.run_once()
    finally:
        await nowhere.close()
    # QUEUED in the ledger but nowhere in Redis: the dispatcher remembers them.
    assert statuses(db) == {"QUEUED": 3}
    assert dispatcher.dispatched == 0
    due = [_due(db, t) for t in task_ids]
    assert await dispatch.waiting(due) == [False, False, False]

    dispatcher.dispatch = dispatch  # Redis is back
    assert await dispatcher.run_once() == 3
    assert await dispatch.waiting(due) == [True, True, True]
    assert dispatcher.dispatched == 3


# --- waking up -----------------------------------------------------------------------------


async def test_notify_wakes_a_sleeping_dispatcher_at_once(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    dispatcher = Dispatcher(
        ledger, dispatch, database_url=settings.database_url, poll_interval_s=30
    )
    async with serving(dispatcher):
        await helpers.eventually(lambda: listening(db), what="the dispatcher to LISTEN")
        started = time.monotonic()
        (task_id,) = await enqueue(ledger)
        await helpers.wait_for_status(ledger, task_id, "QUEUED", deadline_s=5)
        elapsed = time.monotonic() - started
    assert elapsed < 2, f"dispatched after {elapsed:.2f} s: the NOTIFY did not wake it"
    assert dispatcher.dispatched == 1
    assert await dispatch.pop(["default"], 5) == [task_id]


async def test_sleeps_only_until_the_next_task_is_due(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    (task_id,) = await enqueue(ledger, run_at=_in(0.3))
    dispatcher = Dispatcher(
        ledger, dispatch, database_url=settings.database_url, poll_interval_s=30
    )
    started = time.monotonic()
    async with serving(dispatcher):
        task = await helpers.wait_for_status(ledger, task_id, "QUEUED", deadline_s=5)
    elapsed = time.monotonic() - started
    assert 0.2 < elapsed < 2
    assert await dispatch.waiting([_due(db, task_id)]) == [True]
    assert _queued_at(db, task_id) >= task.run_at


async def test_several_dispatchers_dispatch_each_task_exactly_once(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    dispatchers = [
        Dispatcher(
            ledger,
            dispatch,
            database_url=settings.database_url,
            batch_size=7,
            poll_interval_s=0.02,
        )
        for _ in range(3)
    ]
    ids: list[int] = []
    async with contextlib.AsyncExitStack() as stack:
        for d in dispatchers:
            await stack.enter_async_context(serving(d))
        for _ in range(10):
            ids += await enqueue(ledger, 30)

        async def all_queued() -> bool:
            return statuses(db) == {"QUEUED": 300}

        await helpers.eventually(all_queued, what="300 tasks QUEUED")
    assert sum(d.dispatched for d in dispatchers) == 300
    assert sum(d.redelivered for d in dispatchers) == 0
    assert await dispatch.queue_lengths(["default"]) == {"default": 300}
    assert sorted(await dispatch.pop(["default"], 400)) == sorted(ids)


async def test_concurrent_run_once_calls_take_disjoint_batches(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    await enqueue(ledger, 120)
    dispatchers = [
        Dispatcher(ledger, dispatch, database_url=settings.database_url, batch_size=10)
        for _ in range(4)
    ]
    moved = await asyncio.gather(*(d.run_once() for d in dispatchers))
    assert sum(moved) == 120
    assert statuses(db) == {"QUEUED": 120}
    assert await dispatch.queue_lengths(["default"]) == {"default": 120}


# --- the sweep -------------------------------------------------------------------------------


async def test_sweep_pushes_missing_tasks_again_and_vouches_for_waiting_ones(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    lost, waiting, fresh = await enqueue(ledger, 3)
    dispatcher = Dispatcher(ledger, dispatch, database_url=settings.database_url)
    assert await dispatcher.run_once() == 3
    # A worker popped `lost` and died before claiming it; the others still wait.
    await dispatch.client.zrem(dispatch.queue_key("default"), task_member(_due(db, lost)))
    db.execute(
        "UPDATE ledgerq.tasks SET queued_at = now() - interval '60 seconds' WHERE id = ANY(%s)",
        ([lost, waiting],),
    )
    fresh_queued_at = _queued_at(db, fresh)

    assert await dispatcher.sweep() == (1, 1)
    assert dispatcher.redelivered == 1
    assert (
        await dispatch.waiting([_due(db, lost), _due(db, waiting), _due(db, fresh)]) == [True] * 3
    )
    assert await dispatch.queue_lengths(["default"]) == {"default": 3}
    # The one pushed again has its clock restarted; the one still waiting is
    # vouched for with its whole queue, not rewritten.
    age = db.execute(
        "SELECT id, now() - queued_at < interval '5 seconds' FROM ledgerq.tasks ORDER BY id"
    ).fetchall()
    assert age == [(lost, True), (waiting, False), (fresh, True)]
    assert db.execute("SELECT queue FROM ledgerq.queued_seen").fetchall() == [("default",)]
    assert _queued_at(db, fresh) == fresh_queued_at  # not stale: not touched
    # Both deliveries are accounted for again: reap_stuck leaves them alone.
    assert await ledger.reap() == 0
    assert statuses(db) == {"QUEUED": 3}


async def test_a_long_sweep_hands_out_what_was_enqueued_between_its_batches(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    # A backlog of 2,500 waiting in Redis longer than the recheck: three batches.
    await enqueue(ledger, 2500)
    dispatcher = Dispatcher(ledger, dispatch, database_url=settings.database_url)
    assert await dispatcher.run_once() == 2500
    db.execute("UPDATE ledgerq.tasks SET queued_at = now() - interval '60 seconds'")
    (newcomer,) = await enqueue(ledger)
    dispatcher._wake.set()  # the enqueue's NOTIFY, as the listener would see it

    assert await dispatcher.sweep() == (2500, 0)
    # Handed out between the sweep's pages: a sweep dispatches nothing else.
    assert _status(db, newcomer) == "QUEUED"
    assert await dispatch.queue_lengths(["default"]) == {"default": 2501}
    # Without a NOTIFY the same sweep hands nothing out.
    (later,) = await enqueue(ledger)
    db.execute("DELETE FROM ledgerq.queued_seen")
    assert await dispatcher.sweep() == (2500, 0)  # the newcomer is not stale yet
    assert _status(db, later) == "PENDING"


async def test_without_the_sweep_reap_stuck_requeues_a_stale_delivery(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    # The counterpart of the test above: what the refresh protects against.
    await enqueue(ledger)
    assert await Dispatcher(ledger, dispatch, database_url=settings.database_url).run_once() == 1
    db.execute("UPDATE ledgerq.tasks SET queued_at = now() - interval '60 seconds'")
    assert await ledger.reap() == 1
    assert statuses(db) == {"PENDING": 1}


async def test_redis_losing_its_data_rechecks_every_queued_task_at_once(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    ids = await enqueue(ledger, 5)
    dispatcher = Dispatcher(
        ledger, dispatch, database_url=settings.database_url, poll_interval_s=0.05,
        sweep_interval_s=3600, recheck_after_s=3600,
    )  # fmt: skip
    async with serving(dispatcher):

        async def all_queued() -> bool:
            return statuses(db) == {"QUEUED": 5}

        await helpers.eventually(all_queued, what="5 tasks QUEUED")
        assert dispatcher.redelivered == 0

        # FLUSHALL, as far as this test's namespace is concerned.
        # The dispatcher commits the QUEUED mark, then pushes: wait for the push.
        async def pushed() -> list[Any] | None:
            found = [
                k async for k in dispatch.client.scan_iter(match=f"{{{settings.redis_prefix}}}*")
            ]
            return found if len(found) == 2 else None  # the queue and the epoch

        keys = await helpers.eventually(pushed, what="the queue and the epoch in Redis")
        await dispatch.client.delete(*keys)

        async def all_back() -> bool:
            return (await dispatch.queue_lengths(["default"]))["default"] == 5

        await helpers.eventually(all_back, deadline_s=5, what="the ids to be pushed again")
    assert dispatcher.redelivered == 5
    assert dispatcher.dispatched == 5
    assert sorted(await dispatch.pop(["default"], 10)) == ids
    assert statuses(db) == {"QUEUED": 5}


async def test_check_epoch_reports_the_first_check_and_a_change_only(
    settings: config.Settings, ledger: AsyncLedger, dispatch: Dispatch
) -> None:
    dispatcher = Dispatcher(ledger, dispatch, database_url=settings.database_url)
    assert await dispatcher.check_epoch() is True
    assert await dispatcher.check_epoch() is False
    await dispatch.client.delete(dispatch.epoch_key())
    assert await dispatcher.check_epoch() is True
    assert await dispatcher.check_epoch() is False


# --- helpers -------------------------------------------------------------------------------------


def _in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def _due(db: Conn, task_id: int) -> DueTask:
    """The task as the dispatcher hands it out (Redis's member spells its run_at)."""
    row = db.execute(
        "SELECT queue, priority, turn, run_at FROM ledgerq.tasks WHERE id = %s", (task_id,)
    ).fetchone()
    assert row is not None
    return DueTask(TaskId(task_id), row[0], row[1], turn=row[2], run_at=row[3])


def _queued_at(db: Conn, task_id: int) -> datetime:
    row = db.execute("SELECT queued_at FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    value: datetime = row[0]
    return value


def _status(db: Conn, task_id: int) -> str:
    row = db.execute("SELECT status FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0])
