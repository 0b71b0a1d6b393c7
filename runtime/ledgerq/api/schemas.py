"""The HTTP API's request and response shapes (pydantic), apart from ledger rows.

Requests are validated strictly: ``"5"`` is not an integer (``5.0`` is, as in
JSON Schema; ``5.5`` is not); ``run_at`` must name a UTC instant in years 1 to
9999, what the ledger can store and read back; unknown fields are refused, so a misspelt ``delay_second`` is an
error rather than a task that runs at once. Responses are built from
``Task.to_json()`` and friends without a second validation pass (it would cost
more than the rest of the request); these models document them in OpenAPI, and
the schemathesis test holds the two together.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from ledgerq import errors, storable, types

BATCH_MAX = 1000
#: The longest delay_seconds accepted: ten years.
DELAY_MAX_S = 10 * 365 * 24 * 3600
INT32_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1


def _text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain U+0000")
    if not value.strip(" "):
        raise ValueError("must not be blank")
    return value


def _iso_string(value: Any) -> Any:
    # Lax datetime parsing would also take numbers as Unix times; a run_at of 5
    # is far likelier a mistake than 1970.
    if not isinstance(value, str | datetime):
        raise ValueError("must be an ISO 8601 timestamp string with a time zone")
    return value


def _within_years_1_to_9999_utc(value: datetime) -> datetime:
    # 9999-12-31T23:59:59-14:00 is year 10000 in UTC: PostgreSQL would store it
    # and psycopg could not read it back. The clients refuse it the same way.
    try:
        return storable.run_at(value)
    except errors.InvalidInput:
        raise ValueError(f"must fall within {storable.RUN_AT_RANGE}") from None


def _integral(value: Any) -> Any:
    # JSON does not tell 5 from 5.0, and JSON Schema's "integer" admits both:
    # an integral float is taken as the integer it is; 5.5 is still refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_text)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_text)]
ConcurrencyKey = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_text)]
RunAt = Annotated[
    AwareDatetime,
    BeforeValidator(_iso_string),
    Field(strict=False),
    AfterValidator(_within_years_1_to_9999_utc),
]
Integer = Annotated[int, BeforeValidator(_integral)]
#: A queue's limits (max_running, per_key_max_running, burst), rates and
#: retention, within the bounds configure_queue enforces.
RATE_MAX = 1_000_000_000
Limit = Annotated[int, BeforeValidator(_integral), Field(ge=1, le=INT32_MAX)]
Rate = Annotated[float, Field(gt=0, le=RATE_MAX, allow_inf_nan=False)]
Retention = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_text)]
TaskIdParam = Annotated[int, Field(ge=1, le=BIGINT_MAX)]


class TaskCreate(BaseModel):
    """A task to enqueue: POST /tasks, and each item of POST /tasks/batch."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Name = Field(description="The task type a handler is registered for.")
    payload: dict[str, Any] = Field(default_factory=dict, description="A JSON object.")
    queue: Name | None = Field(
        None, description="Default: the task type's registered queue, else `default`."
    )
    priority: Integer = Field(
        0,
        ge=types.PRIORITY_MIN,
        le=types.PRIORITY_MAX,
        description="Higher runs first.",
    )
    run_at: RunAt | None = Field(None, description="When the task is due; not with delay_seconds.")
    delay_seconds: float | None = Field(
        None,
        ge=0,
        le=DELAY_MAX_S,
        allow_inf_nan=False,
        description="Due this many seconds from now; not with run_at.",
    )
    max_attempts: Integer | None = Field(
        None,
        ge=1,
        le=INT32_MAX,
        description="Default: the task type's registered max_attempts, else 5.",
    )
    idempotency_key: IdempotencyKey | None = Field(
        None,
        description="Replaying a key returns the task it created (an Idempotency-Key header works too).",
    )
    concurrency_key: ConcurrencyKey | None = Field(
        None,
        description="Any text naming what the task competes for (a tenant, an outside API); "
        "queue settings can limit how many tasks of one key run at once.",
    )

    @model_validator(mode="after")
    def _one_schedule(self) -> TaskCreate:
        if self.run_at is not None and self.delay_seconds is not None:
            raise ValueError("give run_at or delay_seconds, not both")
        return self


class BatchCreate(BaseModel):
    """POST /tasks/batch: all are enqueued, or none."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: list[TaskCreate] = Field(max_length=BATCH_MAX)


class AttemptOut(BaseModel):
    """One attempt at running a task."""

    attempt: int
    worker_id: str
    started_at: datetime
    finished_at: datetime | None
    outcome: types.AttemptOutcome | None
    error: str | None


class TaskOut(BaseModel):
    """A task, as the ledger records it."""

    id: int
    type: str
    queue: str
    status: types.TaskStatus
    priority: int
    payload: dict[str, Any]
    attempts: int = Field(description="How many attempts have started.")
    max_attempts: int
    run_at: datetime
    idempotency_key: str | None
    concurrency_key: str | None
    result: Any = Field(description="The handler's JSON result, once SUCCEEDED.")
    last_error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool = Field(description="Cancellation asked for while RUNNING.")
    attempt_history: list[AttemptOut]
    created: bool | None = Field(
        None, description="Only in POST /tasks replies: false when a key replayed an old task."
    )


class TaskPage(BaseModel):
    """A page of tasks, newest first."""

    tasks: list[TaskOut]
    next_cursor: str | None = Field(
        description="Pass as cursor= for the next page; null at the end."
    )


class BatchItemOut(BaseModel):
    """The result for one item of a batch, in input order."""

    id: int
    status: types.TaskStatus
    created: bool


class BatchOut(BaseModel):
    """The results of a batch, one per item, in input order."""

    results: list[BatchItemOut]


class StatusOut(BaseModel):
    """A task's status after cancel or retry."""

    id: int
    status: types.TaskStatus


class QueueSettingsIn(BaseModel):
    """PUT /queues/{queue}/settings: the settings to change. A key left out is
    unchanged; a key set to null removes that setting; an unknown key is refused.

    The types and bounds here are checked first; the ledger's configure_queue
    checks every value again (the same rules for SQL callers) and its refusal
    is a 422 naming the key too."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_running: Limit | None = Field(
        None, description="At most this many tasks of the queue RUNNING at once, fleet-wide."
    )
    per_key_max_running: Limit | None = Field(
        None,
        description="At most this many tasks with the same concurrency key RUNNING at once.",
    )
    rate_per_second: Rate | None = Field(
        None, description="At most this many attempts of the queue start per second."
    )
    per_key_rate_per_second: Rate | None = Field(
        None, description="The same, for each concurrency key."
    )
    retry_rate_per_second: Rate | None = Field(
        None, description="At most this many retried attempts (attempt > 1) start per second."
    )
    burst: Limit | None = Field(
        None, description="Bucket size of the rates above (default: max(1, ceil(rate)))."
    )
    retention: Retention | None = Field(
        None,
        description="How long finished tasks of the queue are kept, as PostgreSQL interval "
        'text such as "3 days".',
    )


class QueueSettingsOut(BaseModel):
    """A queue's settings: only the keys that are set."""

    max_running: int | None = None
    per_key_max_running: int | None = None
    rate_per_second: float | None = None
    per_key_rate_per_second: float | None = None
    retry_rate_per_second: float | None = None
    burst: int | None = None
    retention: str | None = None


class QueuePausedOut(BaseModel):
    """A queue's pause after pause or resume, and whether the call changed it."""

    queue: str
    paused: bool
    changed: bool = Field(description="false when the queue was already in that state.")


class QueueOut(BaseModel):
    """One queue's state."""

    queue: str
    counts: dict[types.TaskStatus, int] = Field(description="Tasks by status.")
    oldest_pending_age_seconds: float | None = Field(
        description="How long the oldest due, not yet started task has waited; null if none."
    )
    finished_last_minute: int = Field(
        description="Tasks that reached a final status in the last 60 s."
    )
    paused: bool = Field(description="No task of the queue starts while it is paused.")
    settings: QueueSettingsOut = Field(description="Its flow-control settings (those set).")


class QueuesOut(BaseModel):
    """Every queue with tasks, and every queue that was configured or paused."""

    queues: list[QueueOut]


class ScheduleOut(BaseModel):
    """One schedule, as the ``schedules`` view shows it."""

    name: str
    cron: str
    timezone: str
    task_type: str
    queue: str
    paused: bool
    next_run_at: datetime | None = Field(
        description="When its next task is due; null while paused. In the past while a due "
        "slot waits for the dispatcher."
    )
    last_slot: datetime | None = Field(description="Its latest fired slot; null if none.")
    last_task_id: int | None = Field(description="The task of that slot; null if none.")


class SchedulesOut(BaseModel):
    """Every schedule, by name."""

    schedules: list[ScheduleOut]


class SchedulePausedOut(BaseModel):
    """A schedule's state after pause or resume."""

    name: str
    paused: bool


class HealthOut(BaseModel):
    """The process is alive, or ready."""

    status: Literal["ok"]


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str
    message: str


class ErrorOut(BaseModel):
    """Every error response."""

    error: ErrorDetail


class NotReadyOut(ErrorOut):
    """GET /readyz when a dependency is unavailable: which one."""

    checks: dict[str, str]


_ERROR_DESCRIPTIONS = {
    401: "Missing or wrong bearer token.",
    404: "No such task or schedule, or no such route.",
    409: "Conflict.",
    413: "Request body over the size limit.",
    422: "Invalid input; the message names the field.",
    500: "Internal error.",
    503: "PostgreSQL or Redis is unavailable.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses a route can answer with."""
    return {
        status: {"model": ErrorOut, "description": _ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }
