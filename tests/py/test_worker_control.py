"""The Worker end to end, in process: cancellation, order and timing, stopping,
and fencing of stale attempts (success and failure are in test_worker.py). The
real Dispatcher, Worker and, where a lease must be recovered, Reaper run as
tasks in the test's loop against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import Context, Registry, config
from ledgerq.dispatcher import Dispatcher
from ledgerq.types import DueTask, TaskId, TaskStatus
from ledgerq.worker import Worker

Conn = psycopg.Connection[Any]


# --- cancellation ---------------------------------------------------------------------


async def test_cancelling_a_running_task_reaches_the_handler_at_the_next_heartbeat(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    started = asyncio.Event()
    cancelled: list[int] = []

    @tasks.task("long")
    async def long(ctx: Context, payload: dict[str, Any]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.task_id)
            raise

    async with helpers.running(settings, tasks, lease_s=3) as s:
        task_id = await s.enqueue("long")
        await asyncio.wait_for(started.wait(), 10)
        assert await s.client.cancel(task_id) == TaskStatus.RUNNING
        task = await helpers.wait_for_status(s.ledger, task_id, "CANCELLED", deadline_s=5)
    assert cancelled == [task_id]
    assert task.attempts == 1 and task.finished_at is not None
    assert helpers.attempts(db, task_id) == [(1, "cancelled", "cancelled while running")]


async def test_success_after_cancellation_was_requested_stays_succeeded(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    started = asyncio.Event()
    release = asyncio.Event()

    @tasks.task("almost.done")
    async def almost(ctx: Context, payload: dict[str, Any]) -> str:
        started.set()
        await release.wait()
        return "done"

    # A long lease: no heartbeat (every lease/3 = 10 s) comes before the handler returns.
    async with helpers.running(settings, tasks, lease_s=30) as s:
        task_id = await s.enqueue("almost.done")
        await asyncio.wait_for(started.wait(), 10)
        assert await s.client.cancel(task_id) == TaskStatus.RUNNING
        assert (await s.ledger.get(task_id)).cancel_requested
        release.set()
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED", "CANCELLED")
    assert task.status == TaskStatus.SUCCEEDED
    assert task.result == "done"
    assert not task.cancel_requested
    assert helpers.attempts(db, task_id) == [(1, "succeeded", None)]


async def test_handler_result_that_is_not_json_is_dead_after_one_attempt(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("odd.result", max_attempts=5)
    async def odd(ctx: Context, payload: dict[str, Any]) -> Any:
        return {"tags": {"a", "b"}}  # a set: datetimes and models are JSON-able now

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("odd.result")
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert task.attempts == 1 and task.result is None
    assert task.last_error is not None
    assert task.last_error.startswith("NonRetryable: handler returned a value that is not JSON")


async def test_task_cancelled_while_queued_never_runs(settings: config.Settings, db: Conn) -> None:
    tasks = Registry()
    calls: list[str] = []

    @tasks.task("job")
    async def job(ctx: Context, payload: dict[str, str]) -> None:
        calls.append(payload["name"])

    async with helpers.running(settings, tasks, worker=False, dispatcher=False) as s:
        cancelled = await s.enqueue("job", {"name": "cancelled"})
        kept = await s.enqueue("job", {"name": "kept"})
        dispatcher = Dispatcher(s.ledger, s.dispatch, database_url=settings.database_url)
        assert await dispatcher.run_once() == 2  # both ids wait in Redis
        assert await s.client.cancel(cancelled) == TaskStatus.CANCELLED
        s.start_worker(helpers.worker(tasks, s, concurrency=1))
        await helpers.wait_for_status(s.ledger, kept, "SUCCEEDED")
        assert await s.dispatch.queue_lengths(["default"]) == {"default": 0}
        task = await s.ledger.get(cancelled)
    assert calls == ["kept"]
    assert (task.status, task.attempts, task.attempt_history) == (TaskStatus.CANCELLED, 0, ())


async def test_a_duplicate_delivery_does_not_start_a_second_attempt(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    started = asyncio.Event()
    release = asyncio.Event()
    calls: list[str] = []

    @tasks.task("job")
    async def job(ctx: Context, payload: dict[str, Any]) -> str:
        calls.append(ctx.worker_id)
        started.set()
        await release.wait()
        return "once"

    async with helpers.running(settings, tasks) as s:
        second = helpers.worker(tasks, s, worker_id="second-worker")
        second_run = asyncio.create_task(second.run())
        try:
            task_id = await s.enqueue("job")
            await asyncio.wait_for(started.wait(), 10)
            # The id is delivered again while its attempt runs (a sweep that
            # raced the claim, a duplicate push): some worker pops it ...
            await s.dispatch.push([DueTask(TaskId(task_id), "default", 0)])

            async def popped() -> bool:
                return (await s.dispatch.queue_lengths(["default"]))["default"] == 0

            await helpers.eventually(popped, what="the duplicate to be popped")
            # ... and its claim is refused, in whichever worker: still one attempt.
            task = await s.ledger.get(task_id)
            assert (task.status, task.attempts) == (TaskStatus.RUNNING, 1)
            release.set()
            task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
        finally:
            second.stop()
            await asyncio.wait_for(second_run, 10)
    assert len(calls) == 1
    assert task.result == "once"
    assert helpers.attempts(db, task_id) == [(1, "succeeded", None)]


# --- order and timing -------------------------------------------------------------------


async def test_higher_priority_runs_first_within_a_queue(settings: config.Settings) -> None:
    tasks = Registry()
    order: list[str] = []

    @tasks.task("job")
    async def job(ctx: Context, payload: dict[str, str]) -> None:
        order.append(payload["name"])

    async with helpers.running(settings, tasks, worker=False, dispatcher=False) as s:
        ids = [
            await s.enqueue("job", {"name": name}, priority=priority)
            for name, priority in [("low", -1), ("mid-1", 0), ("top", 9), ("mid-2", 0), ("high", 5)]
        ]
        assert s.dispatcher is None
        # Everything waits in Redis before the worker takes its first id.
        assert (
            await Dispatcher(s.ledger, s.dispatch, database_url=settings.database_url).run_once()
            == 5
        )
        s.start_worker(helpers.worker(tasks, s, concurrency=1))
        for task_id in ids:
            await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert order == ["top", "high", "mid-1", "mid-2", "low"]


async def test_priority_is_honoured_across_the_queues_one_worker_serves(
    settings: config.Settings,
) -> None:
    tasks = Registry()
    order: list[str] = []

    @tasks.task("mail", queue="mail")
    async def mail(ctx: Context, payload: dict[str, str]) -> None:
        order.append(f"{ctx.queue}:{payload['name']}")

    @tasks.task("sms", queue="sms")
    async def sms(ctx: Context, payload: dict[str, str]) -> None:
        order.append(f"{ctx.queue}:{payload['name']}")

    async with helpers.running(settings, tasks, worker=False, dispatcher=False) as s:
        ids = [
            await s.enqueue(kind, {"name": name}, priority=priority)
            for kind, name, priority in [
                ("mail", "m0", 0),
                ("sms", "s5", 5),
                ("mail", "m10", 10),
                ("sms", "s0", 0),
                ("mail", "m-3", -3),
                ("sms", "s7", 7),
            ]
        ]
        assert (
            await Dispatcher(s.ledger, s.dispatch, database_url=settings.database_url).run_once()
            == 6
        )
        s.start_worker(helpers.worker(tasks, s, concurrency=1))
        for task_id in ids:
            await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert order == ["mail:m10", "sms:s7", "sms:s5", "mail:m0", "sms:s0", "mail:m-3"]


async def test_delayed_task_does_not_run_before_its_run_at(settings: config.Settings) -> None:
    tasks = Registry()
    ran_at: dict[str, datetime] = {}

    @tasks.task("tick")
    async def tick(ctx: Context, payload: dict[str, str]) -> None:
        ran_at[payload["name"]] = datetime.now(UTC)

    async with helpers.running(settings, tasks) as s:
        later = await s.enqueue("tick", {"name": "later"}, delay=0.6)
        now = await s.enqueue("tick", {"name": "now"})
        await helpers.wait_for_status(s.ledger, now, "SUCCEEDED")
        assert (await s.ledger.get(later)).status == TaskStatus.PENDING
        task = await helpers.wait_for_status(s.ledger, later, "SUCCEEDED")
    assert task.started_at is not None and task.started_at >= task.run_at
    assert ran_at["later"] >= task.run_at
    assert ran_at["now"] < task.run_at


async def test_concurrency_limit_is_never_exceeded(settings: config.Settings) -> None:
    tasks = Registry()
    running_now = 0
    peak = 0

    @tasks.task("busy")
    async def busy(ctx: Context, payload: dict[str, Any]) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.05)  # the work itself
        running_now -= 1

    async with helpers.running(settings, tasks, concurrency=3) as s:
        ids = [await s.enqueue("busy") for _ in range(12)]
        for task_id in ids:
            await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert peak == 3


# --- stopping ---------------------------------------------------------------------------


def _idle_tasks() -> Registry:
    """A registry with one no-op task type, for a worker that only needs to run."""
    tasks = Registry()

    @tasks.task("job")
    async def job(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    return tasks


async def test_an_idle_worker_blocked_in_its_pop_stops_at_once(
    settings: config.Settings, db: Conn
) -> None:
    tasks = _idle_tasks()
    async with helpers.running(settings, tasks, dispatcher=False) as s:
        assert s.worker is not None
        await _blocked_in_pop(s.worker)  # registered, and waiting in Redis's blocking pop
        started = time.monotonic()
        await s.stop_worker()
        stopped_after = time.monotonic() - started
    # Long before the pop's own timeout (POP_WAIT_S) would have ended it.
    assert stopped_after < 1.0


async def test_a_second_stop_before_the_first_is_handled_still_stops_gracefully(
    settings: config.Settings,
) -> None:
    tasks = _idle_tasks()
    async with helpers.running(settings, tasks, dispatcher=False) as s:
        assert s.worker is not None
        await _blocked_in_pop(s.worker)

        async def redis_holds_the_pop() -> bool:
            info = await s.dispatch.client.info("clients")
            return int(info["blocked_clients"]) >= 1

        # Blocked in Redis itself, past the connection's set-up.
        await helpers.eventually(redis_holds_the_pop, what="Redis to hold the worker's pop")
        s.worker.stop()  # and again at once, as a Runner does when a service fails
        await s.stop_worker()  # a graceful return, not a cancelled run()
        assert s.tasks["worker"].done() and not s.tasks["worker"].cancelled()


def _claims_waiting_for_a_lock(db: Conn) -> int:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE '%task_claim%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


async def _a_claim_waits_for_a_lock(db: Conn) -> None:
    async def probe() -> bool:
        return _claims_waiting_for_a_lock(db) == 1

    await helpers.eventually(probe, what="the worker's claim to wait for the row lock")


async def test_a_claim_under_way_when_the_worker_stops_runs_its_task_before_run_returns(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    ran: list[int] = []

    @tasks.task("job")
    async def job(ctx: Context, payload: dict[str, Any]) -> None:
        ran.append(ctx.task_id)

    async with helpers.running(settings, tasks, worker=False, dispatcher=False) as s:
        task_id = await s.enqueue("job")
        dispatcher = Dispatcher(s.ledger, s.dispatch, database_url=settings.database_url)
        assert await dispatcher.run_once() == 1
        with psycopg.connect(settings.database_url) as holder:
            holder.execute("SELECT 1 FROM ledgerq.tasks WHERE id = %s FOR UPDATE", (task_id,))
            s.start_worker(helpers.worker(tasks, s, concurrency=2))
            await _a_claim_waits_for_a_lock(db)
            assert s.worker is not None
            s.worker.stop()
            # run() waits for the claim: returning now would leave its task
            # claimed by a worker that is gone, RUNNING until its lease expires.
            done, _ = await asyncio.wait({s.tasks["worker"]}, timeout=0.5)
            assert not done
        # The lock is gone; the claim goes on and its task runs within grace.
        await s.stop_worker()
        task = await s.ledger.get(task_id)
    assert ran == [task_id]
    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1)


async def test_a_cancel_from_outside_reaches_a_worker_blocked_in_its_pop(
    settings: config.Settings, db: Conn
) -> None:
    tasks = _idle_tasks()
    async with helpers.running(settings, tasks, worker=False, dispatcher=False) as s:
        worker = helpers.worker(tasks, s)
        serving = asyncio.create_task(worker.run())
        try:
            assert await _blocked_in_pop(worker) is serving
        finally:
            # Cancelled however the test ends, so no worker outlives it.
            serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, 5)


async def _blocked_in_pop(worker: Worker) -> asyncio.Task[Any]:
    """The task of worker that waits in Redis's blocking pop, once it does."""

    async def probe() -> asyncio.Task[Any] | None:
        return worker._blocked_in_pop

    return await helpers.eventually(probe, what="the worker to block in its pop")


async def test_stop_lets_a_task_finish_within_grace_and_hands_back_one_that_does_not(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    started: dict[str, asyncio.Event] = {"quick": asyncio.Event(), "stuck": asyncio.Event()}
    may_finish = asyncio.Event()
    stuck_cancelled = asyncio.Event()

    @tasks.task("job")
    async def job(ctx: Context, payload: dict[str, str]) -> str:
        started[payload["name"]].set()
        if payload["name"] == "quick":
            await may_finish.wait()
            return "finished"
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stuck_cancelled.set()
            raise
        return "never"

    async with helpers.running(settings, tasks, concurrency=2, grace_s=0.5) as s:
        quick = await s.enqueue("job", {"name": "quick"}, max_attempts=3)
        stuck = await s.enqueue("job", {"name": "stuck"}, max_attempts=3)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 10)
        assert s.dispatcher is not None
        s.dispatcher.stop()  # nothing may pick the handed-back task up again here
        await s.tasks["dispatcher"]
        assert s.worker is not None
        s.worker.stop()
        may_finish.set()  # finishes within grace
        await s.stop_worker()
        done = await s.ledger.get(quick)
        handed_back = await s.ledger.get(stuck)
    assert stuck_cancelled.is_set()
    assert done.status == TaskStatus.SUCCEEDED and done.result == "finished"
    assert handed_back.status == TaskStatus.PENDING
    assert handed_back.run_at <= datetime.now(UTC)  # due again at once
    assert helpers.attempts(db, stuck) == [(1, "lost", "worker test-worker shut down")]
    # The handed-back attempt does not count against the task's budget.
    row = db.execute("SELECT attempts, budget_start FROM ledgerq.tasks WHERE id = %s", (stuck,))
    assert row.fetchone() == (1, 1)


# --- fencing ------------------------------------------------------------------------------


async def test_stale_attempt_cannot_overwrite_the_newer_attempts_outcome(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    started = asyncio.Event()
    release = asyncio.Event()

    @tasks.task("job", max_attempts=3)
    async def job(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"by": ctx.worker_id, "attempt": ctx.attempt}

    async with helpers.running(settings, tasks, worker=False, reaper=True) as s:
        task_id = await s.enqueue("job")
        # A worker (simulated in SQL) claims attempt 1, then stops heartbeating.
        await helpers.wait_for_status(s.ledger, task_id, "QUEUED")
        assert helpers.claim_by_sql(db, task_id, "ghost", lease_s=30) == 1
        helpers.expire_lease(db, task_id)

        # The reaper records attempt 1 as lost; the real worker runs attempt 2.
        # (Waiting on the attempt, not on PENDING: with a backoff of a few
        # milliseconds the dispatcher may have queued the task again already.)
        async def reaped() -> bool:
            return [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [(1, "lost")]

        await helpers.eventually(reaped, what="the reaper to record attempt 1 as lost")
        helpers.make_due(db, task_id)
        s.start_worker(helpers.worker(tasks, s))
        await asyncio.wait_for(started.wait(), 10)
        # The ghost wakes up: its heartbeat and its completion are fenced out.
        assert db.execute("SELECT ledgerq.heartbeat(%s, 1)", (task_id,)).fetchone() == ("lost",)
        assert helpers.complete_by_sql(db, task_id, 1, "ghost") is None
        assert (await s.ledger.get(task_id)).status == TaskStatus.RUNNING
        release.set()
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert task.result == {"by": "test-worker", "attempt": 2}
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [(1, "lost"), (2, "succeeded")]


async def test_worker_whose_lease_was_taken_over_cannot_record_its_outcome(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    started = asyncio.Event()
    release = threading.Event()

    @tasks.task("job", max_attempts=3)
    def job(ctx: Context, payload: dict[str, Any]) -> str:
        started_in_loop()
        release.wait(10)
        return "stale result"

    loop = asyncio.get_running_loop()

    def started_in_loop() -> None:
        loop.call_soon_threadsafe(started.set)

    async with helpers.running(settings, tasks, lease_s=30) as s:
        task_id = await s.enqueue("job")
        await asyncio.wait_for(started.wait(), 10)
        # The worker stalls past its lease: the reaper recovers the task and
        # another worker (simulated in SQL) runs and finishes attempt 2.
        helpers.expire_lease(db, task_id)
        assert await s.ledger.reap() == 1
        helpers.make_due(db, task_id)
        assert helpers.claim_by_sql(db, task_id, "other") == 2
        assert helpers.complete_by_sql(db, task_id, 2, "other") == "SUCCEEDED"
        release.set()
        assert s.worker is not None
        await helpers.eventually(
            lambda: _completed(s.worker, "FENCED"), what="the stale outcome to be fenced"
        )
        task = await s.ledger.get(task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.result == {"by": "other"}
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [(1, "lost"), (2, "succeeded")]


async def _completed(worker: Any, key: str) -> int:
    return int(worker.completed.get(key, 0))


async def test_a_stale_attempt_hears_lost_while_its_redelivery_runs_on_the_same_worker(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    started = asyncio.Event()
    stale_cancelled = asyncio.Event()

    @tasks.task("job", max_attempts=3)
    async def job(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
        if ctx.attempt == 1:
            started.set()
            try:
                await asyncio.sleep(60)  # stalled past its lease
            except asyncio.CancelledError:
                stale_cancelled.set()
                raise
        return {"attempt": ctx.attempt}

    async with helpers.running(settings, tasks, lease_s=3) as s:
        task_id = await s.enqueue("job")
        await asyncio.wait_for(started.wait(), 10)
        helpers.expire_lease(db, task_id)
        assert await s.ledger.reap() == 1
        helpers.make_due(db, task_id)
        # Attempt 2 runs on this same worker while attempt 1 still runs: both
        # are tracked, so attempt 1's next heartbeat hears "lost" and stops it.
        task = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
        await asyncio.wait_for(stale_cancelled.wait(), 10)
        assert s.worker is not None
        assert s.worker.completed == {"SUCCEEDED": 1}
    assert task.result == {"attempt": 2}
    assert [(a, o) for a, o, _ in helpers.attempts(db, task_id)] == [(1, "lost"), (2, "succeeded")]


@pytest.fixture(autouse=True)
def _no_handler_thread_left_busy() -> Iterator[None]:
    yield
    helpers.assert_no_handler_thread_left_busy()
