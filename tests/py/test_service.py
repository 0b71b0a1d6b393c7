"""The service shape (service.py): every service has run, stop and run_once;
Worker.run_once does one pass against real PostgreSQL and Redis; the Runner
stops what it serves, also when the stop came first; reconnect waits grow."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import Context, NonRetryable, Registry, config, service
from ledgerq.dispatcher import Dispatcher
from ledgerq.reaper import Reaper
from ledgerq.worker import Worker

Conn = psycopg.Connection[Any]


@pytest.mark.parametrize("cls", [Worker, Dispatcher, Reaper])
def test_every_service_has_the_one_shape(cls: type) -> None:
    for name in ("run", "run_once"):
        assert inspect.iscoroutinefunction(getattr(cls, name)), (cls, name)
    assert callable(cls.stop) and not inspect.iscoroutinefunction(cls.stop)


def test_reconnect_delay_doubles_up_to_its_ceiling() -> None:
    delays = [service.reconnect_delay_s(n) for n in range(1, 9)]
    assert delays[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6])
    assert delays[-1] == service.RECONNECT_MAX_S
    assert delays == sorted(delays)


# --- Worker.run_once ---------------------------------------------------------------------


def _registry() -> Registry:
    tasks = Registry()

    @tasks.task("add")
    async def add(ctx: Context, payload: dict[str, int]) -> int:
        return payload["a"] + payload["b"]

    @tasks.task("refuse")
    def refuse(ctx: Context, payload: dict[str, Any]) -> None:
        raise NonRetryable("never")

    @tasks.task("book")
    def book(ctx: Context, payload: dict[str, Any]) -> str:
        def write(conn: Conn) -> str:
            conn.execute("CREATE TABLE booked AS SELECT %s::bigint AS task_id", (ctx.task_id,))
            return "booked"

        return str(ctx.once_in_transaction(f"book:{ctx.task_id}", write))

    return tasks


async def test_worker_run_once_runs_what_is_waiting_and_records_every_outcome(
    settings: config.Settings, db: Conn
) -> None:
    tasks = _registry()
    async with helpers.running(settings, tasks, worker=False, dispatcher=False) as s:
        worker = Worker(tasks, s.ledger, s.dispatch, worker_id="once")
        dispatcher = Dispatcher(s.ledger, s.dispatch, database_url=settings.database_url)
        assert await worker.run_once() == 0  # nothing waiting: no wait either
        added = [await s.enqueue("add", {"a": n, "b": 1}) for n in range(3)]
        refused = await s.enqueue("refuse")
        booked = await s.enqueue("book")
        assert await dispatcher.run_once() == 5

        assert await worker.run_once() == 5

        results = {t: (await s.ledger.get(t)).result for t in added}
        statuses = {t: (await s.ledger.get(t)).status.value for t in [*added, refused, booked]}
        assert await worker.run_once() == 0
    assert results == {added[0]: 1, added[1]: 2, added[2]: 3}
    assert statuses == dict.fromkeys(added, "SUCCEEDED") | {refused: "DEAD", booked: "SUCCEEDED"}
    assert worker.completed == {"SUCCEEDED": 4, "DEAD": 1}
    assert db.execute("SELECT task_id FROM booked").fetchall() == [(booked,)]


async def test_worker_run_once_takes_at_most_concurrency_tasks(
    settings: config.Settings, db: Conn
) -> None:
    tasks = _registry()
    async with helpers.running(settings, tasks, worker=False, dispatcher=False) as s:
        worker = Worker(tasks, s.ledger, s.dispatch, concurrency=2, worker_id="once")
        for n in range(5):
            await s.enqueue("add", {"a": n, "b": n})
        await Dispatcher(s.ledger, s.dispatch, database_url=settings.database_url).run_once()
        passes = [await worker.run_once() for _ in range(4)]
    assert passes == [2, 2, 1, 0]


# --- Runner ---------------------------------------------------------------------------------


class Pausing:
    """A service whose run() waits for stop(): the smallest thing the Runner serves."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()
        self.started = asyncio.Event()
        self.ran = False

    async def run(self) -> None:
        self.ran = True
        self.started.set()
        await self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()

    async def run_once(self) -> int:
        return 0


class Failing(Pausing):
    async def run(self) -> None:
        raise RuntimeError("boom")


async def test_runner_stop_ends_every_service_it_serves() -> None:
    runner = service.Runner()
    a, b = Pausing(), Pausing()
    serving = asyncio.create_task(runner.serve(a, b))
    await asyncio.wait_for(asyncio.gather(a.started.wait(), b.started.wait()), 5)
    assert not serving.done()
    runner.stop()
    await asyncio.wait_for(serving, 5)


async def test_runner_stopped_before_a_service_starts_stops_it_when_it_does() -> None:
    runner = service.Runner()
    runner.stop()  # a signal while connections were still being opened
    late = Pausing()
    await asyncio.wait_for(runner.serve(late), 5)
    assert late.ran and late.stopped.is_set()


async def test_runner_stops_the_others_when_one_service_fails() -> None:
    runner = service.Runner()
    healthy = Pausing()
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(runner.serve(healthy, Failing()), 5)
    assert healthy.stopped.is_set()
