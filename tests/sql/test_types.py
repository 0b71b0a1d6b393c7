"""Task types known to the ledger: worker_register, worker_heartbeat, worker_stop,
the task_types view, task_type_served and task_hand_back."""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .helpers import (
    Conn,
    attempts,
    call_rows,
    call_value,
    claimed,
    enqueue,
    raises_sqlstate,
    task,
)


def register(
    conn: Conn, worker_id: str, *types: dict[str, Any], queues: list[str] | None = None
) -> int:
    arguments = {"queues": queues or ["default"], "types": Jsonb(list(types)), "concurrency": 4}
    return int(call_value(conn, "worker_register", worker_id=worker_id, **arguments))


def typedef(
    name: str, queue: str = "default", max_attempts: int = 5, timeout: Any = 30
) -> dict[str, Any]:
    return {
        "task_type": name,
        "queue": queue,
        "max_attempts": max_attempts,
        "timeout_seconds": timeout,
    }


def task_types(conn: Conn) -> dict[str, dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("SELECT * FROM ledgerq.task_types ORDER BY task_type").fetchall()
    return {row.pop("task_type"): row for row in rows}


def age_worker(conn: Conn, worker_id: str, seconds: int) -> None:
    conn.execute(
        "UPDATE ledgerq.workers SET last_seen_at = now() - make_interval(secs => %s)"
        " WHERE worker_id = %s",
        (seconds, worker_id),
    )


def test_worker_register_lists_its_types_with_their_defaults_in_the_view(db: Conn) -> None:
    assert (
        register(db, "w1", typedef("a.x", "orders", 1, 12.5), typedef("b.y"), queues=["orders"])
        == 2
    )

    types = task_types(db)

    assert list(types) == ["a.x", "b.y"]
    assert {k: v for k, v in types["a.x"].items() if k != "last_seen_at"} == {
        "queue": "orders", "max_attempts": 1, "timeout_seconds": 12.5, "workers_alive": 1,
    }  # fmt: skip
    assert types["a.x"]["last_seen_at"] is not None
    (row,) = db.execute("SELECT queues, task_types, concurrency FROM ledgerq.workers").fetchall()
    assert row == (["orders"], ["a.x", "b.y"], 4)


def test_the_latest_registration_of_a_type_sets_its_defaults(db: Conn) -> None:
    register(db, "old", typedef("a.x", "orders", 5))
    register(db, "new", typedef("a.x", "billing", 2, None))

    assert {k: v for k, v in task_types(db)["a.x"].items() if k != "last_seen_at"} == {
        "queue": "billing", "max_attempts": 2, "timeout_seconds": None, "workers_alive": 2,
    }  # fmt: skip


def test_a_stopped_worker_no_longer_counts_at_once(db: Conn) -> None:
    register(db, "w1", typedef("a.x"))
    register(db, "w2", typedef("a.x"))

    assert call_value(db, "worker_stop", worker_id="w1") is True

    assert task_types(db)["a.x"]["workers_alive"] == 1
    assert call_value(db, "worker_heartbeat", worker_id="w1") is None  # stopped: register again
    assert call_value(db, "worker_stop", worker_id="w1") is None


def test_a_worker_not_seen_for_30_seconds_no_longer_counts_and_a_heartbeat_keeps_it(
    db: Conn,
) -> None:
    register(db, "w1", typedef("a.x"))
    age_worker(db, "w1", 29)
    assert task_types(db)["a.x"]["workers_alive"] == 1
    age_worker(db, "w1", 31)
    assert task_types(db)["a.x"]["workers_alive"] == 0
    assert call_value(db, "task_type_served", task_type="a.x") is False

    assert call_value(db, "worker_heartbeat", worker_id="w1") is True

    assert task_types(db)["a.x"]["workers_alive"] == 1
    assert call_value(db, "task_type_served", task_type="a.x") is True
    assert call_value(db, "task_type_served", task_type="a.x", except_worker="w1") is False


def test_worker_register_refuses_bad_input_naming_the_field(db: Conn) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"worker_id": " "}, "worker_id"),
        ({"queues": []}, "queues"),
        ({"types": Jsonb([])}, "types"),
        (
            {"types": Jsonb([typedef("a"), {"task_type": "", "queue": "q", "max_attempts": 1}])},
            "types[1]: task_type",
        ),
        ({"types": Jsonb([typedef("a", queue=" ")])}, "types[0]: queue"),
        ({"types": Jsonb([typedef("a", max_attempts=0)])}, "types[0]: max_attempts"),
        ({"types": Jsonb([{**typedef("a"), "max_attempts": 1.5}])}, "types[0]: max_attempts"),
        ({"types": Jsonb([typedef("a", timeout=0)])}, "types[0]: timeout_seconds"),
        ({"types": Jsonb([typedef("a", timeout="1")])}, "types[0]: timeout_seconds"),
    ]
    for override, words in cases:
        arguments = {"worker_id": "w", "queues": ["q"], "types": Jsonb([typedef("a")]), **override}
        with raises_sqlstate("LQ422", words):
            call_value(db, "worker_register", **arguments)
    assert task_types(db) == {}


def test_task_hand_back_returns_a_served_type_to_pending_without_spending_an_attempt(
    db: Conn,
) -> None:
    register(db, "new-version", typedef("old.type"))
    task_id = enqueue(db, "old.type", max_attempts=1)
    attempt = claimed(db, task_id, worker_id="old-version")

    (row,) = call_rows(
        db, "task_hand_back", task_ids=[task_id], attempts=[attempt],
        worker_id="old-version", delay_seconds=2.0,
    )  # fmt: skip

    assert row == {"task_id": task_id, "status": "PENDING"}
    stored = task(db, task_id)
    assert stored["status"] == "PENDING"
    # Still one attempt left in a budget of one: the hand-back spent none.
    assert stored["attempts"] - stored["budget_start"] == 0
    delay = db.execute(
        "SELECT run_at - now() FROM ledgerq.tasks WHERE id = %s", (task_id,)
    ).fetchone()
    assert delay is not None and 1.5 < delay[0].total_seconds() <= 2.0
    (history,) = attempts(db, task_id)
    assert history["outcome"] == "lost"
    assert "no handler" in history["error"] and "old-version" in history["error"]


def test_task_hand_back_leaves_a_type_nobody_live_serves_to_the_caller(db: Conn) -> None:
    register(db, "gone", typedef("old.type"))
    age_worker(db, "gone", 60)
    register(db, "self", typedef("other.type"))
    task_id = enqueue(db, "old.type")
    self_task = enqueue(db, "self.only")
    attempt = claimed(db, task_id, worker_id="self")
    self_attempt = claimed(db, self_task, worker_id="self")

    rows = call_rows(
        db, "task_hand_back", task_ids=[task_id, self_task], attempts=[attempt, self_attempt],
        worker_id="self",
    )  # fmt: skip

    assert rows == [{"task_id": task_id, "status": None}, {"task_id": self_task, "status": None}]
    assert task(db, task_id)["status"] == "RUNNING"


def test_task_hand_back_fences_out_a_stale_attempt(db: Conn) -> None:
    register(db, "other", typedef("a.x"))
    task_id = enqueue(db, "a.x")
    attempt = claimed(db, task_id, worker_id="w")

    (row,) = call_rows(
        db, "task_hand_back", task_ids=[task_id], attempts=[attempt + 1], worker_id="w"
    )

    assert row["status"] is None
    assert task(db, task_id)["status"] == "RUNNING"


def test_task_hand_back_needs_a_live_worker_serving_the_type_on_the_tasks_queue(db: Conn) -> None:
    register(db, "elsewhere", typedef("a.x", "orders"), queues=["orders"])
    task_id = enqueue(db, "a.x", queue="default")
    attempt = claimed(db, task_id, worker_id="w")

    (row,) = call_rows(db, "task_hand_back", task_ids=[task_id], attempts=[attempt], worker_id="w")

    assert row["status"] is None  # nobody would ever receive it on default
    assert call_value(db, "task_type_served", task_type="a.x", queue="orders") is True
    assert call_value(db, "task_type_served", task_type="a.x", queue="default") is False
