"""The operators' dashboard's ledger calls, as plans like those of ``queries.py``.

Beside ``queries.py`` (the SQL function calls and the HTTP API's listings):
what finished per minute, the workers seen lately, a task by its idempotency
key, which optional SQL objects the ledger has, and the calls of the schedule
functions the dashboard's buttons make (its queue controls use the plans of
``queries.py``, as the API and the command line do). ``ledger.py`` runs them;
nothing here does I/O. None of the reads scans the tasks table; each says
which index serves it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any, LiteralString

from ledgerq import queries
from ledgerq.queries import Call, Plan
from ledgerq.types import TaskId, TaskStatus

#: How far back the dashboard's throughput chart looks.
THROUGHPUT_MINUTES = 60
#: A worker counts as seen when it heartbeat or finished an attempt this recently.
WORKERS_WINDOW_S = 300.0


@dataclasses.dataclass(frozen=True, slots=True)
class Features:
    """The SQL objects the dashboard's optional controls need, present or not.

    A ledger migrated before schedules existed lacks them; the dashboard asks
    once at start-up and shows their controls when they exist."""

    schedules: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class FinishedBucket:
    """How many tasks of one queue reached one final status in one minute."""

    queue: str
    status: TaskStatus
    minute: datetime
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSeen:
    """A worker seen lately: its registration (if any) and the attempts it ran."""

    worker_id: str
    queues: tuple[str, ...]
    task_types: tuple[str, ...]
    concurrency: int | None
    started_at: datetime | None
    last_seen_at: datetime | None
    stopped_at: datetime | None
    running: int
    finished: int
    last_finished_at: datetime | None


# --- query texts -----------------------------------------------------------

FEATURES: LiteralString = """
    SELECT to_regprocedure('ledgerq.pause_schedule(text)') IS NOT NULL
           AND to_regprocedure('ledgerq.resume_schedule(text)') IS NOT NULL
           AND to_regclass('ledgerq.schedules') IS NOT NULL
"""
# Index-only on tasks_finished_idx (finished_at INCLUDE queue, status): the
# range predicate implies the index's finished_at IS NOT NULL, and only the
# last hour's rows are read, however many tasks the table holds.
FINISHED_PER_MINUTE: LiteralString = """
    SELECT queue, status, date_trunc('minute', finished_at), count(*)
    FROM ledgerq.tasks
    WHERE finished_at >= date_trunc('minute', now()) - make_interval(mins => %s - 1)
    GROUP BY 1, 2, 3
"""
# tasks_dead_idx (partial on DEAD): index-only without a queue, with one the
# dead rows' queue is read from the heap (dead tasks only, never the others).
DEAD_COUNT: LiteralString = """
    SELECT count(*) FROM ledgerq.tasks
    WHERE status = 'DEAD' AND (%(queue)s::text IS NULL OR queue = %(queue)s)
"""
# tasks_idempotency_key_idx (unique, partial on keys that are set).
TASK_BY_KEY: LiteralString = "SELECT id FROM ledgerq.tasks WHERE idempotency_key = %s"
# Registrations by workers_last_seen_idx; running tasks by tasks_running_idx
# (partial on RUNNING); attempts finished lately through the tasks that
# finished lately (tasks_finished_idx), then attempts' primary key. An attempt
# whose task went back to PENDING for a retry is not counted: its worker shows
# up through its registration or its next attempt.
WORKERS_SEEN: LiteralString = """
    WITH registered AS (
        SELECT worker_id, queues, task_types, concurrency, started_at, last_seen_at, stopped_at
        FROM ledgerq.workers
        WHERE last_seen_at >= now() - make_interval(secs => %(window_s)s)
    ), running AS (
        SELECT worker_id, count(*) AS running
        FROM ledgerq.tasks WHERE status = 'RUNNING' GROUP BY worker_id
    ), finished AS (
        SELECT a.worker_id, count(*) AS finished, max(a.finished_at) AS last_finished_at
        FROM ledgerq.tasks t JOIN ledgerq.attempts a ON a.task_id = t.id
        WHERE t.finished_at >= now() - make_interval(secs => %(window_s)s)
          AND a.finished_at >= now() - make_interval(secs => %(window_s)s)
        GROUP BY a.worker_id
    )
    SELECT worker_id, r.queues, r.task_types, r.concurrency, r.started_at, r.last_seen_at,
           r.stopped_at, coalesce(n.running, 0), coalesce(f.finished, 0), f.last_finished_at
    FROM registered r FULL JOIN running n USING (worker_id) FULL JOIN finished f USING (worker_id)
    ORDER BY worker_id
"""


# --- plans: one per ledger method -------------------------------------------


def features() -> Plan[Features]:
    (row,) = yield Call(FEATURES)
    return _decode_features(row)


def finished_per_minute(minutes: int) -> Plan[list[FinishedBucket]]:
    rows = yield Call(FINISHED_PER_MINUTE, (minutes,))
    return [_decode_bucket(r) for r in rows]


def dead_count(queue: str | None) -> Plan[int]:
    ((count,),) = yield Call(DEAD_COUNT, {"queue": queue})
    return int(count)


def task_id_by_key(idempotency_key: str) -> Plan[TaskId | None]:
    rows = yield Call(TASK_BY_KEY, (idempotency_key,))
    return TaskId(rows[0][0]) if rows else None


def workers_seen(window_s: float) -> Plan[list[WorkerSeen]]:
    rows = yield Call(WORKERS_SEEN, {"window_s": window_s})
    return [_decode_worker(r) for r in rows]


def pause_schedule(name: str) -> Plan[bool]:
    ((found,),) = yield Call(queries.PAUSE_SCHEDULE, (name,))
    return bool(found)


def resume_schedule(name: str) -> Plan[bool]:
    ((found,),) = yield Call(queries.RESUME_SCHEDULE, (name,))
    return bool(found)


# --- row decoding ------------------------------------------------------------


def _decode_features(row: Sequence[Any]) -> Features:
    return Features(schedules=bool(row[0]))


def _decode_bucket(row: Sequence[Any]) -> FinishedBucket:
    return FinishedBucket(row[0], TaskStatus(row[1]), row[2], int(row[3]))


def _decode_worker(row: Sequence[Any]) -> WorkerSeen:
    return WorkerSeen(
        worker_id=row[0],
        queues=tuple(row[1] or ()),
        task_types=tuple(row[2] or ()),
        concurrency=row[3],
        started_at=row[4],
        last_seen_at=row[5],
        stopped_at=row[6],
        running=int(row[7]),
        finished=int(row[8]),
        last_finished_at=row[9],
    )
