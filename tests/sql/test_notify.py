"""NOTIFY on 'ledgerq_tasks': the dispatcher wakes when work becomes due, after commit."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from .helpers import Conn, call_rows, call_value, claimed, db_now, enqueue, expire_lease

CHANNEL = "ledgerq_tasks"
WAIT_S = 5.0


@pytest.fixture
def listener(db_url: str) -> Iterator[Conn]:
    """A connection LISTENing on the dispatcher's channel, as the dispatcher does."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield conn


def next_payload(listener: Conn) -> str | None:
    """The payload of the next notification on the channel; None if none came."""
    for notify in listener.notifies(timeout=WAIT_S, stop_after=1):
        assert notify.channel == CHANNEL
        return notify.payload
    return None


def marker(conn: Conn, text: str) -> None:
    """Send our own notification: anything the ledger sent before it arrives first."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, text))


def test_enqueue_of_due_task_notifies_dispatcher_only_after_commit(
    db_url: str, listener: Conn
) -> None:
    with psycopg.connect(db_url) as conn:
        enqueue(conn)
        # Nothing yet: our marker, sent from another session, overtakes it.
        with psycopg.connect(db_url, autocommit=True) as other:
            marker(other, "before-commit")
        assert next_payload(listener) == "before-commit"
        conn.commit()
    assert next_payload(listener) == ""


def test_enqueue_rolled_back_sends_no_notification(db_url: str, listener: Conn) -> None:
    with psycopg.connect(db_url) as conn:
        enqueue(conn)
        conn.rollback()
        marker(conn, "after-rollback")
        conn.commit()
    assert next_payload(listener) == "after-rollback"


def test_enqueue_of_future_task_does_not_notify(db: Conn, listener: Conn) -> None:
    enqueue(db, run_at=db_now(db) + dt.timedelta(minutes=10))
    marker(db, "after-future-enqueue")
    assert next_payload(listener) == "after-future-enqueue"


def test_enqueue_tasks_notifies_when_any_task_is_due(db: Conn, listener: Conn) -> None:
    call_rows(
        db,
        "enqueue_tasks",
        tasks=Jsonb(
            [{"task_type": "later", "run_at": "2999-01-01T00:00:00Z"}, {"task_type": "now"}]
        ),
    )
    assert next_payload(listener) == ""


def test_enqueue_tasks_of_only_future_tasks_does_not_notify(db: Conn, listener: Conn) -> None:
    call_rows(
        db, "enqueue_tasks", tasks=Jsonb([{"task_type": "later", "run_at": "2999-01-01T00:00:00Z"}])
    )
    marker(db, "after-future-batch")
    assert next_payload(listener) == "after-future-batch"


def test_retry_task_notifies_dispatcher(db: Conn, listener: Conn) -> None:
    task_id = enqueue(db)
    assert next_payload(listener) == ""
    call_value(db, "cancel_task", task_id=task_id)
    call_value(db, "retry_task", task_id=task_id)
    assert next_payload(listener) == ""


def test_reap_stuck_notifies_when_it_moved_something(db: Conn, listener: Conn) -> None:
    task_id = enqueue(db)
    assert next_payload(listener) == ""
    assert call_value(db, "reap_stuck") == 0
    marker(db, "after-idle-reap")
    assert next_payload(listener) == "after-idle-reap"  # the idle reap sent nothing
    claimed(db, task_id)
    expire_lease(db, task_id)
    assert call_value(db, "reap_stuck") == 1
    assert next_payload(listener) == ""
