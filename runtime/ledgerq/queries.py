"""The SQL the runtime sends, its parameters and how its rows decode.

Each public function here is a *plan* for one ledger call: a generator that
yields the ``Call`` (query text and parameters) it needs, is sent that
statement's rows, and returns the decoded answer. ``ledger.py`` runs the same
plan in both of its twins (``AsyncLedger`` awaits each statement, ``Ledger``
blocks on it), so a call's parameters and decoding are written once, here.
A plan that needs a second statement (an idempotency key that replayed, a
task's attempts) yields again; nothing here does I/O.

Every query text is a named ``LiteralString`` constant; a test checks that
each one is used by a plan the runtime calls and that each passes EXPLAIN on
a migrated database.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Mapping, Sequence
from datetime import datetime
from typing import Any, LiteralString, TypeAlias, TypeVar

from psycopg.types.json import Jsonb

from ledgerq import errors, types

T = TypeVar("T")
Row = tuple[Any, ...]

NOTIFY_CHANNEL = "ledgerq_tasks"
#: Each task's id, as it becomes final (migration 0005's trigger).
FINAL_CHANNEL = "ledgerq_final"


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One statement of a plan: its text and parameters."""

    text: LiteralString
    params: Sequence[Any] | Mapping[str, Any] | None = None


#: A ledger call: yields each Call, is sent its rows, returns the answer.
Plan: TypeAlias = Generator[Call, list[Row], T]


# --- query texts -----------------------------------------------------------

PING: LiteralString = "SELECT 1"

ENQUEUE_MANY: LiteralString = "SELECT id, created FROM ledgerq.enqueue_tasks(%s)"
# With the transaction's now(): the created_at (and default run_at) the new row
# got, so the caller can answer with the task without reading it back. The
# queue and max_attempts the task gets are settled first, by the ledger's rule
# (task_defaults), and passed on explicitly: the answer is then what was stored,
# even if a worker registers the type again in between.
ENQUEUE_STAMPED: LiteralString = """
    SELECT e.id, e.created, now(), r.queue, r.max_attempts
    FROM (SELECT coalesce(%(queue)s::text, d.queue) AS queue,
                 coalesce(%(max_attempts)s::integer, d.max_attempts) AS max_attempts
          FROM ledgerq.task_defaults(ARRAY[%(task_type)s::text]) d) r
    CROSS JOIN LATERAL ledgerq.enqueue_task(
        task_type => %(task_type)s, payload => %(payload)s, queue => r.queue,
        priority => %(priority)s, run_at => coalesce(%(run_at)s::timestamptz, now()),
        max_attempts => r.max_attempts, idempotency_key => %(idempotency_key)s,
        concurrency_key => %(concurrency_key)s) e
"""
ENQUEUE_MANY_STAMPED: LiteralString = "SELECT id, created, now() FROM ledgerq.enqueue_tasks(%s)"
TASK_DEFAULTS: LiteralString = """
    SELECT task_type, queue, max_attempts FROM ledgerq.task_defaults(%s::text[])
"""
# The enqueue, and in the same statement (one commit) the hand-off of the tasks
# it created: those due at once are marked QUEUED and come back with what
# their Redis member needs; the caller pushes them after the commit. The
# one-time filter sets ledgerq.hand_off before the enqueue runs (a gating
# qual is checked before its plan's first row), so the enqueue leaves the
# dispatcher's wake-up to task_hand_off, which sends it only for tasks it left
# PENDING.
# Like ENQUEUE_STAMPED, the queue and max_attempts are settled in the same
# statement and returned last, so the answer says what was stored.
ENQUEUE_HANDING_OFF: LiteralString = """
    WITH r AS MATERIALIZED (
        SELECT coalesce(%(queue)s::text, d.queue) AS queue,
               coalesce(%(max_attempts)s::integer, d.max_attempts) AS max_attempts
        FROM ledgerq.task_defaults(ARRAY[%(task_type)s::text]) d
    ), e AS MATERIALIZED (
        SELECT e.id, e.created, now() AS stamped, r.queue, r.max_attempts
        FROM r CROSS JOIN LATERAL ledgerq.enqueue_task(
            task_type => %(task_type)s, payload => %(payload)s, queue => r.queue,
            priority => %(priority)s, run_at => coalesce(%(run_at)s::timestamptz, now()),
            max_attempts => r.max_attempts, idempotency_key => %(idempotency_key)s,
            concurrency_key => %(concurrency_key)s) AS e
        WHERE (SELECT set_config('ledgerq.hand_off', 'on', true)) = 'on'
    ), h AS MATERIALIZED (
        SELECT * FROM ledgerq.task_hand_off(ARRAY(SELECT e.id FROM e WHERE e.created))
    )
    SELECT e.id, e.created, e.stamped, h.queue, h.priority, h.run_at, e.queue, e.max_attempts
    FROM e LEFT JOIN h ON h.id = e.id
"""
ENQUEUE_MANY_HANDING_OFF: LiteralString = """
    WITH e AS MATERIALIZED (
        SELECT e.id, e.created, now() AS stamped, e.ord
        FROM ledgerq.enqueue_tasks(%s) WITH ORDINALITY AS e(id, created, ord)
        WHERE (SELECT set_config('ledgerq.hand_off', 'on', true)) = 'on'
    ), h AS MATERIALIZED (
        SELECT * FROM ledgerq.task_hand_off(ARRAY(SELECT e.id FROM e WHERE e.created))
    )
    SELECT e.id, e.created, e.stamped, h.queue, h.priority, h.run_at
    FROM e LEFT JOIN h ON h.id = e.id ORDER BY e.ord
"""
# task_claim: claim_tasks with the refusals of flow control (limits.sql):
# a row still PENDING was deferred, parked on the reason in waiting_on.
CLAIM: LiteralString = """
    SELECT id, task_type, queue, payload, attempts, max_attempts, priority, run_at, status,
           waiting_on
    FROM ledgerq.task_claim(%s, %s, %s)
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
    SELECT d.id, d.queue, d.priority, d.turn, d.run_at
    FROM set_config('synchronous_commit', 'off', true) AS s, ledgerq.task_take_due(%s) AS d
"""
NEXT_RUN_AT: LiteralString = "SELECT ledgerq.task_next_run_at()"
# Flow control (limits.sql): wake tasks parked on a rate bucket that refilled,
# before taking due tasks; and, with the sweep, the safety net that wakes
# parked tasks whose limit has room although no event said so.
FLOW_WAKE_DUE: LiteralString = "SELECT ledgerq.flow_wake_due()"
FLOW_RESCUE: LiteralString = "SELECT ledgerq.flow_rescue()"
QUEUED_STALE: LiteralString = """
    SELECT id, queue, priority, turn, run_at, queued_at
    FROM ledgerq.task_queued_stale(make_interval(secs => %s), %s, %s, %s, %s)
"""
QUEUED_SEEN: LiteralString = "SELECT ledgerq.task_queued_seen(%s, make_interval(secs => %s), %s)"
QUEUED_CONFIRM: LiteralString = "SELECT ledgerq.task_queued_confirm(%s)"
LEDGER_NOW: LiteralString = "SELECT now()"
REAP: LiteralString = "SELECT ledgerq.reap_stuck()"
# The ledger's churning tables with more dead row versions than a bound: the
# reaper vacuums them itself (ledger.vacuum) rather than wait for autovacuum,
# which looks at a database at most once per autovacuum_naptime (1 min).
CHURNED_TABLES: LiteralString = """
    SELECT relname FROM pg_stat_user_tables
    WHERE schemaname = 'ledgerq' AND relname IN ('tasks', 'attempts') AND n_dead_tup > %s
    ORDER BY relname
"""
# One batch per statement (retention.sql): the reaper loops, so no lock and no
# snapshot outlives a batch however big the backlog.
PRUNE_TASKS_BATCH: LiteralString = """
    SELECT ledgerq.prune_tasks_batch(older_than => %s::interval, batch_size => %s)
"""
CANCEL: LiteralString = "SELECT ledgerq.cancel_task(%s)"
RETRY: LiteralString = "SELECT ledgerq.retry_task(%s)"
RECORD_EFFECT: LiteralString = "SELECT ledgerq.record_effect(%s, %s, %s)"
EFFECT_LOCK: LiteralString = "SELECT recorded, result FROM ledgerq.effect_lock(%s)"
EFFECT_START: LiteralString = """
    SELECT recorded, result, unknown_task_id, unknown_attempt, unknown_started_at
    FROM ledgerq.effect_start(%s, %s, %s, %s, %s)
"""
EFFECT_FINISH: LiteralString = "SELECT ledgerq.effect_finish(%s, %s, %s)"
EFFECT_FORGET: LiteralString = "SELECT ledgerq.effect_forget(%s)"
EFFECT_UNLOCK: LiteralString = "SELECT ledgerq.effect_unlock(%s)"
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
           cancel_requested, concurrency_key
    FROM ledgerq.tasks WHERE id = %s
"""
GET_TASKS: LiteralString = """
    SELECT id, task_type, queue, status, priority, payload, attempts, max_attempts, run_at,
           idempotency_key, result, last_error, created_at, started_at, finished_at,
           cancel_requested, concurrency_key
    FROM ledgerq.tasks WHERE id = ANY(%s)
"""
GET_ATTEMPTS: LiteralString = """
    SELECT attempt, worker_id, started_at, finished_at, outcome, error
    FROM ledgerq.attempts WHERE task_id = %s ORDER BY attempt
"""
LIST_TASKS: LiteralString = """
    SELECT id, task_type, queue, status, priority, payload, attempts, max_attempts, run_at,
           idempotency_key, result, last_error, created_at, started_at, finished_at,
           cancel_requested, concurrency_key
    FROM ledgerq.tasks
    WHERE (%(status)s::text IS NULL OR status = %(status)s)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s)
      AND (%(task_type)s::text IS NULL OR task_type = %(task_type)s)
      AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
    ORDER BY id DESC
    LIMIT %(limit)s
"""  # the plan asks for one row more than the page: whether another page follows
# Live statuses only, one partial index each (tasks_dispatch_idx, tasks_queued_idx,
# tasks_running_idx, tasks_dead_idx): /metrics reads this at every scrape, and a
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
# Every status of every queue, for operators (GET /queues, `ledgerq stats`), in
# index-sized reads: the live statuses through their partial indexes, finished
# tasks counted index-only on tasks_queue_status_idx (few distinct keys, so a
# small index), the last minute's finishes on tasks_finished_idx. Counting
# finished tasks still reads one index entry per task: retention keeps that
# bounded. (A plain GROUP BY over the table was 300 ms at 1,000,000 rows.)
QUEUE_SUMMARY: LiteralString = """
    WITH counts (queue, status, n, oldest_due) AS (
        SELECT queue, 'PENDING', count(*), min(run_at) FILTER (WHERE run_at <= now())
        FROM ledgerq.tasks WHERE status = 'PENDING' GROUP BY queue
        UNION ALL
        SELECT queue, 'QUEUED', count(*), min(run_at) FILTER (WHERE run_at <= now())
        FROM ledgerq.tasks WHERE status = 'QUEUED' GROUP BY queue
        UNION ALL
        SELECT queue, 'RUNNING', count(*), NULL
        FROM ledgerq.tasks WHERE status = 'RUNNING' GROUP BY queue
        UNION ALL
        SELECT queue, status, count(*), NULL
        FROM ledgerq.tasks WHERE finished_at IS NOT NULL GROUP BY queue, status
    ), recent AS (
        SELECT queue, count(*) AS n FROM ledgerq.tasks
        WHERE finished_at >= now() - interval '60 seconds' GROUP BY queue
    )
    SELECT c.queue,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'PENDING'), 0),
           coalesce(sum(c.n) FILTER (WHERE c.status = 'QUEUED'), 0),
           coalesce(sum(c.n) FILTER (WHERE c.status = 'RUNNING'), 0),
           coalesce(sum(c.n) FILTER (WHERE c.status = 'SUCCEEDED'), 0),
           coalesce(sum(c.n) FILTER (WHERE c.status = 'DEAD'), 0),
           coalesce(sum(c.n) FILTER (WHERE c.status = 'CANCELLED'), 0),
           extract(epoch FROM now() - min(c.oldest_due))::float8,
           coalesce(max(r.n), 0)
    FROM counts c LEFT JOIN recent r USING (queue)
    GROUP BY c.queue ORDER BY c.queue
"""
GET_ATTEMPTS_MANY: LiteralString = """
    SELECT task_id, attempt, worker_id, started_at, finished_at, outcome, error
    FROM ledgerq.attempts WHERE task_id = ANY(%s) ORDER BY task_id, attempt
"""
EFFECTS_OF: LiteralString = """
    SELECT effect_key, task_id, recorded_at FROM ledgerq.effects
    WHERE task_id = ANY(%s) ORDER BY effect_key
"""

# Schedules (schedule.sql). schedule_fire is run_schedules with a row per
# schedule it handled, for the dispatcher's metrics.
SCHEDULE_TASK: LiteralString = """
    SELECT ledgerq.schedule_task(
        name => %(name)s, cron => %(cron)s, task_type => %(task_type)s, payload => %(payload)s,
        queue => %(queue)s, priority => %(priority)s, max_attempts => %(max_attempts)s,
        timezone => %(timezone)s, overlap => %(overlap)s, catch_up => %(catch_up)s)
"""
SCHEDULE_FIRE: LiteralString = """
    SELECT name, enqueued, already_enqueued, skipped_overlap FROM ledgerq.schedule_fire(%s)
"""
LIST_SCHEDULES: LiteralString = """
    SELECT name, cron, timezone, task_type, queue, paused, next_run_at, last_slot, last_task_id
    FROM ledgerq.schedules ORDER BY name
"""
# Flow control (queues.sql): a queue's settings and its pause. pause_queue and
# resume_queue answer whether they changed the queue; the view reads back its
# state, so a caller knows where the queue stands either way.
CONFIGURE_QUEUE: LiteralString = "SELECT ledgerq.configure_queue(%s, %s)"
PAUSE_QUEUE: LiteralString = "SELECT ledgerq.pause_queue(%s)"
RESUME_QUEUE: LiteralString = "SELECT ledgerq.resume_queue(%s)"
QUEUE_SETTINGS: LiteralString = """
    SELECT queue, paused, settings, updated_at FROM ledgerq.queue_settings ORDER BY queue
"""

PAUSE_SCHEDULE: LiteralString = "SELECT ledgerq.pause_schedule(%s)"
RESUME_SCHEDULE: LiteralString = "SELECT ledgerq.resume_schedule(%s)"
UNSCHEDULE_TASK: LiteralString = "SELECT ledgerq.unschedule_task(%s)"


# --- plans: one per ledger method -------------------------------------------


def ping() -> Plan[None]:
    yield Call(PING)


def enqueue_many(
    tasks: Sequence[types.NewTask],
) -> Plan[list[tuple[types.TaskId, bool, str]]]:
    tasks = yield from settle_defaults(tasks)
    rows = yield Call(ENQUEUE_MANY, (Jsonb([t.to_json() for t in tasks]),))
    return [
        (types.TaskId(r[0]), bool(r[1]), t.queue or types.QUEUE_DEFAULT)
        for t, r in zip(tasks, rows, strict=True)
    ]


def enqueue_task(task: types.NewTask) -> Plan[types.Task]:
    rows = yield Call(ENQUEUE_STAMPED, _enqueue_params(task))
    (task_id, created, stamp, queue, max_attempts) = rows[0]
    task = dataclasses.replace(task, queue=queue, max_attempts=max_attempts)
    replayed: dict[types.TaskId, types.Task] = {}
    if not created:
        replayed[task_id] = yield from get(task_id)
    return _enqueued([task], [(task_id, created, stamp)], replayed)[0]


def enqueue_tasks(tasks: Sequence[types.NewTask]) -> Plan[list[types.Task]]:
    tasks = yield from settle_defaults(tasks)
    rows = yield Call(ENQUEUE_MANY_STAMPED, (Jsonb([t.to_json() for t in tasks]),))
    old = [r[0] for r in rows if not r[1]]
    replayed: dict[types.TaskId, types.Task] = {}
    if old:
        replayed = {t.id: t for t in (yield from get_many(old, history=True))}
    return _enqueued(tasks, rows, replayed)


def settle_defaults(tasks: Sequence[types.NewTask]) -> Plan[Sequence[types.NewTask]]:
    """tasks with the queue and max_attempts the ledger gives those that name
    none (task_defaults), settled before the enqueue so the answer can say them."""
    open_types = sorted({t.task_type for t in tasks if t.queue is None or t.max_attempts is None})
    if not open_types:
        return tasks
    defaults = {r[0]: (r[1], r[2]) for r in (yield Call(TASK_DEFAULTS, (open_types,)))}
    settled = []
    for task in tasks:
        if task.queue is None or task.max_attempts is None:
            queue, max_attempts = defaults[task.task_type]
            task = dataclasses.replace(
                task,
                queue=queue if task.queue is None else task.queue,
                max_attempts=max_attempts if task.max_attempts is None else task.max_attempts,
            )
        settled.append(task)
    return settled


def enqueue_handing_off(
    tasks: Sequence[types.NewTask], *, many: bool
) -> Plan[tuple[list[types.Task], list[types.DueTask]]]:
    """enqueue_task (one task) or enqueue_tasks (many), and the created tasks
    that were due at once, now QUEUED, for the caller to push to Redis."""
    if not many:
        rows = yield Call(ENQUEUE_HANDING_OFF, _enqueue_params(tasks[0]))
        tasks = [dataclasses.replace(tasks[0], queue=rows[0][6], max_attempts=rows[0][7])]
    else:
        tasks = yield from settle_defaults(tasks)
        rows = yield Call(ENQUEUE_MANY_HANDING_OFF, (Jsonb([t.to_json() for t in tasks]),))
    old = [r[0] for r in rows if not r[1]]
    replayed: dict[types.TaskId, types.Task] = {}
    if old:
        replayed = {t.id: t for t in (yield from get_many(old, history=True))}
    answers = _enqueued(tasks, rows, replayed)
    handed: list[types.DueTask] = []
    for index, row in enumerate(rows):
        if row[3] is not None:
            handed.append(types.DueTask(types.TaskId(row[0]), row[3], row[4], run_at=row[5]))
            answers[index] = dataclasses.replace(answers[index], status=types.TaskStatus.QUEUED)
    return answers, handed


def claim(task_ids: Sequence[int], worker_id: str, lease_s: int) -> Plan[list[types.ClaimedTask]]:
    claimed, _ = yield from claim_reporting(task_ids, worker_id, lease_s)
    return claimed


def claim_reporting(
    task_ids: Sequence[int], worker_id: str, lease_s: int
) -> Plan[tuple[list[types.ClaimedTask], list[types.Deferral]]]:
    """The claimed tasks, and those flow control deferred (parked in the ledger)."""
    rows = yield Call(CLAIM, (list(task_ids), worker_id, lease_s))
    claimed = [_decode_claimed(r) for r in rows if r[8] == "RUNNING"]
    deferred = [types.Deferral(types.TaskId(r[0]), r[2], r[9]) for r in rows if r[8] != "RUNNING"]
    return claimed, deferred


def heartbeat(
    leases: Sequence[tuple[int, int]], lease_s: int
) -> Plan[list[tuple[types.TaskId, int, str]]]:
    rows = yield Call(HEARTBEAT, ([t for t, _ in leases], [a for _, a in leases], lease_s))
    return [(types.TaskId(r[0]), r[1], r[2]) for r in rows]


def complete(outcomes: Sequence[types.Outcome]) -> Plan[list[types.TaskStatus | None]]:
    rows = yield Call(COMPLETE, _complete_params(outcomes))
    return [_status_or_none(r[2]) for r in rows]


def release(leases: Sequence[tuple[int, int]], reason: str) -> Plan[list[types.TaskStatus | None]]:
    rows = yield Call(RELEASE, ([t for t, _ in leases], [a for _, a in leases], reason))
    return [_status_or_none(r[1]) for r in rows]


def effect_lock(effect_key: str) -> Plan[tuple[bool, types.JsonValue]]:
    ((recorded, result),) = yield Call(EFFECT_LOCK, (effect_key,))
    return bool(recorded), result


def record_effect(effect_key: str, task_id: int, result: types.JsonValue) -> Plan[bool]:
    json_result = Jsonb(result) if result is not None else None
    ((recorded,),) = yield Call(RECORD_EFFECT, (effect_key, task_id, json_result))
    return bool(recorded)


def effect_start(
    effect_key: str, task_id: int, attempt: int, wait_ms: int | None, hold_ms: int | None
) -> Plan[types.EffectStart]:
    params = (effect_key, task_id, attempt, wait_ms, hold_ms)
    ((recorded, result, unknown_task, unknown_attempt, unknown_at),) = yield Call(
        EFFECT_START, params
    )
    return types.EffectStart(
        bool(recorded),
        result,
        types.TaskId(unknown_task) if unknown_task is not None else None,
        unknown_attempt,
        unknown_at,
    )


def effect_finish(effect_key: str, task_id: int, result: types.JsonValue) -> Plan[bool]:
    json_result = Jsonb(result) if result is not None else None
    ((recorded,),) = yield Call(EFFECT_FINISH, (effect_key, task_id, json_result))
    return bool(recorded)


def effect_forget(effect_key: str) -> Plan[None]:
    yield Call(EFFECT_FORGET, (effect_key,))


def effect_unlock(effect_key: str) -> Plan[None]:
    yield Call(EFFECT_UNLOCK, (effect_key,))


def take_due(batch_size: int) -> Plan[list[types.DueTask]]:
    rows = yield Call(TAKE_DUE, (batch_size,))
    return [_due(r) for r in rows]


def flow_wake_due() -> Plan[int]:
    ((woken,),) = yield Call(FLOW_WAKE_DUE)
    return int(woken)


def flow_rescue() -> Plan[int]:
    ((woken,),) = yield Call(FLOW_RESCUE)
    return int(woken)


def next_run_at() -> Plan[datetime | None]:
    ((value,),) = yield Call(NEXT_RUN_AT)
    return value  # type: ignore[no-any-return]


def queued_stale(
    older_than_s: float, batch_size: int, as_of: datetime, after: tuple[datetime, int] | None
) -> Plan[list[tuple[types.DueTask, datetime]]]:
    """A page of the QUEUED tasks a sweep checks, each with its queued_at (the
    next page starts after the last one's)."""
    after_at, after_id = after if after is not None else (None, None)
    rows = yield Call(QUEUED_STALE, (older_than_s, batch_size, as_of, after_at, after_id))
    return [(_due(r), r[5]) for r in rows]


def queued_seen(queues: Sequence[str], older_than_s: float, as_of: datetime) -> Plan[int]:
    ((count,),) = yield Call(QUEUED_SEEN, (list(queues), older_than_s, as_of))
    return int(count)


def ledger_now() -> Plan[datetime]:
    ((value,),) = yield Call(LEDGER_NOW)
    return value  # type: ignore[no-any-return]


def _due(row: Sequence[Any]) -> types.DueTask:
    """A row of task_take_due or task_queued_stale: id, queue, priority, turn, run_at."""
    return types.DueTask(types.TaskId(row[0]), row[1], row[2], turn=int(row[3]), run_at=row[4])


def queued_confirm(task_ids: Sequence[int]) -> Plan[int]:
    ((count,),) = yield Call(QUEUED_CONFIRM, (list(task_ids),))
    return int(count)


def reap() -> Plan[int]:
    ((moved,),) = yield Call(REAP)
    return int(moved)


def churned_tables(dead_rows: int) -> Plan[list[str]]:
    rows = yield Call(CHURNED_TABLES, (dead_rows,))
    return [str(r[0]) for r in rows]


def prune_tasks_batch(older_than: str, batch_size: int) -> Plan[int]:
    ((deleted,),) = yield Call(PRUNE_TASKS_BATCH, (older_than, batch_size))
    return int(deleted)


def cancel(task_id: int) -> Plan[types.TaskStatus]:
    ((status,),) = yield Call(CANCEL, (task_id,))
    return types.TaskStatus(status)


def retry(task_id: int) -> Plan[types.TaskStatus]:
    ((status,),) = yield Call(RETRY, (task_id,))
    return types.TaskStatus(status)


def get(task_id: int) -> Plan[types.Task]:
    rows = yield Call(GET_TASK, (task_id,))
    if not rows:
        raise errors.TaskNotFound(f"task {task_id} does not exist")
    history = yield Call(GET_ATTEMPTS, (task_id,))
    return _decode_task(rows[0], [_decode_attempt(a) for a in history])


def get_many(task_ids: Sequence[int], *, history: bool = False) -> Plan[list[types.Task]]:
    tasks = [_decode_task(r) for r in (yield Call(GET_TASKS, (list(task_ids),)))]
    if not history:
        return tasks
    attempts = yield from attempts_of(task_ids)
    return [dataclasses.replace(t, attempt_history=attempts.get(t.id, ())) for t in tasks]


def list_tasks(
    status: str | None, queue: str | None, task_type: str | None, limit: int, before_id: int | None
) -> Plan[types.TaskPage]:
    rows = yield Call(LIST_TASKS, _list_params(status, queue, task_type, limit, before_id))
    tasks = [_decode_task(r) for r in rows[:limit]]
    return types.TaskPage(tasks, tasks[-1].id if len(rows) > limit else None)


def queue_depths() -> Plan[list[types.QueueDepth]]:
    rows = yield Call(QUEUE_DEPTHS)
    return [types.QueueDepth(r[0], types.TaskStatus(r[1]), int(r[2]), r[3]) for r in rows]


def queue_summary() -> Plan[list[types.QueueSummary]]:
    """Every queue with tasks, and every queue that was configured or paused
    (with no tasks, its counts are zero), with its pause and settings."""
    counted = {q.queue: q for q in map(_decode_queue_summary, (yield Call(QUEUE_SUMMARY)))}
    configured = {s.queue: s for s in (yield from queue_settings())}
    summary = []
    for name in sorted(counted.keys() | configured.keys()):
        queue = counted.get(name) or types.QueueSummary(name, {}, None, 0)
        flow = configured.get(name)
        if flow is not None:
            queue = dataclasses.replace(queue, paused=flow.paused, settings=flow.settings)
        summary.append(queue)
    return summary


def attempts_of(task_ids: Sequence[int]) -> Plan[dict[types.TaskId, tuple[types.Attempt, ...]]]:
    history: dict[types.TaskId, list[types.Attempt]] = {}
    for row in (yield Call(GET_ATTEMPTS_MANY, (list(task_ids),))):
        history.setdefault(types.TaskId(row[0]), []).append(_decode_attempt(row[1:]))
    return {task_id: tuple(attempts) for task_id, attempts in history.items()}


def effects_of(task_ids: Sequence[int]) -> Plan[list[types.EffectRecord]]:
    rows = yield Call(EFFECTS_OF, (list(task_ids),))
    return [
        types.EffectRecord(r[0], types.TaskId(r[1]) if r[1] is not None else None, r[2])
        for r in rows
    ]


def schedule_task(schedule: types.NewSchedule) -> Plan[None]:
    yield Call(SCHEDULE_TASK, _schedule_params(schedule))


def schedule_fire(as_of: datetime | None) -> Plan[list[types.ScheduleFired]]:
    rows = yield Call(SCHEDULE_FIRE, (as_of,))
    return [types.ScheduleFired(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]


def list_schedules() -> Plan[list[types.Schedule]]:
    rows = yield Call(LIST_SCHEDULES)
    return [_decode_schedule(r) for r in rows]


def pause_schedule(name: str) -> Plan[None]:
    yield from _schedule_known(PAUSE_SCHEDULE, name)


def resume_schedule(name: str) -> Plan[None]:
    yield from _schedule_known(RESUME_SCHEDULE, name)


def unschedule_task(name: str) -> Plan[None]:
    yield from _schedule_known(UNSCHEDULE_TASK, name)


def _schedule_known(text: LiteralString, name: str) -> Plan[None]:
    ((known,),) = yield Call(text, (name,))
    if not known:
        raise errors.ScheduleNotFound(f"schedule {name!r} does not exist")


def configure_queue(queue: str, settings: types.JsonObject) -> Plan[types.JsonObject]:
    """Merge settings into queue's (a key set to None removes it); all of them now."""
    ((merged,),) = yield Call(CONFIGURE_QUEUE, (queue, Jsonb(settings)))
    return dict(merged or {})


def pause_queue(queue: str) -> Plan[types.QueuePaused]:
    ((changed,),) = yield Call(PAUSE_QUEUE, (queue,))
    return types.QueuePaused(queue, True, bool(changed))


def resume_queue(queue: str) -> Plan[types.QueuePaused]:
    ((changed,),) = yield Call(RESUME_QUEUE, (queue,))
    return types.QueuePaused(queue, False, bool(changed))


def queue_settings() -> Plan[list[types.QueueSettings]]:
    return [_decode_queue_settings(r) for r in (yield Call(QUEUE_SETTINGS))]


def hand_back(
    leases: Sequence[tuple[int, int]], worker_id: str, delay_s: float
) -> Plan[list[types.TaskStatus | None]]:
    rows = yield Call(
        HAND_BACK, ([t for t, _ in leases], [a for _, a in leases], worker_id, delay_s)
    )
    return [_status_or_none(r[1]) for r in rows]


def register_worker(
    worker_id: str, queues: Sequence[str], task_types: Sequence[types.JsonObject], concurrency: int
) -> Plan[int]:
    ((count,),) = yield Call(
        WORKER_REGISTER, (worker_id, list(queues), Jsonb(list(task_types)), concurrency)
    )
    return int(count)


def worker_heartbeat(worker_id: str) -> Plan[bool]:
    ((renewed,),) = yield Call(WORKER_HEARTBEAT, (worker_id,))
    return bool(renewed)


def worker_stop(worker_id: str) -> Plan[None]:
    yield Call(WORKER_STOP, (worker_id,))


def task_types() -> Plan[list[types.TaskTypeInfo]]:
    return [_decode_task_type(r) for r in (yield Call(TASK_TYPES))]


# --- row decoding ------------------------------------------------------------


def _decode_task(row: Sequence[Any], history: Sequence[types.Attempt] = ()) -> types.Task:
    return types.Task(
        id=types.TaskId(row[0]),
        type=row[1],
        queue=row[2],
        status=types.TaskStatus(row[3]),
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
        concurrency_key=row[16],
        attempt_history=tuple(history),
    )


def _decode_attempt(row: Sequence[Any]) -> types.Attempt:
    return types.Attempt(
        attempt=row[0],
        worker_id=row[1],
        started_at=row[2],
        finished_at=row[3],
        outcome=types.AttemptOutcome(row[4]) if row[4] is not None else None,
        error=row[5],
    )


def _decode_claimed(row: Sequence[Any]) -> types.ClaimedTask:
    return types.ClaimedTask(
        id=types.TaskId(row[0]),
        type=row[1],
        queue=row[2],
        payload=row[3],
        attempt=row[4],
        max_attempts=row[5],
        priority=row[6],
        run_at=row[7],
    )


def _created_task(task: types.NewTask, task_id: int, stamp: datetime) -> types.Task:
    """The row enqueue_task(s) inserted for task (its queue and max_attempts
    settled), given its id and the transaction's now()."""
    assert task.queue is not None and task.max_attempts is not None
    return types.Task(
        id=types.TaskId(task_id),
        type=task.task_type,
        queue=task.queue,
        status=types.TaskStatus.PENDING,
        priority=task.priority,
        payload=task.payload,
        attempts=0,
        max_attempts=task.max_attempts,
        run_at=_in_zone_of(task.run_at, stamp) if task.run_at else stamp,
        idempotency_key=task.idempotency_key,
        result=None,
        last_error=None,
        created_at=stamp,
        started_at=None,
        finished_at=None,
        created=True,
        concurrency_key=task.concurrency_key,
    )


def _in_zone_of(value: datetime, stamp: datetime) -> datetime:
    """value in stamp's zone (the session's, as a read would give it), or as it
    is where that zone would take it past year 9999 or before year 1 (a caller's
    connection may be in any zone). A naive value is the session's to place, as
    PostgreSQL placed it."""
    if value.tzinfo is None:
        return value.replace(tzinfo=stamp.tzinfo)
    try:
        return value.astimezone(stamp.tzinfo)
    except OverflowError:
        return value


def _enqueued(
    tasks: Sequence[types.NewTask],
    rows: Sequence[Sequence[Any]],
    replayed: Mapping[types.TaskId, types.Task],
) -> list[types.Task]:
    """The answers of enqueue_task(s) as tasks, in input order: a task the call
    created is built from its arguments (no read needed); one an idempotency
    key returned is the task as read back (``replayed``, by id)."""
    return [
        _created_task(task, row[0], row[2])
        if row[1]
        else dataclasses.replace(replayed[row[0]], created=False)
        for task, row in zip(tasks, rows, strict=True)
    ]


def _enqueue_params(task: types.NewTask) -> dict[str, Any]:
    return {
        "task_type": task.task_type,
        "payload": Jsonb(task.payload),
        "queue": task.queue,
        "priority": task.priority,
        "run_at": task.run_at,
        "max_attempts": task.max_attempts,
        "idempotency_key": task.idempotency_key,
        "concurrency_key": task.concurrency_key,
    }


def _complete_params(outcomes: Sequence[types.Outcome]) -> tuple[Any, ...]:
    return (
        [o.task_id for o in outcomes],
        [o.attempt for o in outcomes],
        [o.succeeded for o in outcomes],
        [Jsonb(o.result) if o.result is not None else None for o in outcomes],
        [o.error for o in outcomes],
        [o.retryable for o in outcomes],
    )


def _list_params(
    status: str | None, queue: str | None, task_type: str | None, limit: int, before_id: int | None
) -> dict[str, Any]:
    if status is not None and status not in types.TaskStatus.__members__:
        allowed = ", ".join(types.TaskStatus.__members__)
        raise errors.InvalidInput(f"status must be one of {allowed}, got {status!r}")
    if not 1 <= limit <= types.LIST_LIMIT_MAX:
        raise errors.InvalidInput(
            f"limit must be between 1 and {types.LIST_LIMIT_MAX}, got {limit}"
        )
    return {
        "status": status,
        "queue": queue,
        "task_type": task_type,
        "limit": limit + 1,
        "before_id": before_id,
    }


def _status_or_none(value: str | None) -> types.TaskStatus | None:
    return types.TaskStatus(value) if value is not None else None


# QUEUE_SUMMARY's count columns, in order.
_SUMMARY_STATUSES = (
    types.TaskStatus.PENDING, types.TaskStatus.QUEUED, types.TaskStatus.RUNNING,
    types.TaskStatus.SUCCEEDED, types.TaskStatus.DEAD, types.TaskStatus.CANCELLED,
)  # fmt: skip


def _decode_queue_summary(row: Sequence[Any]) -> types.QueueSummary:
    counts = {status: int(n) for status, n in zip(_SUMMARY_STATUSES, row[1:7], strict=True)}
    return types.QueueSummary(row[0], counts, row[7], int(row[8]))


def _decode_queue_settings(row: Sequence[Any]) -> types.QueueSettings:
    return types.QueueSettings(row[0], bool(row[1]), dict(row[2] or {}), row[3])


def _schedule_params(schedule: types.NewSchedule) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "cron": schedule.cron,
        "task_type": schedule.task_type,
        "payload": Jsonb(schedule.payload),
        "queue": schedule.queue,
        "priority": schedule.priority,
        "max_attempts": schedule.max_attempts,
        "timezone": schedule.timezone,
        "overlap": schedule.overlap,
        "catch_up": schedule.catch_up,
    }


def _decode_schedule(row: Sequence[Any]) -> types.Schedule:
    return types.Schedule(
        name=row[0],
        cron=row[1],
        timezone=row[2],
        task_type=row[3],
        queue=row[4],
        paused=row[5],
        next_run_at=row[6],
        last_slot=row[7],
        last_task_id=types.TaskId(row[8]) if row[8] is not None else None,
    )


def _decode_task_type(row: Sequence[Any]) -> types.TaskTypeInfo:
    return types.TaskTypeInfo(row[0], row[1], int(row[2]), row[3], int(row[4]), row[5])
