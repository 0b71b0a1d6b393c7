"""prune_tasks, prune_tasks_batch, prune_tasks_in_batches and prune_effects."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from .helpers import (
    Conn,
    call_rows,
    call_value,
    claimed,
    complete,
    count,
    enqueue,
    raises_sqlstate,
)


def finished(
    conn: Conn, status: str, *, ago: str = "10 days", queue: str = "default", **kw: Any
) -> int:
    """A task that ended ``status`` (SUCCEEDED, DEAD or CANCELLED) ``ago``, with its attempt."""
    task_id = enqueue(conn, queue=queue, **kw)
    if status == "CANCELLED":
        assert call_value(conn, "cancel_task", task_id=task_id) == "CANCELLED"
    else:
        attempt = claimed(conn, task_id)
        outcome = complete(conn, task_id, attempt, status == "SUCCEEDED", retryable=False)
        assert outcome == status
    conn.execute(
        "UPDATE ledgerq.tasks SET finished_at = now() - %s::interval WHERE id = %s", (ago, task_id)
    )
    return task_id


def existing(conn: Conn, ids: list[int]) -> set[int]:
    rows = conn.execute("SELECT id FROM ledgerq.tasks WHERE id = ANY(%s)", (ids,)).fetchall()
    return {r[0] for r in rows}


def set_retention(conn: Conn, queue: str, retention: str) -> None:
    # configure_queue lands with flow control; the row is what prune reads.
    conn.execute(
        "INSERT INTO ledgerq.queues (queue, settings) VALUES (%s, %s) "
        "ON CONFLICT (queue) DO UPDATE SET settings = excluded.settings",
        (queue, Jsonb({"retention": retention})),
    )


def test_prune_tasks_deletes_old_succeeded_and_cancelled_tasks_with_their_attempts(
    db: Conn,
) -> None:
    old_ok = finished(db, "SUCCEEDED")
    old_cancelled = finished(db, "CANCELLED")
    old_dead = finished(db, "DEAD")
    recent_ok = finished(db, "SUCCEEDED", ago="1 day")
    pending = enqueue(db)
    running = enqueue(db)
    claimed(db, running)
    # A running task created long ago is still not prunable.
    db.execute("UPDATE ledgerq.tasks SET created_at = now() - interval '30 days'")

    assert call_value(db, "prune_tasks") == 2

    all_ids = [old_ok, old_cancelled, old_dead, recent_ok, pending, running]
    assert existing(db, all_ids) == {old_dead, recent_ok, pending, running}
    assert count(db, "SELECT count(*) FROM ledgerq.attempts WHERE task_id = %s", old_ok) == 0
    assert count(db, "SELECT count(*) FROM ledgerq.attempts WHERE task_id = %s", old_dead) == 1
    assert call_value(db, "prune_tasks") == 0


def test_prune_tasks_with_include_dead_deletes_dead_tasks_too(db: Conn) -> None:
    old_dead = finished(db, "DEAD")
    recent_dead = finished(db, "DEAD", ago="1 hour")
    assert call_value(db, "prune_tasks", older_than="2 hours", include_dead=True) == 1
    assert existing(db, [old_dead, recent_dead]) == {recent_dead}


def test_prune_tasks_honours_older_than_and_the_queue_argument(db: Conn) -> None:
    a = finished(db, "SUCCEEDED", ago="3 hours", queue="a")
    b = finished(db, "SUCCEEDED", ago="3 hours", queue="b")
    b_recent = finished(db, "SUCCEEDED", ago="1 hour", queue="b")
    assert call_value(db, "prune_tasks", older_than="2 hours", queue="b") == 1
    assert existing(db, [a, b, b_recent]) == {a, b_recent}
    assert call_value(db, "prune_tasks", older_than="0 seconds") == 2
    assert existing(db, [a, b, b_recent]) == set()


def test_a_queue_retention_setting_overrides_older_than_both_ways(db: Conn) -> None:
    set_retention(db, "brief", "1 hour")
    set_retention(db, "kept", "30 days")
    brief = finished(db, "SUCCEEDED", ago="2 hours", queue="brief")
    brief_recent = finished(db, "SUCCEEDED", ago="30 minutes", queue="brief")
    kept = finished(db, "SUCCEEDED", ago="10 days", queue="kept")
    plain = finished(db, "SUCCEEDED", ago="10 days", queue="plain")
    plain_recent = finished(db, "SUCCEEDED", ago="2 hours", queue="plain")

    assert call_value(db, "prune_tasks", older_than="7 days") == 2

    ids = [brief, brief_recent, kept, plain, plain_recent]
    assert existing(db, ids) == {brief_recent, kept, plain_recent}
    # Asked for one queue, its own setting still wins.
    assert call_value(db, "prune_tasks", older_than="1 second", queue="kept") == 0
    assert call_value(db, "prune_tasks", older_than="1 second", queue="plain") == 1


def test_a_retention_that_is_not_an_interval_counts_as_none(db: Conn) -> None:
    db.execute(
        "INSERT INTO ledgerq.queues (queue, settings) VALUES ('odd', %s)",
        (Jsonb({"retention": "whenever"}),),
    )
    old = finished(db, "SUCCEEDED", queue="odd")
    assert call_value(db, "prune_tasks", older_than="1 day") == 1
    assert existing(db, [old]) == set()


def test_prune_tasks_works_in_batches_and_counts_them_all(db: Conn) -> None:
    ids = [finished(db, "SUCCEEDED", ago=f"{2 + n} days") for n in range(7)]
    assert call_value(db, "prune_tasks_batch", older_than="1 day", batch_size=3) == 3
    # Oldest first.
    assert existing(db, ids) == set(ids[:4])
    assert call_value(db, "prune_tasks", older_than="1 day", batch_size=2) == 4
    assert existing(db, ids) == set()


def test_prune_tasks_in_batches_commits_after_each_batch(db: Conn) -> None:
    ids = [finished(db, "SUCCEEDED") for _ in range(5)]
    (row,) = db.execute(
        "CALL ledgerq.prune_tasks_in_batches(older_than => '1 day', batch_size => 2)"
    ).fetchall()
    assert row == (5,)
    assert existing(db, ids) == set()
    # Inside a transaction it cannot commit, and says so.
    with pytest.raises(psycopg.errors.InvalidTransactionTermination), db.transaction():
        db.execute("CALL ledgerq.prune_tasks_in_batches(older_than => '1 day')")


def test_effects_are_kept_and_their_task_ids_cleared_until_prune_effects(db: Conn) -> None:
    task_id = finished(db, "SUCCEEDED")
    live_id = enqueue(db)
    assert call_value(db, "record_effect", effect_key="mail:1", task_id=task_id) is True
    assert call_value(db, "record_effect", effect_key="mail:live", task_id=live_id) is True
    db.execute(
        "INSERT INTO ledgerq.effect_starts (effect_key, task_id, attempt) VALUES ('pay:1', %s, 1)",
        (task_id,),
    )

    assert call_value(db, "prune_tasks") == 1

    assert db.execute(
        "SELECT effect_key, task_id FROM ledgerq.effects ORDER BY effect_key"
    ).fetchall() == [("mail:1", None), ("mail:live", live_id)]
    assert db.execute("SELECT effect_key, task_id FROM ledgerq.effect_starts").fetchall() == [
        ("pay:1", None)
    ]
    # The effect still guards: recording it again is refused.
    assert call_value(db, "record_effect", effect_key="mail:1", task_id=live_id) is False

    assert call_value(db, "prune_effects", older_than="1 hour") == 0
    db.execute("UPDATE ledgerq.effects SET recorded_at = now() - interval '2 hours'")
    db.execute("UPDATE ledgerq.effect_starts SET started_at = now() - interval '2 hours'")
    # The live task's effect stays: it may still be retried.
    assert call_value(db, "prune_effects", older_than="1 hour") == 1
    assert db.execute("SELECT effect_key FROM ledgerq.effects").fetchall() == [("mail:live",)]
    assert count(db, "SELECT count(*) FROM ledgerq.effect_starts") == 0


def test_a_pruned_tasks_idempotency_key_can_be_used_again(db: Conn) -> None:
    old = finished(db, "SUCCEEDED", idempotency_key="order-7", payload={"n": 1})
    with raises_sqlstate("LQ409", "order-7"):
        call_rows(db, "enqueue_task", task_type="email.send", payload={"n": 2},
                  idempotency_key="order-7")  # fmt: skip

    assert call_value(db, "prune_tasks") == 1

    (row,) = call_rows(db, "enqueue_task", task_type="email.send", payload={"n": 2},
                       idempotency_key="order-7")  # fmt: skip
    assert row["created"] is True
    assert row["id"] != old


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"older_than": "-1 day"}, ("older_than", "-1 days")),
        ({"batch_size": 0}, ("batch_size", "0")),
        ({"older_than": None}, ("older_than", "NULL")),
    ],
)
def test_bad_arguments_raise_lq422_naming_them(
    db: Conn, arguments: dict[str, Any], words: tuple[str, ...]
) -> None:
    for function in ("prune_tasks", "prune_tasks_batch"):
        with raises_sqlstate("LQ422", *words):
            call_value(db, function, **arguments)
    if "older_than" in arguments:
        with raises_sqlstate("LQ422", *words):
            call_value(db, "prune_effects", older_than=arguments["older_than"])


def test_concurrent_pruners_delete_each_task_once(db: Conn, db_url: str) -> None:
    db.execute(
        """
        INSERT INTO ledgerq.tasks (task_type, queue, status, attempts, started_at, finished_at)
        SELECT 'job', 'default', 'SUCCEEDED', 1, now() - interval '9 days',
               now() - interval '8 days' - g * interval '1 second'
        FROM generate_series(1, 3000) g
        """
    )
    db.execute(
        "INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, finished_at, outcome) "
        "SELECT id, 1, 'w', finished_at, 'succeeded' FROM ledgerq.tasks"
    )
    counts: list[int] = []
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def prune() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                start.wait()
                counts.append(int(call_value(conn, "prune_tasks", batch_size=100)))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=prune) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert failures == []
    assert sum(counts) == 3000
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 0


def test_the_retention_configure_queue_sets_is_the_one_prune_honours(db: Conn) -> None:
    db.execute(
        "SELECT ledgerq.configure_queue(queue => 'brief', settings => %s)",
        (Jsonb({"retention": "1 hour"}),),
    )
    brief = finished(db, "SUCCEEDED", ago="2 hours", queue="brief")
    other = finished(db, "SUCCEEDED", ago="2 hours", queue="other")
    assert call_value(db, "prune_tasks") == 1
    assert existing(db, [brief, other]) == {other}
    # Removing the setting (JSON null) puts the queue back on older_than.
    db.execute(
        "SELECT ledgerq.configure_queue(queue => 'brief', settings => %s)",
        (Jsonb({"retention": None}),),
    )
    again = finished(db, "SUCCEEDED", ago="2 hours", queue="brief")
    assert call_value(db, "prune_tasks") == 0
    assert call_value(db, "prune_tasks", older_than="1 hour") == 2
    assert existing(db, [again, other]) == set()
