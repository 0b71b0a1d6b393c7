"""enqueue_task under a hand-off (ledgerq.hand_off set, as the clients' enqueue
statement does): a task task_hand_off would mark QUEUED is inserted QUEUED at
once, one row version instead of an insert and an update; every other task is
inserted PENDING and marked, or left to the dispatcher, as before."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from .helpers import Conn, call_rows, call_value, db_now, enqueue, task


def _handing_off(db: Conn) -> None:
    db.execute("BEGIN")
    db.execute("SELECT set_config('ledgerq.hand_off', 'on', true)")


def _transaction_now(db: Conn) -> dt.datetime:
    row = db.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]


def _updates_so_far(db: Conn) -> int:
    """Row updates of ledgerq.tasks in the current transaction."""
    row = db.execute(
        "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = 'ledgerq.tasks'::regclass"
    ).fetchone()
    return int(row[0]) if row is not None else 0


def test_a_due_task_handed_off_is_inserted_queued_and_never_updated(db: Conn) -> None:
    _handing_off(db)
    task_id = enqueue(db, "email.send", queue="mail", priority=3)
    stored = task(db, task_id)
    assert stored["status"] == "QUEUED"
    assert stored["queued_at"] == _transaction_now(db)
    (handed,) = call_rows(db, "task_hand_off", task_ids=[task_id])
    assert handed == {
        "id": task_id, "queue": "mail", "priority": 3, "run_at": stored["run_at"],
    }  # fmt: skip
    assert _updates_so_far(db) == 0
    db.execute("COMMIT")
    assert task(db, task_id)["status"] == "QUEUED"


def test_a_due_task_of_a_batch_handed_off_is_marked_by_task_hand_off(db: Conn) -> None:
    _handing_off(db)
    rows = db.execute(
        'SELECT id FROM ledgerq.enqueue_tasks(\'[{"task_type": "a"}, {"task_type": "b"}]\')'
    ).fetchall()
    ids = [r[0] for r in rows]
    assert [task(db, i)["status"] for i in ids] == ["PENDING", "PENDING"]
    handed = call_rows(db, "task_hand_off", task_ids=ids)
    assert sorted(h["id"] for h in handed) == ids
    assert [task(db, i)["status"] for i in ids] == ["QUEUED", "QUEUED"]
    db.execute("COMMIT")


@pytest.mark.parametrize(
    "arguments",
    [
        {"concurrency_key": "customer-1"},
        {"queue": "configured"},
        {"run_at": "later"},
    ],
    ids=["with a concurrency key", "of a queue with settings", "due later"],
)
def test_a_task_the_dispatcher_must_decide_on_is_inserted_pending(
    db: Conn, arguments: dict[str, Any]
) -> None:
    call_value(db, "configure_queue", queue="configured", settings={"max_running": 5})
    if arguments.get("run_at") == "later":
        arguments = {"run_at": db_now(db) + dt.timedelta(hours=1)}
    _handing_off(db)
    task_id = enqueue(db, "email.send", **arguments)
    assert task(db, task_id)["status"] == "PENDING"
    assert task(db, task_id)["queued_at"] is None
    assert call_rows(db, "task_hand_off", task_ids=[task_id]) == []
    assert task(db, task_id)["status"] == "PENDING"
    db.execute("COMMIT")


def test_without_a_hand_off_a_due_task_is_inserted_pending(db: Conn) -> None:
    task_id = enqueue(db, "email.send")
    assert task(db, task_id)["status"] == "PENDING"


def test_a_task_without_a_key_takes_its_queues_frontier_as_its_turn(db: Conn) -> None:
    db.execute("INSERT INTO ledgerq.flow_turns (queue, frontier) VALUES ('mail', 41)")
    for hand_off in (False, True):
        if hand_off:
            _handing_off(db)
        assert task(db, enqueue(db, "email.send", queue="mail"))["turn"] == 41
        assert task(db, enqueue(db, "email.send", queue="other"))["turn"] == 0
        if hand_off:
            db.execute("COMMIT")
