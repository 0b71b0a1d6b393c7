"""Plain values every layer shares: statuses, tasks, attempts, queue summaries,
and the bounds every edge checks (priority range). No I/O here."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime, timedelta
from typing import Any, NewType, Protocol

#: A JSON value (payloads, results). The one place ``Any`` is allowed.
JsonValue = Any
JsonObject = dict[str, JsonValue]

TaskId = NewType("TaskId", int)

QUEUE_DEFAULT = "default"
MAX_ATTEMPTS_DEFAULT = 5
#: A task's priority is a PostgreSQL smallint; higher runs first.
PRIORITY_MIN = -32768
PRIORITY_MAX = 32767
#: Tasks per page of a listing (the ledger's, the API's and the command line's).
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500


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
    concurrency_key: str | None = None

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
            "concurrency_key": self.concurrency_key,
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
class TaskPage:
    """A page of a listing, newest first, and where the next page starts."""

    tasks: list[Task]
    #: The ``before_id`` that asks for the next page; None on the last page.
    next_before_id: TaskId | None


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
    """A task the dispatcher hands to Redis. Its place in line: priority (higher
    first), then turn (lower first: concurrency keys take turns), then run_at,
    then id. turn and run_at are known when the task comes from task_take_due."""

    id: TaskId
    queue: str
    priority: int
    turn: int = 0
    run_at: datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Deferral:
    """A delivered task the claim refused, for now, because of its queue's flow
    control: ``reason`` is the setting that held it (``max_running``,
    ``per_key_max_running``, ``rate_per_second``, ``per_key_rate_per_second``,
    ``retry_rate_per_second``) or ``paused``. The ledger parked it, with its
    attempt budget untouched, and hands it out again when the limit allows."""

    id: TaskId
    queue: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class NewTask:
    """The arguments of enqueue_task. A queue or max_attempts of None is the
    ledger's to fill in: the task type's registered value, else the defaults."""

    task_type: str
    payload: JsonObject = dataclasses.field(default_factory=dict)
    queue: str | None = None
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None
    concurrency_key: str | None = None

    def to_json(self) -> JsonObject:
        """The object enqueue_tasks takes for this task."""
        body: JsonObject = {
            "task_type": self.task_type,
            "payload": self.payload,
            "priority": self.priority,
        }
        if self.queue is not None:
            body["queue"] = self.queue
        if self.max_attempts is not None:
            body["max_attempts"] = self.max_attempts
        if self.run_at is not None:
            body["run_at"] = self.run_at.isoformat()
        if self.idempotency_key is not None:
            body["idempotency_key"] = self.idempotency_key
        if self.concurrency_key is not None:
            body["concurrency_key"] = self.concurrency_key
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
    """One queue: tasks by status, its oldest due task's age, what finished lately,
    and its flow control (paused, settings)."""

    queue: str
    counts: dict[TaskStatus, int]
    oldest_due_age_s: float | None
    finished_last_minute: int
    paused: bool = False
    settings: JsonObject = dataclasses.field(default_factory=dict)

    def to_json(self) -> JsonObject:
        """The queue as GET /queues, ``ledgerq queues --json`` and ``ledgerq stats
        --json`` show it."""
        return {
            "queue": self.queue,
            "counts": {status.value: self.counts.get(status, 0) for status in TaskStatus},
            "oldest_pending_age_seconds": self.oldest_due_age_s,
            "finished_last_minute": self.finished_last_minute,
            "paused": self.paused,
            "settings": self.settings,
        }


#: The keys of a queue's settings (``configure_queue``), in the order they are shown.
QUEUE_SETTING_KEYS = (
    "max_running", "per_key_max_running", "rate_per_second", "per_key_rate_per_second",
    "retry_rate_per_second", "burst", "retention",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSettings:
    """A row of the ``queue_settings`` view: a queue that was configured or paused."""

    queue: str
    paused: bool
    settings: JsonObject
    updated_at: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class QueuePaused:
    """What pause_queue or resume_queue did: the queue's pause now, and whether it changed."""

    queue: str
    paused: bool
    changed: bool

    def to_json(self) -> JsonObject:
        return {"queue": self.queue, "paused": self.paused, "changed": self.changed}


@dataclasses.dataclass(frozen=True, slots=True)
class EffectRecord:
    """One row of the effect log: which task recorded an effect key, and when."""

    effect_key: str
    task_id: TaskId | None
    recorded_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class NewSchedule:
    """The arguments of ``schedule_task``: a schedule to create or replace."""

    name: str
    cron: str
    task_type: str
    payload: JsonObject = dataclasses.field(default_factory=dict)
    queue: str = QUEUE_DEFAULT
    priority: int = 0
    max_attempts: int = MAX_ATTEMPTS_DEFAULT
    timezone: str = "UTC"
    overlap: bool = True
    catch_up: timedelta = timedelta(0)


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """One row of the ``schedules`` view."""

    name: str
    cron: str
    timezone: str
    task_type: str
    queue: str
    paused: bool
    next_run_at: datetime | None
    last_slot: datetime | None
    last_task_id: TaskId | None

    def to_json(self) -> JsonObject:
        """The schedule as GET /schedules and ``ledgerq schedules --json`` show it."""
        return {
            "name": self.name,
            "cron": self.cron,
            "timezone": self.timezone,
            "task_type": self.task_type,
            "queue": self.queue,
            "paused": self.paused,
            "next_run_at": self.next_run_at.isoformat() if self.next_run_at else None,
            "last_slot": self.last_slot.isoformat() if self.last_slot else None,
            "last_task_id": self.last_task_id,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleFired:
    """What one ``schedule_fire`` call did to one schedule that was due."""

    name: str
    enqueued: int
    already_enqueued: int
    skipped_overlap: int


@dataclasses.dataclass(frozen=True, slots=True)
class EffectStart:
    """What effect_start found: a recorded result, or the start mark a lost attempt left."""

    recorded: bool
    result: Any
    unknown_task_id: TaskId | None
    unknown_attempt: int | None
    unknown_started_at: datetime | None


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
