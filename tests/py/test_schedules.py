"""Schedules in the runtime: ``@tasks.periodic``, the worker registering them at
start, the dispatcher firing them (and counting what it did), and the ledger's
schedule calls. Which slots fire is the ledger's (tests/sql/test_schedule*.py);
here, that the runtime calls it rightly."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import config, errors, metrics
from ledgerq.dispatch import Dispatch
from ledgerq.dispatcher import Dispatcher
from ledgerq.ledger import AsyncLedger, Ledger
from ledgerq.registry import Context, Registry
from ledgerq.types import NewSchedule
from ledgerq.worker import Worker

Conn = psycopg.Connection[Any]


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


async def noop(ctx: Context, payload: dict[str, Any]) -> None:
    return None


def unique(prefix: str) -> str:
    """A schedule name no other test uses: the metrics registry is per process."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def slots(schedule: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "ledgerq_schedule_slots_total", {"schedule": schedule, "outcome": outcome}
    )
    return value or 0.0


def schedule_rows(db: Conn) -> dict[str, tuple[Any, ...]]:
    rows = db.execute(
        "SELECT name, cron, timezone, task_type, payload, queue, priority, max_attempts,"
        " overlap, catch_up, next_slot FROM ledgerq.task_schedules"
    ).fetchall()
    return {r[0]: r[1:] for r in rows}


def db_now(db: Conn) -> Any:
    return db.execute("SELECT now()").fetchone()[0]  # type: ignore[index]


# --- @tasks.periodic ---------------------------------------------------------------------


def test_periodic_above_or_below_task_takes_the_tasks_queue_and_attempts() -> None:
    tasks = Registry()

    @tasks.periodic("*/5 * * * *")
    @tasks.task("report.above", queue="reports", max_attempts=2)
    async def above(ctx: Context, payload: dict[str, Any]) -> None: ...

    @tasks.task("report.below", queue="other", max_attempts=7)
    @tasks.periodic("@every 30 seconds", name="below", payload={"n": 1},
                    timezone="Europe/Berlin", overlap=False, catch_up=timedelta(hours=1))  # fmt: skip
    async def below(ctx: Context, payload: dict[str, Any]) -> None: ...

    assert tasks.schedules() == [
        NewSchedule(
            name="below", cron="@every 30 seconds", task_type="report.below", payload={"n": 1},
            queue="other", max_attempts=7, timezone="Europe/Berlin", overlap=False,
            catch_up=timedelta(hours=1),
        ),
        NewSchedule(
            name="report.above", cron="*/5 * * * *", task_type="report.above", payload={},
            queue="reports", max_attempts=2, timezone="UTC", overlap=True,
            catch_up=timedelta(0),
        ),
    ]  # fmt: skip


def test_periodic_on_a_function_that_is_no_task_is_a_config_error() -> None:
    tasks = Registry()
    tasks.periodic("@hourly")(noop)
    with pytest.raises(errors.ConfigError, match=r"noop, which is not a registered task"):
        tasks.schedules()


def test_two_schedules_with_one_name_are_a_config_error() -> None:
    tasks = Registry()
    tasks.periodic("@hourly", name="twice")(tasks.task("a")(noop))

    async def other(ctx: Context, payload: dict[str, Any]) -> None: ...

    tasks.periodic("@daily", name="twice")(tasks.task("b")(other))
    with pytest.raises(errors.ConfigError, match="schedule 'twice' is defined twice"):
        tasks.schedules()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": " "}, "cron must be a non-empty string"),
        ({"cron": "@hourly", "name": ""}, "schedule name must be a non-empty string"),
        ({"cron": "@hourly", "payload": [1]}, "schedule payload must be a dict, got list"),
        ({"cron": "@hourly", "catch_up": timedelta(seconds=-1)}, "catch_up must be a timedelta"),
        ({"cron": "@hourly", "catch_up": 60}, "catch_up must be a timedelta"),
    ],
)
def test_periodic_refuses_bad_arguments_when_decorating(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        Registry().periodic(**kwargs)


# --- the worker registers its schedules --------------------------------------------------


async def test_a_worker_creates_its_schedules_and_a_restart_keeps_their_cursor(
    ledger: AsyncLedger, dispatch: Dispatch, db: Conn
) -> None:
    tasks = Registry()
    tasks.periodic("0 3 * * *", timezone="Europe/Berlin", payload={"kind": "nightly"},
                   overlap=False, catch_up=timedelta(minutes=90))(
        tasks.task("report.nightly", queue="reports", max_attempts=3)(noop)
    )  # fmt: skip
    assert await Worker(tasks, ledger, dispatch).register_schedules() == 1
    first = schedule_rows(db)
    assert first["report.nightly"][:9] == (
        "0 3 * * *", "Europe/Berlin", "report.nightly", {"kind": "nightly"}, "reports", 0, 3,
        False, timedelta(minutes=90),
    )  # fmt: skip
    assert first["report.nightly"][9] > db_now(db)

    # A second start writes nothing: the same cursor (and no new updated_at).
    stamp = db.execute("SELECT updated_at FROM ledgerq.task_schedules").fetchone()
    await Worker(tasks, ledger, dispatch).register_schedules()
    assert schedule_rows(db) == first
    assert db.execute("SELECT updated_at FROM ledgerq.task_schedules").fetchone() == stamp


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [
        ("61 * * * *", "UTC", "minute"),
        ("@every 0 seconds", "UTC", "@every"),
        ("* * * * *", "Mars/Olympus", "Mars/Olympus"),
    ],
)
async def test_a_bad_cron_or_time_zone_stops_the_worker_with_one_line(
    ledger: AsyncLedger, dispatch: Dispatch, db: Conn, cron: str, timezone: str, message: str
) -> None:
    tasks = Registry()
    tasks.periodic(cron, timezone=timezone)(tasks.task("bad.schedule")(noop))
    worker = Worker(tasks, ledger, dispatch)
    with pytest.raises(errors.ConfigError) as caught:
        await worker.run()
    line = errors.first_line(caught.value)
    assert line.startswith("schedule 'bad.schedule': ")
    assert message in line
    assert "\n" not in str(caught.value)
    assert schedule_rows(db) == {}


# --- the dispatcher fires them -----------------------------------------------------------


async def test_fire_schedules_enqueues_due_slots_and_counts_them(
    ledger: AsyncLedger, dispatch: Dispatch, db: Conn, settings: config.Settings
) -> None:
    name = unique("every-minute")
    await ledger.schedule_task(NewSchedule(name, "* * * * *", "job", overlap=False))
    dispatcher = Dispatcher(ledger, dispatch, database_url=settings.database_url)
    start = db_now(db)

    assert await dispatcher.fire_schedules(start) == 0  # the first slot is after creation
    assert await dispatcher.fire_schedules(start + timedelta(minutes=2)) == 1
    assert slots(name, "enqueued") == 1
    # The same instant again: that slot is handled, nothing more.
    assert await dispatcher.fire_schedules(start + timedelta(minutes=2)) == 0
    # Two minutes on, the slot's task is still PENDING and overlap is off.
    assert await dispatcher.fire_schedules(start + timedelta(minutes=4)) == 0
    assert slots(name, "enqueued") == 1
    assert slots(name, "skipped_overlap") == 1
    rows = db.execute(
        "SELECT idempotency_key, task_type, status FROM ledgerq.tasks ORDER BY id"
    ).fetchall()
    assert len(rows) == 1
    assert rows[0][0].startswith(f"schedule:{name}:")
    assert rows[0][1:] == ("job", "PENDING")


async def test_a_running_dispatcher_fires_an_every_second_schedule_each_second(
    settings: config.Settings, db: Conn
) -> None:
    name = unique("each-second")
    tasks = Registry()
    tasks.periodic("@every 1 seconds", name=name)(tasks.task("tick")(noop))
    async with helpers.running(settings, tasks, poll_interval_s=5.0) as s:
        # The worker registers the schedule; the dispatcher, whose poll interval
        # is five seconds here, still fires it each second, and the worker runs them.
        async def three_succeeded() -> bool:
            return (
                db.execute(
                    "SELECT count(*) FROM ledgerq.tasks WHERE task_type = 'tick'"
                    " AND status = 'SUCCEEDED'"
                ).fetchone()[0]  # type: ignore[index]
                >= 3
            )

        await helpers.eventually(three_succeeded, what="three ticks run")
        assert s.dispatcher is not None
        assert s.dispatcher.schedule_enqueued >= 3
    keys = [k for (k,) in db.execute("SELECT idempotency_key FROM ledgerq.tasks ORDER BY run_at")]
    assert len(keys) == len(set(keys))
    assert slots(name, "enqueued") >= 3


# --- pause, resume, delete, list ----------------------------------------------------------


async def test_pause_resume_and_list_through_the_ledger(
    ledger: AsyncLedger, db: Conn, db_url: str
) -> None:
    await ledger.schedule_task(NewSchedule("hourly", "@hourly", "job", queue="q"))
    (listed,) = await ledger.list_schedules()
    assert (listed.name, listed.cron, listed.timezone, listed.task_type, listed.queue) == (
        "hourly", "@hourly", "UTC", "job", "q",
    )  # fmt: skip
    assert not listed.paused
    assert listed.next_run_at is not None and listed.next_run_at > db_now(db)
    assert listed.last_slot is None and listed.last_task_id is None

    assert await ledger.pause_schedule("hourly")
    assert await ledger.pause_schedule("hourly")  # again: still known
    (paused,) = await ledger.list_schedules()
    assert paused.paused and paused.next_run_at is None
    assert await ledger.resume_schedule("hourly")
    assert (await ledger.list_schedules())[0] == listed

    sync = Ledger.connect(db_url)
    try:
        sync.pause_schedule("hourly")
        assert sync.list_schedules()[0].paused
        sync.resume_schedule("hourly")
        sync.unschedule_task("hourly")
        assert sync.list_schedules() == []
        with pytest.raises(errors.ScheduleNotFound, match="schedule 'hourly' does not exist"):
            sync.unschedule_task("hourly")
        with pytest.raises(errors.ScheduleNotFound):
            sync.pause_schedule("hourly")
    finally:
        sync.close()
    assert not await ledger.pause_schedule("nope")
    assert not await ledger.resume_schedule("nope")
