"""enqueue_task and enqueue_tasks: durable PENDING tasks, idempotency keys, validation."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from .helpers import (
    Conn,
    call_rows,
    count,
    db_now,
    enqueue,
    raises_sqlstate,
    task,
    wait_for_lock_waiters,
)


def test_enqueue_task_inserts_pending_task_with_documented_defaults(db: Conn) -> None:
    before = db_now(db)
    (row,) = call_rows(db, "enqueue_task", task_type="email.send")
    after = db_now(db)

    assert row["created"] is True
    stored = task(db, row["id"])
    assert stored["task_type"] == "email.send"
    assert stored["status"] == "PENDING"
    assert stored["payload"] == {}
    assert stored["queue"] == "default"
    assert stored["priority"] == 0
    assert stored["max_attempts"] == 5
    assert stored["attempts"] == 0
    assert stored["idempotency_key"] is None
    assert before <= stored["run_at"] <= after
    assert before <= stored["created_at"] <= after
    for column in ("result", "last_error", "worker_id", "lease_expires_at", "queued_at"):
        assert stored[column] is None, column
    assert stored["started_at"] is None
    assert stored["finished_at"] is None
    assert stored["cancel_requested"] is False


def test_enqueue_task_stores_every_given_field(db: Conn) -> None:
    run_at = db_now(db) + dt.timedelta(hours=1)
    task_id = enqueue(
        db,
        "payment.capture",
        payload={"amount": 42, "currency": "EUR"},
        queue="payments",
        priority=7,
        run_at=run_at,
        max_attempts=3,
        idempotency_key="capture-42",
    )

    stored = task(db, task_id)
    assert stored["task_type"] == "payment.capture"
    assert stored["payload"] == {"amount": 42, "currency": "EUR"}
    assert stored["queue"] == "payments"
    assert stored["priority"] == 7
    assert stored["run_at"] == run_at
    assert stored["max_attempts"] == 3
    assert stored["idempotency_key"] == "capture-42"
    assert stored["status"] == "PENDING"


def test_enqueue_task_gives_each_task_a_new_increasing_id(db: Conn) -> None:
    ids = [enqueue(db) for _ in range(3)]
    assert ids == sorted(set(ids))


def test_enqueue_task_with_null_run_at_makes_task_due_now(db: Conn) -> None:
    before = db_now(db)
    task_id = enqueue(db, run_at=None)
    assert before <= task(db, task_id)["run_at"] <= db_now(db)


def test_enqueue_task_replays_same_key_type_and_payload_as_existing_task(db: Conn) -> None:
    (first,) = call_rows(
        db, "enqueue_task", task_type="email.send", payload={"to": "a@b.c"}, idempotency_key="k1"
    )
    (second,) = call_rows(
        db,
        "enqueue_task",
        task_type="email.send",
        payload={"to": "a@b.c"},
        idempotency_key="k1",
        # Other fields may differ on a replay; the key, type and payload decide.
        queue="other",
        priority=3,
    )

    assert first["created"] is True
    assert second == {"id": first["id"], "created": False}
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 1
    assert task(db, first["id"])["queue"] == "default"


def test_enqueue_task_replay_returns_existing_task_even_after_it_finished(db: Conn) -> None:
    task_id = enqueue(db, idempotency_key="done-once")
    db.execute(
        "UPDATE ledgerq.tasks SET status = 'CANCELLED', finished_at = now() WHERE id = %s",
        (task_id,),
    )
    (row,) = call_rows(db, "enqueue_task", task_type="email.send", idempotency_key="done-once")
    assert row == {"id": task_id, "created": False}


@pytest.mark.parametrize(
    ("task_type", "payload"),
    [("email.send", {"to": "other@b.c"}), ("sms.send", {"to": "a@b.c"})],
    ids=["other-payload", "other-type"],
)
def test_enqueue_task_rejects_same_key_with_other_content_with_lq409(
    db: Conn, task_type: str, payload: dict[str, Any]
) -> None:
    task_id = enqueue(db, payload={"to": "a@b.c"}, idempotency_key="welcome-42")

    with raises_sqlstate("LQ409", "idempotency_key", "welcome-42", str(task_id)):
        call_rows(
            db, "enqueue_task", task_type=task_type, payload=payload, idempotency_key="welcome-42"
        )
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 1


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"task_type": ""}, "task_type"),
        ({"task_type": "   "}, "task_type"),
        ({"task_type": None}, "task_type"),
        ({"task_type": "x" * 201}, "task_type"),
        ({"payload": Jsonb([1, 2])}, "payload"),
        ({"payload": Jsonb("text")}, "payload"),
        ({"payload": Jsonb(None)}, "payload"),
        ({"payload": None}, "payload"),
        ({"queue": ""}, "queue"),
        ({"queue": "  "}, "queue"),
        ({"queue": "q" * 201}, "queue"),
        ({"priority": 40000}, "priority"),
        ({"priority": -40000}, "priority"),
        ({"priority": None}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 513}, "idempotency_key"),
        ({"concurrency_key": ""}, "concurrency_key"),
        ({"concurrency_key": "   "}, "concurrency_key"),
        ({"concurrency_key": "c" * 513}, "concurrency_key"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_enqueue_task_rejects_bad_argument_with_lq422_naming_the_field(
    db: Conn, arguments: dict[str, Any], field: str
) -> None:
    arguments = {"task_type": "email.send", **arguments}
    with raises_sqlstate("LQ422", field):
        call_rows(db, "enqueue_task", **arguments)
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0


def test_enqueue_task_accepts_boundary_values(db: Conn) -> None:
    task_id = enqueue(
        db,
        "t" * 200,
        queue="q" * 200,
        priority=-32768,
        max_attempts=1,
        idempotency_key="k" * 512,
    )
    stored = task(db, task_id)
    assert (stored["priority"], stored["max_attempts"]) == (-32768, 1)
    assert enqueue(db, priority=32767) > task_id


def test_enqueue_task_inside_rolled_back_transaction_leaves_nothing(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        task_id = enqueue(conn, idempotency_key="rolled-back")
        assert count(conn, "SELECT count(*) FROM ledgerq.tasks WHERE id = %s", task_id) == 1
        conn.rollback()

        assert count(conn, "SELECT count(*) FROM ledgerq.tasks") == 0
        # The key was never taken: a new enqueue with it creates a task.
        (row,) = call_rows(
            conn, "enqueue_task", task_type="other.type", idempotency_key="rolled-back"
        )
        conn.commit()
    assert row["created"] is True


def test_enqueue_task_is_invisible_to_others_until_caller_commits(db_url: str, db: Conn) -> None:
    with psycopg.connect(db_url) as conn:
        task_id = enqueue(conn)
        assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0
        conn.commit()
    assert task(db, task_id)["status"] == "PENDING"


def test_concurrent_enqueues_with_one_key_create_exactly_one_task(db_url: str, db: Conn) -> None:
    callers = 20
    barrier = threading.Barrier(callers)
    results: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def enqueue_once() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                barrier.wait(timeout=10)
                (row,) = call_rows(
                    conn,
                    "enqueue_task",
                    task_type="email.send",
                    payload={"to": "a@b.c"},
                    idempotency_key="race",
                )
            with lock:
                results.append(row)
        except BaseException as exc:
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=enqueue_once) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert len(results) == callers
    assert sum(row["created"] for row in results) == 1
    assert len({row["id"] for row in results}) == 1
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 1


def test_enqueue_waits_for_concurrent_uncommitted_insert_of_same_key(db_url: str, db: Conn) -> None:
    with psycopg.connect(db_url) as first:
        first_id = enqueue(first, idempotency_key="pending-key")
        outcome: list[Any] = []

        def second_enqueue() -> None:
            try:
                outcome.append(
                    call_rows(
                        db, "enqueue_task", task_type="email.send", idempotency_key="pending-key"
                    )
                )
            except psycopg.Error as exc:
                outcome.append(exc)

        thread = threading.Thread(target=second_enqueue)
        thread.start()
        # The second call must block on the first's uncommitted key ...
        wait_for_lock_waiters(first)
        assert outcome == []
        first.commit()
    thread.join(timeout=10)
    # ... and then see the committed task instead of creating another.
    assert outcome == [[{"id": first_id, "created": False}]]


def test_enqueue_tasks_returns_one_row_per_input_in_input_order(db: Conn) -> None:
    existing = enqueue(db, "b.type", idempotency_key="existing")
    items = [
        {"task_type": "a.type", "payload": {"n": 1}},
        {"task_type": "b.type", "idempotency_key": "existing"},
        {"task_type": "c.type", "queue": "q2", "priority": 5, "max_attempts": 2},
        {"task_type": "d.type", "run_at": "2100-01-01T00:00:00+00:00", "idempotency_key": "new"},
    ]

    rows = call_rows(db, "enqueue_tasks", tasks=Jsonb(items))

    assert [row["created"] for row in rows] == [True, False, True, True]
    assert rows[1]["id"] == existing
    stored = [task(db, row["id"]) for row in rows]
    assert [s["task_type"] for s in stored] == ["a.type", "b.type", "c.type", "d.type"]
    assert stored[0]["payload"] == {"n": 1}
    assert (stored[2]["queue"], stored[2]["priority"], stored[2]["max_attempts"]) == ("q2", 5, 2)
    assert stored[3]["run_at"] == dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    assert stored[3]["idempotency_key"] == "new"
    # Defaults as in enqueue_task.
    assert (stored[0]["queue"], stored[0]["priority"], stored[0]["max_attempts"]) == (
        "default",
        0,
        5,
    )
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 4


def test_enqueue_tasks_of_a_large_batch_keeps_input_order(db: Conn) -> None:
    items = [{"task_type": f"t{i}", "priority": (i * 7) % 11} for i in range(500)]
    rows = call_rows(db, "enqueue_tasks", tasks=Jsonb(items))
    with db.cursor() as cur:
        types = dict(cur.execute("SELECT id, task_type FROM ledgerq.tasks").fetchall())
    assert [types[row["id"]] for row in rows] == [f"t{i}" for i in range(500)]


def test_enqueue_tasks_with_empty_array_enqueues_nothing(db: Conn) -> None:
    assert call_rows(db, "enqueue_tasks", tasks=Jsonb([])) == []
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0


def test_enqueue_tasks_repeated_key_in_one_batch_creates_one_task(db: Conn) -> None:
    item = {"task_type": "email.send", "payload": {"to": "x"}, "idempotency_key": "twice"}
    rows = call_rows(db, "enqueue_tasks", tasks=Jsonb([item, {"task_type": "other"}, item]))

    assert [row["created"] for row in rows] == [True, True, False]
    assert rows[0]["id"] == rows[2]["id"]
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 2


def test_enqueue_tasks_rejects_key_reused_with_other_payload_within_batch(db: Conn) -> None:
    items = [
        {"task_type": "email.send", "idempotency_key": "dup", "payload": {"to": "a"}},
        {"task_type": "email.send", "idempotency_key": "dup", "payload": {"to": "b"}},
    ]
    with raises_sqlstate("LQ409", "tasks[1]", "idempotency_key", "dup"):
        call_rows(db, "enqueue_tasks", tasks=Jsonb(items))
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0


def test_enqueue_tasks_rejects_key_held_by_earlier_task_of_other_type(db: Conn) -> None:
    enqueue(db, "email.send", idempotency_key="held")
    items = [{"task_type": "fresh"}, {"task_type": "sms.send", "idempotency_key": "held"}]
    with raises_sqlstate("LQ409", "tasks[1]", "held"):
        call_rows(db, "enqueue_tasks", tasks=Jsonb(items))
    # All or nothing: the valid first item was not kept either.
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 1


@pytest.mark.parametrize(
    ("bad_item", "words"),
    [
        ({"task_type": ""}, ["tasks[1]", "task_type"]),
        ({"payload": {}}, ["tasks[1]", "task_type"]),
        ({"task_type": 5}, ["tasks[1]", "task_type"]),
        ({"task_type": "t", "payload": [1]}, ["tasks[1]", "payload"]),
        ({"task_type": "t", "queue": 3}, ["tasks[1]", "queue"]),
        ({"task_type": "t", "queue": ""}, ["tasks[1]", "queue"]),
        ({"task_type": "t", "priority": 1.5}, ["tasks[1]", "priority"]),
        ({"task_type": "t", "priority": "high"}, ["tasks[1]", "priority"]),
        ({"task_type": "t", "priority": 99999}, ["tasks[1]", "priority"]),
        ({"task_type": "t", "max_attempts": 0}, ["tasks[1]", "max_attempts"]),
        ({"task_type": "t", "max_attempts": 99999999999}, ["tasks[1]", "max_attempts"]),
        ({"task_type": "t", "max_attempts": 2147483648}, ["tasks[1]", "max_attempts"]),
        ({"task_type": "t", "concurrency_key": ""}, ["tasks[1]", "concurrency_key"]),
        ({"task_type": "t", "concurrency_key": " "}, ["tasks[1]", "concurrency_key"]),
        ({"task_type": "t", "concurrency_key": "c" * 513}, ["tasks[1]", "concurrency_key"]),
        ({"task_type": "t", "concurrency_key": 7}, ["tasks[1]", "concurrency_key"]),
        ({"task_type": "t", "concurrency_key": {"a": 1}}, ["tasks[1]", "concurrency_key"]),
        ({"task_type": "t", "run_at": "not a time"}, ["tasks[1]", "run_at"]),
        ({"task_type": "t", "run_at": 12}, ["tasks[1]", "run_at"]),
        ({"task_type": "t", "idempotency_key": ""}, ["tasks[1]", "idempotency_key"]),
        ({"task_type": "t", "idempotency_key": 7}, ["tasks[1]", "idempotency_key"]),
        ({"task_type": "t", "delay": 5}, ["tasks[1]", "unknown field", "delay"]),
        ("just a string", ["tasks[1]", "JSON object"]),
    ],
    ids=lambda v: None,
)
def test_enqueue_tasks_rejects_bad_item_with_lq422_naming_index_and_field(
    db: Conn, bad_item: Any, words: list[str]
) -> None:
    items = [{"task_type": "good"}, bad_item, {"task_type": "also.good"}]
    with raises_sqlstate("LQ422", *words):
        call_rows(db, "enqueue_tasks", tasks=Jsonb(items))
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0


@pytest.mark.parametrize(
    "tasks", [{"task_type": "t"}, "text", None], ids=["object", "string", "null"]
)
def test_enqueue_tasks_rejects_anything_but_an_array_with_lq422(db: Conn, tasks: Any) -> None:
    with raises_sqlstate("LQ422", "tasks"):
        call_rows(db, "enqueue_tasks", tasks=Jsonb(tasks) if tasks is not None else None)


def test_enqueue_tasks_is_all_or_nothing_inside_callers_transaction(db_url: str, db: Conn) -> None:
    with psycopg.connect(db_url) as conn:
        rows = call_rows(
            conn, "enqueue_tasks", tasks=Jsonb([{"task_type": "a"}, {"task_type": "b"}])
        )
        assert len(rows) == 2
        conn.rollback()
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0


def test_concurrent_enqueue_tasks_batches_sharing_a_key_create_it_once(
    db_url: str, db: Conn
) -> None:
    callers = 8
    barrier = threading.Barrier(callers)
    created: list[list[bool]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def enqueue_batch(n: int) -> None:
        try:
            items = [{"task_type": f"own.{n}"}, {"task_type": "shared", "idempotency_key": "s"}]
            with psycopg.connect(db_url, autocommit=True) as conn:
                barrier.wait(timeout=10)
                rows = call_rows(conn, "enqueue_tasks", tasks=Jsonb(items))
            with lock:
                created.append([row["created"] for row in rows])
        except BaseException as exc:
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=enqueue_batch, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert all(first for first, _ in created)
    assert sum(second for _, second in created) == 1
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE task_type = 'shared'") == 1
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == callers + 1
