"""Helpers for the flow-control tests: bulk tasks, claims with refusals, overlaps."""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row

from .helpers import Conn, Row, call_rows, call_value


def add_tasks(
    conn: Conn, count: int, queue: str = "q", key: str | None = None, priority: int = 0
) -> list[int]:
    """``count`` due tasks of one queue and key, with the turns enqueue gives them
    (flow_turns), inserted in one statement: the tests need thousands."""
    rows = conn.execute(
        """
        INSERT INTO ledgerq.tasks (task_type, queue, concurrency_key, priority, turn, run_at)
        SELECT 't', %(queue)s, %(key)s, %(priority)s, u.turn, now() - interval '1 second'
        FROM unnest(ledgerq.flow_turns(array_fill(%(queue)s::text, ARRAY[%(n)s]),
                                       array_fill(%(key)s::text, ARRAY[%(n)s])))
             WITH ORDINALITY AS u(turn, ord)
        ORDER BY u.ord
        RETURNING id
        """,
        {"queue": queue, "key": key, "n": count, "priority": priority},
    ).fetchall()
    return sorted(int(r[0]) for r in rows)


def configure(conn: Conn, queue: str, **settings: Any) -> Any:
    return call_value(conn, "configure_queue", queue=queue, settings=settings)


def take_due(conn: Conn, batch_size: int = 100) -> list[Row]:
    return call_rows(conn, "task_take_due", batch_size=batch_size)


def claim_report(
    conn: Conn, task_ids: list[int], worker_id: str = "w"
) -> tuple[list[Row], list[Row]]:
    """task_claim: (claimed rows, deferred rows)."""
    rows = call_rows(conn, "task_claim", task_ids=task_ids, worker_id=worker_id)
    claimed = [r for r in rows if r["status"] == "RUNNING"]
    deferred = [r for r in rows if r["status"] == "PENDING"]
    assert len(claimed) + len(deferred) == len(rows), rows
    assert all(r["waiting_on"] for r in deferred), deferred
    return claimed, deferred


def finish(conn: Conn, task_id: int, attempt: int, succeeded: bool = True) -> Any:
    return call_value(conn, "complete_task", task_id=task_id, attempt=attempt, succeeded=succeeded)


def max_overlap(conn: Conn, scope: str) -> dict[Any, int]:
    """The most attempts running at once, per concurrency key ('key') or per
    queue ('queue'), from the attempt history's intervals. At equal times an
    end counts before a start."""
    column = "t.concurrency_key" if scope == "key" else "t.queue"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"""
            WITH events AS (
                SELECT {column} AS scope, a.started_at AS at, 1 AS delta
                FROM ledgerq.attempts a JOIN ledgerq.tasks t ON t.id = a.task_id
                UNION ALL
                SELECT {column}, coalesce(a.finished_at, 'infinity'), -1
                FROM ledgerq.attempts a JOIN ledgerq.tasks t ON t.id = a.task_id
            )
            SELECT scope, max(running) AS most FROM (
                SELECT scope, sum(delta) OVER (PARTITION BY scope ORDER BY at, delta
                                               ROWS UNBOUNDED PRECEDING) AS running
                FROM events) r
            GROUP BY scope
            """
        ).fetchall()
    return {r["scope"]: int(r["most"]) for r in rows}


def statuses(conn: Conn, task_ids: list[int]) -> dict[int, tuple[str, str | None, int]]:
    rows = conn.execute(
        "SELECT id, status, waiting_on, attempts FROM ledgerq.tasks WHERE id = ANY(%s)",
        (task_ids,),
    ).fetchall()
    return {int(r[0]): (r[1], r[2], int(r[3])) for r in rows}
