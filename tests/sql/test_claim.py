"""claim_task / claim_tasks and heartbeat / heartbeat_tasks: leases and attempts."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import psycopg
import pytest

from .helpers import (
    Conn,
    attempts,
    call_rows,
    call_value,
    claim,
    claimed,
    count,
    db_now,
    enqueue,
    raises_sqlstate,
    task,
    wait_for_lock_waiters,
)


def test_claim_task_moves_due_pending_task_to_running_under_a_lease(db: Conn) -> None:
    task_id = enqueue(db)
    before = db_now(db)

    row = claim(db, task_id, "worker-a", lease_seconds=45)

    after = db_now(db)
    assert row is not None
    assert row == task(db, task_id)  # returns the whole, updated tasks row
    assert row["status"] == "RUNNING"
    assert row["attempts"] == 1
    assert row["worker_id"] == "worker-a"
    assert before <= row["started_at"] <= after
    assert row["lease_expires_at"] - row["started_at"] == dt.timedelta(seconds=45)
    assert row["queued_at"] is None
    (attempt,) = attempts(db, task_id)
    assert attempt["attempt"] == 1
    assert attempt["worker_id"] == "worker-a"
    assert attempt["started_at"] == row["started_at"]
    assert (attempt["finished_at"], attempt["outcome"], attempt["error"]) == (None, None, None)


def test_claim_task_default_lease_is_30_seconds(db: Conn) -> None:
    row = claim(db, enqueue(db))
    assert row is not None
    assert row["lease_expires_at"] - row["started_at"] == dt.timedelta(seconds=30)


def test_claim_task_claims_queued_task(db: Conn) -> None:
    task_id = enqueue(db)
    assert [r["id"] for r in call_rows(db, "task_take_due")] == [task_id]
    assert task(db, task_id)["status"] == "QUEUED"

    row = claim(db, task_id)

    assert row is not None
    assert (row["status"], row["queued_at"]) == ("RUNNING", None)


def test_claim_task_claims_queued_task_even_if_its_run_at_is_in_future(db: Conn) -> None:
    # A QUEUED task was due when it was dispatched: Redis delivery decides.
    task_id = enqueue(db)
    call_rows(db, "task_take_due")
    db.execute(
        "UPDATE ledgerq.tasks SET run_at = now() + interval '1 hour' WHERE id = %s", (task_id,)
    )
    assert claim(db, task_id) is not None


def test_claim_task_returns_no_row_for_pending_task_not_yet_due(db: Conn) -> None:
    task_id = enqueue(db, run_at=db_now(db) + dt.timedelta(minutes=5))
    before = task(db, task_id)

    assert claim(db, task_id) is None

    assert task(db, task_id) == before
    assert attempts(db, task_id) == []


def test_claim_task_returns_no_row_for_unknown_task(db: Conn) -> None:
    assert claim(db, 424242) is None
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 0


def test_claim_task_returns_no_row_for_running_task(db: Conn) -> None:
    task_id = enqueue(db)
    claimed(db, task_id, "worker-a")
    before = task(db, task_id)

    assert claim(db, task_id, "worker-b") is None

    assert task(db, task_id) == before
    assert len(attempts(db, task_id)) == 1


@pytest.mark.parametrize("final", ["SUCCEEDED", "DEAD", "CANCELLED"])
def test_claim_task_returns_no_row_for_final_task(db: Conn, final: str) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    if final == "SUCCEEDED":
        call_value(db, "complete_task", task_id=task_id, attempt=attempt, succeeded=True)
    elif final == "DEAD":
        call_value(
            db,
            "complete_task",
            task_id=task_id,
            attempt=attempt,
            succeeded=False,
            retryable=False,
        )
    else:
        call_value(db, "cancel_task", task_id=task_id)
        call_value(db, "complete_task", task_id=task_id, attempt=attempt, succeeded=False)
    assert task(db, task_id)["status"] == final
    before = task(db, task_id)

    assert claim(db, task_id) is None
    assert task(db, task_id) == before


def test_claim_task_returns_no_row_for_cancelled_queued_task(db: Conn) -> None:
    task_id = enqueue(db)
    call_rows(db, "task_take_due")
    assert call_value(db, "cancel_task", task_id=task_id) == "CANCELLED"
    assert claim(db, task_id) is None


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"worker_id": ""}, "worker_id"),
        ({"worker_id": None}, "worker_id"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"lease_seconds": -5}, "lease_seconds"),
        ({"lease_seconds": None}, "lease_seconds"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("function", ["claim_task", "claim_tasks"])
def test_claim_rejects_bad_argument_with_lq422_naming_the_field(
    db: Conn, function: str, arguments: dict[str, Any], field: str
) -> None:
    task_id = enqueue(db)
    ids: dict[str, Any] = (
        {"task_id": task_id} if function == "claim_task" else {"task_ids": [task_id]}
    )
    with raises_sqlstate("LQ422", field):
        call_rows(db, function, **{**ids, "worker_id": "w", **arguments})
    assert task(db, task_id)["status"] == "PENDING"


def test_concurrent_claims_of_one_task_have_exactly_one_winner(db_url: str, db: Conn) -> None:
    task_id = enqueue(db)
    call_rows(db, "task_take_due")
    workers = 20
    barrier = threading.Barrier(workers)
    results: dict[str, Any] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def race(worker_id: str) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                barrier.wait(timeout=10)
                row = claim(conn, task_id, worker_id)
            with lock:
                results[worker_id] = row
        except BaseException as exc:
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=race, args=(f"w{n}",)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert len(results) == workers
    winners = [worker for worker, row in results.items() if row is not None]
    assert len(winners) == 1
    stored = task(db, task_id)
    assert (stored["status"], stored["attempts"], stored["worker_id"]) == (
        "RUNNING",
        1,
        winners[0],
    )
    assert [(a["attempt"], a["worker_id"]) for a in attempts(db, task_id)] == [(1, winners[0])]


def test_claim_task_waits_for_a_transaction_holding_the_row_then_claims(
    db_url: str, db: Conn
) -> None:
    # A worker may pop an id while the dispatcher's transaction still holds the
    # row: it must wait and claim, not skip the task.
    task_id = enqueue(db)
    with psycopg.connect(db_url) as dispatcher:
        assert [r["id"] for r in call_rows(dispatcher, "task_take_due")] == [task_id]
        outcome: list[Any] = []
        thread = threading.Thread(target=lambda: outcome.append(claim(db, task_id)))
        thread.start()
        wait_for_lock_waiters(dispatcher)
        dispatcher.commit()
    thread.join(timeout=10)
    assert len(outcome) == 1
    assert outcome[0] is not None
    assert outcome[0]["status"] == "RUNNING"


def test_claim_tasks_claims_only_the_claimable_ones(db: Conn) -> None:
    due = enqueue(db)
    queued = enqueue(db)
    call_rows(db, "task_take_due")  # both QUEUED now
    later = enqueue(db, run_at=db_now(db) + dt.timedelta(hours=1))
    running = enqueue(db)
    claimed(db, running, "other-worker")
    pending_due = enqueue(db)

    rows = call_rows(
        db,
        "claim_tasks",
        task_ids=[due, queued, later, running, pending_due, 999999],
        worker_id="batch-worker",
        lease_seconds=10,
    )

    assert sorted(r["id"] for r in rows) == sorted([due, queued, pending_due])
    for row in rows:
        assert row == task(db, row["id"])
        assert (row["status"], row["worker_id"], row["attempts"]) == ("RUNNING", "batch-worker", 1)
        assert row["lease_expires_at"] - row["started_at"] == dt.timedelta(seconds=10)
    assert task(db, later)["status"] == "PENDING"
    assert task(db, running)["worker_id"] == "other-worker"
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 4


def test_claim_tasks_with_a_duplicated_id_claims_it_once(db: Conn) -> None:
    task_id = enqueue(db)
    rows = call_rows(db, "claim_tasks", task_ids=[task_id, task_id], worker_id="w")
    assert [r["id"] for r in rows] == [task_id]
    assert len(attempts(db, task_id)) == 1


def test_claim_tasks_with_empty_array_claims_nothing(db: Conn) -> None:
    enqueue(db)
    assert call_rows(db, "claim_tasks", task_ids=[], worker_id="w") == []
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'RUNNING'") == 0


def test_concurrent_overlapping_claim_batches_never_claim_a_task_twice(
    db_url: str, db: Conn
) -> None:
    ids = [enqueue(db) for _ in range(30)]
    workers = 6
    barrier = threading.Barrier(workers)
    won: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def race(n: int) -> None:
        # Each worker asks for the ids in its own order: id-ordered locking
        # keeps them from deadlocking.
        mine = ids[n:] + ids[:n] if n % 2 else list(reversed(ids))
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                barrier.wait(timeout=10)
                rows = call_rows(conn, "claim_tasks", task_ids=mine, worker_id=f"w{n}")
            with lock:
                won.extend(r["id"] for r in rows)
        except BaseException as exc:
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert sorted(won) == sorted(ids)
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == len(ids)


def test_heartbeat_extends_lease_of_current_attempt(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id, lease_seconds=5)
    before = db_now(db)

    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt, lease_seconds=120) == "ok"

    lease = task(db, task_id)["lease_expires_at"]
    assert before + dt.timedelta(seconds=120) <= lease <= db_now(db) + dt.timedelta(seconds=120)


def test_heartbeat_default_lease_is_30_seconds(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id, lease_seconds=1)
    before = db_now(db)
    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt) == "ok"
    lease = task(db, task_id)["lease_expires_at"]
    assert before + dt.timedelta(seconds=30) <= lease <= db_now(db) + dt.timedelta(seconds=30)


def test_heartbeat_renews_an_expired_lease_the_reaper_has_not_taken(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    db.execute(
        "UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 minute' WHERE id = %s",
        (task_id,),
    )
    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt) == "ok"
    assert task(db, task_id)["lease_expires_at"] > db_now(db)


def test_heartbeat_reports_cancel_when_cancellation_was_requested(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    assert call_value(db, "cancel_task", task_id=task_id) == "RUNNING"

    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt) == "cancel"
    assert task(db, task_id)["status"] == "RUNNING"


def test_heartbeat_reports_lost_for_stale_attempt_and_leaves_lease_alone(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    before = task(db, task_id)

    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt + 1) == "lost"
    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt - 1) == "lost"

    assert task(db, task_id) == before


def test_heartbeat_reports_lost_once_attempt_was_reaped_and_task_reclaimed(db: Conn) -> None:
    task_id = enqueue(db)
    first = claimed(db, task_id, "worker-a")
    db.execute("UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 s'")
    assert call_value(db, "reap_stuck") == 1
    db.execute("UPDATE ledgerq.tasks SET run_at = now()")  # skip the backoff
    second = claimed(db, task_id, "worker-b")

    assert call_value(db, "heartbeat", task_id=task_id, attempt=first) == "lost"
    assert call_value(db, "heartbeat", task_id=task_id, attempt=second) == "ok"


@pytest.mark.parametrize("status", ["PENDING", "SUCCEEDED"])
def test_heartbeat_reports_lost_for_task_not_running(db: Conn, status: str) -> None:
    task_id = enqueue(db)
    if status == "SUCCEEDED":
        attempt = claimed(db, task_id)
        call_value(db, "complete_task", task_id=task_id, attempt=attempt, succeeded=True)
    assert call_value(db, "heartbeat", task_id=task_id, attempt=1) == "lost"


def test_heartbeat_reports_lost_for_unknown_task(db: Conn) -> None:
    assert call_value(db, "heartbeat", task_id=31337, attempt=1) == "lost"


@pytest.mark.parametrize("lease_seconds", [0, -1, None])
def test_heartbeat_rejects_bad_lease_with_lq422(db: Conn, lease_seconds: int | None) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    with raises_sqlstate("LQ422", "lease_seconds"):
        call_value(db, "heartbeat", task_id=task_id, attempt=attempt, lease_seconds=lease_seconds)


def test_heartbeat_tasks_answers_each_pair_in_input_order(db: Conn) -> None:
    ok_id = enqueue(db)
    ok_attempt = claimed(db, ok_id)
    cancel_id = enqueue(db)
    cancel_attempt = claimed(db, cancel_id)
    call_value(db, "cancel_task", task_id=cancel_id)
    pending_id = enqueue(db)

    rows = call_rows(
        db,
        "heartbeat_tasks",
        task_ids=[cancel_id, 777777, ok_id, pending_id, ok_id],
        attempts=[cancel_attempt, 1, ok_attempt, 1, ok_attempt + 1],
        lease_seconds=60,
    )

    assert [(r["task_id"], r["attempt"], r["state"]) for r in rows] == [
        (cancel_id, cancel_attempt, "cancel"),
        (777777, 1, "lost"),
        (ok_id, ok_attempt, "ok"),
        (pending_id, 1, "lost"),
        # A stale attempt of a task listed twice is still fenced out.
        (ok_id, ok_attempt + 1, "lost"),
    ]


def test_heartbeat_tasks_rejects_arrays_of_different_length_with_lq422(db: Conn) -> None:
    with raises_sqlstate("LQ422", "task_ids", "attempts"):
        call_rows(db, "heartbeat_tasks", task_ids=[1, 2], attempts=[1])


def test_plans_made_on_an_empty_table_find_tasks_by_id_behind_a_backlog(db: Conn) -> None:
    """A worker's session keeps its generic plans until the table is analyzed.
    Made while the table was empty (a fresh deploy), they must still look
    tasks up by primary key once 5,000 tasks wait, not read every one of them."""

    def one_cycle() -> tuple[int, int, int]:
        task_id = enqueue(db)
        db.execute("SELECT count(*) FROM ledgerq.task_take_due(1)")
        reads = []
        with db.transaction():
            for statement in (
                "SELECT attempts FROM ledgerq.task_claim(ARRAY[%(id)s]::bigint[], 'w')",
                "SELECT * FROM ledgerq.heartbeat_tasks(ARRAY[%(id)s]::bigint[], ARRAY[1])",
                "SELECT * FROM ledgerq.complete_tasks(ARRAY[%(id)s]::bigint[], ARRAY[1],"
                " ARRAY[true])",
            ):
                before = count(db, READ)
                db.execute(statement, {"id": task_id})
                reads.append(count(db, READ) - before)
        assert task(db, task_id)["status"] == "SUCCEEDED"
        return reads[0], reads[1], reads[2]

    one_cycle()  # the plans, made on a table with one task
    db.execute(
        "INSERT INTO ledgerq.tasks (task_type, queue, status, queued_at)"
        " SELECT 't', 'default', 'QUEUED', now() FROM generate_series(1, 5000)"
    )
    claim_reads, heartbeat_reads, complete_reads = one_cycle()
    assert claim_reads < 50, claim_reads
    assert heartbeat_reads < 50, heartbeat_reads
    assert complete_reads < 50, complete_reads


# Rows this transaction read from ledgerq.tasks: index entries of every index
# of the table, plus rows read by sequential scans.
READ = """
    SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)
           + coalesce((SELECT seq_tup_read FROM pg_stat_xact_user_tables
                       WHERE relid = 'ledgerq.tasks'::regclass), 0)
    FROM pg_index i WHERE i.indrelid = 'ledgerq.tasks'::regclass
"""
