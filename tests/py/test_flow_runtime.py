"""Flow control end to end in process: the real Dispatcher and Worker against real
PostgreSQL and Redis, with queue limits, pauses and rates set in the ledger."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import helpers
import psycopg
from psycopg.types.json import Jsonb

from ledgerq import Context, Registry, config
from ledgerq.types import DueTask, TaskId

Conn = psycopg.Connection[Any]


def configure(db: Conn, queue: str, **settings: Any) -> None:
    db.execute("SELECT ledgerq.configure_queue(%s, %s)", (queue, Jsonb(settings)))


def add_keyed(db: Conn, task_type: str, queue: str, keys: list[str]) -> list[int]:
    """One due task per entry of keys, with the turn enqueue gives it."""
    rows = db.execute(
        """
        INSERT INTO ledgerq.tasks (task_type, queue, concurrency_key, turn)
        SELECT %s, %s, u.key, t.turn
        FROM unnest(%s::text[]) WITH ORDINALITY AS u(key, ord)
        JOIN unnest(ledgerq.flow_turns(array_fill(%s::text, ARRAY[cardinality(%s::text[])]),
                                       %s::text[])) WITH ORDINALITY AS t(turn, ord)
          ON t.ord = u.ord
        ORDER BY u.ord
        RETURNING id
        """,
        (task_type, queue, keys, queue, keys, keys),
    ).fetchall()
    db.execute("NOTIFY ledgerq_tasks")
    return [int(r[0]) for r in rows]


def most_running_per_key(db: Conn) -> dict[str, int]:
    rows = db.execute(
        """
        WITH events AS (
            SELECT t.concurrency_key AS k, a.started_at AS at, 1 AS delta
            FROM ledgerq.attempts a JOIN ledgerq.tasks t ON t.id = a.task_id
            UNION ALL
            SELECT t.concurrency_key, coalesce(a.finished_at, 'infinity'), -1
            FROM ledgerq.attempts a JOIN ledgerq.tasks t ON t.id = a.task_id
        )
        SELECT k, max(n) FROM (
            SELECT k, sum(delta) OVER (PARTITION BY k ORDER BY at, delta
                                       ROWS UNBOUNDED PRECEDING) AS n FROM events) e
        GROUP BY k
        """
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


async def wait_until(check: Any, deadline_s: float = helpers.DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def count(db: Conn, query: str, *params: Any) -> int:
    row = db.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


async def test_per_key_limit_holds_with_a_worker_busier_than_the_limit(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("call", queue="calls")
    async def call(ctx: Context, payload: dict[str, Any]) -> None:
        await asyncio.sleep(0.02)

    configure(db, "calls", per_key_max_running=1)
    ids = add_keyed(db, "call", "calls", [f"tenant-{n % 3}" for n in range(24)])
    async with helpers.running(settings, tasks, concurrency=8) as s:
        for task_id in ids:
            await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert most_running_per_key(db) == {"tenant-0": 1, "tenant-1": 1, "tenant-2": 1}
    # Nothing was spent on waiting: one attempt per task.
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 24


async def test_paused_queue_waits_in_the_ledger_and_resume_runs_it(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("mail", queue="mail")
    async def mail(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    db.execute("SELECT ledgerq.pause_queue('mail')")
    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("mail")
        # The dispatcher parks it instead of pushing it to Redis.
        await wait_until(
            lambda: (
                count(
                    db,
                    "SELECT count(*) FROM ledgerq.tasks WHERE id = %s AND waiting_on = 'paused'",
                    task_id,
                )
                == 1
            )
        )
        assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 0
        db.execute("SELECT ledgerq.resume_queue('mail')")
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert task.attempts == 1


async def test_worker_drops_and_counts_a_deferred_delivery(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("mail", queue="mail")
    async def mail(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    async with helpers.running(settings, tasks, dispatcher=False) as s:
        task_id = await s.enqueue("mail")
        db.execute("SELECT ledgerq.pause_queue('mail')")
        # A stale copy of the id in Redis (pushed before the pause).
        await s.dispatch.push([DueTask(TaskId(task_id), "mail", 0)])
        assert s.worker is not None
        worker = s.worker
        await wait_until(lambda: worker.deferred.get(("mail", "paused"), 0) == 1)
        row = db.execute(
            "SELECT status, waiting_on, attempts FROM ledgerq.tasks WHERE id = %s", (task_id,)
        ).fetchone()
        assert row == ("PENDING", "paused", 0)
        assert worker.completed == {}


async def test_rate_limited_queue_runs_at_its_rate_without_spinning(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("ping", queue="api")
    async def ping(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    configure(db, "api", rate_per_second=10, burst=2)
    async with helpers.running(settings, tasks) as s:
        started = time.monotonic()
        ids = [await s.enqueue("ping") for _ in range(8)]
        for task_id in ids:
            await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
        elapsed = time.monotonic() - started
    # 2 at once, then one every 0.1 s: the sixth of the rest needs >= 0.6 s.
    assert elapsed >= 0.55
    assert elapsed < 3.0  # woken by the bucket's refill, not by a slow poll
    assert s.worker is not None
    # The dispatcher held them in the ledger: next to nothing was refused at claim.
    assert sum(s.worker.deferred.values()) <= 2
