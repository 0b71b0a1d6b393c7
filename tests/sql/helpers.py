"""Small helpers for calling the ledger's SQL functions the way SQL users do.

Every call uses named notation (``ledgerq.claim_task(task_id => ..., ...)``), so a
renamed parameter breaks these tests as it would break a user's SQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]
Row = dict[str, Any]


def named_call(function: str, **arguments: Any) -> tuple[str, dict[str, Any]]:
    """``ledgerq.<function>(a => %(a)s, ...)`` and its parameters.

    A dict is sent as jsonb and a list as a PostgreSQL array; wrap a JSON array
    in ``Jsonb`` yourself.
    """
    placeholders = ", ".join(f"{name} => %({name})s" for name in arguments)
    params = {
        name: Jsonb(value) if isinstance(value, dict) else value
        for name, value in arguments.items()
    }
    return f"ledgerq.{function}({placeholders})", params


def call_rows(conn: Conn, function: str, **arguments: Any) -> list[Row]:
    """``SELECT * FROM ledgerq.<function>(...)`` as a list of dicts."""
    call, params = named_call(function, **arguments)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"SELECT * FROM {call}", params).fetchall()


def call_value(conn: Conn, function: str, **arguments: Any) -> Any:
    """``SELECT ledgerq.<function>(...)``: the one scalar it returns."""
    call, params = named_call(function, **arguments)
    row = conn.execute(f"SELECT {call}", params).fetchone()
    assert row is not None
    return row[0]


def enqueue(conn: Conn, task_type: str = "email.send", **arguments: Any) -> int:
    """Enqueue one task and return its id (it must be newly created)."""
    (row,) = call_rows(conn, "enqueue_task", task_type=task_type, **arguments)
    assert row["created"] is True
    return int(row["id"])


def claim(conn: Conn, task_id: int, worker_id: str = "worker-1", **arguments: Any) -> Row | None:
    """claim_task: the claimed task row, or None when it was not claimable."""
    rows = call_rows(conn, "claim_task", task_id=task_id, worker_id=worker_id, **arguments)
    assert len(rows) <= 1
    return rows[0] if rows else None


def claimed(conn: Conn, task_id: int, worker_id: str = "worker-1", **arguments: Any) -> int:
    """Claim a task that must be claimable; return the attempt number."""
    row = claim(conn, task_id, worker_id, **arguments)
    assert row is not None, f"task {task_id} was not claimable: {task(conn, task_id)}"
    return int(row["attempts"])


def complete(conn: Conn, task_id: int, attempt: int, succeeded: bool, **arguments: Any) -> Any:
    return call_value(
        conn, "complete_task", task_id=task_id, attempt=attempt, succeeded=succeeded, **arguments
    )


def task(conn: Conn, task_id: int) -> Row:
    """The whole tasks row."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None, f"no task {task_id}"
    return row


def attempts(conn: Conn, task_id: int) -> list[Row]:
    """The task's attempt rows, in attempt order."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM ledgerq.attempts WHERE task_id = %s ORDER BY attempt", (task_id,)
        ).fetchall()


def db_now(conn: Conn) -> dt.datetime:
    """The server's clock (outside a transaction: the statement's time)."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def expire_lease(conn: Conn, task_id: int) -> None:
    """Push a RUNNING task's lease into the past, as if its worker died."""
    conn.execute(
        "UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (task_id,),
    )


def age_queued(conn: Conn, task_id: int, by: str) -> None:
    """Pretend a QUEUED task was handed to Redis ``by`` (an interval) ago."""
    conn.execute(
        "UPDATE ledgerq.tasks SET queued_at = now() - %s::interval WHERE id = %s", (by, task_id)
    )


def count(conn: Conn, query: str, *params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def raises_sqlstate(sqlstate: str, *words: str) -> Iterator[pytest.ExceptionInfo[psycopg.Error]]:
    """Expect a psycopg error with this SQLSTATE whose message contains ``words``."""
    with pytest.raises(psycopg.Error) as info:
        yield info
    assert info.value.sqlstate == sqlstate, f"{info.value.sqlstate}: {info.value}"
    message = info.value.diag.message_primary or ""
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def wait_for_lock_waiters(conn: Conn, waiters: int = 1, timeout_s: float = 10.0) -> None:
    """Return once ``waiters`` backends of this database are blocked on a lock."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Inside a transaction pg_stat_activity is read once and cached.
        conn.execute("SELECT pg_stat_clear_snapshot()")
        blocked = count(
            conn,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        if blocked >= waiters:
            return
        assert time.monotonic() < deadline, f"{blocked} of {waiters} backends blocked"
        time.sleep(0.005)


def schema_snapshot(url: str) -> dict[str, Any]:
    """Everything migrate defines in schema ledgerq, as comparable text."""
    with psycopg.connect(url) as conn:
        return {
            "columns": conn.execute(
                """
                SELECT table_name, column_name, data_type, column_default, is_nullable
                FROM information_schema.columns WHERE table_schema = 'ledgerq'
                ORDER BY 1, 2
                """
            ).fetchall(),
            "constraints": conn.execute(
                """
                SELECT c.conname, pg_get_constraintdef(c.oid)
                FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
                WHERE n.nspname = 'ledgerq' ORDER BY 1
                """
            ).fetchall(),
            "indexes": conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'ledgerq' ORDER BY 1"
            ).fetchall(),
            "functions": conn.execute(
                """
                SELECT p.proname, pg_get_functiondef(p.oid)
                FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'ledgerq' ORDER BY 1, 2
                """
            ).fetchall(),
            "views": conn.execute(
                "SELECT viewname, definition FROM pg_views WHERE schemaname = 'ledgerq' ORDER BY 1"
            ).fetchall(),
            "applied": conn.execute(
                "SELECT migration_id FROM ledgerq._yoyo_migration ORDER BY 1"
            ).fetchall(),
        }
