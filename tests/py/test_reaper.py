"""The Reaper: run_once() recovers expired leases and undelivered QUEUED tasks;
several reapers at once never recover one attempt twice; run() serves until stop()."""

from __future__ import annotations

import asyncio
import logging
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


def old_finished_tasks(db: Conn, n: int) -> list[int]:
    """n SUCCEEDED tasks, with an attempt each, that finished ten days ago."""
    rows = db.execute(
        "INSERT INTO ledgerq.tasks (task_type, queue, status, attempts, started_at, finished_at) "
        "SELECT 'job', 'default', 'SUCCEEDED', 1, now() - interval '10 days', "
        "now() - interval '10 days' + g * interval '1 second' "
        "FROM generate_series(1, %s) g RETURNING id",
        (n,),
    ).fetchall()
    db.execute(
        "INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, finished_at, outcome) "
        "SELECT id, 1, 'w', finished_at, 'succeeded' FROM ledgerq.tasks WHERE id = ANY(%s)",
        ([r[0] for r in rows],),
    )
    return [int(r[0]) for r in rows]


async def test_prune_once_deletes_in_batches_until_one_comes_back_short(
    ledger: AsyncLedger, db: Conn
) -> None:
    ids = old_finished_tasks(db, 5)
    recent = old_finished_tasks(db, 1)
    db.execute("UPDATE ledgerq.tasks SET finished_at = now() WHERE id = %s", (recent[0],))
    reaper = Reaper(ledger, retention="1 day", prune_batch_size=2)

    assert await reaper.prune_once(budget_s=0) == (2, True)  # one batch, then the budget is out
    assert await reaper.prune_once() == (3, False)

    assert reaper.pruned == 5
    left = db.execute("SELECT id FROM ledgerq.tasks WHERE id = ANY(%s)", (ids + recent,))
    assert [r[0] for r in left.fetchall()] == recent
    assert db.execute("SELECT count(*) FROM ledgerq.attempts").fetchone() == (1,)


async def test_run_prunes_on_its_prune_interval_and_not_with_none(
    ledger: AsyncLedger, db: Conn
) -> None:
    kept = old_finished_tasks(db, 3)
    idle = Reaper(ledger, interval_s=0.02, prune_interval_s=None, retention="1 day")
    serving = asyncio.create_task(idle.run())
    (stuck,) = await running_tasks(ledger, db, 1)
    await helpers.wait_for_status(ledger, stuck, "PENDING", deadline_s=5)
    idle.stop()
    await asyncio.wait_for(serving, 5)
    assert idle.pruned == 0
    assert (
        len(db.execute("SELECT id FROM ledgerq.tasks WHERE id = ANY(%s)", (kept,)).fetchall()) == 3
    )

    pruning = Reaper(ledger, interval_s=0.02, prune_interval_s=0.05, retention="1 day")
    serving = asyncio.create_task(pruning.run())
    try:

        async def gone() -> bool:
            return not db.execute(
                "SELECT 1 FROM ledgerq.tasks WHERE id = ANY(%s)", (kept,)
            ).fetchall()

        await helpers.eventually(gone, deadline_s=5, what="the reaper to prune")
    finally:
        pruning.stop()
        await asyncio.wait_for(serving, 5)
    assert pruning.pruned == 3


async def test_vacuum_once_vacuums_a_table_past_its_dead_rows(
    ledger: AsyncLedger, db: Conn
) -> None:
    old_finished_tasks(db, 300)
    db.execute("DELETE FROM ledgerq.tasks")  # 300 dead rows in tasks, and in attempts

    def dead_and_vacuums() -> tuple[int, int]:
        db.execute("SELECT pg_stat_clear_snapshot()")
        row = db.execute(
            "SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables "
            "WHERE relid = 'ledgerq.tasks'::regclass"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def counted() -> bool:  # the statistics arrive within a second or so
        return dead_and_vacuums()[0] >= 300

    await helpers.eventually(counted, deadline_s=10, what="the dead rows to be counted")
    vacuums = dead_and_vacuums()[1]
    assert await Reaper(ledger, vacuum_dead_rows=1000).vacuum_once() == []
    assert await Reaper(ledger, vacuum_dead_rows=0).vacuum_once() == []
    assert "tasks" in await Reaper(ledger, vacuum_dead_rows=200).vacuum_once()

    async def vacuumed() -> bool:
        return dead_and_vacuums()[1] == vacuums + 1

    await helpers.eventually(vacuumed, deadline_s=10, what="the vacuum to be counted")


@pytest.mark.parametrize("retention", ["soon", "-1 day", "", "7 dayz"])
def test_retention_must_be_an_interval(retention: str) -> None:
    with pytest.raises(errors.ConfigError, match="retention must be a PostgreSQL interval"):
        Reaper(None, retention=retention)  # type: ignore[arg-type]


async def test_a_reaper_whose_ledger_keeps_failing_backs_off_instead_of_spinning(
    ledger: AsyncLedger, db: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    db.execute("DROP SCHEMA ledgerq CASCADE")  # every sweep now fails at once
    reaper = Reaper(ledger, interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="ledgerq.reaper"):
        running = asyncio.create_task(reaper.run())
        await asyncio.sleep(1.0)  # the window the retries are counted in
        reaper.stop()
        await asyncio.wait_for(running, 5)
    failures = [r for r in caplog.records if r.getMessage().startswith("ledger.unavailable")]
    assert "ledgerq" in failures[0].getMessage()
    # Retries 0.2 s, 0.4 s, 0.8 s apart: 3 in the second (a spin made thousands).
    assert 2 <= len(failures) <= 4, len(failures)
