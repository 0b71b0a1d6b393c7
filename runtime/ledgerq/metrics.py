"""Prometheus metrics: the names are a contract (see the README's table).

Every metric lives in ``REGISTRY`` (not the process-global default registry),
so tests and several components in one process stay independent of one another.

| name | type | labels | meaning |
|---|---|---|---|
| ledgerq_tasks_enqueued_total | counter | type, queue | tasks created through this process (API or client) |
| ledgerq_tasks_started_total | counter | type, queue | attempts started by this worker |
| ledgerq_tasks_succeeded_total | counter | type, queue | attempts that ended SUCCEEDED |
| ledgerq_tasks_retried_total | counter | type, queue | failed attempts scheduled for a retry |
| ledgerq_tasks_dead_total | counter | type, queue | attempts that left the task DEAD |
| ledgerq_tasks_cancelled_total | counter | type, queue | attempts that ended CANCELLED |
| ledgerq_task_duration_seconds | histogram | type, queue | handler run time |
| ledgerq_pickup_latency_seconds | histogram | queue | run_at (or enqueue) to handler start |
| ledgerq_worker_inflight | gauge | | handlers running in this worker process |
| ledgerq_queue_depth | gauge | queue, status | tasks in the ledger by queue and status (read at scrape) |
| ledgerq_queue_oldest_pending_seconds | gauge | queue | age of the oldest due PENDING/QUEUED task (read at scrape) |
| ledgerq_queue_paused | gauge | queue | 1 while the queue is paused, else 0 (read at scrape) |
| ledgerq_claims_deferred_total | counter | queue, reason | tasks this worker was handed that the ledger held back for a flow-control limit |
| ledgerq_schedule_slots_total | counter | schedule, outcome | schedule slots this dispatcher handled: `enqueued`, `skipped_overlap` |
| ledgerq_tasks_pruned_total | counter | | finished tasks this reaper deleted (with their attempts) |

Task types and queues are chosen by clients, so their label values are
bounded: the first ``LEDGERQ_METRICS_MAX_TYPES`` types (default 200) and
``LEDGERQ_METRICS_MAX_QUEUES`` queues (default 100) a process sees get a series
of their own, and every later one is counted under ``other``. Without a bound,
20,000 distinct types made 80,000 series and a 6.6 MB scrape.
"""

from __future__ import annotations

import logging
import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ledgerq import types

REGISTRY = CollectorRegistry(auto_describe=True)

_TASK_LABELS = ("type", "queue")
# Tasks are short: most land in the millisecond buckets.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip

TASKS_ENQUEUED = Counter(
    "ledgerq_tasks_enqueued", "Tasks created.", _TASK_LABELS, registry=REGISTRY
)
TASKS_STARTED = Counter(
    "ledgerq_tasks_started", "Attempts started.", _TASK_LABELS, registry=REGISTRY
)
TASKS_SUCCEEDED = Counter(
    "ledgerq_tasks_succeeded", "Attempts that succeeded.", _TASK_LABELS, registry=REGISTRY
)
TASKS_RETRIED = Counter(
    "ledgerq_tasks_retried", "Failed attempts scheduled for retry.", _TASK_LABELS, registry=REGISTRY
)
TASKS_DEAD = Counter(
    "ledgerq_tasks_dead", "Attempts that left the task DEAD.", _TASK_LABELS, registry=REGISTRY
)
TASKS_CANCELLED = Counter(
    "ledgerq_tasks_cancelled", "Attempts that ended CANCELLED.", _TASK_LABELS, registry=REGISTRY
)
TASK_DURATION = Histogram(
    "ledgerq_task_duration_seconds",
    "Handler run time.",
    _TASK_LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PICKUP_LATENCY = Histogram(
    "ledgerq_pickup_latency_seconds",
    "From the task's run_at (its enqueue, for a task due at once) to its handler's start.",
    ("queue",),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
WORKER_INFLIGHT = Gauge(
    "ledgerq_worker_inflight", "Handlers running in this worker process.", registry=REGISTRY
)
QUEUE_DEPTH = Gauge(
    "ledgerq_queue_depth", "Tasks in the ledger by queue and status.", ("queue", "status"),
    registry=REGISTRY,
)  # fmt: skip
QUEUE_OLDEST_PENDING = Gauge(
    "ledgerq_queue_oldest_pending_seconds",
    "Age of the oldest due task not yet started, by queue.",
    ("queue",),
    registry=REGISTRY,
)

QUEUE_PAUSED = Gauge(
    "ledgerq_queue_paused",
    "1 while the queue is paused (no task of it starts), else 0.",
    ("queue",),
    registry=REGISTRY,
)
CLAIMS_DEFERRED = Counter(
    "ledgerq_claims_deferred",
    "Tasks handed to this worker that the ledger held back for a flow-control limit, "
    "by the limit (reason).",
    ("queue", "reason"),
    registry=REGISTRY,
)

SCHEDULE_SLOTS = Counter(
    "ledgerq_schedule_slots",
    "Schedule slots handled by this dispatcher, by outcome (enqueued, skipped_overlap).",
    ("schedule", "outcome"),
    registry=REGISTRY,
)
TASKS_PRUNED = Counter(
    "ledgerq_tasks_pruned",
    "Finished tasks deleted by this reaper's pruning (with their attempts).",
    registry=REGISTRY,
)


# --- bounded label values ----------------------------------------------------------

OTHER = "other"
MAX_TYPES_DEFAULT = 200
MAX_QUEUES_DEFAULT = 100


class LabelValues:
    """The values one label may take: the first ``limit`` seen, then ``other``."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"a label value limit must be >= 0, got {limit}")
        self.limit = limit
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._admitted:
            return value
        with self._lock:
            if value in self._admitted:
                return value
            if len(self._admitted) >= self.limit or value == OTHER:
                return OTHER
            self._admitted.add(value)
            return value


def _limit_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        # Metrics are no reason to refuse to start; the warning says what happened.
        logging.getLogger("ledgerq.metrics").warning(
            "%s must be a whole number >= 0, got %r; using %d", name, raw, default
        )
        return default
    return value


TYPE_LABEL = LabelValues(_limit_from_env("LEDGERQ_METRICS_MAX_TYPES", MAX_TYPES_DEFAULT))
QUEUE_LABEL = LabelValues(_limit_from_env("LEDGERQ_METRICS_MAX_QUEUES", MAX_QUEUES_DEFAULT))


def task_labels(task_type: str, queue: str) -> tuple[str, str]:
    """The (type, queue) label values for a task: bounded, see the module docstring."""
    return TYPE_LABEL(task_type), QUEUE_LABEL(queue)


#: Why a claim was deferred: the ledger's waiting_on values (anything else is ``other``).
DEFERRAL_REASONS = frozenset({
    "paused", "max_running", "per_key_max_running", "rate_per_second",
    "per_key_rate_per_second", "retry_rate_per_second",
})  # fmt: skip


def deferral_labels(queue: str, reason: str) -> tuple[str, str]:
    """The (queue, reason) label values of a deferred claim, both bounded."""
    return QUEUE_LABEL(queue), reason if reason in DEFERRAL_REASONS else OTHER


def configure_labels(*, max_types: int, max_queues: int) -> None:
    """Set the label value limits, forgetting which values were admitted (start-up, tests)."""
    global TYPE_LABEL, QUEUE_LABEL
    TYPE_LABEL = LabelValues(max_types)
    QUEUE_LABEL = LabelValues(max_queues)


class TaskSeries:
    """The labelled children of the task metrics for one (type, queue), looked up
    once: prometheus-client's labels() takes a lock and builds a key on every call."""

    __slots__ = ("duration", "outcomes", "pickup", "started")

    def __init__(self, labels: tuple[str, str]) -> None:
        self.started = TASKS_STARTED.labels(*labels)
        self.duration = TASK_DURATION.labels(*labels)
        self.pickup = PICKUP_LATENCY.labels(labels[1])
        #: The counter an attempt's resulting status adds to.
        self.outcomes = {
            types.TaskStatus.SUCCEEDED: TASKS_SUCCEEDED.labels(*labels),
            types.TaskStatus.PENDING: TASKS_RETRIED.labels(*labels),
            types.TaskStatus.DEAD: TASKS_DEAD.labels(*labels),
            types.TaskStatus.CANCELLED: TASKS_CANCELLED.labels(*labels),
        }


_TASK_SERIES: dict[tuple[str, str], TaskSeries] = {}


def task_series(labels: tuple[str, str]) -> TaskSeries:
    """The TaskSeries of (task type, queue), under its bounded label values (so
    this cache is bounded too)."""
    bounded = task_labels(*labels)
    series = _TASK_SERIES.get(bounded)
    if series is None:
        series = _TASK_SERIES[bounded] = TaskSeries(bounded)
    return series
