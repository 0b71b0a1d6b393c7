"""record_effect, effect_lock and effect_result: the log that stops a side effect running twice."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from .helpers import (
    Conn,
    call_rows,
    call_value,
    count,
    enqueue,
    raises_sqlstate,
    wait_for_lock_waiters,
)


def record(conn: Conn, effect_key: str, task_id: int | None, **arguments: Any) -> bool:
    return bool(
        call_value(conn, "record_effect", effect_key=effect_key, task_id=task_id, **arguments)
    )


def test_record_effect_is_true_once_then_false(db: Conn) -> None:
    task_id = enqueue(db)

    assert record(db, "email:welcome:42", task_id, result={"message_id": "m-1"}) is True
    assert record(db, "email:welcome:42", task_id, result={"message_id": "m-2"}) is False

    rows = call_rows(db, "effect_result", effect_key="email:welcome:42")
    assert [(r["task_id"], r["result"]) for r in rows] == [(task_id, {"message_id": "m-1"})]
    assert count(db, "SELECT count(*) FROM ledgerq.effects") == 1


def test_record_effect_is_false_when_another_task_recorded_the_key(db: Conn) -> None:
    assert record(db, "payment:7", enqueue(db)) is True
    assert record(db, "payment:7", enqueue(db)) is False


def test_record_effect_result_defaults_to_null_and_task_may_be_null(db: Conn) -> None:
    assert record(db, "manual-op", None) is True
    (row,) = call_rows(db, "effect_result", effect_key="manual-op")
    assert (row["task_id"], row["result"]) == (None, None)


def test_record_effect_in_rolled_back_transaction_is_forgotten(db_url: str, db: Conn) -> None:
    task_id = enqueue(db)
    with psycopg.connect(db_url) as conn:
        assert record(conn, "sms:1", task_id) is True
        conn.rollback()
    assert record(db, "sms:1", task_id) is True


def test_effect_result_of_unknown_key_is_empty(db: Conn) -> None:
    assert call_rows(db, "effect_result", effect_key="never") == []


@pytest.mark.parametrize("effect_key", ["", None])
def test_record_effect_rejects_empty_key_with_lq422(db: Conn, effect_key: str | None) -> None:
    with raises_sqlstate("LQ422", "effect_key"):
        call_value(db, "record_effect", effect_key=effect_key, task_id=None)


def test_record_effect_rejects_unknown_task_with_lq422_naming_it(db: Conn) -> None:
    with raises_sqlstate("LQ422", "task 5555"):
        record(db, "k", 5555)
    assert count(db, "SELECT count(*) FROM ledgerq.effects") == 0


def test_concurrent_record_effect_with_one_key_records_it_once(db_url: str, db: Conn) -> None:
    task_id = enqueue(db)
    callers = 10
    barrier = threading.Barrier(callers)
    answers: list[bool] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                barrier.wait(timeout=10)
                answers.append(record(conn, "shared-effect", task_id))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert sorted(answers) == [False] * (callers - 1) + [True]


def test_effect_lock_reports_unrecorded_then_recorded_effect_with_its_result(db: Conn) -> None:
    task_id = enqueue(db)
    assert call_rows(db, "effect_lock", effect_key="once") == [{"recorded": False, "result": None}]
    record(db, "once", task_id, result={"n": 7})
    assert call_rows(db, "effect_lock", effect_key="once") == [
        {"recorded": True, "result": {"n": 7}}
    ]


def test_effect_lock_serialises_transactions_on_one_key_until_commit(db_url: str, db: Conn) -> None:
    task_id = enqueue(db)
    with psycopg.connect(db_url) as first:
        assert call_rows(first, "effect_lock", effect_key="k")[0]["recorded"] is False
        seen: list[list[dict[str, Any]]] = []

        def second() -> None:
            with psycopg.connect(db_url) as conn:
                seen.append(call_rows(conn, "effect_lock", effect_key="k"))
                conn.rollback()

        thread = threading.Thread(target=second)
        thread.start()
        wait_for_lock_waiters(first)  # blocked on the first's advisory lock
        assert seen == []
        assert record(first, "k", task_id, result={"sent": 1}) is True
        first.commit()
    thread.join(timeout=10)
    # After the first committed, the second sees the effect as recorded.
    assert seen == [[{"recorded": True, "result": {"sent": 1}}]]


def test_effect_lock_on_other_keys_does_not_block(db_url: str) -> None:
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        first.execute("SET lock_timeout = '2s'")
        second.execute("SET lock_timeout = '2s'")
        call_rows(first, "effect_lock", effect_key="a")
        assert call_rows(second, "effect_lock", effect_key="b") == [
            {"recorded": False, "result": None}
        ]


@pytest.mark.parametrize("effect_key", ["", None])
def test_effect_lock_rejects_empty_key_with_lq422(db: Conn, effect_key: str | None) -> None:
    with raises_sqlstate("LQ422", "effect_key"):
        call_rows(db, "effect_lock", effect_key=effect_key)


@pytest.mark.parametrize("function", ["record_effect", "effect_lock", "effect_start"])
def test_an_effect_key_over_2000_bytes_is_refused_before_anything_runs(
    db: Conn, function: str
) -> None:
    task_id = enqueue(db)
    key = "é" * 1001  # 2002 bytes of UTF-8
    arguments: dict[str, Any] = {"effect_key": key}
    if function != "effect_lock":
        arguments["task_id"] = task_id
    if function == "effect_start":
        arguments["attempt"] = 1
    with raises_sqlstate("LQ422", "effect_key must be at most 2000 bytes"):
        call_rows(db, function, **arguments)
    assert count(db, "SELECT count(*) FROM ledgerq.effects") == 0
    assert count(db, "SELECT count(*) FROM ledgerq.effect_starts") == 0
    assert record(db, "é" * 1000, task_id) is True  # 2000 bytes: the bound itself fits


def test_effect_start_marks_the_start_and_reports_a_mark_left_by_a_lost_attempt(
    db: Conn, db_url: str
) -> None:
    task_id = enqueue(db)
    with psycopg.connect(db_url, autocommit=True) as lost:
        first = call_rows(lost, "effect_start", effect_key="k", task_id=task_id, attempt=1)
        assert [(r["recorded"], r["unknown_attempt"]) for r in first] == [(False, None)]
    # That session ended without finishing: its lock is gone, its mark is not.
    again = call_rows(db, "effect_start", effect_key="k", task_id=task_id, attempt=2)
    assert [(r["recorded"], r["unknown_task_id"], r["unknown_attempt"]) for r in again] == [
        (False, task_id, 1)
    ]
    assert call_value(db, "effect_finish", effect_key="k", task_id=task_id, result=None) is True
    assert call_value(db, "effect_unlock", effect_key="k") is True
    assert count(db, "SELECT count(*) FROM ledgerq.effect_starts") == 0
    done = call_rows(db, "effect_start", effect_key="k", task_id=task_id, attempt=3)
    assert [(r["recorded"], r["unknown_attempt"]) for r in done] == [(True, None)]
    assert count(db, LOCKS_HERE) == 0


LOCKS_HERE = """
    SELECT count(*) FROM pg_locks
    WHERE locktype = 'advisory' AND database = (
        SELECT oid FROM pg_database WHERE datname = current_database())
"""


def test_effect_start_waits_at_most_wait_ms_for_a_key_another_session_holds(
    db: Conn, db_url: str
) -> None:
    task_id = enqueue(db)
    with psycopg.connect(db_url, autocommit=True) as holder:
        call_rows(holder, "effect_start", effect_key="k", task_id=task_id, attempt=1)
        with raises_sqlstate("55P03", "lock timeout"):
            call_rows(db, "effect_start", effect_key="k", task_id=task_id, attempt=2, wait_ms=100)
    # The holder's session ended: the key is free, its mark says attempt 1 started it.
    rows = call_rows(db, "effect_start", effect_key="k", task_id=task_id, attempt=3, wait_ms=100)
    assert [(r["recorded"], r["unknown_attempt"]) for r in rows] == [(False, 1)]


def test_a_session_holding_a_key_idle_past_hold_ms_is_ended_by_the_server(
    db: Conn, db_url: str
) -> None:
    task_id = enqueue(db)
    holder = psycopg.connect(db_url, autocommit=True)
    try:
        call_rows(holder, "effect_start", effect_key="k", task_id=task_id, attempt=1, hold_ms=200)
        rows = call_rows(
            db, "effect_start", effect_key="k", task_id=task_id, attempt=2, wait_ms=10_000
        )
        assert [(r["recorded"], r["unknown_attempt"]) for r in rows] == [(False, 1)]
        with pytest.raises(psycopg.OperationalError):
            holder.execute("SELECT 1")
    finally:
        holder.close()
    # effect_unlock resets the bound, so a pooled connection is not ended later.
    assert call_value(db, "effect_unlock", effect_key="k") is True
    assert db.execute("SHOW idle_session_timeout").fetchone() == ("0",)
