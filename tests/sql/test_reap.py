"""reap_stuck / task_reap, and the dispatcher's helpers (task_take_due, task_queued_*)."""

from __future__ import annotations

import datetime as dt
import threading

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from .helpers import (
    Conn,
    age_queued,
    attempts,
    call_rows,
    call_value,
    claimed,
    complete,
    count,
    db_now,
    enqueue,
    expire_lease,
    task,
)


def reap(conn: Conn, *, ahead: str | None = None, redelivery_timeout: str | None = None) -> int:
    """task_reap with the clock moved ``ahead`` (an interval) of now()."""
    as_of = None
    if ahead is not None:
        row = conn.execute("SELECT now() + %s::interval", (ahead,)).fetchone()
        assert row is not None
        as_of = row[0]
    return int(call_value(conn, "task_reap", as_of=as_of, redelivery_timeout=redelivery_timeout))


def take_due(conn: Conn, **arguments: object) -> list[int]:
    return [row["id"] for row in call_rows(conn, "task_take_due", **arguments)]


def test_reap_stuck_requeues_task_whose_lease_expired(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=3)
    attempt = claimed(db, task_id, "dead-worker")
    expire_lease(db, task_id)
    before = db_now(db)

    assert call_value(db, "reap_stuck") == 1

    after = db_now(db)
    stored = task(db, task_id)
    assert stored["status"] == "PENDING"
    assert stored["lease_expires_at"] is None
    assert stored["finished_at"] is None
    assert stored["attempts"] == attempt
    assert "dead-worker" in stored["last_error"]
    # Retried with backoff: compute_backoff(1) is in [0, 1] s.
    assert before <= stored["run_at"] <= after + dt.timedelta(seconds=1)
    (row,) = attempts(db, task_id)
    assert row["outcome"] == "lost"
    assert row["error"] == stored["last_error"]
    assert before <= row["finished_at"] <= after


def test_reap_stuck_backoff_grows_with_the_attempt_number(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=10)
    for _ in range(4):
        claimed(db, task_id)
        complete(db, task_id, task(db, task_id)["attempts"], False)
        db.execute("UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,))
    claimed(db, task_id)  # attempt 5
    expire_lease(db, task_id)
    before = db_now(db)

    assert call_value(db, "reap_stuck") == 1

    assert before <= task(db, task_id)["run_at"] <= db_now(db) + dt.timedelta(seconds=16)


def test_reap_stuck_sends_lost_last_attempt_to_dead(db: Conn) -> None:
    task_id = enqueue(db, max_attempts=1)
    claimed(db, task_id)
    expire_lease(db, task_id)

    assert call_value(db, "reap_stuck") == 1

    stored = task(db, task_id)
    assert stored["status"] == "DEAD"
    assert stored["finished_at"] is not None
    assert stored["lease_expires_at"] is None
    assert [a["outcome"] for a in attempts(db, task_id)] == ["lost"]


def test_reap_stuck_cancels_expired_task_whose_cancellation_was_requested(db: Conn) -> None:
    task_id = enqueue(db)
    claimed(db, task_id)
    call_value(db, "cancel_task", task_id=task_id)
    expire_lease(db, task_id)

    assert call_value(db, "reap_stuck") == 1

    stored = task(db, task_id)
    assert (stored["status"], stored["cancel_requested"]) == ("CANCELLED", False)
    assert stored["finished_at"] is not None
    assert [a["outcome"] for a in attempts(db, task_id)] == ["cancelled"]


def test_reap_stuck_leaves_running_task_with_live_lease_alone(db: Conn) -> None:
    task_id = enqueue(db)
    claimed(db, task_id, lease_seconds=60)
    before = task(db, task_id)

    assert call_value(db, "reap_stuck") == 0

    assert task(db, task_id) == before
    assert attempts(db, task_id)[0]["outcome"] is None


def test_task_reap_with_advanced_clock_recovers_lease_that_will_have_expired(db: Conn) -> None:
    task_id = enqueue(db)
    claimed(db, task_id, lease_seconds=60)

    assert reap(db, ahead="30 seconds") == 0
    assert task(db, task_id)["status"] == "RUNNING"
    assert reap(db, ahead="61 seconds") == 1
    assert task(db, task_id)["status"] == "PENDING"


def test_reaped_worker_is_fenced_out_of_completing_and_heartbeating(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    expire_lease(db, task_id)
    call_value(db, "reap_stuck")
    before = task(db, task_id)

    assert complete(db, task_id, attempt, True) is None
    assert call_value(db, "heartbeat", task_id=task_id, attempt=attempt) == "lost"
    assert task(db, task_id) == before


def test_reap_stuck_redispatches_queued_task_older_than_redelivery_timeout(db: Conn) -> None:
    task_id = enqueue(db)
    assert take_due(db) == [task_id]

    assert reap(db, ahead="31 seconds") == 1

    stored = task(db, task_id)
    assert (stored["status"], stored["queued_at"]) == ("PENDING", None)
    assert stored["attempts"] == 0
    assert attempts(db, task_id) == []
    assert take_due(db) == [task_id]


def test_reap_stuck_leaves_freshly_queued_task_alone(db: Conn) -> None:
    task_id = enqueue(db)
    take_due(db)
    before = task(db, task_id)

    assert reap(db, ahead="29 seconds") == 0
    assert call_value(db, "reap_stuck") == 0

    assert task(db, task_id) == before


def test_reap_stuck_with_real_clock_redispatches_a_long_queued_task(db: Conn) -> None:
    task_id = enqueue(db)
    take_due(db)
    age_queued(db, task_id, "31 seconds")
    assert call_value(db, "reap_stuck") == 1
    assert task(db, task_id)["status"] == "PENDING"


def test_task_reap_takes_redelivery_timeout_argument(db: Conn) -> None:
    task_id = enqueue(db)
    take_due(db)
    assert reap(db, ahead="5 minutes", redelivery_timeout="10 minutes") == 0
    assert reap(db, ahead="5 minutes", redelivery_timeout="4 minutes") == 1
    assert task(db, task_id)["status"] == "PENDING"


def test_reap_stuck_honours_redelivery_timeout_setting(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        task_id = enqueue(conn)
        take_due(conn)
        conn.execute("SET ledgerq.redelivery_timeout = '2 minutes'")

        assert reap(conn, ahead="90 seconds") == 0
        assert task(conn, task_id)["status"] == "QUEUED"
        assert reap(conn, ahead="121 seconds") == 1
        assert task(conn, task_id)["status"] == "PENDING"


def test_redelivery_timeout_set_on_the_database_applies_to_new_sessions(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET ledgerq.redelivery_timeout = '10s'").format(
                sql.Identifier(conn.info.dbname)
            )
        )
    with psycopg.connect(db_url, autocommit=True) as conn:
        task_id = enqueue(conn)
        take_due(conn)
        age_queued(conn, task_id, "11 seconds")
        assert call_value(conn, "reap_stuck") == 1


def test_task_queued_confirm_restarts_the_redelivery_clock(db: Conn) -> None:
    waiting = enqueue(db)
    lost = enqueue(db)
    take_due(db)
    age_queued(db, waiting, "25 seconds")
    age_queued(db, lost, "25 seconds")

    # The dispatcher saw `waiting` still in Redis' backlog.
    assert call_value(db, "task_queued_confirm", task_ids=[waiting, 999999]) == 1
    assert reap(db, ahead="10 seconds") == 1

    assert task(db, waiting)["status"] == "QUEUED"
    assert task(db, lost)["status"] == "PENDING"


def test_task_queued_confirm_ignores_tasks_that_are_not_queued(db: Conn) -> None:
    task_id = enqueue(db)
    before = task(db, task_id)
    assert call_value(db, "task_queued_confirm", task_ids=[task_id]) == 0
    assert task(db, task_id) == before


def test_task_queued_stale_lists_queued_tasks_older_than_given_age_oldest_first(
    db: Conn,
) -> None:
    young = enqueue(db, queue="a")
    old = enqueue(db, queue="b", priority=4)
    older = enqueue(db, queue="c")
    enqueue(db)  # still PENDING
    take_due(db, batch_size=3)
    age_queued(db, old, "2 minutes")
    age_queued(db, older, "3 minutes")
    age_queued(db, young, "10 seconds")

    rows = call_rows(db, "task_queued_stale", older_than="1 minute")

    assert rows == [
        {
            "id": older, "queue": "c", "priority": 0, "turn": 0,
            "run_at": task(db, older)["run_at"], "queued_at": task(db, older)["queued_at"],
        },
        {
            "id": old, "queue": "b", "priority": 4, "turn": 0,
            "run_at": task(db, old)["run_at"], "queued_at": task(db, old)["queued_at"],
        },
    ]  # fmt: skip
    assert [r["run_at"] for r in rows] == [task(db, older)["run_at"], task(db, old)["run_at"]]
    assert [
        r["id"] for r in call_rows(db, "task_queued_stale", older_than="1 minute", batch_size=1)
    ] == [older]
    assert (
        len(
            call_rows(
                db,
                "task_queued_stale",
                older_than="1 minute",
                as_of=db_now(db) + dt.timedelta(minutes=1),
            )
        )
        == 3
    )


def test_task_take_due_queues_due_tasks_by_priority_then_run_at_then_creation(db: Conn) -> None:
    now = db_now(db)
    low = enqueue(db, priority=-1)
    first = enqueue(db, run_at=now - dt.timedelta(minutes=2))
    second = enqueue(db, run_at=now - dt.timedelta(minutes=1))
    same_run_at_created_later = enqueue(db, run_at=now - dt.timedelta(minutes=1))
    urgent = enqueue(db, priority=10)
    future = enqueue(db, priority=100, run_at=now + dt.timedelta(hours=1))

    rows = call_rows(db, "task_take_due", batch_size=3)

    assert {r["id"] for r in rows} == {urgent, first, second}
    for row in rows:
        stored = task(db, row["id"])
        assert stored["status"] == "QUEUED"
        assert stored["queued_at"] is not None
        assert (row["queue"], row["priority"], row["run_at"]) == (
            stored["queue"], stored["priority"], stored["run_at"]
        )  # fmt: skip
    assert take_due(db, batch_size=1) == [same_run_at_created_later]
    assert take_due(db, batch_size=1) == [low]
    assert take_due(db) == []
    assert task(db, future)["status"] == "PENDING"
    # With the clock moved past its run_at, the future task is due.
    assert take_due(db, as_of=now + dt.timedelta(hours=2)) == [future]


def test_task_take_due_default_batch_is_100(db: Conn) -> None:
    call_rows(db, "enqueue_tasks", tasks=Jsonb([{"task_type": "t"}] * 150))
    assert len(take_due(db)) == 100
    assert len(take_due(db)) == 50
    assert take_due(db) == []


def test_concurrent_task_take_due_batches_are_disjoint(db_url: str, db: Conn) -> None:
    for _ in range(40):
        enqueue(db)
    with psycopg.connect(db_url) as one, psycopg.connect(db_url) as two:
        first = take_due(one, batch_size=25)
        second = take_due(two, batch_size=25)  # skips the rows `one` holds
        one.commit()
        two.commit()
    assert len(first) == 25
    assert len(second) == 15
    assert not set(first) & set(second)


def test_task_take_due_rolled_back_leaves_tasks_pending(db_url: str, db: Conn) -> None:
    task_id = enqueue(db)
    with psycopg.connect(db_url) as conn:
        assert take_due(conn) == [task_id]
        conn.rollback()
    assert task(db, task_id)["status"] == "PENDING"


def test_task_next_run_at_is_the_earliest_pending_run_at(db: Conn) -> None:
    assert call_value(db, "task_next_run_at") is None
    now = db_now(db)
    enqueue(db, run_at=now + dt.timedelta(minutes=5))
    soon = enqueue(db, run_at=now + dt.timedelta(minutes=1))
    assert call_value(db, "task_next_run_at") == task(db, soon)["run_at"]


def test_concurrent_reapers_recover_each_task_once(db_url: str, db: Conn) -> None:
    ids = [enqueue(db, max_attempts=3) for _ in range(20)]
    call_rows(db, "claim_tasks", task_ids=ids, worker_id="crashed")
    db.execute("UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 second'")
    reapers = 4
    barrier = threading.Barrier(reapers)
    counts: list[int] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                barrier.wait(timeout=10)
                counts.append(int(call_value(conn, "reap_stuck")))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(reapers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert sum(counts) == len(ids)
    assert count(db, "SELECT count(*) FROM ledgerq.attempts WHERE outcome = 'lost'") == len(ids)
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'PENDING'") == len(ids)


@pytest.mark.parametrize("status", ["PENDING", "SUCCEEDED", "DEAD", "CANCELLED"])
def test_reap_stuck_ignores_tasks_in_other_states_even_far_in_the_future(
    db: Conn, status: str
) -> None:
    task_id = enqueue(db)
    if status == "SUCCEEDED":
        complete(db, task_id, claimed(db, task_id), True)
    elif status == "DEAD":
        complete(db, task_id, claimed(db, task_id), False, retryable=False)
    elif status == "CANCELLED":
        call_value(db, "cancel_task", task_id=task_id)
    before = task(db, task_id)

    assert reap(db, ahead="1 day") == 0

    assert task(db, task_id) == before


@pytest.mark.parametrize("setting", ["banana", "-5 minutes", "0"])
def test_reap_stuck_with_a_bad_redelivery_timeout_setting_warns_and_uses_30_seconds(
    db_url: str, setting: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        warnings: list[str] = []
        conn.add_notice_handler(
            lambda d: warnings.append(d.message_primary or "") if d.severity == "WARNING" else None
        )
        task_id = enqueue(conn)
        take_due(conn)
        conn.execute("SELECT set_config('ledgerq.redelivery_timeout', %s, false)", (setting,))

        assert call_value(conn, "reap_stuck") == 0
        assert task(conn, task_id)["status"] == "QUEUED"
        age_queued(conn, task_id, "31 seconds")
        assert call_value(conn, "reap_stuck") == 1
        assert task(conn, task_id)["status"] == "PENDING"

    assert len(warnings) == 2
    assert all("ledgerq.redelivery_timeout" in w and setting in w for w in warnings)


def test_a_sweep_vouches_for_a_whole_queue_and_reap_stuck_believes_it(db: Conn) -> None:
    first, second = enqueue(db, queue="a"), enqueue(db, queue="a")
    other = enqueue(db, queue="b")
    take_due(db, batch_size=3)
    for task_id in (first, second, other):
        age_queued(db, task_id, "2 minutes")
    # Pages: after the first row, the second; the cursor is (queued_at, id).
    (page,) = call_rows(db, "task_queued_stale", older_than="1 minute", batch_size=1)
    rest = call_rows(
        db, "task_queued_stale", older_than="1 minute",
        after_queued_at=page["queued_at"], after_id=page["id"],
    )  # fmt: skip
    assert [page["id"], *(r["id"] for r in rest)] == sorted([first, second, other])
    # The sweep found queue a's tasks in Redis: one row vouches for both.
    assert call_value(db, "task_queued_seen", queues=["a", "a"], older_than="1 minute",
                      as_of=db_now(db)) == 1  # fmt: skip
    assert [r["id"] for r in call_rows(db, "task_queued_stale", older_than="1 minute")] == [other]
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'QUEUED'") == 3
    # Past the redelivery timeout only the task nobody vouched for goes back.
    assert call_value(db, "reap_stuck") == 1
    assert task(db, other)["status"] == "PENDING"
    assert task(db, first)["status"] == task(db, second)["status"] == "QUEUED"
    # A vouch older than the redelivery timeout vouches for nothing.
    db.execute("UPDATE ledgerq.queued_seen SET seen_at = seen_at - interval '1 minute'")
    assert call_value(db, "reap_stuck") == 2
