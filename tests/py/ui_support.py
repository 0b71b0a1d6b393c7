"""Helpers for the dashboard tests: tasks in chosen states, made through the
ledger's own SQL functions, and the token pair of a dashboard with roles."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import psycopg

from ledgerq import config

Db = psycopg.Connection[tuple[Any, ...]]

ADMIN_TOKEN = "admin-token-0123456789"
READER_TOKEN = "reader-token-0123456789"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def with_roles(settings: config.Settings) -> config.Settings:
    """settings with the admin and the read-only token set."""
    return dataclasses.replace(settings, api_token=ADMIN_TOKEN, api_readonly_token=READER_TOKEN)


def enqueue(db: Db, task_type: str = "email.send", **fields: Any) -> int:
    """enqueue_task with fields; the new task's id."""
    names = ", ".join(f"{name} => %({name})s" for name in fields)
    sql = f"SELECT id FROM ledgerq.enqueue_task(task_type => %(task_type)s{', ' if names else ''}{names})"
    row = db.execute(sql, {"task_type": task_type, **fields}).fetchone()
    assert row is not None
    return int(row[0])


def make_dead(
    db: Db,
    task_type: str = "email.send",
    *,
    error: str = "boom",
    worker_id: str = "worker-a",
    **fields: Any,
) -> int:
    """A task that ran once and failed for good (DEAD), through claim/complete."""
    task_id = enqueue(db, task_type, **fields)
    row = db.execute(
        "SELECT attempts FROM ledgerq.claim_task(task_id => %s, worker_id => %s, "
        "lease_seconds => 30)",
        (task_id, worker_id),
    ).fetchone()
    assert row is not None
    status = db.execute(
        "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => false, "
        "error => %s, retryable => false)",
        (task_id, row[0], error),
    ).fetchone()
    assert status is not None and status[0] == "DEAD", status
    return task_id


def make_succeeded(
    db: Db, task_type: str = "email.send", worker_id: str = "worker-a", **fields: Any
) -> int:
    """A task that ran once and succeeded, with a result."""
    task_id = enqueue(db, task_type, **fields)
    row = db.execute(
        "SELECT attempts FROM ledgerq.claim_task(task_id => %s, worker_id => %s, "
        "lease_seconds => 30)",
        (task_id, worker_id),
    ).fetchone()
    assert row is not None
    db.execute(
        "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => true, "
        "result => '{\"sent\": true}')",
        (task_id, row[0]),
    )
    return task_id


def status_of(db: Db, task_id: int) -> str:
    row = db.execute("SELECT status FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0])


def csrf_of(html: str) -> str:
    """The CSRF token a dashboard page's forms carry."""
    match = _CSRF.search(html)
    assert match is not None, "the page has no form with a CSRF token"
    return match.group(1)


def ensure_schedules(db: Db, name: str = "nightly-report") -> None:
    """A schedule named name, made through schedule_task."""
    db.execute(
        "SELECT ledgerq.schedule_task(name => %s, cron => '0 3 * * *', "
        "task_type => 'report.build')",
        (name,),
    )


def queue_paused(db: Db, queue: str) -> bool:
    row = db.execute(
        "SELECT paused FROM ledgerq.queue_settings WHERE queue = %s", (queue,)
    ).fetchone()
    return bool(row and row[0])


def queue_settings(db: Db, queue: str) -> dict[str, Any]:
    row = db.execute(
        "SELECT settings FROM ledgerq.queue_settings WHERE queue = %s", (queue,)
    ).fetchone()
    return dict(row[0]) if row else {}


def schedule_paused(db: Db, name: str) -> bool:
    row = db.execute("SELECT paused FROM ledgerq.schedules WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return bool(row[0])


def make_retried_twice_and_running(db: Db, worker_ids: tuple[str, str, str]) -> int:
    """A task whose first two attempts failed (retryable) and whose third runs now."""
    task_id = enqueue(db, "payment.capture", max_attempts=5)
    for number, worker_id in enumerate(worker_ids, start=1):
        # Skip each retry's backoff (tests may write the table; the runtime never does).
        db.execute("UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,))
        row = db.execute(
            "SELECT attempts FROM ledgerq.claim_task(task_id => %s, worker_id => %s, "
            "lease_seconds => 30)",
            (task_id, worker_id),
        ).fetchone()
        assert row is not None and row[0] == number
        if number < len(worker_ids):
            db.execute(
                "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => false, "
                "error => %s)",
                (task_id, number, f"gateway timeout #{number}"),
            )
    return task_id
