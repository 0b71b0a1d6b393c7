"""The SQL the runtime sends and how its rows decode: query texts (one per SQL
function call, plus read-only listings and stats), their parameters, and the
values they return. ``ledger.py`` runs them; nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, LiteralString

from psycopg.types.json import Jsonb

from ledgerq import errors
from ledgerq.types import (
    Attempt,
    AttemptOutcome,
    ClaimedTask,
    JsonObject,
    Outcome,
    Task,
    TaskId,
    TaskStatus,
    TaskTypeInfo,
)

NOTIFY_CHANNEL = "ledgerq_tasks"
#: Each task's id, as it becomes final (migration 0005's trigger).
FINAL_CHANNEL = "ledgerq_final"
LIST_LIMIT_MAX = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class NewTask:
    """The arguments of enqueue_task."""

    task_type: str
    payload: JsonObject = dataclasses.field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 5
    idempotency_key: str | None = None

    def to_json(self) -> JsonObject:
        body: JsonObject = {
            "task_type": self.task_type,
            "payload": self.payload,
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
        }
        if self.run_at is not None:
            body["run_at"] = self.run_at.isoformat()
        if self.idempotency_key is not None:
            body["idempotency_key"] = self.idempotency_key
        return body


@dataclasses.dataclass(frozen=True, slots=True)
class QueueDepth:
    """Tasks of one queue in one live status (or DEAD), for the metrics gauges."""

    queue: str
    status: TaskStatus
    count: int
    #: Seconds since the oldest due task of this status became due (PENDING, QUEUED).
    oldest_due_age_s: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSummary:
    """One queue: tasks by status, its oldest due task's age, what finished lately."""

    queue: str
    counts: dict[TaskStatus, int]
    oldest_due_age_s: float | None
    finished_last_minute: int


@dataclasses.dataclass(frozen=True, slots=True)
class EffectRecord:
    """One row of the effect log: which task recorded an effect key, and when."""

    effect_key: str
    task_id: TaskId | None
    recorded_at: datetime


# --- query texts -----------------------------------------------------------

ENQUEUE: LiteralString = """
    SELECT id, created FROM ledgerq.enqueue_task(
        task_type => %(task_type)s, payload => %(payload)s, queue => %(queue)s,
        priority => %(priority)s, run_at => coalesce(%(run_at)s::timestamptz, now()),
        max_attempts => %(max_attempts)s, idempotency_key => %(idempotency_key)s)
"""
ENQUEUE_MANY: LiteralString = "SELECT id, created FROM ledgerq.enqueue_tasks(%s)"
# ENQUEUE plus the transaction's now(): the created_at (and default run_at) the
# new row got, so the caller can answer with the task without reading it back.
ENQUEUE_STAMPED: LiteralString = """
    SELECT id, created, now() FROM ledgerq.enqueue_task(
        task_type => %(task_type)s, payload => %(payload)s, queue => %(queue)s,
        priority => %(priority)s, run_at => coalesce(%(run_at)s::timestamptz, now()),
        max_attempts => %(max_attempts)s, idempotency_key => %(idempotency_key)s)
"""
ENQUEUE_MANY_STAMPED: LiteralString = "SELECT id, created, now() FROM ledgerq.enqueue_tasks(%s)"
CLAIM: LiteralString = """
    SELECT id, task_type, queue, payload, attempts, max_attempts, priority, run_at
    FROM ledgerq.claim_tasks(%s, %s, %s)
"""
HEARTBEAT: LiteralString = "SELECT task_id, attempt, state FROM ledgerq.heartbeat_tasks(%s, %s, %s)"
COMPLETE: LiteralString = """
    SELECT task_id, attempt, status FROM ledgerq.complete_tasks(%s, %s, %s, %s, %s, %s)
"""
RELEASE: LiteralString = "SELECT task_id, status FROM ledgerq.task_release(%s, %s, %s)"
# One statement, so one round trip; and it commits without waiting for the WAL
# flush: a QUEUED mark lost in a crash leaves the task PENDING, and it is
# simply dispatched again (claim_task accepts either).
TAKE_DUE: LiteralString = """
    SELECT d.id, d.queue, d.priority
    FROM set_config('synchronous_commit', 'off', true) AS s, ledgerq.task_take_due(%s) AS d
"""
NEXT_RUN_AT: LiteralString = "SELECT ledgerq.task_next_run_at()"
QUEUED_STALE: LiteralString = """
    SELECT id, queue, priority FROM ledgerq.task_queued_stale(make_interval(secs => %s), %s)
"""
QUEUED_CONFIRM: LiteralString = "SELECT ledgerq.task_queued_confirm(%s)"
REAP: LiteralString = "SELECT ledgerq.reap_stuck()"
CANCEL: LiteralString = "SELECT ledgerq.cancel_task(%s)"
RETRY: LiteralString = "SELECT ledgerq.retry_task(%s)"
RECORD_EFFECT: LiteralString = "SELECT ledgerq.record_effect(%s, %s, %s)"
EFFECT_LOCK: LiteralString = "SELECT recorded, result FROM ledgerq.effect_lock(%s)"
WORKER_REGISTER: LiteralString = "SELECT ledgerq.worker_register(%s, %s, %s, %s)"
WORKER_HEARTBEAT: LiteralString = "SELECT ledgerq.worker_heartbeat(%s)"
WORKER_STOP: LiteralString = "SELECT ledgerq.worker_stop(%s)"
HAND_BACK: LiteralString = "SELECT task_id, status FROM ledgerq.task_hand_back(%s, %s, %s, %s)"
TASK_TYPES: LiteralString = """
    SELECT task_type, queue, max_attempts, timeout_seconds, workers_alive, last_seen_at
    FROM ledgerq.task_types ORDER BY task_type
"""

# Read-only queries for listings and stats.
GET_TASK: LiteralString = """
    SELECT id, task_type, queue, status, priority, payload, attempts, max_attempts, run_at,
           idempotency_key, result, last_error, created_at, started_at, finished_at,
           cancel_requested
    FROM ledgerq.tasks WHERE id = %s
"""
GET_TASKS: LiteralString = """
    SELECT id, task_type, queue, status, priority, payload, attempts, max_attempts, run_at,
           idempotency_key, result, last_error, created_at, started_at, finished_at,
           cancel_requested
    FROM ledgerq.tasks WHERE id = ANY(%s)
"""
GET_ATTEMPTS: LiteralString = """
    SELECT attempt, worker_id, started_at, finished_at, outcome, error
    FROM ledgerq.attempts WHERE task_id = %s ORDER BY attempt
"""
LIST_TASKS: LiteralString = """
    SELECT id, task_type, queue, status, priority, payload, attempts, max_attempts, run_at,
           idempotency_key, result, last_error, created_at, started_at, finished_at,
           cancel_requested
    FROM ledgerq.tasks
    WHERE (%(status)s::text IS NULL OR status = %(status)s)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s)
      AND (%(task_type)s::text IS NULL OR task_type = %(task_type)s)
      AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
    ORDER BY id DESC
    LIMIT %(limit)s
"""
QUEUE_STATS: LiteralString = """
    SELECT queue, status, count, oldest_run_at FROM ledgerq.queue_stats ORDER BY queue, status
"""
# Live statuses only, one partial index each (tasks_dispatch_idx, tasks_queued_idx,
# tasks_lease_idx, tasks_dead_idx): /metrics reads this at every scrape, and a
# count over SUCCEEDED rows would scan the whole table.
QUEUE_DEPTHS: LiteralString = """
    SELECT queue, 'PENDING', count(*),
           extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8
    FROM ledgerq.tasks WHERE status = 'PENDING' GROUP BY queue
    UNION ALL
    SELECT queue, 'QUEUED', count(*), extract(epoch FROM now() - min(run_at))::float8
    FROM ledgerq.tasks WHERE status = 'QUEUED' GROUP BY queue
    UNION ALL
    SELECT queue, 'RUNNING', count(*), NULL FROM ledgerq.tasks WHERE status = 'RUNNING' GROUP BY queue
    UNION ALL
    SELECT queue, 'DEAD', count(*), NULL FROM ledgerq.tasks WHERE status = 'DEAD' GROUP BY queue
"""
# Every status of every queue in one pass: a full scan, for operators (GET /queues,
# `ledgerq stats`), not for anything scraped on a timer.
QUEUE_SUMMARY: LiteralString = """
    SELECT queue,
           count(*) FILTER (WHERE status = 'PENDING'),
           count(*) FILTER (WHERE status = 'QUEUED'),
           count(*) FILTER (WHERE status = 'RUNNING'),
           count(*) FILTER (WHERE status = 'SUCCEEDED'),
           count(*) FILTER (WHERE status = 'DEAD'),
           count(*) FILTER (WHERE status = 'CANCELLED'),
           extract(epoch FROM now() - min(run_at)
               FILTER (WHERE status IN ('PENDING', 'QUEUED') AND run_at <= now()))::float8,
           count(*) FILTER (WHERE finished_at >= now() - interval '60 seconds')
    FROM ledgerq.tasks GROUP BY queue ORDER BY queue
"""
GET_ATTEMPTS_MANY: LiteralString = """
    SELECT task_id, attempt, worker_id, started_at, finished_at, outcome, error
    FROM ledgerq.attempts WHERE task_id = ANY(%s) ORDER BY task_id, attempt
"""
EFFECTS_OF: LiteralString = """
    SELECT effect_key, task_id, recorded_at FROM ledgerq.effects
    WHERE task_id = ANY(%s) ORDER BY effect_key
"""


# --- row decoding ------------------------------------------------------------


def decode_task(row: Sequence[Any], history: Sequence[Attempt] = ()) -> Task:
    return Task(
        id=TaskId(row[0]),
        type=row[1],
        queue=row[2],
        status=TaskStatus(row[3]),
        priority=row[4],
        payload=row[5],
        attempts=row[6],
        max_attempts=row[7],
        run_at=row[8],
        idempotency_key=row[9],
        result=row[10],
        last_error=row[11],
        created_at=row[12],
        started_at=row[13],
        finished_at=row[14],
        cancel_requested=row[15],
        attempt_history=tuple(history),
    )


def decode_attempt(row: Sequence[Any]) -> Attempt:
    return Attempt(
        attempt=row[0],
        worker_id=row[1],
        started_at=row[2],
        finished_at=row[3],
        outcome=AttemptOutcome(row[4]) if row[4] is not None else None,
        error=row[5],
    )


def decode_claimed(row: Sequence[Any]) -> ClaimedTask:
    return ClaimedTask(
        id=TaskId(row[0]),
        type=row[1],
        queue=row[2],
        payload=row[3],
        attempt=row[4],
        max_attempts=row[5],
        priority=row[6],
        run_at=row[7],
    )


def created_task(task: NewTask, task_id: int, stamp: datetime) -> Task:
    """The row enqueue_task(s) inserted for task, given its id and the transaction's now()."""
    return Task(
        id=TaskId(task_id),
        type=task.task_type,
        queue=task.queue,
        status=TaskStatus.PENDING,
        priority=task.priority,
        payload=task.payload,
        attempts=0,
        max_attempts=task.max_attempts,
        run_at=task.run_at.astimezone(stamp.tzinfo) if task.run_at else stamp,
        idempotency_key=task.idempotency_key,
        result=None,
        last_error=None,
        created_at=stamp,
        started_at=None,
        finished_at=None,
        created=True,
    )


def enqueued(
    tasks: Sequence[NewTask], rows: Sequence[Sequence[Any]], replayed: Mapping[TaskId, Task]
) -> list[Task]:
    """The answers of enqueue_task(s) as tasks, in input order: a task the call
    created is built from its arguments (no read needed); one an idempotency
    key returned is the task as read back (``replayed``, by id)."""
    return [
        created_task(task, row[0], row[2])
        if row[1]
        else dataclasses.replace(replayed[row[0]], created=False)
        for task, row in zip(tasks, rows, strict=True)
    ]


def enqueue_params(task: NewTask) -> dict[str, Any]:
    return {
        "task_type": task.task_type,
        "payload": Jsonb(task.payload),
        "queue": task.queue,
        "priority": task.priority,
        "run_at": task.run_at,
        "max_attempts": task.max_attempts,
        "idempotency_key": task.idempotency_key,
    }


def complete_params(outcomes: Sequence[Outcome]) -> tuple[Any, ...]:
    return (
        [o.task_id for o in outcomes],
        [o.attempt for o in outcomes],
        [o.succeeded for o in outcomes],
        [Jsonb(o.result) if o.result is not None else None for o in outcomes],
        [o.error for o in outcomes],
        [o.retryable for o in outcomes],
    )


def list_params(
    status: str | None, queue: str | None, task_type: str | None, limit: int, before_id: int | None
) -> dict[str, Any]:
    if status is not None and status not in TaskStatus.__members__:
        allowed = ", ".join(TaskStatus.__members__)
        raise errors.InvalidInput(f"status must be one of {allowed}, got {status!r}")
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise errors.InvalidInput(f"limit must be between 1 and {LIST_LIMIT_MAX}, got {limit}")
    return {
        "status": status,
        "queue": queue,
        "task_type": task_type,
        "limit": limit,
        "before_id": before_id,
    }


def status_or_none(value: str | None) -> TaskStatus | None:
    return TaskStatus(value) if value is not None else None


SUMMARY_STATUSES = (
    TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING,
    TaskStatus.SUCCEEDED, TaskStatus.DEAD, TaskStatus.CANCELLED,
)  # fmt: skip


def decode_queue_summary(row: Sequence[Any]) -> QueueSummary:
    counts = {status: int(n) for status, n in zip(SUMMARY_STATUSES, row[1:7], strict=True)}
    return QueueSummary(row[0], counts, row[7], int(row[8]))


def decode_task_type(row: Sequence[Any]) -> TaskTypeInfo:
    return TaskTypeInfo(row[0], row[1], int(row[2]), row[3], int(row[4]), row[5])
