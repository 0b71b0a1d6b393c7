"""The Reaper: run_once() recovers expired leases and undelivered QUEUED tasks;
several reapers at once never recover one attempt twice; run() serves until stop()."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import errors
from ledgerq.ledger import AsyncLedger
from ledgerq.reaper import Reaper
from ledgerq.types import NewTask, TaskStatus

Conn = psycopg.Connection[Any]


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[AsyncLedger]:
    ledger = await AsyncLedger.connect(db_url, max_size=4)
    yield ledger
    await ledger.close()


async def running_tasks(ledger: AsyncLedger, db: Conn, n: int, **fields: Any) -> list[int]:
    """n tasks claimed by a (simulated) worker whose leases have already expired."""
    ids: list[int] = [
        tid for tid, _, _ in await ledger.enqueue_many([NewTask("job", **fields)] * n)
    ]
    claimed = await ledger.claim(ids, "crashed-worker", 30)
    assert len(claimed) == n
    db.execute(
        "UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 second' "
        "WHERE id = ANY(%s)",
        (ids,),
    )
    return ids


async def test_run_once_recovers_an_expired_lease_for_a_retry(
    ledger: AsyncLedger, db: Conn
) -> None:
    (task_id,) = await running_tasks(ledger, db, 1, max_attempts=3)
    reaper = Reaper(ledger)
    assert await reaper.run_once() == 1
    assert reaper.reaped == 1
    task = await ledger.get(task_id)
    assert task.status == TaskStatus.PENDING
    expected = "lease expired: worker crashed-worker stopped heartbeating during attempt 1"
    assert task.last_error == expected
    assert helpers.attempts(db, task_id) == [(1, "lost", expected)]
    finished = task.attempt_history[0].finished_at
    assert finished is not None
    assert finished <= task.run_at <= finished + timedelta(seconds=1)  # backoff after attempt 1
    assert await reaper.run_once() == 0


async def test_run_once_ends_the_last_attempt_dead(ledger: AsyncLedger, db: Conn) -> None:
    (task_id,) = await running_tasks(ledger, db, 1, max_attempts=1)
    assert await Reaper(ledger).run_once() == 1
    task = await ledger.get(task_id)
    assert task.status == TaskStatus.DEAD and task.finished_at is not None
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [(1, "lost")]


async def test_run_once_ends_a_cancel_requested_task_cancelled(
    ledger: AsyncLedger, db: Conn
) -> None:
    (task_id,) = await running_tasks(ledger, db, 1, max_attempts=3)
    assert await ledger.cancel(task_id) == TaskStatus.RUNNING
    assert await Reaper(ledger).run_once() == 1
    assert (await ledger.get(task_id)).status == TaskStatus.CANCELLED
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [(1, "cancelled")]


async def test_run_once_leaves_live_leases_alone(ledger: AsyncLedger, db: Conn) -> None:
    ids = [tid for tid, _, _ in await ledger.enqueue_many([NewTask("job")] * 2)]
    await ledger.claim(ids, "alive-worker", 30)
    assert await Reaper(ledger).run_once() == 0
    assert {t.status for t in await ledger.get_many(ids)} == {TaskStatus.RUNNING}


async def test_run_once_returns_an_unclaimed_delivery_to_dispatch(
    ledger: AsyncLedger, db: Conn
) -> None:
    (task_id,) = [tid for tid, _, _ in await ledger.enqueue_many([NewTask("job")])]
    due = await ledger.take_due(10)
    assert [t.id for t in due] == [task_id]
    db.execute("UPDATE ledgerq.tasks SET queued_at = now() - interval '5 seconds'")
    assert await Reaper(ledger).run_once() == 0  # within the redelivery timeout
    db.execute("UPDATE ledgerq.tasks SET queued_at = now() - interval '31 seconds'")
    assert await Reaper(ledger).run_once() == 1
    task = await ledger.get(task_id)
    assert (task.status, task.attempts) == (TaskStatus.PENDING, 0)


async def test_concurrent_reapers_recover_each_attempt_exactly_once(
    ledger: AsyncLedger, db: Conn, db_url: str
) -> None:
    other = await AsyncLedger.connect(db_url, max_size=4)
    try:
        reapers = [Reaper(ledger), Reaper(other), Reaper(ledger), Reaper(other)]
        for round_ in range(1, 4):
            ids = await running_tasks(ledger, db, 60, max_attempts=5)
            moved = await asyncio.gather(*(r.run_once() for r in reapers))
            assert sum(moved) == 60, f"round {round_}: {moved}"
            rows = db.execute(
                "SELECT outcome, count(*) FROM ledgerq.attempts WHERE task_id = ANY(%s) "
                "GROUP BY outcome",
                (ids,),
            ).fetchall()
            assert rows == [("lost", 60)]
            assert {t.status for t in await ledger.get_many(ids)} == {TaskStatus.PENDING}
        assert sum(r.reaped for r in reapers) == 180
    finally:
        await other.close()


async def test_run_serves_on_its_interval_until_stopped(ledger: AsyncLedger, db: Conn) -> None:
    reaper = Reaper(ledger, interval_s=0.02)
    serving = asyncio.create_task(reaper.run())
    try:
        (task_id,) = await running_tasks(ledger, db, 1)
        await helpers.wait_for_status(ledger, task_id, "PENDING", deadline_s=5)
    finally:
        reaper.stop()
        await asyncio.wait_for(serving, 5)
    assert reaper.reaped == 1


@pytest.mark.parametrize("interval_s", [0, -1])
def test_interval_must_be_positive(interval_s: float) -> None:
    with pytest.raises(errors.ConfigError, match="reaper interval must be > 0 seconds"):
        Reaper(None, interval_s=interval_s)  # type: ignore[arg-type]
