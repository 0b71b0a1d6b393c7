"""Plain values every layer shares: statuses, tasks, attempts. No I/O here."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any, NewType, Protocol

#: A JSON value (payloads, results). The one place ``Any`` is allowed.
JsonValue = Any
JsonObject = dict[str, JsonValue]

TaskId = NewType("TaskId", int)

QUEUE_DEFAULT = "default"
MAX_ATTEMPTS_DEFAULT = 5


class TaskDefaults(Protocol):
    """What a client needs to know of a registered task type."""

    @property
    def queue(self) -> str: ...

    @property
    def max_attempts(self) -> int: ...


class TaskTypes(Protocol):
    """Registered task types by name (a Registry), as a client sees them."""

    def get(self, name: str, /) -> TaskDefaults | None: ...


class TaskStatus(enum.StrEnum):
    """The life cycle of a task, exactly as the ledger stores it."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.DEAD, TaskStatus.CANCELLED})


class AttemptOutcome(enum.StrEnum):
    """How one attempt ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    CANCELLED = "cancelled"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at running a task."""

    attempt: int
    worker_id: str
    started_at: datetime
    finished_at: datetime | None
    outcome: AttemptOutcome | None
    error: str | None

    def to_json(self) -> JsonObject:
        return {
            "attempt": self.attempt,
            "worker_id": self.worker_id,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "outcome": self.outcome.value if self.outcome else None,
            "error": self.error,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """A task as the ledger records it; the same fields as the HTTP task JSON.

    ``created`` is set only on the result of an enqueue: True when that call
    created the task, False when an idempotency key returned an existing one.
    """

    id: TaskId
    type: str
    queue: str
    status: TaskStatus
    priority: int
    payload: JsonObject
    attempts: int
    max_attempts: int
    run_at: datetime
    idempotency_key: str | None
    result: JsonValue
    last_error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool = False
    attempt_history: tuple[Attempt, ...] = ()
    created: bool | None = None

    def to_json(self) -> JsonObject:
        body: JsonObject = {
            "id": self.id,
            "type": self.type,
            "queue": self.queue,
            "status": self.status.value,
            "priority": self.priority,
            "payload": self.payload,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "run_at": _iso(self.run_at),
            "idempotency_key": self.idempotency_key,
            "result": self.result,
            "last_error": self.last_error,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "cancel_requested": self.cancel_requested,
            "attempt_history": [a.to_json() for a in self.attempt_history],
        }
        if self.created is not None:
            body["created"] = self.created
        return body


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A task this worker has just claimed: what a handler needs to run."""

    id: TaskId
    type: str
    queue: str
    payload: JsonObject
    attempt: int
    max_attempts: int
    priority: int
    run_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt, for complete_tasks."""

    task_id: TaskId
    attempt: int
    succeeded: bool
    result: JsonValue = None
    error: str | None = None
    retryable: bool = True
    #: How long the handler ran, for the worker's outcome log line.
    duration_s: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DueTask:
    """A task the dispatcher hands to Redis."""

    id: TaskId
    queue: str
    priority: int


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStat:
    """One row of the queue_stats view."""

    queue: str
    status: TaskStatus
    count: int
    oldest_run_at: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class TaskTypeInfo:
    """A task type registered by workers: its defaults, and who serves it now."""

    task_type: str
    queue: str
    max_attempts: int
    timeout_s: float | None
    workers_alive: int
    last_seen_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "task_type": self.task_type,
            "queue": self.queue,
            "max_attempts": self.max_attempts,
            "timeout_seconds": self.timeout_s,
            "workers_alive": self.workers_alive,
            "last_seen_at": self.last_seen_at.isoformat() if self.last_seen_at else None,
        }
