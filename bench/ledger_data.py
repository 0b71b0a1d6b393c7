"""Data for bench/sql_bench.py: an empty ledger, a large realistic one, and task bodies.

The large table is made set-based (INSERT ... SELECT generate_series), not by a million
enqueue calls, with column values that satisfy every constraint of ledgerq.tasks and an
attempt row for every attempt a task has made.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[tuple[Any, ...]]


def reset(conn: Conn) -> None:
    """An empty ledger, and a checkpoint so the previous benchmark's dirty pages don't bill this one."""
    conn.execute(
        "TRUNCATE ledgerq.effects, ledgerq.effect_starts, ledgerq.attempts, ledgerq.tasks RESTART IDENTITY"
    )
    conn.execute("CHECKPOINT")


# Per mille of ids, by status: 90% SUCCEEDED, 4% DEAD, 1% CANCELLED, 2% PENDING and due (a
# backlog), 1% PENDING in the future (retries waiting out their backoff, scheduled tasks), 1%
# RUNNING with an expired lease, 0.5% RUNNING with a live one, 0.4% QUEUED, 0.1% QUEUED and
# never claimed. Priorities come from a hash so they do not correlate with the status buckets.
POPULATE_TASKS = """
INSERT INTO ledgerq.tasks (id, task_type, queue, status, priority, payload, attempts,
    max_attempts, run_at, idempotency_key, result, last_error, worker_id, lease_expires_at,
    queued_at, created_at, started_at, finished_at)
SELECT g, (ARRAY['email.send', 'payment.capture', 'report.build'])[1 + g %% 3],
    CASE WHEN g %% 4 = 0 THEN 'reports' ELSE 'default' END,
    s.status,
    CASE WHEN h < 5 THEN 10 WHEN h < 20 THEN 5 WHEN h < 25 THEN -5 ELSE 0 END,
    jsonb_build_object('to', 'user' || g || '@example.com', 'template', 'welcome', 'n', g),
    s.attempts, CASE WHEN s.status = 'DEAD' THEN 3 ELSE 5 END,
    CASE WHEN s.b BETWEEN 970 AND 979 THEN now() + make_interval(secs => 60 + g %% 3600)
         ELSE s.created END,
    CASE WHEN h %% 3 = 0 THEN 'key-' || g END,
    CASE WHEN s.status = 'SUCCEEDED' THEN '{"ok": true}'::jsonb END,
    CASE WHEN s.status = 'DEAD' OR s.b BETWEEN 970 AND 979 THEN 'boom' END,
    CASE WHEN s.attempts > 0 THEN 'worker-' || g %% 16 END,
    CASE WHEN s.b BETWEEN 980 AND 989 THEN now() - make_interval(secs => 1 + g %% 300)
         WHEN s.b BETWEEN 990 AND 994 THEN now() + interval '1 hour' END,
    CASE WHEN s.b = 999 THEN now() - interval '10 minutes'
         WHEN s.status = 'QUEUED' THEN now() END,
    s.created,
    CASE WHEN s.attempts > 0 THEN s.created + interval '1 second' END,
    CASE WHEN s.status IN ('SUCCEEDED', 'DEAD', 'CANCELLED') THEN s.created + interval '2 seconds' END
FROM generate_series(1, %(rows)s) g
CROSS JOIN LATERAL (SELECT abs(hashint4(g)) %% 100 AS h) hh
CROSS JOIN LATERAL (
    SELECT b, created,
        CASE WHEN b < 900 THEN 'SUCCEEDED' WHEN b < 940 THEN 'DEAD' WHEN b < 950 THEN 'CANCELLED'
             WHEN b < 980 THEN 'PENDING' WHEN b < 995 THEN 'RUNNING' ELSE 'QUEUED' END AS status,
        CASE WHEN b < 900 THEN 1 WHEN b < 940 THEN 3 WHEN b < 970 THEN 0
             WHEN b < 995 THEN 1 ELSE 0 END AS attempts
    FROM (SELECT g %% 1000 AS b,
                 now() - interval '1 hour' - make_interval(secs => (%(rows)s - g) * 0.05) AS created) c
) s
"""

# Every attempt a task has made; the current one of a RUNNING task is still open.
POPULATE_ATTEMPTS = """
INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, started_at, finished_at, outcome, error)
SELECT t.id, a, t.worker_id, t.started_at,
    CASE WHEN t.status = 'RUNNING' AND a = t.attempts THEN NULL ELSE t.started_at + interval '1 second' END,
    CASE WHEN t.status = 'RUNNING' AND a = t.attempts THEN NULL
         WHEN t.status = 'SUCCEEDED' AND a = t.attempts THEN 'succeeded' ELSE 'failed' END,
    CASE WHEN t.status = 'RUNNING' AND a = t.attempts THEN NULL
         WHEN t.status = 'SUCCEEDED' AND a = t.attempts THEN NULL ELSE 'boom' END
FROM ledgerq.tasks t CROSS JOIN LATERAL generate_series(1, t.attempts) a
"""


def populate(conn: Conn, rows: int) -> None:
    """Replace the ledger's contents with `rows` tasks, vacuumed and analysed."""
    reset(conn)
    with conn.transaction():
        conn.execute(POPULATE_TASKS, {"rows": rows})
        conn.execute(POPULATE_ATTEMPTS)
        conn.execute("SELECT setval(pg_get_serial_sequence('ledgerq.tasks', 'id'), %s)", (rows,))
    conn.execute("VACUUM (ANALYZE) ledgerq.tasks, ledgerq.attempts")
    conn.execute("CHECKPOINT")


def task_json(n: int, keyed: bool) -> dict[str, Any]:
    """One enqueue_tasks element, as Ledger.enqueue_many builds it from a NewTask."""
    body: dict[str, Any] = {
        "task_type": "email.send",
        "payload": {"to": f"user{n}@example.com", "template": "welcome"},
        "queue": "default",
        "priority": 0,
        "max_attempts": 5,
    }
    if keyed:
        body["idempotency_key"] = f"welcome-{n}"
    return body


def batch_bodies(count: int, size: int, keyed: bool) -> list[str]:
    """`count` enqueue_tasks arguments of `size` tasks each, as JSON text."""
    return [json.dumps([task_json(b * size + i, keyed) for i in range(size)]) for b in range(count)]


def one_task(n: int) -> tuple[Any, ...]:
    """enqueue_task's arguments: task_type, payload, queue, priority, max_attempts, key."""
    return ("email.send", Jsonb({"to": f"user{n}@example.com"}), "default", 0, 5, None)


def queued_ids(conn: Conn, count: int) -> list[int]:
    """`count` new tasks, handed to "Redis" by task_take_due: their ids in dispatch order."""
    reset(conn)
    conn.execute(
        "INSERT INTO ledgerq.tasks (task_type, queue, payload, run_at)"
        " SELECT 'email.send', 'default', jsonb_build_object('n', g), now() - interval '1 second'"
        " FROM generate_series(1, %s) g",
        (count,),
    )
    conn.execute("VACUUM (ANALYZE) ledgerq.tasks")
    ids: list[int] = []
    while len(ids) < count:
        rows = conn.execute("SELECT id FROM ledgerq.task_take_due(1000)").fetchall()
        if not rows:
            break
        ids.extend(r[0] for r in rows)
    conn.execute("VACUUM (ANALYZE) ledgerq.tasks")
    conn.execute("CHECKPOINT")
    return ids
