"""cancel_task and retry_task: deliberate operator actions."""

from __future__ import annotations

import pytest

from .helpers import (
    Conn,
    attempts,
    call_rows,
    call_value,
    claimed,
    complete,
    db_now,
    enqueue,
    expire_lease,
    raises_sqlstate,
    task,
)


def cancel(conn: Conn, task_id: int) -> str:
    return str(call_value(conn, "cancel_task", task_id=task_id))


def retry(conn: Conn, task_id: int) -> str:
    return str(call_value(conn, "retry_task", task_id=task_id))


def make_dead(conn: Conn, task_id: int) -> int:
    attempt = claimed(conn, task_id)
    assert complete(conn, task_id, attempt, False, error="bad", retryable=False) == "DEAD"
    return attempt


def test_cancel_task_cancels_pending_task_at_once(db: Conn) -> None:
    task_id = enqueue(db)
    before = db_now(db)

    assert cancel(db, task_id) == "CANCELLED"

    stored = task(db, task_id)
    assert stored["status"] == "CANCELLED"
    assert before <= stored["finished_at"] <= db_now(db)
    assert stored["cancel_requested"] is False
    assert call_rows(db, "claim_task", task_id=task_id, worker_id="w") == []


def test_cancel_task_cancels_queued_task_at_once(db: Conn) -> None:
    task_id = enqueue(db)
    call_rows(db, "task_take_due")

    assert cancel(db, task_id) == "CANCELLED"

    stored = task(db, task_id)
    assert (stored["status"], stored["queued_at"]) == ("CANCELLED", None)
    assert stored["finished_at"] is not None


def test_cancel_task_of_running_task_only_requests_cancellation(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    before = task(db, task_id)

    assert cancel(db, task_id) == "RUNNING"

    stored = task(db, task_id)
    assert stored == {**before, "cancel_requested": True}
    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt) == "cancel"
    # Asking again changes nothing more.
    stored = task(db, task_id)
    assert cancel(db, task_id) == "RUNNING"
    assert task(db, task_id) == stored


@pytest.mark.parametrize("final", ["SUCCEEDED", "DEAD", "CANCELLED"])
def test_cancel_task_leaves_final_task_as_it_is(db: Conn, final: str) -> None:
    task_id = enqueue(db)
    if final == "SUCCEEDED":
        complete(db, task_id, claimed(db, task_id), True)
    elif final == "DEAD":
        make_dead(db, task_id)
    else:
        cancel(db, task_id)
    before = task(db, task_id)

    assert cancel(db, task_id) == final

    assert task(db, task_id) == before


def test_cancel_task_of_unknown_task_raises_lq404_naming_it(db: Conn) -> None:
    with raises_sqlstate("LQ404", "task 123456"):
        cancel(db, 123456)


def test_cancelled_running_task_whose_attempt_fails_ends_cancelled(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    cancel(db, task_id)
    assert complete(db, task_id, attempt, False, error="interrupted") == "CANCELLED"
    assert task(db, task_id)["status"] == "CANCELLED"


def test_retry_task_revives_dead_task_with_fresh_budget_and_kept_history(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=2)
    make_dead(db, task_id)
    dead = task(db, task_id)
    before = db_now(db)

    assert retry(db, task_id) == "PENDING"

    stored = task(db, task_id)
    assert stored["status"] == "PENDING"
    assert stored["finished_at"] is None
    assert stored["result"] is None
    assert before <= stored["run_at"] <= db_now(db)
    assert stored["attempts"] == dead["attempts"] == 1
    assert stored["last_error"] == "bad"  # the reason it died stays visible
    assert [a["attempt"] for a in attempts(db, task_id)] == [1]

    # A fresh budget of max_attempts=2 attempts, numbered on from the history.
    second = claimed(db, task_id)
    assert second == 2
    assert complete(db, task_id, second, False) == "PENDING"
    db.execute("UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,))
    third = claimed(db, task_id)
    assert third == 3
    assert complete(db, task_id, third, False) == "DEAD"
    assert [a["attempt"] for a in attempts(db, task_id)] == [1, 2, 3]


def test_retry_task_revives_cancelled_task(db: Conn) -> None:
    task_id = enqueue(db)
    cancel(db, task_id)
    assert retry(db, task_id) == "PENDING"
    assert claimed(db, task_id) == 1


def test_retry_task_attempt_numbers_never_repeat_so_old_attempt_stays_fenced(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=1)
    old = make_dead(db, task_id)
    retry(db, task_id)
    new = claimed(db, task_id)
    assert new > old
    before = task(db, task_id)

    assert complete(db, task_id, old, True) is None
    assert call_value(db, "heartbeat", task_id=task_id, attempt=old) == "lost"
    assert task(db, task_id) == before


def test_retry_task_after_lost_last_attempt_gives_fresh_budget(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=1)
    claimed(db, task_id)
    expire_lease(db, task_id)
    assert call_value(db, "reap_stuck") == 1
    assert task(db, task_id)["status"] == "DEAD"

    assert retry(db, task_id) == "PENDING"
    assert claimed(db, task_id) == 2


@pytest.mark.parametrize("status", ["PENDING", "QUEUED", "RUNNING", "SUCCEEDED"])
def test_retry_task_refuses_task_that_is_not_dead_or_cancelled_with_lq409(
    db: Conn, status: str
) -> None:
    task_id = enqueue(db)
    if status == "QUEUED":
        call_rows(db, "task_take_due")
    elif status == "RUNNING":
        claimed(db, task_id)
    elif status == "SUCCEEDED":
        complete(db, task_id, claimed(db, task_id), True)
    before = task(db, task_id)

    with raises_sqlstate("LQ409", f"task {task_id}", status):
        retry(db, task_id)

    assert task(db, task_id) == before


def test_retry_task_of_unknown_task_raises_lq404_naming_it(db: Conn) -> None:
    with raises_sqlstate("LQ404", "task 98765"):
        retry(db, 98765)
