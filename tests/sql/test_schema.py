"""The schema: SPEC.md's SQL API exactly as written, constraints, statuses, queue_stats."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from ledgerq import types

from .helpers import Conn, call_value, claimed, complete, db_now, enqueue

# The SQL API of SPEC.md, as pg_get_function_arguments / pg_get_function_result
# print it. Parameter names and defaults are part of the contract: callers use
# named notation.
SPEC_FUNCTIONS = {
    "enqueue_task": (
        "task_type text, payload jsonb DEFAULT '{}'::jsonb, queue text DEFAULT NULL::text, "
        "priority integer DEFAULT 0, run_at timestamp with time zone DEFAULT now(), "
        "max_attempts integer DEFAULT NULL::integer, idempotency_key text DEFAULT NULL::text, "
        "concurrency_key text DEFAULT NULL::text",
        "TABLE(id bigint, created boolean)",
    ),
    "enqueue_tasks": ("tasks jsonb", "TABLE(id bigint, created boolean)"),
    "claim_task": (
        "task_id bigint, worker_id text, lease_seconds integer DEFAULT 30",
        "SETOF ledgerq.tasks",
    ),
    "claim_tasks": (
        "task_ids bigint[], worker_id text, lease_seconds integer DEFAULT 30",
        "SETOF ledgerq.tasks",
    ),
    "heartbeat": ("task_id bigint, attempt integer, lease_seconds integer DEFAULT 30", "text"),
    "complete_task": (
        "task_id bigint, attempt integer, succeeded boolean, result jsonb DEFAULT NULL::jsonb, "
        "error text DEFAULT NULL::text, retryable boolean DEFAULT true",
        "text",
    ),
    "compute_backoff": (
        "attempt integer, base_seconds double precision DEFAULT 1, "
        "max_seconds double precision DEFAULT 3600, jitter boolean DEFAULT true",
        "interval",
    ),
    "reap_stuck": ("", "integer"),
    "cancel_task": ("task_id bigint", "text"),
    "retry_task": ("task_id bigint", "text"),
    "record_effect": (
        "effect_key text, task_id bigint, result jsonb DEFAULT NULL::jsonb",
        "boolean",
    ),
}


def functions(conn: Conn) -> dict[str, list[tuple[str, str]]]:
    """Every function in schema ledgerq: name -> [(arguments, result), ...]."""
    rows = conn.execute(
        """
        SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'ledgerq' AND p.prokind = 'f'
        """
    ).fetchall()
    found: dict[str, list[tuple[str, str]]] = {}
    for name, arguments, result in rows:
        found.setdefault(name, []).append((arguments, result))
    return found


@pytest.mark.parametrize("name", sorted(SPEC_FUNCTIONS))
def test_spec_function_exists_with_exact_parameters_defaults_and_return_type(
    db: Conn, name: str
) -> None:
    # Exactly one overload: a second one would make named calls ambiguous.
    assert functions(db).get(name) == [SPEC_FUNCTIONS[name]]


def test_queue_stats_view_has_spec_columns(db: Conn) -> None:
    rows = db.execute(
        """
        SELECT a.attname FROM pg_attribute a
        WHERE a.attrelid = 'ledgerq.queue_stats'::regclass AND a.attnum > 0
        ORDER BY a.attnum
        """
    ).fetchall()
    assert [r[0] for r in rows] == ["queue", "status", "count", "oldest_run_at"]


def test_queue_stats_counts_tasks_per_queue_and_status_with_oldest_run_at(db: Conn) -> None:
    now = db_now(db)
    early = now - dt.timedelta(minutes=5)
    enqueue(db, queue="mail", run_at=early)
    enqueue(db, queue="mail")
    running = enqueue(db, queue="mail")
    claimed(db, running)
    done = enqueue(db, queue="billing")
    complete(db, done, claimed(db, done), True)

    with db.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("SELECT * FROM ledgerq.queue_stats ORDER BY queue, status").fetchall()

    assert [(r["queue"], r["status"], r["count"]) for r in rows] == [
        ("billing", "SUCCEEDED", 1),
        ("mail", "PENDING", 2),
        ("mail", "RUNNING", 1),
    ]
    assert rows[1]["oldest_run_at"] == early


def test_queue_stats_is_empty_for_an_empty_ledger(db: Conn) -> None:
    assert db.execute("SELECT count(*) FROM ledgerq.queue_stats").fetchone() == (0,)


def check_values(conn: Conn, constraint: str) -> set[str]:
    """The string literals a CHECK constraint lists."""
    row = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s", (constraint,)
    ).fetchone()
    assert row is not None, constraint
    return set(re.findall(r"'([^']*)'::text", row[0]))


def test_statuses_allowed_by_the_table_equal_task_status(db: Conn) -> None:
    assert check_values(db, "tasks_status_valid") == {s.value for s in types.TaskStatus}


def test_final_statuses_of_the_table_equal_task_status_final_ones(db: Conn) -> None:
    assert check_values(db, "tasks_finished_iff_final") == {
        s.value for s in types.TaskStatus if s.is_final
    }


def test_attempt_outcomes_allowed_by_the_table_equal_attempt_outcome(db: Conn) -> None:
    assert check_values(db, "attempts_outcome_valid") == {o.value for o in types.AttemptOutcome}


VALID_TASK: dict[str, Any] = {"task_type": "t", "queue": "q"}

IMPOSSIBLE_TASKS = [
    ({"status": "DONE"}, "tasks_status_valid"),
    ({"status": "pending"}, "tasks_status_valid"),
    ({"finished_at": "now()"}, "tasks_finished_iff_final"),
    ({"status": "'SUCCEEDED'"}, "tasks_finished_iff_final"),
    ({"status": "'RUNNING'", "worker_id": "'w'", "attempts": "1"}, "tasks_lease_iff_running"),
    ({"lease_expires_at": "now()"}, "tasks_lease_iff_running"),
    (
        {"status": "'RUNNING'", "lease_expires_at": "now()", "attempts": "1"},
        "tasks_running_has_attempt",
    ),
    (
        {"status": "'RUNNING'", "lease_expires_at": "now()", "worker_id": "'w'"},
        "tasks_running_has_attempt",
    ),
    ({"status": "'QUEUED'"}, "tasks_queued_at_iff_queued"),
    ({"queued_at": "now()"}, "tasks_queued_at_iff_queued"),
    ({"cancel_requested": "true"}, "tasks_cancel_only_while_running"),
    ({"result": "'{}'::jsonb"}, "tasks_result_only_when_succeeded"),
    ({"attempts": "1", "budget_start": "2"}, "tasks_attempt_counts"),
    ({"budget_start": "-1", "attempts": "0"}, "tasks_attempt_counts"),
    ({"task_type": "' '"}, "tasks_type_not_blank"),
    ({"queue": "''"}, "tasks_queue_not_blank"),
    ({"payload": "'[]'::jsonb"}, "tasks_payload_is_object"),
    ({"priority": "40000"}, "tasks_priority_range"),
    ({"max_attempts": "0"}, "tasks_max_attempts_positive"),
    ({"idempotency_key": "''"}, "tasks_idempotency_key_not_empty"),
]


def insert_task(conn: Conn, columns: dict[str, str]) -> None:
    values = {"task_type": "'t'", "queue": "'q'", **columns}
    if "status" in values and not values["status"].startswith("'"):
        values["status"] = f"'{values['status']}'"
    conn.execute(
        f"INSERT INTO ledgerq.tasks ({', '.join(values)}) VALUES ({', '.join(values.values())})"
    )


@pytest.mark.parametrize(
    ("columns", "constraint"), IMPOSSIBLE_TASKS, ids=[c for _, c in IMPOSSIBLE_TASKS]
)
def test_tasks_table_refuses_impossible_row(
    db: Conn, columns: dict[str, str], constraint: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        insert_task(db, columns)
    assert info.value.diag.constraint_name == constraint


@pytest.mark.parametrize(
    "columns",
    [
        {},
        {"status": "'QUEUED'", "queued_at": "now()"},
        {
            "status": "'RUNNING'",
            "lease_expires_at": "now()",
            "worker_id": "'w'",
            "attempts": "1",
            "cancel_requested": "true",
        },
        {"status": "'SUCCEEDED'", "finished_at": "now()", "result": "'[1]'::jsonb"},
        {"status": "'DEAD'", "finished_at": "now()", "attempts": "3", "budget_start": "3"},
        {"status": "'CANCELLED'", "finished_at": "now()"},
    ],
    ids=["pending", "queued", "running", "succeeded", "dead", "cancelled"],
)
def test_tasks_table_accepts_every_possible_state(db: Conn, columns: dict[str, str]) -> None:
    insert_task(db, columns)
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (1,)


def test_idempotency_key_is_unique_across_tasks(db: Conn) -> None:
    insert_task(db, {"idempotency_key": "'k'"})
    with pytest.raises(psycopg.errors.UniqueViolation):
        insert_task(db, {"idempotency_key": "'k'", "task_type": "'other'"})


@pytest.mark.parametrize(
    ("columns", "values", "constraint"),
    [
        (
            "attempt, worker_id, finished_at, outcome",
            "1, 'w', now(), 'exploded'",
            "attempts_outcome_valid",
        ),
        ("attempt, worker_id, finished_at", "1, 'w', now()", "attempts_finished_iff_outcome"),
        ("attempt, worker_id, outcome", "1, 'w', 'lost'", "attempts_finished_iff_outcome"),
        ("attempt, worker_id", "0, 'w'", "attempts_number_positive"),
    ],
)
def test_attempts_table_refuses_impossible_row(
    db: Conn, columns: str, values: str, constraint: str
) -> None:
    task_id = enqueue(db)
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        db.execute(
            f"INSERT INTO ledgerq.attempts (task_id, {columns}) VALUES (%s, {values})", (task_id,)
        )
    assert info.value.diag.constraint_name == constraint


def test_attempt_numbers_are_unique_per_task(db: Conn) -> None:
    task_id = enqueue(db)
    claimed(db, task_id)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(
            "INSERT INTO ledgerq.attempts (task_id, attempt, worker_id) VALUES (%s, 1, 'w')",
            (task_id,),
        )


def test_effects_table_refuses_empty_key(db: Conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        db.execute("INSERT INTO ledgerq.effects (effect_key) VALUES ('')")
    assert info.value.diag.constraint_name == "effects_key_not_empty"


def test_deleting_a_task_keeps_its_effects_but_drops_its_attempts(db: Conn) -> None:
    task_id = enqueue(db)
    claimed(db, task_id)
    assert call_value(db, "record_effect", effect_key="kept", task_id=task_id) is True
    db.execute("DELETE FROM ledgerq.tasks WHERE id = %s", (task_id,))
    assert db.execute("SELECT count(*) FROM ledgerq.attempts").fetchone() == (0,)
    assert db.execute("SELECT task_id FROM ledgerq.effects").fetchall() == [(None,)]
    # The effect stays recorded: it must not run again.
    assert call_value(db, "record_effect", effect_key="kept", task_id=None) is False


def test_dispatcher_hot_query_is_an_index_scan_without_sort(db: Conn) -> None:
    db.execute("SET enable_seqscan = off")  # a tiny table would tempt the planner
    plan = "\n".join(
        row[0]
        for row in db.execute(
            """
            EXPLAIN SELECT t.id FROM ledgerq.tasks t
            WHERE t.status = 'PENDING' AND t.waiting_on IS NULL AND t.run_at <= now()
            ORDER BY t.priority DESC, t.turn, t.run_at, t.id
            LIMIT 100
            """
        )
    )
    assert "tasks_dispatch_idx" in plan
    assert "Sort" not in plan
