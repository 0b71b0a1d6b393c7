"""Side effects through the worker: ctx.once runs its function once per effect key
across retries and racing tasks; ctx.once_in_transaction commits the handler's
writes with the effect record and the task's completion, or none of them."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import Context, Registry, config, errors, ledger
from ledgerq.types import TaskStatus

Conn = psycopg.Connection[Any]
AsyncConn = psycopg.AsyncConnection[Any]


def effects(db: Conn) -> list[tuple[str, int | None, Any]]:
    return [
        (k, t, r)
        for k, t, r in db.execute(
            "SELECT effect_key, task_id, result FROM ledgerq.effects ORDER BY effect_key"
        ).fetchall()
    ]


# --- ctx.once ---------------------------------------------------------------------------


async def test_once_runs_its_function_once_across_a_retry_async(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    sent: list[int] = []
    returned: list[Any] = []

    def send_email(to: str) -> dict[str, Any]:
        sent.append(len(sent) + 1)
        return {"message_id": f"msg-{len(sent)}", "to": to}

    @tasks.task("email.send", max_attempts=3)
    async def handler(ctx: Context, payload: dict[str, str]) -> Any:
        receipt = await ctx.once(f"email:{ctx.task_id}", send_email, payload["to"])
        returned.append(receipt)
        if ctx.attempt == 1:
            raise ConnectionError("SMTP connection dropped after sending")
        return receipt

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("email.send", {"to": "a@b.c"})
        task = await helpers.run_retries(s.ledger, db, task_id, "SUCCEEDED", "DEAD")
    receipt = {"message_id": "msg-1", "to": "a@b.c"}
    assert sent == [1]
    assert returned == [receipt, receipt]
    assert task.status == TaskStatus.SUCCEEDED and task.result == receipt
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [
        (1, "failed"),
        (2, "succeeded"),
    ]
    assert effects(db) == [(f"email:{task_id}", task_id, receipt)]


async def test_once_runs_its_function_once_across_a_retry_sync(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    charged: list[str] = []
    returned: list[Any] = []

    def charge(amount: int) -> int:
        charged.append(threading.current_thread().name)
        return amount * 100

    @tasks.task("charge", max_attempts=3)
    def handler(ctx: Context, payload: dict[str, int]) -> Any:
        cents = ctx.once(f"charge:{ctx.task_id}", charge, payload["amount"])
        returned.append(cents)
        if ctx.attempt == 1:
            raise RuntimeError("crashed after charging")
        return {"cents": cents}

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("charge", {"amount": 12})
        task = await helpers.run_retries(s.ledger, db, task_id, "SUCCEEDED", "DEAD")
    assert len(charged) == 1
    assert charged[0].startswith("asyncio") or charged[0].startswith("ledgerq-handler")
    assert returned == [1200, 1200]
    assert task.status == TaskStatus.SUCCEEDED and task.result == {"cents": 1200}
    assert effects(db) == [(f"charge:{task_id}", task_id, 1200)]


async def test_once_accepts_an_async_effect_function(settings: config.Settings, db: Conn) -> None:
    tasks = Registry()
    calls: list[str] = []

    async def notify(channel: str) -> str:
        calls.append(channel)
        await asyncio.sleep(0)
        return f"posted to {channel}"

    @tasks.task("notify")
    async def handler(ctx: Context, payload: dict[str, Any]) -> Any:
        first = await ctx.once("notify:ops", notify, "#ops")
        again = await ctx.once("notify:ops", notify, "#ops")
        return [first, again]

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("notify")
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert calls == ["#ops"]
    assert task.result == ["posted to #ops", "posted to #ops"]


async def test_two_tasks_racing_on_one_effect_key_run_it_once(
    settings: config.Settings, db: Conn, db_url: str
) -> None:
    tasks = Registry()
    calls: list[int] = []

    async def refund(task_id: int) -> dict[str, int]:
        calls.append(task_id)
        # Hold the effect until the other task is waiting on the same key, so
        # the two really overlap (bounded: a second call would find no waiter).
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                if (await cur.fetchone()) == (1,):
                    break
                await asyncio.sleep(0.01)
        return {"refunded_by": task_id}

    @tasks.task("refund")
    async def handler(ctx: Context, payload: dict[str, Any]) -> Any:
        return await ctx.once("refund:order-9", refund, ctx.task_id)

    async with helpers.running(settings, tasks, concurrency=2) as s:
        first = await s.enqueue("refund", {"n": 1})
        second = await s.enqueue("refund", {"n": 2})
        a = await helpers.wait_for_status(s.ledger, first, "SUCCEEDED")
        b = await helpers.wait_for_status(s.ledger, second, "SUCCEEDED")
    assert len(calls) == 1
    assert a.result == b.result == {"refunded_by": calls[0]}
    assert effects(db) == [("refund:order-9", calls[0], {"refunded_by": calls[0]})]


# --- ctx.once_in_transaction ----------------------------------------------------------------


@pytest.fixture
def ledger_entries(db: Conn) -> Conn:
    db.execute(
        "CREATE TABLE ledger_entries (id serial PRIMARY KEY, task_id bigint NOT NULL, "
        "amount int NOT NULL)"
    )
    return db


def entries(db: Conn) -> list[tuple[int, int]]:
    return [
        (t, a)
        for t, a in db.execute("SELECT task_id, amount FROM ledger_entries ORDER BY id").fetchall()
    ]


async def test_once_in_transaction_commits_with_the_completion_and_rolls_back_on_failure(
    settings: config.Settings, ledger_entries: Conn
) -> None:
    db = ledger_entries
    tasks = Registry()
    visible_before_completion: list[list[tuple[int, int]]] = []

    @tasks.task("book", max_attempts=3)
    async def book(ctx: Context, payload: dict[str, int]) -> Any:
        async def write(conn: AsyncConn) -> dict[str, int]:
            cur = await conn.execute(
                "INSERT INTO ledger_entries (task_id, amount) VALUES (%s, %s) RETURNING id",
                (ctx.task_id, payload["amount"]),
            )
            row = await cur.fetchone()
            assert row is not None
            return {"entry": row[0]}

        booked = await ctx.once_in_transaction(f"book:{ctx.task_id}", write)
        # Not committed yet: another connection sees nothing until completion.
        visible_before_completion.append(entries(db))
        if ctx.attempt == 1:
            helpers.pause_queue(settings)
            raise ValueError("failed after writing")
        return booked

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("book", {"amount": 250})
        retrying = await helpers.wait_for_attempts(s.ledger, task_id, "PENDING", 1)
        # Attempt 1 failed after its write: the write and the effect rolled back.
        assert entries(db) == []
        assert effects(db) == []
        assert retrying.last_error is not None
        await s.ledger.resume_queue("default")
        task = await helpers.run_retries(s.ledger, db, task_id, "SUCCEEDED", "DEAD")
    assert visible_before_completion == [[], []]
    assert entries(db) == [(task_id, 250)]
    (entry_id,) = db.execute("SELECT id FROM ledger_entries").fetchone() or (None,)
    assert task.status == TaskStatus.SUCCEEDED and task.result == {"entry": entry_id}
    assert effects(db) == [(f"book:{task_id}", task_id, {"entry": entry_id})]
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [
        (1, "failed"),
        (2, "succeeded"),
    ]


async def test_once_in_transaction_skips_an_effect_already_recorded(
    settings: config.Settings, ledger_entries: Conn
) -> None:
    db = ledger_entries
    tasks = Registry()

    @tasks.task("book")
    async def book(ctx: Context, payload: dict[str, int]) -> Any:
        async def write(conn: AsyncConn) -> str:
            await conn.execute(
                "INSERT INTO ledger_entries (task_id, amount) VALUES (%s, %s)",
                (ctx.task_id, payload["amount"]),
            )
            return f"booked by {ctx.task_id}"

        return await ctx.once_in_transaction("book:invoice-1", write)

    async with helpers.running(settings, tasks) as s:
        first = await s.enqueue("book", {"amount": 1})
        a = await helpers.wait_for_status(s.ledger, first, "SUCCEEDED")
        second = await s.enqueue("book", {"amount": 2})
        b = await helpers.wait_for_status(s.ledger, second, "SUCCEEDED")
    assert entries(db) == [(first, 1)]
    assert a.result == b.result == f"booked by {first}"


async def test_once_in_transaction_in_a_sync_handler_is_exactly_once(
    settings: config.Settings, ledger_entries: Conn
) -> None:
    db = ledger_entries
    tasks = Registry()
    writes: list[int] = []

    @tasks.task("book.sync", max_attempts=3)
    def book(ctx: Context, payload: dict[str, int]) -> Any:
        def write(conn: Conn) -> int:
            writes.append(ctx.attempt)
            conn.execute(
                "INSERT INTO ledger_entries (task_id, amount) VALUES (%s, %s)",
                (ctx.task_id, payload["amount"] * ctx.attempt),
            )
            return ctx.attempt

        booked_on = ctx.once_in_transaction(f"book:{ctx.task_id}", write)
        if ctx.attempt == 1:
            helpers.pause_queue(settings)
            raise ValueError("failed after writing")
        return {"booked_on_attempt": booked_on}

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("book.sync", {"amount": 10})
        await helpers.wait_for_attempts(s.ledger, task_id, "PENDING", 1)
        assert entries(db) == []
        await s.ledger.resume_queue("default")
        task = await helpers.run_retries(s.ledger, db, task_id, "SUCCEEDED", "DEAD")
    assert writes == [1, 2]  # attempt 1's write was rolled back, so attempt 2 wrote
    assert entries(db) == [(task_id, 20)]
    assert task.result == {"booked_on_attempt": 2}
    assert effects(db) == [(f"book:{task_id}", task_id, 2)]


async def test_once_in_transaction_of_a_fenced_attempt_writes_nothing(
    settings: config.Settings, ledger_entries: Conn
) -> None:
    db = ledger_entries
    tasks = Registry()
    wrote = asyncio.Event()
    release = asyncio.Event()

    @tasks.task("book", max_attempts=3)
    async def book(ctx: Context, payload: dict[str, int]) -> Any:
        async def write(conn: AsyncConn) -> None:
            await conn.execute(
                "INSERT INTO ledger_entries (task_id, amount) VALUES (%s, %s)", (ctx.task_id, 1)
            )

        await ctx.once_in_transaction(f"book:{ctx.task_id}", write)
        wrote.set()
        await release.wait()
        return "stale"

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("book")
        await asyncio.wait_for(wrote.wait(), 10)
        # The worker's lease is lost and another attempt finishes the task first.
        helpers.expire_lease(db, task_id)
        assert await s.ledger.reap() == 1
        helpers.make_due(db, task_id)
        assert helpers.claim_by_sql(db, task_id, "other") == 2
        assert helpers.complete_by_sql(db, task_id, 2, "other") == "SUCCEEDED"
        release.set()
        assert s.worker is not None
        worker = s.worker

        async def fenced() -> bool:
            return worker.completed.get("FENCED", 0) == 1

        await helpers.eventually(fenced, what="the stale outcome to be fenced")
        task = await s.ledger.get(task_id)
    assert task.result == {"by": "other"}
    assert entries(db) == []
    assert effects(db) == []


async def test_a_lost_sync_attempt_rolls_back_its_transaction_and_frees_its_effect_key(
    settings: config.Settings, ledger_entries: Conn
) -> None:
    db = ledger_entries
    tasks = Registry()
    wrote = threading.Event()
    stopped = threading.Event()

    @tasks.task("book.sync", max_attempts=3)
    def book(ctx: Context, payload: dict[str, int]) -> Any:
        def write(conn: Conn) -> int:
            conn.execute(
                "INSERT INTO ledger_entries (task_id, amount) VALUES (%s, %s)",
                (ctx.task_id, ctx.attempt),
            )
            return ctx.attempt

        booked_on = ctx.once_in_transaction(f"book:{ctx.task_id}", write)
        if ctx.attempt == 1:
            wrote.set()
            deadline = time.monotonic() + 10
            while not ctx.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)  # a thread cannot be cancelled: it polls, as handlers should
            if ctx.cancelled:
                stopped.set()
        return {"booked_on_attempt": booked_on}

    async with helpers.running(settings, tasks, lease_s=3) as s:
        task_id = await s.enqueue("book.sync")
        assert await asyncio.to_thread(wrote.wait, 10)
        # The lease expires under the running handler; its next heartbeat hears "lost".
        helpers.expire_lease(db, task_id)
        assert await s.ledger.reap() == 1
        assert await asyncio.to_thread(stopped.wait, 10), "attempt 1 never heard lost"
        helpers.make_due(db, task_id)
        # Attempt 2 takes the same effect key: it would wait forever on a lock
        # still held by attempt 1's transaction, had that not been rolled back.
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert task.result == {"booked_on_attempt": 2}
    assert entries(db) == [(task_id, 2)]
    assert effects(db) == [(f"book:{task_id}", task_id, 2)]
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [(1, "lost"), (2, "succeeded")]


# --- ctx.once: what cannot be recorded ------------------------------------------------


async def test_once_refuses_an_effect_key_over_the_bound_before_running_the_effect(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    ran: list[int] = []

    @tasks.task("long.key", max_attempts=3)
    async def handler(ctx: Context, payload: dict[str, Any]) -> Any:
        return await ctx.once("k" * 6400, lambda: ran.append(ctx.attempt))

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("long.key")
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert ran == []
    assert task.attempts == 1
    assert (task.last_error or "").splitlines()[0] == (
        "NonRetryable: ctx.once: effect_key must be at most 2000 bytes "
        "(an index entry holds about 2700), got 6400"
    )


async def test_once_whose_result_cannot_be_recorded_fails_for_good_after_one_run(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    ran: list[int] = []

    def charge(attempt: int) -> dict[str, Any]:
        ran.append(attempt)
        return {"tags": {"a", "b"}}  # a set: not JSON (datetimes are)

    @tasks.task("charge", max_attempts=3)
    async def handler(ctx: Context, payload: dict[str, Any]) -> Any:
        return await ctx.once(f"charge:{ctx.task_id}", charge, ctx.attempt)

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("charge")
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert ran == [1]
    assert task.attempts == 1
    assert (task.last_error or "").startswith(
        f"NonRetryable: ctx.once('charge:{task_id}'): the effect ran but its result cannot be "
        "recorded (handler returned a value that is not JSON: "
    )
    assert effects(db) == []
    # The start mark stays: if an operator retries the task, the next attempt knows.
    marks = db.execute("SELECT task_id, attempt FROM ledgerq.effect_starts").fetchall()
    assert marks == [(task_id, 1)]


async def test_once_with_an_unknown_on_unknown_policy_is_a_config_error(
    settings: config.Settings,
) -> None:
    tasks = Registry()

    @tasks.task("bad.policy", max_attempts=1)
    async def handler(ctx: Context, payload: dict[str, Any]) -> Any:
        return await ctx.once("k", lambda: 1, on_unknown="maybe")  # type: ignore[arg-type]

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("bad.policy")
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert "on_unknown must be one of run, skip, fail, got 'maybe'" in (task.last_error or "")


def test_program_limit_exceeded_is_a_refusal_not_an_outage(db: Conn) -> None:
    with pytest.raises(psycopg.Error) as info:
        db.execute(
            "INSERT INTO ledgerq.effects (effect_key) "
            "SELECT string_agg(md5(i::text), '') FROM generate_series(1, 200) AS i"
        )
    assert info.value.sqlstate == "54000"
    translated = ledger.translate(info.value)
    assert type(translated) is errors.LedgerError
    assert "unavailable" not in translated.message
    assert "index row size" in translated.message and "54000" in translated.message
