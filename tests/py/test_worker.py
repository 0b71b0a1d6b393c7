"""The Worker end to end, in process: handlers that succeed, fail for good, or are
retried. The real Dispatcher and Worker run as tasks in the test's loop against
real PostgreSQL and Redis; the tests await ledger states, never fixed sleeps.
Cancellation, ordering, stopping and fencing are in test_worker_control.py."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import Context, NonRetryable, Registry, Retryable, config
from ledgerq.types import AttemptOutcome, TaskStatus

Conn = psycopg.Connection[Any]


@dataclasses.dataclass
class Order:
    order_id: int
    amount: float


# --- success ---------------------------------------------------------------------


async def test_async_task_succeeds_with_its_result_stored(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("add")
    async def add(ctx: Context, payload: dict[str, int]) -> dict[str, int]:
        return {"sum": payload["a"] + payload["b"]}

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("add", {"a": 2, "b": 3})
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert task.result == {"sum": 5}
    assert task.attempts == 1
    assert task.last_error is None
    assert task.finished_at is not None
    assert helpers.attempts(db, task_id) == [(1, "succeeded", None)]
    assert [a.worker_id for a in task.attempt_history] == ["test-worker"]


async def test_sync_handler_runs_in_a_thread_and_succeeds(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    seen: list[str] = []

    @tasks.task("report.build")
    def build(ctx: Context, payload: dict[str, Any]) -> list[int]:
        seen.append(threading.current_thread().name)
        return [1, 2, 3]

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("report.build")
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert task.result == [1, 2, 3]
    assert len(seen) == 1 and seen[0].startswith("ledgerq-handler")
    assert helpers.attempts(db, task_id) == [(1, "succeeded", None)]


# --- failures that are not retried -------------------------------------------------


async def test_payload_that_does_not_fit_the_declared_type_is_dead_after_one_attempt(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    calls: list[Order] = []

    @tasks.task("order.charge", max_attempts=5)
    async def charge(ctx: Context, payload: Order) -> None:
        calls.append(payload)

    async with helpers.running(settings, tasks) as s:
        bad = await s.enqueue("order.charge", {"order_id": "not a number"})
        good = await s.enqueue("order.charge", {"order_id": 7, "amount": 9.5})
        dead = await helpers.wait_for_status(s.ledger, bad, "DEAD")
        await helpers.wait_for_status(s.ledger, good, "SUCCEEDED")
    assert dead.attempts == 1
    assert dead.last_error is not None
    assert dead.last_error.startswith("InvalidPayload: payload does not match Order")
    assert "order_id" in dead.last_error and "amount" in dead.last_error
    assert helpers.attempts(db, bad) == [(1, "failed", dead.last_error.splitlines()[0])]
    assert calls == [Order(7, 9.5)]


async def test_unknown_task_type_is_dead_after_one_attempt(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("known")
    async def known(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("nobody.handles.this", max_attempts=5)
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert task.attempts == 1
    assert task.last_error == (
        "NonRetryable: unknown task type 'nobody.handles.this': no handler is registered"
    )
    assert helpers.attempts(db, task_id) == [(1, "failed", task.last_error)]


async def test_non_retryable_error_is_dead_after_one_attempt(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("card.charge", max_attempts=5)
    async def charge(ctx: Context, payload: dict[str, Any]) -> None:
        raise NonRetryable("card declined")

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("card.charge")
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert task.attempts == 1
    assert task.last_error is not None
    assert task.last_error.splitlines()[0] == "NonRetryable: card declined"
    assert "Traceback" in task.last_error  # a handler's own error keeps where it came from
    assert helpers.attempts(db, task_id) == [(1, "failed", "NonRetryable: card declined")]


async def test_integrity_error_from_the_handlers_own_connection_is_dead_after_one_attempt(
    settings: config.Settings, db: Conn, db_url: str
) -> None:
    db.execute("CREATE TABLE signups (email text PRIMARY KEY)")
    db.execute("INSERT INTO signups VALUES ('a@b.c')")
    tasks = Registry()

    @tasks.task("signup", max_attempts=5)
    async def signup(ctx: Context, payload: dict[str, str]) -> None:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("INSERT INTO signups VALUES (%s)", (payload["email"],))

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("signup", {"email": "a@b.c"})
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert task.attempts == 1
    assert task.last_error is not None
    assert task.last_error.startswith("UniqueViolation: duplicate key value")
    assert helpers.attempts(db, task_id) == [(1, "failed", task.last_error.splitlines()[0])]


async def test_integrity_error_inside_once_in_transaction_is_dead_and_rolled_back(
    settings: config.Settings, db: Conn
) -> None:
    db.execute("CREATE TABLE payments (ref text PRIMARY KEY, amount int NOT NULL)")
    db.execute("INSERT INTO payments VALUES ('dup', 1)")
    tasks = Registry()

    @tasks.task("pay", max_attempts=5)
    async def pay(ctx: Context, payload: dict[str, Any]) -> None:
        async def write(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("INSERT INTO payments VALUES ('fresh', 2)")
            await conn.execute("INSERT INTO payments VALUES (%s, 3)", (payload["ref"],))

        await ctx.once_in_transaction(f"pay:{ctx.task_id}", write)

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("pay", {"ref": "dup"})
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert task.attempts == 1
    assert task.last_error is not None
    assert task.last_error.startswith("UniqueViolation")
    assert helpers.attempts(db, task_id) == [(1, "failed", task.last_error.splitlines()[0])]
    # Nothing of the failed transaction landed: not the first insert, not the effect.
    assert db.execute("SELECT ref FROM payments ORDER BY ref").fetchall() == [("dup",)]
    assert db.execute("SELECT count(*) FROM ledgerq.effects").fetchone() == (0,)


# --- failures that are retried ------------------------------------------------------


async def test_plain_exception_is_retried_with_backoff_until_attempts_run_out(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    calls: list[int] = []

    @tasks.task("flaky", max_attempts=3)
    async def flaky(ctx: Context, payload: dict[str, Any]) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            helpers.pause_queue(settings)
        raise ValueError(f"boom {ctx.attempt}")

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("flaky")
        retrying = await helpers.wait_for_attempts(s.ledger, task_id, "PENDING", 1)
        first = retrying.attempt_history[0]
        assert first.finished_at is not None
        # Backoff after attempt 1: full jitter in [0, 1 s].
        assert first.finished_at <= retrying.run_at <= first.finished_at + timedelta(seconds=1)
        assert retrying.last_error is not None and retrying.last_error.startswith(
            "ValueError: boom 1"
        )
        await s.ledger.resume_queue("default")
        task = await helpers.run_retries(s.ledger, db, task_id, "DEAD")
    assert calls == [1, 2, 3]
    assert task.attempts == 3
    assert helpers.attempts(db, task_id) == [
        (1, "failed", "ValueError: boom 1"),
        (2, "failed", "ValueError: boom 2"),
        (3, "failed", "ValueError: boom 3"),
    ]


async def test_retryable_is_retried_then_succeeds(settings: config.Settings, db: Conn) -> None:
    tasks = Registry()

    @tasks.task("upstream", max_attempts=2)
    async def upstream(ctx: Context, payload: dict[str, Any]) -> str:
        if ctx.attempt == 1:
            raise Retryable("upstream returned 503")
        return "ok"

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("upstream")
        task = await helpers.run_retries(s.ledger, db, task_id, "SUCCEEDED", "DEAD")
    assert task.status == TaskStatus.SUCCEEDED
    assert task.result == "ok"
    assert helpers.attempts(db, task_id) == [
        (1, "failed", "Retryable: upstream returned 503"),
        (2, "succeeded", None),
    ]


async def test_retryable_ends_dead_when_attempts_run_out(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("always.503", max_attempts=2)
    async def always(ctx: Context, payload: dict[str, Any]) -> None:
        raise Retryable("503")

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("always.503")
        task = await helpers.run_retries(s.ledger, db, task_id, "DEAD")
    assert task.attempts == 2
    assert [a.outcome for a in task.attempt_history] == [AttemptOutcome.FAILED] * 2
    assert task.last_error is not None and task.last_error.startswith("Retryable: 503")


async def test_retry_on_and_dont_retry_on_narrow_what_is_retried(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("only.conn", max_attempts=3, retry_on=[ConnectionError])
    async def only_conn(ctx: Context, payload: dict[str, str]) -> None:
        raise {"conn": ConnectionError, "key": KeyError}[payload["raise"]]("x")

    @tasks.task("not.value", max_attempts=3, dont_retry_on=[ValueError])
    async def not_value(ctx: Context, payload: dict[str, str]) -> None:
        raise {"value": ValueError, "runtime": RuntimeError}[payload["raise"]]("x")

    async with helpers.running(settings, tasks) as s:
        conn_id = await s.enqueue("only.conn", {"raise": "conn"})
        key_id = await s.enqueue("only.conn", {"raise": "key"})
        value_id = await s.enqueue("not.value", {"raise": "value"})
        runtime_id = await s.enqueue("not.value", {"raise": "runtime"})
        # Not retried: DEAD after one attempt.
        for task_id in (key_id, value_id):
            task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
            assert task.attempts == 1
        # Retried: back to PENDING after attempt 1.
        for task_id in (conn_id, runtime_id):
            await helpers.wait_for_retry(s.ledger, task_id)
    assert helpers.attempts(db, key_id) == [(1, "failed", "KeyError: 'x'")]
    assert helpers.attempts(db, value_id) == [(1, "failed", "ValueError: x")]


async def test_timeout_ends_the_attempt_as_a_retryable_failure(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    stopped: list[str] = []

    @tasks.task("slow", max_attempts=2, timeout=0.2)
    async def slow(ctx: Context, payload: dict[str, Any]) -> None:
        if ctx.attempt == 1:
            helpers.pause_queue(settings)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append(f"attempt {ctx.attempt}")
            raise

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("slow")
        retrying = await helpers.wait_for_attempts(s.ledger, task_id, "PENDING", 1)
        assert retrying.last_error == "Retryable: timed out after 0.2 s"
        await s.ledger.resume_queue("default")
        task = await helpers.run_retries(s.ledger, db, task_id, "DEAD")
    assert stopped == ["attempt 1", "attempt 2"]
    assert helpers.attempts(db, task_id) == [
        (1, "failed", "Retryable: timed out after 0.2 s"),
        (2, "failed", "Retryable: timed out after 0.2 s"),
    ]
    assert task.attempts == 2


async def test_sync_handler_timeout_is_retryable_and_tells_the_handler_to_stop(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    gave_up = threading.Event()

    @tasks.task("slow.sync", max_attempts=2, timeout=0.2)
    def slow(ctx: Context, payload: dict[str, Any]) -> str:
        helpers.pause_queue(settings)
        while not ctx.cancelled:
            threading.Event().wait(0.01)
        gave_up.set()
        return "too late"

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("slow.sync")
        task = await helpers.wait_for_attempts(s.ledger, task_id, "PENDING", 1)
    assert gave_up.is_set()
    assert task.result is None
    assert helpers.attempts(db, task_id) == [(1, "failed", "Retryable: timed out after 0.2 s")]


@pytest.fixture(autouse=True)
def _no_handler_thread_left_busy() -> Iterator[None]:
    yield
    helpers.assert_no_handler_thread_left_busy()
