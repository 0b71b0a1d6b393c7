"""The only code that talks to PostgreSQL: one typed method per SQL function.

``AsyncLedger`` serves the worker, dispatcher, reaper, API and ``AsyncClient``;
``Ledger`` serves the synchronous ``Client`` and the command line. Both send
the same query texts and decode rows with the same functions (queries.py). psycopg errors are translated here into ``ledgerq.errors``: SQLSTATE
``LQ422`` → ``InvalidInput``, ``LQ409`` → ``IdempotencyConflict`` or
``InvalidTransition``, ``LQ404`` → ``TaskNotFound``, a lost or refused
connection → ``LedgerUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import Any, LiteralString

import psycopg
import psycopg.conninfo
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ledgerq import errors, finals
from ledgerq.queries import (
    CANCEL,
    CLAIM,
    COMPLETE,
    EFFECT_LOCK,
    EFFECTS_OF,
    ENQUEUE_MANY,
    ENQUEUE_MANY_STAMPED,
    ENQUEUE_STAMPED,
    GET_ATTEMPTS,
    GET_ATTEMPTS_MANY,
    GET_TASK,
    GET_TASKS,
    HAND_BACK,
    HEARTBEAT,
    LIST_TASKS,
    NEXT_RUN_AT,
    QUEUE_DEPTHS,
    QUEUE_STATS,
    QUEUE_SUMMARY,
    QUEUED_CONFIRM,
    QUEUED_STALE,
    REAP,
    RECORD_EFFECT,
    RELEASE,
    RETRY,
    TAKE_DUE,
    TASK_TYPES,
    WORKER_HEARTBEAT,
    WORKER_REGISTER,
    WORKER_STOP,
    EffectRecord,
    NewTask,
    QueueDepth,
    QueueSummary,
    complete_params,
    decode_attempt,
    decode_claimed,
    decode_queue_summary,
    decode_task,
    decode_task_type,
    enqueue_params,
    enqueued,
    list_params,
    status_or_none,
)
from ledgerq.types import (
    Attempt,
    ClaimedTask,
    DueTask,
    JsonObject,
    JsonValue,
    Outcome,
    QueueStat,
    Task,
    TaskId,
    TaskStatus,
    TaskTypeInfo,
)

AsyncConn = psycopg.AsyncConnection[TupleRow]
SyncConn = psycopg.Connection[TupleRow]

# --- error translation -----------------------------------------------------------


def translate(exc: psycopg.Error) -> errors.LedgerError:
    """The ledgerq error for a psycopg error."""
    diag_message = exc.diag.message_primary if exc.diag else None
    message = diag_message or errors.first_line(exc)
    state = exc.sqlstate
    if state == "LQ422":
        return errors.InvalidInput(message)
    if state == "LQ404":
        return errors.TaskNotFound(message)
    if state == "LQ409":
        if "idempotency_key" in message:
            return errors.IdempotencyConflict(message)
        return errors.InvalidTransition(message)
    if state in ("3F000", "42883", "42P01"):  # schema, function or table missing
        return errors.LedgerError(
            f"{message}: the ledgerq schema is missing or out of date; run `ledgerq migrate`"
        )
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
        state is not None and state[:2] in ("08", "57")
    ):
        return errors.LedgerUnavailable(f"PostgreSQL is unavailable: {message}")
    return errors.LedgerError(message)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Translate psycopg and pool errors raised inside the block."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc) from exc
    except OSError as exc:
        raise errors.LedgerUnavailable(f"PostgreSQL is unavailable: {exc}") from exc
    except Exception as exc:
        # psycopg_pool.PoolTimeout: no connection could be had in time.
        if type(exc).__name__ == "PoolTimeout":
            raise errors.LedgerUnavailable(f"PostgreSQL is unavailable: {exc}") from exc
        raise


def is_integrity_error(exc: BaseException) -> bool:
    """Whether exc (or what it wraps) is a PostgreSQL integrity/constraint violation."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, psycopg.errors.IntegrityError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def probe(database_url: str, *, timeout_s: int = 5) -> None:
    """Connect once and run ``SELECT 1``: LedgerUnavailable at once if PostgreSQL
    cannot be reached (a pool would retry until its timeout, logging each try)."""
    with (
        translated(),
        psycopg.connect(database_url, autocommit=True, connect_timeout=max(2, timeout_s)) as conn,
    ):
        conn.execute("SELECT 1")


# Ask the server to probe idle client sockets, so a worker host that vanished
# mid-transaction (once_in_transaction holds one open while its handler runs)
# releases its locks within about a minute, not after TCP's two hours.
SERVER_KEEPALIVE_OPTIONS = (
    "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
)


def pool_kwargs(database_url: str) -> dict[str, Any]:
    """Connection arguments for every pooled connection: autocommit, keepalives."""
    options = psycopg.conninfo.conninfo_to_dict(database_url).get("options")
    merged = f"{options} {SERVER_KEEPALIVE_OPTIONS}" if options else SERVER_KEEPALIVE_OPTIONS
    return {"autocommit": True, "options": merged}


def _conninfo(conninfo: object) -> str:
    """The pool's connection string, for the connections it does not manage (LISTEN)."""
    if not isinstance(conninfo, str):
        raise errors.ConfigError("waiting needs a pool opened with a connection string")
    return conninfo


# --- the async ledger ------------------------------------------------------------


class AsyncLedger:
    """Typed async calls into the ledger's SQL functions, over a connection pool."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConn]) -> None:
        self.pool = pool
        self._finals: finals.FinalWatcher | None = None

    @classmethod
    async def connect(
        cls, database_url: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 10
    ) -> AsyncLedger:
        """Open a pool; raises LedgerUnavailable at once if PostgreSQL cannot be reached."""
        await asyncio.to_thread(probe, database_url)
        pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            database_url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=timeout_s,
            # No check= on checkout: it would cost a round trip per query. A
            # connection broken by a PostgreSQL restart fails its next query
            # (LedgerUnavailable, the caller retries) and the pool drops it.
            kwargs=pool_kwargs(database_url),
        )
        with translated():
            await pool.open(wait=True, timeout=timeout_s)
        return cls(pool)

    async def close(self) -> None:
        if self._finals is not None:
            await self._finals.close()
        await self.pool.close()

    async def wait_final(self, task_id: int, timeout_s: float | None = None) -> Task:
        """The task once it is final, woken by the ledger's NOTIFY (one LISTEN
        connection shared by every waiter); TimeoutError after timeout_s."""
        if self._finals is None:
            self._finals = finals.FinalWatcher(_conninfo(self.pool.conninfo), self.get)
        # Not inside translated(): TimeoutError is an OSError. The reads raise
        # ledgerq errors already, and the listener handles its own failures.
        return await self._finals.wait(task_id, timeout_s)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConn]:
        """A pooled connection in autocommit mode."""
        with translated():
            async with self.pool.connection() as conn:
                yield conn

    async def _rows(
        self, query: LiteralString, params: Any = None, conn: AsyncConn | None = None
    ) -> list[tuple[Any, ...]]:
        with translated():
            if conn is not None:
                cur = await conn.execute(query, params)
                return await cur.fetchall()
            async with self.pool.connection() as pooled:
                cur = await pooled.execute(query, params)
                return await cur.fetchall()

    async def ping(self) -> None:
        await self._rows("SELECT 1")

    # enqueue
    async def enqueue_many(
        self, tasks: Sequence[NewTask] | Sequence[JsonObject], conn: AsyncConn | None = None
    ) -> list[tuple[TaskId, bool]]:
        body = [t.to_json() if isinstance(t, NewTask) else t for t in tasks]
        rows = await self._rows(ENQUEUE_MANY, (Jsonb(body),), conn)
        return [(TaskId(r[0]), bool(r[1])) for r in rows]

    async def enqueue_task(self, task: NewTask, conn: AsyncConn | None = None) -> Task:
        """Enqueue; the task with ``created`` set (one round trip unless a key replays)."""
        (row,) = await self._rows(ENQUEUE_STAMPED, enqueue_params(task), conn)
        replayed = {} if row[1] else {row[0]: await self.get(row[0], conn)}
        return enqueued([task], [row], replayed)[0]

    async def enqueue_tasks(
        self, tasks: Sequence[NewTask], conn: AsyncConn | None = None
    ) -> list[Task]:
        """enqueue_task for many tasks in one transaction (all or nothing), in order."""
        rows = await self._rows(ENQUEUE_MANY_STAMPED, (Jsonb([t.to_json() for t in tasks]),), conn)
        old = [r[0] for r in rows if not r[1]]
        replayed = {t.id: t for t in await self.get_many(old, conn, history=True)} if old else {}
        return enqueued(tasks, rows, replayed)

    # worker
    async def claim(
        self, task_ids: Sequence[int], worker_id: str, lease_s: int
    ) -> list[ClaimedTask]:
        rows = await self._rows(CLAIM, (list(task_ids), worker_id, lease_s))
        return [decode_claimed(r) for r in rows]

    async def heartbeat(
        self, leases: Sequence[tuple[int, int]], lease_s: int
    ) -> list[tuple[TaskId, int, str]]:
        rows = await self._rows(
            HEARTBEAT, ([t for t, _ in leases], [a for _, a in leases], lease_s)
        )
        return [(TaskId(r[0]), r[1], r[2]) for r in rows]

    async def complete(
        self, outcomes: Sequence[Outcome], conn: AsyncConn | None = None
    ) -> list[TaskStatus | None]:
        rows = await self._rows(COMPLETE, complete_params(outcomes), conn)
        return [status_or_none(r[2]) for r in rows]

    async def release(
        self, leases: Sequence[tuple[int, int]], reason: str
    ) -> list[TaskStatus | None]:
        rows = await self._rows(RELEASE, ([t for t, _ in leases], [a for _, a in leases], reason))
        return [status_or_none(r[1]) for r in rows]

    async def hand_back(
        self, leases: Sequence[tuple[int, int]], worker_id: str, delay_s: float
    ) -> list[TaskStatus | None]:
        """Hand back tasks of a type another live worker serves (no attempt spent);
        None for a task no live worker serves."""
        rows = await self._rows(
            HAND_BACK, ([t for t, _ in leases], [a for _, a in leases], worker_id, delay_s)
        )
        return [status_or_none(r[1]) for r in rows]

    # task types known to the ledger
    async def register_worker(
        self, worker_id: str, queues: Sequence[str], types: Sequence[JsonObject], concurrency: int
    ) -> int:
        """Register a worker and the task types it serves; how many types."""
        (row,) = await self._rows(
            WORKER_REGISTER, (worker_id, list(queues), Jsonb(list(types)), concurrency)
        )
        return int(row[0])

    async def worker_heartbeat(self, worker_id: str) -> bool:
        """Keep a registration alive; False if it is gone (register again)."""
        (row,) = await self._rows(WORKER_HEARTBEAT, (worker_id,))
        return bool(row[0])

    async def worker_stop(self, worker_id: str) -> None:
        """A graceful stop: the worker no longer counts as serving its types."""
        await self._rows(WORKER_STOP, (worker_id,))

    async def task_types(self) -> list[TaskTypeInfo]:
        return [decode_task_type(r) for r in await self._rows(TASK_TYPES)]

    # effects
    async def effect_lock(self, conn: AsyncConn, effect_key: str) -> tuple[bool, JsonValue]:
        """Lock effect_key for conn's transaction; (already recorded?, its result)."""
        (row,) = await self._rows(EFFECT_LOCK, (effect_key,), conn)
        return bool(row[0]), row[1]

    async def record_effect(
        self, conn: AsyncConn | None, effect_key: str, task_id: int, result: JsonValue
    ) -> bool:
        (row,) = await self._rows(
            RECORD_EFFECT,
            (effect_key, task_id, Jsonb(result) if result is not None else None),
            conn,
        )
        return bool(row[0])

    # dispatcher
    async def take_due(self, batch_size: int) -> list[DueTask]:
        """Up to batch_size due PENDING tasks, now QUEUED (one statement, committed)."""
        rows = await self._rows(TAKE_DUE, (batch_size,))
        return [DueTask(TaskId(r[0]), r[1], r[2]) for r in rows]

    async def next_run_at(self) -> datetime | None:
        (row,) = await self._rows(NEXT_RUN_AT)
        value: datetime | None = row[0]
        return value

    async def queued_stale(self, older_than_s: float, batch_size: int) -> list[DueTask]:
        rows = await self._rows(QUEUED_STALE, (older_than_s, batch_size))
        return [DueTask(TaskId(r[0]), r[1], r[2]) for r in rows]

    async def queued_confirm(self, task_ids: Sequence[int]) -> int:
        (row,) = await self._rows(QUEUED_CONFIRM, (list(task_ids),))
        return int(row[0])

    # reaper
    async def reap(self) -> int:
        (row,) = await self._rows(REAP)
        return int(row[0])

    # operators
    async def cancel(self, task_id: int) -> TaskStatus:
        (row,) = await self._rows(CANCEL, (task_id,))
        return TaskStatus(row[0])

    async def retry(self, task_id: int) -> TaskStatus:
        (row,) = await self._rows(RETRY, (task_id,))
        return TaskStatus(row[0])

    async def get(self, task_id: int, conn: AsyncConn | None = None) -> Task:
        """The task with its attempt history; conn sees the caller's own transaction."""
        rows = await self._rows(GET_TASK, (task_id,), conn)
        if not rows:
            raise errors.TaskNotFound(f"task {task_id} does not exist")
        history = await self._rows(GET_ATTEMPTS, (task_id,), conn)
        return decode_task(rows[0], [decode_attempt(a) for a in history])

    async def get_many(
        self, task_ids: Sequence[int], conn: AsyncConn | None = None, *, history: bool = False
    ) -> list[Task]:
        """Tasks by id, in no particular order; with their attempts if history."""
        tasks = [decode_task(r) for r in await self._rows(GET_TASKS, (list(task_ids),), conn)]
        if not history:
            return tasks
        attempts = await self.attempts_of(task_ids, conn)
        return [dataclasses.replace(t, attempt_history=attempts.get(t.id, ())) for t in tasks]

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[Task]:
        rows = await self._rows(LIST_TASKS, list_params(status, queue, task_type, limit, before_id))
        return [decode_task(r) for r in rows]

    async def queue_stats(self) -> list[QueueStat]:
        rows = await self._rows(QUEUE_STATS)
        return [QueueStat(r[0], TaskStatus(r[1]), int(r[2]), r[3]) for r in rows]

    async def queue_depths(self) -> list[QueueDepth]:
        """Live (and DEAD) task counts per queue, from partial indexes: cheap to scrape."""
        rows = await self._rows(QUEUE_DEPTHS)
        return [QueueDepth(r[0], TaskStatus(r[1]), int(r[2]), r[3]) for r in rows]

    async def queue_summary(self) -> list[QueueSummary]:
        """Every queue's counts by status, oldest due age and last minute's finishes.

        Scans the whole tasks table: for operators, not for a scrape loop."""
        return [decode_queue_summary(r) for r in await self._rows(QUEUE_SUMMARY)]

    async def attempts_of(
        self, task_ids: Sequence[int], conn: AsyncConn | None = None
    ) -> dict[TaskId, tuple[Attempt, ...]]:
        """The attempt history of each task that has one (for a page of tasks)."""
        history: dict[TaskId, list[Attempt]] = {}
        for row in await self._rows(GET_ATTEMPTS_MANY, (list(task_ids),), conn):
            history.setdefault(TaskId(row[0]), []).append(decode_attempt(row[1:]))
        return {task_id: tuple(attempts) for task_id, attempts in history.items()}

    async def effects_of(self, task_ids: Sequence[int]) -> list[EffectRecord]:
        """The effects these tasks recorded, by effect key."""
        rows = await self._rows(EFFECTS_OF, (list(task_ids),))
        return [EffectRecord(r[0], TaskId(r[1]) if r[1] is not None else None, r[2]) for r in rows]


# --- the sync ledger ---------------------------------------------------------------


class Ledger:
    """The synchronous subset of AsyncLedger, for Client and the command line."""

    def __init__(self, pool: ConnectionPool[SyncConn]) -> None:
        self.pool = pool

    @classmethod
    def connect(
        cls, database_url: str, *, min_size: int = 1, max_size: int = 4, timeout_s: float = 10
    ) -> Ledger:
        """Open a pool; raises LedgerUnavailable at once if PostgreSQL cannot be reached."""
        probe(database_url)
        pool: ConnectionPool[SyncConn] = ConnectionPool(
            database_url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=timeout_s,
            kwargs=pool_kwargs(database_url),
        )
        with translated():
            pool.open(wait=True, timeout=timeout_s)
        return cls(pool)

    def close(self) -> None:
        self.pool.close()

    def wait_final(self, task_id: int, timeout_s: float | None = None) -> Task:
        """The task once it is final, woken by the ledger's NOTIFY; TimeoutError
        after timeout_s. Holds a connection of its own while it waits."""
        try:
            with translated():
                return finals.wait_sync(
                    _conninfo(self.pool.conninfo), task_id, lambda: self.get(task_id), timeout_s
                )
        except errors.LedgerUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise exc.__cause__ from None  # the wait's own timeout, not an outage
            raise

    def _rows(
        self, query: LiteralString, params: Any = None, conn: SyncConn | None = None
    ) -> list[tuple[Any, ...]]:
        with translated():
            if conn is not None:
                return conn.execute(query, params).fetchall()
            with self.pool.connection() as pooled:
                return pooled.execute(query, params).fetchall()

    def ping(self) -> None:
        self._rows("SELECT 1")

    def enqueue_task(self, task: NewTask, conn: SyncConn | None = None) -> Task:
        """Enqueue; the task with ``created`` set (one round trip unless a key replays)."""
        (row,) = self._rows(ENQUEUE_STAMPED, enqueue_params(task), conn)
        replayed = {} if row[1] else {row[0]: self.get(row[0], conn)}
        return enqueued([task], [row], replayed)[0]

    def enqueue_tasks(self, tasks: Sequence[NewTask], conn: SyncConn | None = None) -> list[Task]:
        """enqueue_task for many tasks in one transaction (all or nothing), in order."""
        rows = self._rows(ENQUEUE_MANY_STAMPED, (Jsonb([t.to_json() for t in tasks]),), conn)
        old = [r[0] for r in rows if not r[1]]
        replayed = {t.id: t for t in self.get_many(old, conn, history=True)} if old else {}
        return enqueued(tasks, rows, replayed)

    def complete(
        self, outcomes: Sequence[Outcome], conn: SyncConn | None = None
    ) -> list[TaskStatus | None]:
        rows = self._rows(COMPLETE, complete_params(outcomes), conn)
        return [status_or_none(r[2]) for r in rows]

    def effect_lock(self, conn: SyncConn, effect_key: str) -> tuple[bool, JsonValue]:
        (row,) = self._rows(EFFECT_LOCK, (effect_key,), conn)
        return bool(row[0]), row[1]

    def record_effect(
        self, conn: SyncConn | None, effect_key: str, task_id: int, result: JsonValue
    ) -> bool:
        (row,) = self._rows(
            RECORD_EFFECT,
            (effect_key, task_id, Jsonb(result) if result is not None else None),
            conn,
        )
        return bool(row[0])

    def reap(self) -> int:
        (row,) = self._rows(REAP)
        return int(row[0])

    def cancel(self, task_id: int) -> TaskStatus:
        (row,) = self._rows(CANCEL, (task_id,))
        return TaskStatus(row[0])

    def retry(self, task_id: int) -> TaskStatus:
        (row,) = self._rows(RETRY, (task_id,))
        return TaskStatus(row[0])

    def get(self, task_id: int, conn: SyncConn | None = None) -> Task:
        """The task with its attempt history; conn sees the caller's own transaction."""
        rows = self._rows(GET_TASK, (task_id,), conn)
        if not rows:
            raise errors.TaskNotFound(f"task {task_id} does not exist")
        history = self._rows(GET_ATTEMPTS, (task_id,), conn)
        return decode_task(rows[0], [decode_attempt(a) for a in history])

    def get_many(
        self, task_ids: Sequence[int], conn: SyncConn | None = None, *, history: bool = False
    ) -> list[Task]:
        """Tasks by id, in no particular order; with their attempts if history."""
        tasks = [decode_task(r) for r in self._rows(GET_TASKS, (list(task_ids),), conn)]
        if not history:
            return tasks
        attempts = self.attempts_of(task_ids, conn)
        return [dataclasses.replace(t, attempt_history=attempts.get(t.id, ())) for t in tasks]

    def list_tasks(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[Task]:
        rows = self._rows(LIST_TASKS, list_params(status, queue, task_type, limit, before_id))
        return [decode_task(r) for r in rows]

    def queue_stats(self) -> list[QueueStat]:
        rows = self._rows(QUEUE_STATS)
        return [QueueStat(r[0], TaskStatus(r[1]), int(r[2]), r[3]) for r in rows]

    def task_types(self) -> list[TaskTypeInfo]:
        """The task types workers registered, with how many live workers serve each."""
        return [decode_task_type(r) for r in self._rows(TASK_TYPES)]

    def queue_summary(self) -> list[QueueSummary]:
        """Every queue's counts by status, oldest due age and last minute's finishes.

        Scans the whole tasks table: for operators, not for a scrape loop."""
        return [decode_queue_summary(r) for r in self._rows(QUEUE_SUMMARY)]

    def attempts_of(
        self, task_ids: Sequence[int], conn: SyncConn | None = None
    ) -> dict[TaskId, tuple[Attempt, ...]]:
        """The attempt history of each task that has one (for a page of tasks)."""
        history: dict[TaskId, list[Attempt]] = {}
        for row in self._rows(GET_ATTEMPTS_MANY, (list(task_ids),), conn):
            history.setdefault(TaskId(row[0]), []).append(decode_attempt(row[1:]))
        return {task_id: tuple(attempts) for task_id, attempts in history.items()}
