"""Helpers of the schedule tests: calls in named notation, keys, and a simulated clock.

A schedule created now fires slots after now, so the tests walk run_schedules'
``as_of`` through a clock that starts in the near future (``midnight_after``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from psycopg.rows import dict_row

from .helpers import Conn, Row, call_rows, call_value, db_now

UTC = dt.UTC
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


def schedule(
    conn: Conn, name: str, cron: str, task_type: str = "report.build", **arguments: Any
) -> None:
    call_value(conn, "schedule_task", name=name, cron=cron, task_type=task_type, **arguments)


def run(conn: Conn, as_of: dt.datetime) -> int:
    return int(call_value(conn, "run_schedules", as_of=as_of))


def fire(conn: Conn, as_of: dt.datetime) -> dict[str, Row]:
    """schedule_fire's report, by schedule name."""
    return {row["name"]: row for row in call_rows(conn, "schedule_fire", as_of=as_of)}


def view(conn: Conn, name: str) -> Row | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM ledgerq.schedules WHERE name = %s", (name,)).fetchone()


def next_run_at(conn: Conn, name: str) -> dt.datetime:
    row = view(conn, name)
    assert row is not None and row["next_run_at"] is not None
    return row["next_run_at"]


def key(name: str, slot: dt.datetime) -> str:
    return f"schedule:{name}:{slot.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def keys(conn: Conn, name: str) -> list[str]:
    rows = conn.execute(
        "SELECT idempotency_key FROM ledgerq.tasks WHERE idempotency_key LIKE %s"
        " ORDER BY idempotency_key",
        (f"schedule:{name}:%",),
    ).fetchall()
    return [r[0] for r in rows]


def keys_since(conn: Conn, name: str, since: dt.datetime) -> list[str]:
    rows = conn.execute(
        "SELECT idempotency_key FROM ledgerq.tasks WHERE idempotency_key LIKE %s AND run_at >= %s"
        " ORDER BY run_at",
        (f"schedule:{name}:%", since),
    ).fetchall()
    return [r[0] for r in rows]


def task_by_key(conn: Conn, idempotency_key: str) -> Row:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT * FROM ledgerq.tasks WHERE idempotency_key = %s", (idempotency_key,)
        ).fetchone()
    assert row is not None, f"no task with key {idempotency_key}"
    return row


def every(start: dt.datetime, end: dt.datetime, step: dt.timedelta) -> list[dt.datetime]:
    """start, start + step, ... up to end inclusive."""
    found = []
    while start <= end:
        found.append(start)
        start += step
    return found


def midnight_after(conn: Conn, days: int = 2) -> dt.datetime:
    """A UTC midnight `days` ahead: a simulated day that starts after every schedule's creation."""
    today = db_now(conn).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + days * DAY


def schedule_row(conn: Conn, name: str) -> Row:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT * FROM ledgerq.task_schedules WHERE name = %s", (name,)
        ).fetchone()
    assert row is not None
    return row


def make_due(conn: Conn, task_id: int) -> None:
    """A slot's task has run_at = its slot, ahead of the real clock: let it be claimed now."""
    conn.execute("UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,))
