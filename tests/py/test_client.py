"""Client and AsyncClient against a real ledger: enqueue (idempotency, the
caller's transaction, batches, defaults), get, cancel, retry, and bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from ledgerq import AsyncClient, Client, Context, Registry, TaskStatus, config, errors

Conn = psycopg.Connection[Any]


def _registry() -> Registry:
    tasks = Registry()

    @tasks.task("email.send", queue="mail", max_attempts=7)
    async def send(ctx: Context, payload: dict[str, Any]) -> None: ...

    return tasks


@pytest.fixture
def client(settings: config.Settings) -> Iterator[Client]:
    with Client(settings, registry=_registry()) as c:
        yield c


@pytest.fixture
async def aclient(settings: config.Settings) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(settings, registry=_registry()) as c:
        yield c


def count_tasks(db: Conn) -> int:
    row = db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone()
    assert row is not None
    return int(row[0])


# --- Client ---------------------------------------------------------------------------


def test_enqueue_returns_the_new_task(client: Client, db: Conn) -> None:
    before = datetime.now(UTC)
    task = client.enqueue("report.build", {"month": "2024-05"}, priority=3)
    assert task.created is True
    assert task.status == TaskStatus.QUEUED  # due at once: handed off to Redis
    assert (task.type, task.queue, task.priority, task.payload) == (
        "report.build", "default", 3, {"month": "2024-05"},
    )  # fmt: skip
    assert (task.attempts, task.max_attempts, task.result, task.last_error) == (0, 5, None, None)
    assert before - timedelta(seconds=1) <= task.created_at <= datetime.now(UTC)
    assert task.run_at == task.created_at
    assert db.execute("SELECT id, status FROM ledgerq.tasks").fetchall() == [(task.id, "QUEUED")]


def test_idempotency_key_replays_the_same_task(client: Client, db: Conn) -> None:
    first = client.enqueue("email.send", {"to": "a@b.c"}, idempotency_key="welcome-42")
    again = client.enqueue("email.send", {"to": "a@b.c"}, idempotency_key="welcome-42")
    assert first.created is True and again.created is False
    assert again.id == first.id and again.idempotency_key == "welcome-42"
    with pytest.raises(errors.IdempotencyConflict, match="welcome-42"):
        client.enqueue("email.send", {"to": "x@y.z"}, idempotency_key="welcome-42")
    with pytest.raises(errors.IdempotencyConflict):
        client.enqueue("sms.send", {"to": "a@b.c"}, idempotency_key="welcome-42")
    assert count_tasks(db) == 1


def test_enqueue_inside_the_callers_transaction(client: Client, db_url: str, db: Conn) -> None:
    with psycopg.connect(db_url) as conn:
        task = client.enqueue("email.send", {"to": "rolled@back"}, conn=conn)
        assert task.created is True and task.status == TaskStatus.PENDING
        assert count_tasks(db) == 0  # not visible outside the transaction yet
        conn.rollback()
        with pytest.raises(errors.TaskNotFound):
            client.get(task.id)

        kept = client.enqueue("email.send", {"to": "com@mitted"}, conn=conn)
        conn.execute("CREATE TABLE IF NOT EXISTS signups (email text)")
        assert count_tasks(db) == 0
        conn.commit()
    assert client.get(kept.id).payload == {"to": "com@mitted"}
    assert count_tasks(db) == 1


def test_enqueue_many_returns_tasks_in_input_order(client: Client) -> None:
    client.enqueue("email.send", {"to": "old"}, idempotency_key="k-old")
    tasks = client.enqueue_many(
        [
            {"task_type": "b", "payload": {"n": 1}},
            {"task_type": "email.send", "payload": {"to": "old"}, "idempotency_key": "k-old"},
            {"task_type": "a", "priority": 4, "queue": "q"},
            {"task_type": "email.send", "payload": {"to": "new"}},
        ]
    )
    assert [(t.type, t.created) for t in tasks] == [
        ("b", True), ("email.send", False), ("a", True), ("email.send", True),
    ]  # fmt: skip
    assert tasks[0].id < tasks[2].id < tasks[3].id
    assert (tasks[2].queue, tasks[2].priority, tasks[2].payload) == ("q", 4, {})
    assert (tasks[3].queue, tasks[3].max_attempts) == ("mail", 7)  # registry defaults
    assert all(t.status == TaskStatus.QUEUED for t in tasks)  # due at once: handed off


def test_enqueue_many_is_all_or_nothing(client: Client, db: Conn) -> None:
    with pytest.raises(errors.InvalidInput, match=r"tasks\[1\] max_attempts must be >= 1"):
        client.enqueue_many(
            [
                {"task_type": "a"},
                {"task_type": "b", "max_attempts": 0},
                {"task_type": "c"},
            ]
        )
    with pytest.raises(errors.IdempotencyConflict):
        client.enqueue_many(
            [
                {"task_type": "a", "idempotency_key": "same", "payload": {"n": 1}},
                {"task_type": "a", "idempotency_key": "same", "payload": {"n": 2}},
            ]
        )
    with pytest.raises(errors.InvalidInput, match="unknown task field"):
        client.enqueue_many([{"task_type": "a", "colour": "red"}])
    with pytest.raises(errors.InvalidInput, match="every task needs a task_type"):
        client.enqueue_many([{"payload": {}}])
    assert count_tasks(db) == 0


def test_get_cancel_and_retry(client: Client) -> None:
    task = client.enqueue("report.build")
    got = client.get(task.id)
    assert (got.id, got.status, got.created, got.attempt_history) == (
        task.id, TaskStatus.QUEUED, None, (),
    )  # fmt: skip
    assert client.cancel(task.id) == TaskStatus.CANCELLED
    cancelled = client.get(task.id)
    assert cancelled.status == TaskStatus.CANCELLED and cancelled.finished_at is not None
    assert client.cancel(task.id) == TaskStatus.CANCELLED  # a final task stays as it is
    assert client.retry(task.id) == TaskStatus.PENDING
    assert client.get(task.id).finished_at is None
    with pytest.raises(errors.InvalidTransition, match="only DEAD or CANCELLED"):
        client.retry(task.id)
    for call in (client.get, client.cancel, client.retry):
        with pytest.raises(errors.TaskNotFound):
            call(987654)


def test_delay_and_run_at_set_when_the_task_is_due(client: Client) -> None:
    before = datetime.now(UTC)
    delayed = client.enqueue("report.build", delay=60)
    assert (
        before + timedelta(seconds=59)
        <= delayed.run_at
        <= datetime.now(UTC) + timedelta(seconds=61)
    )
    as_timedelta = client.enqueue("report.build", delay=timedelta(minutes=2))
    assert as_timedelta.run_at - as_timedelta.created_at > timedelta(seconds=115)
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert client.enqueue("report.build", run_at=at).run_at == at


def test_registry_defaults_and_explicit_overrides(client: Client) -> None:
    default = client.enqueue("email.send")
    assert (default.queue, default.max_attempts) == ("mail", 7)
    explicit = client.enqueue("email.send", queue="bulk", max_attempts=2)
    assert (explicit.queue, explicit.max_attempts) == ("bulk", 2)
    unregistered = client.enqueue("not.registered")
    assert (unregistered.queue, unregistered.max_attempts) == ("default", 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delay": -1}, "delay must be >= 0 seconds"),
        ({"delay": 5, "run_at": datetime(2030, 1, 1, tzinfo=UTC)}, "run_at or delay, not both"),
        ({"payload": ["not", "an", "object"]}, "payload must be a JSON object"),
        ({"task_type": ""}, "task_type must be a non-empty string"),
        ({"priority": 40000}, "priority must be an integer between -32768 and 32767"),
        ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
        ({"queue": ""}, "queue must be a non-empty string"),
        ({"idempotency_key": ""}, "idempotency_key must not be empty"),
    ],
)
def test_bad_arguments_raise_invalid_input(
    client: Client, db: Conn, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"task_type": "email.send", "payload": {}} | kwargs
    with pytest.raises(errors.InvalidInput, match=message):
        client.enqueue(args.pop("task_type"), args.pop("payload"), **args)
    assert count_tasks(db) == 0


# --- AsyncClient ------------------------------------------------------------------------


async def test_async_enqueue_replay_and_conflict(aclient: AsyncClient, db: Conn) -> None:
    task = await aclient.enqueue("email.send", {"to": "a@b.c"}, idempotency_key="k1")
    assert task.created is True and task.status == TaskStatus.QUEUED
    assert (task.queue, task.max_attempts) == ("mail", 7)
    again = await aclient.enqueue("email.send", {"to": "a@b.c"}, idempotency_key="k1")
    assert (again.id, again.created) == (task.id, False)
    with pytest.raises(errors.IdempotencyConflict):
        await aclient.enqueue("email.send", {"to": "other"}, idempotency_key="k1")
    assert count_tasks(db) == 1


async def test_async_enqueue_inside_the_callers_transaction(
    aclient: AsyncClient, db_url: str, db: Conn
) -> None:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        gone = await aclient.enqueue("email.send", conn=conn)
        assert count_tasks(db) == 0
        await conn.rollback()
        with pytest.raises(errors.TaskNotFound):
            await aclient.get(gone.id)
        kept = await aclient.enqueue("email.send", conn=conn)
        await conn.commit()
    assert (await aclient.get(kept.id)).status == TaskStatus.PENDING
    assert count_tasks(db) == 1


async def test_async_enqueue_many_get_cancel_retry(aclient: AsyncClient, db: Conn) -> None:
    tasks = await aclient.enqueue_many([{"task_type": "x", "payload": {"i": i}} for i in range(3)])
    assert [t.payload for t in tasks] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert all(t.created for t in tasks)
    with pytest.raises(errors.InvalidInput):
        await aclient.enqueue_many([{"task_type": "x"}, {"task_type": "x", "priority": 10**6}])
    assert count_tasks(db) == 3
    assert await aclient.cancel(tasks[0].id) == TaskStatus.CANCELLED
    assert await aclient.retry(tasks[0].id) == TaskStatus.PENDING
    assert (await aclient.get(tasks[0].id)).status == TaskStatus.PENDING
    with pytest.raises(errors.InvalidInput, match="delay must be >= 0"):
        await aclient.enqueue("x", delay=-0.5)
    with pytest.raises(errors.TaskNotFound):
        await aclient.cancel(424242)


@pytest.mark.parametrize(
    "run_at",
    [
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14))),
        datetime(1, 1, 1, 0, 0, 0, tzinfo=timezone(timedelta(hours=14))),
    ],
    ids=["year 10000 in UTC", "year 0 in UTC"],
)
async def test_run_at_outside_years_1_to_9999_utc_is_refused_before_sending(
    client: Client, aclient: AsyncClient, db: Conn, run_at: datetime
) -> None:
    with pytest.raises(errors.InvalidInput, match="run_at must fall within years 1 to 9999 in UTC"):
        client.enqueue("report.build", run_at=run_at)
    with pytest.raises(errors.InvalidInput, match="run_at must fall within"):
        await aclient.enqueue("report.build", run_at=run_at)
    with pytest.raises(errors.InvalidInput, match="run_at must fall within"):
        client.enqueue_many([{"task_type": "report.build", "run_at": run_at}])
    with pytest.raises(errors.InvalidInput, match="past year 9999"):
        client.enqueue("report.build", delay=timedelta(days=3_000_000))
    assert count_tasks(db) == 0


def test_close_leaves_a_given_ledger_open_and_closes_its_own(settings: config.Settings) -> None:
    from ledgerq.ledger import Ledger

    ledger = Ledger.connect(settings.database_url)
    try:
        with Client(settings, ledger=ledger, hand_off=False) as given:
            first = given.enqueue("email.send", {})
        # The giver's ledger still works after the client closed.
        assert ledger.get(first.id).status == TaskStatus.PENDING
    finally:
        ledger.close()
    with Client(settings, hand_off=False) as own:
        own.enqueue("email.send", {})
        pool = own.ledger
    with pytest.raises(errors.LedgerError):
        pool.get(first.id)


async def test_async_close_leaves_a_given_ledger_open(settings: config.Settings) -> None:
    from ledgerq.ledger import AsyncLedger

    ledger = await AsyncLedger.connect(settings.database_url)
    try:
        async with AsyncClient(settings, ledger=ledger, hand_off=False) as given:
            task = await given.enqueue("email.send", {})
        assert (await ledger.get(task.id)).status == TaskStatus.PENDING
    finally:
        await ledger.close()
