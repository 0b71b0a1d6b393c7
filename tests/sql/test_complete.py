"""complete_task / complete_tasks and task_release: outcomes, retries, fencing."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from .helpers import (
    Conn,
    attempts,
    call_rows,
    call_value,
    claimed,
    complete,
    count,
    db_now,
    enqueue,
    raises_sqlstate,
    task,
)


def make_due(conn: Conn, task_id: int) -> None:
    """Skip a retry's backoff, as if its run_at had come."""
    conn.execute("UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,))


def test_complete_task_success_records_result_and_finishes_task(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    before = db_now(db)

    status = complete(db, task_id, attempt, True, result={"sent": True})

    assert status == "SUCCEEDED"
    stored = task(db, task_id)
    assert stored["status"] == "SUCCEEDED"
    assert stored["result"] == {"sent": True}
    assert before <= stored["finished_at"] <= db_now(db)
    assert (stored["lease_expires_at"], stored["cancel_requested"]) == (None, False)
    assert stored["attempts"] == 1
    (row,) = attempts(db, task_id)
    assert (row["outcome"], row["error"]) == ("succeeded", None)
    assert row["finished_at"] == stored["finished_at"]


def test_complete_task_success_without_result_stores_null(db: Conn) -> None:
    task_id = enqueue(db)
    assert complete(db, task_id, claimed(db, task_id), True) == "SUCCEEDED"
    assert task(db, task_id)["result"] is None


@pytest.mark.parametrize("result", [[1, 2], "done", 42, None], ids=repr)
def test_complete_task_stores_any_json_result(db: Conn, result: Any) -> None:
    task_id = enqueue(db)
    complete(db, task_id, claimed(db, task_id), True, result=Jsonb(result))
    assert task(db, task_id)["result"] == result


def test_complete_task_failure_retries_with_backoff_within_compute_backoff_bounds(
    db: Conn,
) -> None:
    task_id = enqueue(db, max_attempts=5)
    for attempt_number in (1, 2, 3):
        attempt = claimed(db, task_id)
        assert attempt == attempt_number
        before = db_now(db)

        status = complete(db, task_id, attempt, False, error=f"boom {attempt}")

        after = db_now(db)
        assert status == "PENDING"
        stored = task(db, task_id)
        assert stored["status"] == "PENDING"
        assert stored["last_error"] == f"boom {attempt}"
        assert stored["finished_at"] is None
        assert stored["lease_expires_at"] is None
        assert stored["result"] is None
        # compute_backoff(n) with the defaults: full jitter in [0, 2^(n-1)] s.
        ceiling = dt.timedelta(seconds=2 ** (attempt - 1))
        assert before <= stored["run_at"] <= after + ceiling
        make_due(db, task_id)

    assert [(a["attempt"], a["outcome"], a["error"]) for a in attempts(db, task_id)] == [
        (1, "failed", "boom 1"),
        (2, "failed", "boom 2"),
        (3, "failed", "boom 3"),
    ]


def test_complete_task_retry_is_not_claimable_before_its_backoff_ends(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    complete(db, task_id, attempt, False)
    db.execute(
        "UPDATE ledgerq.tasks SET run_at = now() + interval '1 minute' WHERE id = %s", (task_id,)
    )
    assert call_rows(db, "claim_task", task_id=task_id, worker_id="w") == []


def test_complete_task_failure_on_last_attempt_is_dead(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=2)
    complete(db, task_id, claimed(db, task_id), False, error="first")
    make_due(db, task_id)
    attempt = claimed(db, task_id)
    run_at_before = task(db, task_id)["run_at"]

    assert complete(db, task_id, attempt, False, error="second") == "DEAD"

    stored = task(db, task_id)
    assert stored["status"] == "DEAD"
    assert stored["last_error"] == "second"
    assert stored["finished_at"] is not None
    assert stored["run_at"] == run_at_before
    assert stored["attempts"] == 2
    assert [a["outcome"] for a in attempts(db, task_id)] == ["failed", "failed"]
    assert call_rows(db, "claim_task", task_id=task_id, worker_id="w") == []


def test_complete_task_with_single_attempt_budget_is_dead_after_one_failure(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=1)
    assert complete(db, task_id, claimed(db, task_id), False) == "DEAD"


def test_complete_task_non_retryable_failure_is_dead_after_one_attempt(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=5)
    attempt = claimed(db, task_id)

    status = complete(db, task_id, attempt, False, error="invalid payload", retryable=False)

    assert status == "DEAD"
    stored = task(db, task_id)
    assert (stored["status"], stored["attempts"], stored["last_error"]) == (
        "DEAD",
        1,
        "invalid payload",
    )
    assert stored["finished_at"] is not None
    assert [(a["outcome"], a["error"]) for a in attempts(db, task_id)] == [
        ("failed", "invalid payload")
    ]


def test_complete_task_failure_without_error_records_a_message(db: Conn) -> None:
    task_id = enqueue(db)
    complete(db, task_id, claimed(db, task_id), False)
    assert task(db, task_id)["last_error"]
    assert attempts(db, task_id)[0]["error"] == task(db, task_id)["last_error"]


def test_complete_task_success_keeps_last_error_of_earlier_attempt(db: Conn) -> None:
    task_id = enqueue(db)
    complete(db, task_id, claimed(db, task_id), False, error="flaky")
    make_due(db, task_id)
    complete(db, task_id, claimed(db, task_id), True, result={"ok": 1})
    stored = task(db, task_id)
    assert (stored["status"], stored["last_error"]) == ("SUCCEEDED", "flaky")
    assert [a["outcome"] for a in attempts(db, task_id)] == ["failed", "succeeded"]


@pytest.mark.parametrize("stale", ["earlier", "later"])
def test_complete_task_by_stale_attempt_returns_null_and_changes_nothing(
    db: Conn, stale: str
) -> None:
    task_id = enqueue(db)
    first = claimed(db, task_id, "worker-a")
    complete(db, task_id, first, False, error="lost it")
    make_due(db, task_id)
    current = claimed(db, task_id, "worker-b")
    stale_attempt = first if stale == "earlier" else current + 1
    task_before = task(db, task_id)
    attempts_before = attempts(db, task_id)

    assert complete(db, task_id, stale_attempt, True, result={"stale": True}) is None
    assert complete(db, task_id, stale_attempt, False, retryable=False) is None

    assert task(db, task_id) == task_before
    assert attempts(db, task_id) == attempts_before


@pytest.mark.parametrize("status", ["PENDING", "SUCCEEDED", "DEAD"])
def test_complete_task_of_task_not_running_returns_null_and_changes_nothing(
    db: Conn, status: str
) -> None:
    task_id = enqueue(db)
    attempt = 1
    if status != "PENDING":
        attempt = claimed(db, task_id)
        complete(db, task_id, attempt, status == "SUCCEEDED", retryable=False)
    before = task(db, task_id)
    attempts_before = attempts(db, task_id)

    assert complete(db, task_id, attempt, True) is None

    assert task(db, task_id) == before
    assert attempts(db, task_id) == attempts_before


def test_complete_task_of_unknown_task_returns_null(db: Conn) -> None:
    assert complete(db, 99999, 1, True) is None


def test_complete_task_turns_failure_of_cancel_requested_attempt_into_cancelled(
    db: Conn,
) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    assert call_value(db, "cancel_task", task_id=task_id) == "RUNNING"

    assert complete(db, task_id, attempt, False, error="stopped on request") == "CANCELLED"

    stored = task(db, task_id)
    assert (stored["status"], stored["cancel_requested"]) == ("CANCELLED", False)
    assert stored["finished_at"] is not None
    assert [(a["outcome"], a["error"]) for a in attempts(db, task_id)] == [
        ("cancelled", "stopped on request")
    ]


def test_complete_task_success_wins_over_requested_cancellation(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    call_value(db, "cancel_task", task_id=task_id)

    assert complete(db, task_id, attempt, True, result={"done": 1}) == "SUCCEEDED"

    stored = task(db, task_id)
    assert (stored["status"], stored["result"], stored["cancel_requested"]) == (
        "SUCCEEDED",
        {"done": 1},
        False,
    )
    assert attempts(db, task_id)[0]["outcome"] == "succeeded"


def test_complete_tasks_completes_a_batch_and_answers_in_input_order(db: Conn) -> None:
    ok = enqueue(db)
    retry = enqueue(db)
    dead = enqueue(db)
    stale = enqueue(db)
    ids = [ok, retry, dead, stale]
    rows = call_rows(db, "claim_tasks", task_ids=ids, worker_id="w")
    assert len(rows) == 4
    stale_before = task(db, stale)

    result = call_rows(
        db,
        "complete_tasks",
        task_ids=[dead, stale, ok, retry],
        attempts=[1, 2, 1, 1],
        succeeded=[False, True, True, False],
        results=[None, None, Jsonb({"n": 1}), None],
        errors=[None, None, None, "again"],
        retryable=[False, True, True, True],
    )

    assert [(r["task_id"], r["attempt"], r["status"]) for r in result] == [
        (dead, 1, "DEAD"),
        (stale, 2, None),
        (ok, 1, "SUCCEEDED"),
        (retry, 1, "PENDING"),
    ]
    assert task(db, ok)["result"] == {"n": 1}
    assert task(db, retry)["last_error"] == "again"
    assert task(db, stale) == stale_before
    assert count(db, "SELECT count(*) FROM ledgerq.attempts WHERE outcome IS NULL") == 1


def test_complete_tasks_defaults_to_retryable_failures_without_results(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    rows = call_rows(
        db, "complete_tasks", task_ids=[task_id], attempts=[attempt], succeeded=[False]
    )
    assert [r["status"] for r in rows] == ["PENDING"]


def test_complete_tasks_applies_first_outcome_of_a_task_listed_twice(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    rows = call_rows(
        db,
        "complete_tasks",
        task_ids=[task_id, task_id],
        attempts=[attempt, attempt],
        succeeded=[True, False],
    )
    assert task(db, task_id)["status"] == "SUCCEEDED"
    assert rows[0]["status"] == "SUCCEEDED"


@pytest.mark.parametrize(
    "arrays",
    [
        {"task_ids": [1, 2], "attempts": [1], "succeeded": [True, True]},
        {"task_ids": [1], "attempts": [1], "succeeded": [True, False]},
    ],
)
def test_complete_tasks_rejects_arrays_of_different_length_with_lq422(
    db: Conn, arrays: dict[str, Any]
) -> None:
    with raises_sqlstate("LQ422", "task_ids", "attempts", "succeeded"):
        call_rows(db, "complete_tasks", **arrays)


def test_task_release_makes_task_due_again_without_spending_its_budget(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=1)
    attempt = claimed(db, task_id)
    before = db_now(db)

    rows = call_rows(
        db, "task_release", task_ids=[task_id], attempts=[attempt], reason="worker stopping"
    )

    assert rows == [{"task_id": task_id, "status": "PENDING"}]
    stored = task(db, task_id)
    assert stored["status"] == "PENDING"
    assert before <= stored["run_at"] <= db_now(db)
    assert stored["last_error"] == "worker stopping"
    assert stored["lease_expires_at"] is None
    assert [(a["outcome"], a["error"]) for a in attempts(db, task_id)] == [
        ("lost", "worker stopping")
    ]
    # With max_attempts=1 the released attempt did not count: the next one may
    # still fail retryably... and then it is DEAD, its number continuing.
    second = claimed(db, task_id)
    assert second == attempt + 1
    assert complete(db, task_id, second, False) == "DEAD"


def test_task_release_default_reason_says_worker_was_shutting_down(db: Conn) -> None:
    task_id = enqueue(db)
    call_rows(db, "task_release", task_ids=[task_id], attempts=[claimed(db, task_id)])
    assert "shutting down" in task(db, task_id)["last_error"]


def test_task_release_of_cancel_requested_attempt_cancels_task(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    call_value(db, "cancel_task", task_id=task_id)

    rows = call_rows(db, "task_release", task_ids=[task_id], attempts=[attempt])

    assert rows == [{"task_id": task_id, "status": "CANCELLED"}]
    stored = task(db, task_id)
    assert (stored["status"], stored["cancel_requested"]) == ("CANCELLED", False)
    assert stored["finished_at"] is not None
    assert attempts(db, task_id)[0]["outcome"] == "cancelled"


def test_task_release_fences_out_stale_attempts(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    before = task(db, task_id)

    rows = call_rows(
        db,
        "task_release",
        task_ids=[task_id, task_id, 4040],
        attempts=[attempt + 1, attempt - 1, 1],
    )

    assert rows == [
        {"task_id": task_id, "status": None},
        {"task_id": task_id, "status": None},
        {"task_id": 4040, "status": None},
    ]
    assert task(db, task_id) == before


def test_task_release_answers_stale_and_current_attempt_of_one_task_apart(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    rows = call_rows(
        db, "task_release", task_ids=[task_id, task_id], attempts=[attempt + 1, attempt]
    )
    assert rows == [
        {"task_id": task_id, "status": None},
        {"task_id": task_id, "status": "PENDING"},
    ]
