"""enqueue_task and enqueue_tasks: a registered type's queue and max_attempts as
defaults, concurrency keys, and the one bound of max_attempts."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg.types.json import Jsonb

from .helpers import Conn, call_rows, call_value, count, enqueue, raises_sqlstate, task
from .test_types import register, typedef


@pytest.fixture
def orders(db: Conn) -> Conn:
    """A worker has registered type "t" on queue "orders" with max_attempts 1."""
    register(db, "w1", typedef("t", queue="orders", max_attempts=1), queues=["orders"])
    return db


def queue_and_max_attempts(conn: Conn, task_id: int) -> tuple[str, int]:
    stored = task(conn, task_id)
    return stored["queue"], stored["max_attempts"]


def batch(conn: Conn, *items: dict[str, Any]) -> list[int]:
    rows = call_rows(conn, "enqueue_tasks", tasks=Jsonb(list(items)))
    assert all(row["created"] for row in rows)
    return [int(row["id"]) for row in rows]


def test_enqueue_task_without_queue_or_max_attempts_takes_the_registered_ones(orders: Conn) -> None:
    assert queue_and_max_attempts(orders, enqueue(orders, "t")) == ("orders", 1)
    both_null = enqueue(orders, "t", queue=None, max_attempts=None)
    assert queue_and_max_attempts(orders, both_null) == ("orders", 1)


def test_enqueue_task_explicit_values_win_over_the_registered_ones(orders: Conn) -> None:
    assert queue_and_max_attempts(orders, enqueue(orders, "t", queue="q")) == ("q", 1)
    assert queue_and_max_attempts(orders, enqueue(orders, "t", max_attempts=9)) == ("orders", 9)
    explicit = enqueue(orders, "t", queue="default", max_attempts=5)
    assert queue_and_max_attempts(orders, explicit) == ("default", 5)


def test_an_unregistered_type_gets_default_and_5(orders: Conn) -> None:
    assert queue_and_max_attempts(orders, enqueue(orders, "other")) == ("default", 5)
    [from_batch] = batch(orders, {"task_type": "other"})
    assert queue_and_max_attempts(orders, from_batch) == ("default", 5)


def test_enqueue_tasks_applies_each_types_registration_to_missing_or_null_fields(
    orders: Conn,
) -> None:
    register(orders, "w2", typedef("u", queue="mail", max_attempts=3), queues=["mail"])
    ids = batch(
        orders,
        {"task_type": "t"},
        {"task_type": "u", "queue": None, "max_attempts": None},
        {"task_type": "other"},
        {"task_type": "t", "queue": "explicit"},
        {"task_type": "u", "max_attempts": 8},
        {"task_type": "t"},
    )
    assert [queue_and_max_attempts(orders, i) for i in ids] == [
        ("orders", 1),
        ("mail", 3),
        ("default", 5),
        ("explicit", 1),
        ("mail", 8),
        ("orders", 1),
    ]


def test_the_latest_registration_decides_the_defaults(orders: Conn) -> None:
    register(orders, "w-new", typedef("t", queue="orders-v2", max_attempts=4))
    call_value(orders, "worker_stop", worker_id="w-new")  # it still decides once stopped
    assert queue_and_max_attempts(orders, enqueue(orders, "t")) == ("orders-v2", 4)


def test_task_defaults_answers_one_row_per_type(orders: Conn) -> None:
    rows = call_rows(orders, "task_defaults", task_types=["t", "other", "t"])
    assert sorted((r["task_type"], r["queue"], r["max_attempts"]) for r in rows) == [
        ("other", "default", 5),
        ("t", "orders", 1),
    ]


def test_a_schedule_keeps_its_own_queue_and_max_attempts(orders: Conn) -> None:
    call_value(orders, "schedule_task", name="s", cron="@every 1 second", task_type="t")
    call_value(orders, "run_schedules", as_of=call_value(orders, "schedule_next_slot", name="s"))
    (row,) = orders.execute("SELECT queue, max_attempts FROM ledgerq.tasks").fetchall()
    assert row == ("default", 5)


def test_concurrency_key_is_stored_by_enqueue_task_and_enqueue_tasks(db: Conn) -> None:
    single = enqueue(db, "t", concurrency_key="tenant-1")
    without = enqueue(db, "t")
    many = batch(
        db, {"task_type": "t", "concurrency_key": "tenant-2"}, {"task_type": "t"},
        {"task_type": "t", "concurrency_key": None},
    )  # fmt: skip
    keys = [task(db, i)["concurrency_key"] for i in [single, without, *many]]
    assert keys == ["tenant-1", None, "tenant-2", None, None]


def test_concurrency_key_of_512_characters_is_accepted(db: Conn) -> None:
    key = "é" * 512
    assert task(db, enqueue(db, "t", concurrency_key=key))["concurrency_key"] == key
    [from_batch] = batch(db, {"task_type": "t", "concurrency_key": key})
    assert task(db, from_batch)["concurrency_key"] == key


def test_a_replay_with_another_concurrency_key_is_the_same_task_with_its_first_key(
    db: Conn,
) -> None:
    first = enqueue(db, "t", idempotency_key="k", concurrency_key="a")
    (again,) = call_rows(
        db, "enqueue_task", task_type="t", idempotency_key="k", concurrency_key="b"
    )
    (in_batch,) = call_rows(
        db,
        "enqueue_tasks",
        tasks=Jsonb([{"task_type": "t", "idempotency_key": "k", "concurrency_key": "c"}]),
    )
    assert (again["id"], again["created"]) == (first, False)
    assert (in_batch["id"], in_batch["created"]) == (first, False)
    assert task(db, first)["concurrency_key"] == "a"
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 1


@pytest.mark.parametrize("function", ["enqueue_task", "enqueue_tasks"])
def test_max_attempts_has_one_bound_in_both_forms(db: Conn, function: str) -> None:
    def call(max_attempts: int) -> list[dict[str, Any]]:
        if function == "enqueue_task":
            return call_rows(db, function, task_type="t", max_attempts=max_attempts)
        return call_rows(
            db, function, tasks=Jsonb([{"task_type": "t", "max_attempts": max_attempts}])
        )

    (row,) = call(2147483647)
    assert task(db, row["id"])["max_attempts"] == 2147483647
    with raises_sqlstate("LQ422", "max_attempts must be >= 1", "got 0"):
        call(0)
    if function == "enqueue_tasks":
        with raises_sqlstate("LQ422", "max_attempts", "at most 2147483647", "2147483648"):
            call(2147483648)
