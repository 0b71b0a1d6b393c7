"""The only code that talks to PostgreSQL: one typed method per SQL function call.

``AsyncLedger`` serves the worker, dispatcher, reaper, API and ``AsyncClient``;
``Ledger`` serves the synchronous ``Client`` and the command line. Each method
runs a plan from ``queries.py`` (the query, its parameters and its decoding,
written once for both twins), so each is one line in both.

Transactions live here too. ``AsyncTransaction`` and its synchronous twin
``Transaction`` begin on a pooled connection at their first statement: ``ctx.once``
uses one as a context manager, and a handler's ``ctx.once_in_transaction``
writes go into one that the worker ends with ``finish(outcome)``: the attempt
is completed inside it and committed with the handler's writes, or (failed,
fenced, lost) all of it rolls back. Nothing outside this module touches a pool.

psycopg errors are translated here into ``ledgerq.errors``: SQLSTATE
``LQ422`` → ``InvalidInput``, ``LQ409`` → ``IdempotencyConflict`` or
``InvalidTransition``, ``LQ404`` → ``TaskNotFound``, a lost or refused
connection → ``LedgerUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, LiteralString, TypeVar

import psycopg
import psycopg.conninfo
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ledgerq import errors, finals, queries, reads, types

AsyncConn = psycopg.AsyncConnection[TupleRow]
SyncConn = psycopg.Connection[TupleRow]
T = TypeVar("T")
_NOT_STARTED = types.EffectStart(False, None, None, None, None)

# --- error translation -----------------------------------------------------------


# SQLSTATE classes of errors psycopg raises as OperationalError that are about
# the call, not the connection: 54 program limit exceeded (an index row over
# the btree limit, too many columns or arguments).
REFUSAL_CLASSES = frozenset({"54"})
# 55P03 lock_not_available: lock_timeout ran out; the server is fine.
LOCK_TIMEOUT = "55P03"


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
    if state == LOCK_TIMEOUT:
        return errors.LedgerError(
            f"{message} (SQLSTATE {state}: another transaction holds the lock)"
        )
    if state is not None and state[:2] in REFUSAL_CLASSES:
        # psycopg files these under OperationalError, but the server answered:
        # the same call would fail the same way again.
        return errors.LedgerError(f"{message} (SQLSTATE {state})")
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


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether exc (or what it wraps) is PostgreSQL giving up on a lock (lock_timeout)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, psycopg.errors.LockNotAvailable):
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
        conn.execute(queries.PING)


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


# Every pooled connection reads times in UTC, whatever zone the server, the
# database, the URL or PGTZ set: the ledger keeps times within years 1 to 9999
# in UTC, and the same instant shown in a zone east or west of Greenwich can
# be year 10000 or 1 BC, which psycopg cannot decode. A SET once the session
# has started, because PGTZ overrides a TimeZone in the startup options.
SESSION_SETUP: LiteralString = "SET TimeZone TO 'UTC'"


async def _session_setup_async(conn: AsyncConn) -> None:
    await conn.execute(SESSION_SETUP)


def _session_setup(conn: SyncConn) -> None:
    conn.execute(SESSION_SETUP)


def _conninfo(conninfo: object) -> str:
    """The pool's connection string, for the connections it does not manage (LISTEN)."""
    if not isinstance(conninfo, str):
        raise errors.ConfigError("waiting needs a pool opened with a connection string")
    return conninfo


VACUUMED_TABLES = ("tasks", "attempts")


# --- running plans -------------------------------------------------------------------


async def _run_async(plan: queries.Plan[T], conn: AsyncConn) -> T:
    """Send each of plan's statements on conn and hand it the rows; its answer."""
    with translated():
        try:
            call = next(plan)
            while True:
                cursor = await conn.execute(call.text, call.params)
                call = plan.send(await cursor.fetchall())
        except StopIteration as done:
            answer: T = done.value
            return answer


def _run(plan: queries.Plan[T], conn: SyncConn) -> T:
    """The blocking twin of _run_async."""
    with translated():
        try:
            call = next(plan)
            while True:
                call = plan.send(conn.execute(call.text, call.params).fetchall())
        except StopIteration as done:
            answer: T = done.value
            return answer


# --- transactions ----------------------------------------------------------------------


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, round(seconds * 1000))


def _begin(lock_wait_s: float | None, idle_s: float | None) -> sql.SQL | sql.Composed:
    """BEGIN with the transaction's bounds, in one round trip: how long a statement
    waits for a lock (lock_timeout), how long the session may sit idle inside it
    before the server ends it (idle_in_transaction_session_timeout)."""
    if lock_wait_s is None and idle_s is None:
        return sql.SQL("BEGIN")
    return sql.SQL(
        "BEGIN; SET LOCAL lock_timeout = {}; SET LOCAL idle_in_transaction_session_timeout = {}"
    ).format(sql.Literal(_ms(lock_wait_s) or 0), sql.Literal(_ms(idle_s) or 0))


class AsyncTransaction:
    """A transaction on a pooled connection, begun at its first statement.

    As ``async with ledger.transaction() as tx:`` it commits when the block
    ends and rolls back if it raises. As a handler's transaction it is ended
    by ``finish(outcome)``. Either way the connection goes back to the pool.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConn],
        *,
        lock_wait_s: float | None = None,
        idle_s: float | None = None,
    ) -> None:
        self._pool = pool
        self._conn: AsyncConn | None = None
        self._begin = _begin(lock_wait_s, idle_s)

    @property
    def begun(self) -> bool:
        return self._conn is not None

    async def connection(self) -> AsyncConn:
        """The transaction's connection (BEGIN on a pooled one the first time)."""
        if self._conn is None:
            with translated():
                conn = await self._pool.getconn()
                try:
                    await conn.execute(self._begin)
                except BaseException:
                    await self._pool.putconn(conn)
                    raise
            self._conn = conn
        return self._conn

    async def effect_lock(self, effect_key: str) -> tuple[bool, types.JsonValue]:
        """Lock effect_key until the transaction ends; (already recorded?, its result)."""
        return await _run_async(queries.effect_lock(effect_key), await self.connection())

    async def record_effect(self, effect_key: str, task_id: int, result: types.JsonValue) -> bool:
        plan = queries.record_effect(effect_key, task_id, result)
        return await _run_async(plan, await self.connection())

    async def finish(self, outcome: types.Outcome | None) -> types.TaskStatus | None:
        """End the transaction; the status the attempt's completion committed, if any.

        A succeeded outcome is completed inside the transaction (complete_tasks)
        and committed with the handler's writes, unless the attempt was fenced
        (another attempt owns the task: None), when all of it rolls back. A
        failed outcome, or None (the attempt was lost), rolls back; its caller
        records a failed outcome the usual way. Raises LedgerError when
        completing or committing failed: then nothing was committed.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return None
        try:
            status: types.TaskStatus | None = None
            if outcome is not None and outcome.succeeded:
                (status,) = await _run_async(queries.complete([outcome]), conn)
            with translated():
                await conn.execute("COMMIT" if status is not None else "ROLLBACK")
            return status
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            if outcome is None or not outcome.succeeded:
                return None  # it was to roll back anyway; the server drops the rest
            raise
        finally:
            await self._pool.putconn(conn)

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if exc_type is None:
                with translated():
                    await conn.execute("COMMIT")
            else:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
        finally:
            await self._pool.putconn(conn)


class Transaction:
    """AsyncTransaction's twin for a plain ``def`` handler, used from its thread."""

    def __init__(
        self,
        pool: ConnectionPool[SyncConn],
        *,
        lock_wait_s: float | None = None,
        idle_s: float | None = None,
    ) -> None:
        self._pool = pool
        self._conn: SyncConn | None = None
        self._begin = _begin(lock_wait_s, idle_s)

    @property
    def begun(self) -> bool:
        return self._conn is not None

    def connection(self) -> SyncConn:
        """The transaction's connection (BEGIN on a pooled one the first time)."""
        if self._conn is None:
            with translated():
                conn = self._pool.getconn()
                try:
                    conn.execute(self._begin)
                except BaseException:
                    self._pool.putconn(conn)
                    raise
            self._conn = conn
        return self._conn

    def effect_lock(self, effect_key: str) -> tuple[bool, types.JsonValue]:
        """Lock effect_key until the transaction ends; (already recorded?, its result)."""
        return _run(queries.effect_lock(effect_key), self.connection())

    def record_effect(self, effect_key: str, task_id: int, result: types.JsonValue) -> bool:
        return _run(queries.record_effect(effect_key, task_id, result), self.connection())

    async def finish(self, outcome: types.Outcome | None) -> types.TaskStatus | None:
        """AsyncTransaction.finish, in a thread: the worker ends every handler's
        transaction from its event loop, and this one's statements block."""
        return await asyncio.to_thread(self._finish, outcome)

    def _finish(self, outcome: types.Outcome | None) -> types.TaskStatus | None:
        conn, self._conn = self._conn, None
        if conn is None:
            return None
        try:
            status: types.TaskStatus | None = None
            if outcome is not None and outcome.succeeded:
                (status,) = _run(queries.complete([outcome]), conn)
            with translated():
                conn.execute("COMMIT" if status is not None else "ROLLBACK")
            return status
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            if outcome is None or not outcome.succeeded:
                return None
            raise
        finally:
            self._pool.putconn(conn)


# --- effect holds ---------------------------------------------------------------------


class EffectHold:
    """ctx.once's hold on one effect key: a pooled connection in autocommit
    mode holding the key's session-level lock (effect_start) while the effect
    runs. Every statement commits at once, so the start mark is durable before
    the effect runs, and the lock is released (effect_unlock) only after the
    record has committed. If the worker dies, the lock goes with its session.
    ``close()`` must follow, whatever happens."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConn],
        conn: AsyncConn,
        effect_key: str,
        start: types.EffectStart,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self.effect_key = effect_key
        self.start = start
        #: Clear the start mark on close: the effect's function came back.
        self.forget_start = False

    async def finish(self, task_id: int, result: types.JsonValue) -> bool:
        """Record the effect and clear its start mark (effect_finish)."""
        return await _run_async(queries.effect_finish(self.effect_key, task_id, result), self._conn)

    async def close(self) -> None:
        """Let go of the key (unless effect_start already did: it was recorded)
        and of the connection. Shielded: a cancelled attempt must still let go."""
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        try:
            if not self.start.recorded:
                if self.forget_start:
                    await _run_async(queries.effect_forget(self.effect_key), self._conn)
                await _run_async(queries.effect_unlock(self.effect_key), self._conn)
        except errors.LedgerError:
            # Ending the session lets go of the key too.
            with contextlib.suppress(Exception):
                await self._conn.close()
        finally:
            await self._pool.putconn(self._conn)


# --- the async ledger ------------------------------------------------------------


class AsyncLedger:
    """Typed async calls into the ledger's SQL functions, over a connection pool."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConn]) -> None:
        self._pool = pool
        self._sync_twin: Ledger | None = None
        self._sync_twin_lock = threading.Lock()
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
            configure=_session_setup_async,
        )
        with translated():
            await pool.open(wait=True, timeout=timeout_s)
        return cls(pool)

    async def close(self) -> None:
        if self._finals is not None:
            await self._finals.close()
        await self._pool.close()
        if self._sync_twin is not None:
            await asyncio.to_thread(self._sync_twin.close)

    @property
    def closed(self) -> bool:
        return self._pool.closed

    async def wait_final(self, task_id: int, timeout_s: float | None = None) -> types.Task:
        """The task once it is final, woken by the ledger's NOTIFY (one LISTEN
        connection shared by every waiter); TimeoutError after timeout_s."""
        if self._finals is None:
            self._finals = finals.FinalWatcher(_conninfo(self._pool.conninfo), self.get)
        # Not inside translated(): TimeoutError is an OSError. The reads raise
        # ledgerq errors already, and the listener handles its own failures.
        return await self._finals.wait(task_id, timeout_s)

    async def _run(self, plan: queries.Plan[T], conn: AsyncConn | None = None) -> T:
        """Run plan on conn (the caller's transaction), or on a pooled connection."""
        if conn is not None:
            return await _run_async(plan, conn)
        with translated():
            async with self._pool.connection() as pooled:
                return await _run_async(plan, pooled)

    def transaction(
        self, *, lock_wait_s: float | None = None, idle_s: float | None = None
    ) -> AsyncTransaction:
        """A transaction, begun at its first statement (see AsyncTransaction);
        lock_wait_s and idle_s bound its lock waits and its idle time."""
        return AsyncTransaction(self._pool, lock_wait_s=lock_wait_s, idle_s=idle_s)

    def sync_transaction(
        self, *, lock_wait_s: float | None = None, idle_s: float | None = None
    ) -> Transaction:
        """A transaction for a plain ``def`` handler's thread, on a synchronous pool
        of this ledger's size, opened on first use (so a worker whose handlers
        are all ``async def`` never opens it)."""
        with self._sync_twin_lock:
            if self._sync_twin is None:
                conninfo = self._pool.conninfo
                if not isinstance(conninfo, str):
                    raise errors.ConfigError("plain def handlers need a pool with a fixed conninfo")
                self._sync_twin = Ledger.connect(conninfo, max_size=self._pool.max_size)
        return self._sync_twin.transaction(lock_wait_s=lock_wait_s, idle_s=idle_s)

    async def effect_hold(
        self,
        effect_key: str,
        task_id: int,
        attempt: int,
        *,
        wait_s: float | None = None,
        hold_s: float | None = None,
    ) -> EffectHold:
        """Hold effect_key for ctx.once (see EffectHold, and effect_start in
        effects.sql): wait_s bounds the wait for the key, hold_s how long the
        session may then idle holding it. The hold's ``start`` says whether the
        effect is recorded (the key is then already free) or a lost attempt left
        a start mark. The caller must ``close()`` it."""
        with translated():
            conn = await self._pool.getconn()
        plan = queries.effect_start(effect_key, task_id, attempt, _ms(wait_s), _ms(hold_s))
        try:
            start = await _run_async(plan, conn)
        except BaseException:
            # The statement may have failed after taking the lock.
            await EffectHold(self._pool, conn, effect_key, _NOT_STARTED).close()
            raise
        return EffectHold(self._pool, conn, effect_key, start)

    async def ping(self) -> None:
        await self._run(queries.ping())

    # enqueue
    async def enqueue_many(
        self, tasks: Sequence[types.NewTask]
    ) -> list[tuple[types.TaskId, bool, str]]:
        """enqueue_tasks: (id, created, queue) per task, in input order; nothing read back."""
        return await self._run(queries.enqueue_many(tasks))

    async def enqueue_task(self, task: types.NewTask, conn: AsyncConn | None = None) -> types.Task:
        """Enqueue; the task with ``created`` set (one round trip unless a key replays)."""
        return await self._run(queries.enqueue_task(task), conn)

    async def enqueue_tasks(
        self, tasks: Sequence[types.NewTask], conn: AsyncConn | None = None
    ) -> list[types.Task]:
        """enqueue_task for many tasks in one transaction (all or nothing), in order."""
        return await self._run(queries.enqueue_tasks(tasks), conn)

    async def enqueue_handing_off(
        self, tasks: Sequence[types.NewTask], *, many: bool
    ) -> tuple[list[types.Task], list[types.DueTask]]:
        """Enqueue in one statement, marking the created tasks that are due at
        once QUEUED for the caller to push to Redis (see task_hand_off)."""
        return await self._run(queries.enqueue_handing_off(tasks, many=many))

    # worker
    async def claim(
        self, task_ids: Sequence[int], worker_id: str, lease_s: int
    ) -> list[types.ClaimedTask]:
        return await self._run(queries.claim(task_ids, worker_id, lease_s))

    async def claim_reporting(
        self, task_ids: Sequence[int], worker_id: str, lease_s: int
    ) -> tuple[list[types.ClaimedTask], list[types.Deferral]]:
        """claim, with the tasks flow control deferred (see types.Deferral)."""
        return await self._run(queries.claim_reporting(task_ids, worker_id, lease_s))

    async def heartbeat(
        self, leases: Sequence[tuple[int, int]], lease_s: int
    ) -> list[tuple[types.TaskId, int, str]]:
        return await self._run(queries.heartbeat(leases, lease_s))

    async def complete(self, outcomes: Sequence[types.Outcome]) -> list[types.TaskStatus | None]:
        return await self._run(queries.complete(outcomes))

    async def release(
        self, leases: Sequence[tuple[int, int]], reason: str
    ) -> list[types.TaskStatus | None]:
        return await self._run(queries.release(leases, reason))

    async def hand_back(
        self, leases: Sequence[tuple[int, int]], worker_id: str, delay_s: float
    ) -> list[types.TaskStatus | None]:
        """Hand back tasks of a type another live worker serves (no attempt spent);
        None for a task no live worker serves."""
        return await self._run(queries.hand_back(leases, worker_id, delay_s))

    # task types known to the ledger
    async def register_worker(
        self,
        worker_id: str,
        queues: Sequence[str],
        task_types: Sequence[types.JsonObject],
        concurrency: int,
    ) -> int:
        """Register a worker and the task types it serves; how many types."""
        return await self._run(queries.register_worker(worker_id, queues, task_types, concurrency))

    async def worker_heartbeat(self, worker_id: str) -> bool:
        """Keep a registration alive; False if it is gone (register again)."""
        return await self._run(queries.worker_heartbeat(worker_id))

    async def worker_stop(self, worker_id: str) -> None:
        """A graceful stop: the worker no longer counts as serving its types."""
        await self._run(queries.worker_stop(worker_id))

    async def task_types(self) -> list[types.TaskTypeInfo]:
        return await self._run(queries.task_types())

    # dispatcher
    async def take_due(self, batch_size: int) -> list[types.DueTask]:
        """Up to batch_size due PENDING tasks, now QUEUED (one statement, committed)."""
        return await self._run(queries.take_due(batch_size))

    async def next_run_at(self) -> datetime | None:
        return await self._run(queries.next_run_at())

    async def flow_wake_due(self) -> int:
        """Wake tasks parked on rate buckets that refilled; how many."""
        return await self._run(queries.flow_wake_due())

    async def flow_rescue(self) -> int:
        """Wake parked tasks whose limit has room although no event said so; how many."""
        return await self._run(queries.flow_rescue())

    async def queued_stale(
        self,
        older_than_s: float,
        batch_size: int,
        as_of: datetime,
        after: tuple[datetime, int] | None = None,
    ) -> list[tuple[types.DueTask, datetime]]:
        return await self._run(queries.queued_stale(older_than_s, batch_size, as_of, after))

    async def queued_seen(self, queues: Sequence[str], older_than_s: float, as_of: datetime) -> int:
        return await self._run(queries.queued_seen(queues, older_than_s, as_of))

    async def now(self) -> datetime:
        """The ledger's clock."""
        return await self._run(queries.ledger_now())

    async def queued_confirm(self, task_ids: Sequence[int]) -> int:
        return await self._run(queries.queued_confirm(task_ids))

    # reaper
    async def reap(self) -> int:
        return await self._run(queries.reap())

    async def prune_tasks_batch(self, older_than: str, batch_size: int) -> int:
        return await self._run(queries.prune_tasks_batch(older_than, batch_size))

    async def churned_tables(self, dead_rows: int) -> list[str]:
        """The ledger's tables (tasks, attempts) with more than dead_rows dead rows."""
        return await self._run(queries.churned_tables(dead_rows))

    async def vacuum(self, table: str) -> None:
        """VACUUM (SKIP_LOCKED) ledgerq.<table>, tasks or attempts. No plan: VACUUM
        runs outside any transaction and returns no rows. Without the table's
        ownership PostgreSQL skips it with a warning."""
        if table not in VACUUMED_TABLES:
            raise errors.ConfigError(
                f"only {', '.join(VACUUMED_TABLES)} are vacuumed, not {table!r}"
            )
        statement = sql.SQL("VACUUM (SKIP_LOCKED) {}").format(sql.Identifier("ledgerq", table))
        with translated():
            async with self._pool.connection() as pooled:
                await pooled.execute(statement)

    # operators
    async def cancel(self, task_id: int) -> types.TaskStatus:
        return await self._run(queries.cancel(task_id))

    async def retry(self, task_id: int) -> types.TaskStatus:
        return await self._run(queries.retry(task_id))

    async def get(self, task_id: int) -> types.Task:
        """The task with its attempt history."""
        return await self._run(queries.get(task_id))

    async def get_many(self, task_ids: Sequence[int], *, history: bool = False) -> list[types.Task]:
        """Tasks by id, in no particular order; with their attempts if history."""
        return await self._run(queries.get_many(task_ids, history=history))

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
        limit: int = types.LIST_LIMIT_DEFAULT,
        before_id: int | None = None,
    ) -> types.TaskPage:
        """A page of tasks, newest first, older than before_id if given."""
        return await self._run(queries.list_tasks(status, queue, task_type, limit, before_id))

    async def queue_depths(self) -> list[types.QueueDepth]:
        """Live (and DEAD) task counts per queue, from partial indexes: cheap to scrape."""
        return await self._run(queries.queue_depths())

    async def queue_summary(self) -> list[types.QueueSummary]:
        """Every queue's counts by status, oldest due age and last minute's finishes.

        Scans the whole tasks table: for operators, not for a scrape loop."""
        return await self._run(queries.queue_summary())

    async def attempts_of(
        self, task_ids: Sequence[int]
    ) -> dict[types.TaskId, tuple[types.Attempt, ...]]:
        """The attempt history of each task that has one (for a page of tasks)."""
        return await self._run(queries.attempts_of(task_ids))

    async def effects_of(self, task_ids: Sequence[int]) -> list[types.EffectRecord]:
        """The effects these tasks recorded, by effect key."""
        return await self._run(queries.effects_of(task_ids))

    # flow control
    async def configure_queue(self, queue: str, settings: types.JsonObject) -> types.JsonObject:
        """Merge settings into queue's (a key set to None removes it); all of them now.
        InvalidInput (LQ422) names an unknown key or a bad value."""
        return await self._run(queries.configure_queue(queue, settings))

    async def pause_queue(self, queue: str) -> types.QueuePaused:
        """No task of queue starts until it is resumed; whether this changed it."""
        return await self._run(queries.pause_queue(queue))

    async def resume_queue(self, queue: str) -> types.QueuePaused:
        return await self._run(queries.resume_queue(queue))

    async def queue_settings(self) -> list[types.QueueSettings]:
        """Every queue that was configured or paused: its pause and its settings."""
        return await self._run(queries.queue_settings())

    # schedules
    async def schedule_task(self, schedule: types.NewSchedule) -> None:
        """Create or replace a schedule (unchanged: nothing written); InvalidInput if bad."""
        await self._run(queries.schedule_task(schedule))

    async def schedule_fire(self, as_of: datetime | None = None) -> list[types.ScheduleFired]:
        """Enqueue every due slot (run_schedules); what happened to each due schedule."""
        return await self._run(queries.schedule_fire(as_of))

    async def list_schedules(self) -> list[types.Schedule]:
        return await self._run(queries.list_schedules())

    # the operators' dashboard (reads.py; its changes call the SQL functions)
    async def dashboard_features(self) -> reads.Features:
        """Which optional SQL objects (queue controls, schedules) this ledger has."""
        return await self._run(reads.features())

    async def finished_per_minute(
        self, minutes: int = reads.THROUGHPUT_MINUTES
    ) -> list[reads.FinishedBucket]:
        """Tasks that reached a final status, per queue, status and minute, lately."""
        return await self._run(reads.finished_per_minute(minutes))

    async def dead_count(self, queue: str | None = None) -> int:
        """How many tasks are DEAD (in queue, if given)."""
        return await self._run(reads.dead_count(queue))

    async def task_id_by_key(self, idempotency_key: str) -> types.TaskId | None:
        """The id of the task holding idempotency_key, if any."""
        return await self._run(reads.task_id_by_key(idempotency_key))

    async def workers_seen(
        self, window_s: float = reads.WORKERS_WINDOW_S
    ) -> list[reads.WorkerSeen]:
        """Workers that registered, heartbeat or finished an attempt within window_s."""
        return await self._run(reads.workers_seen(window_s))

    async def pause_schedule(self, name: str) -> bool:
        """False for an unknown schedule."""
        return await self._run(reads.pause_schedule(name))

    async def resume_schedule(self, name: str) -> bool:
        """False for an unknown schedule."""
        return await self._run(reads.resume_schedule(name))


# --- the sync ledger ---------------------------------------------------------------


class Ledger:
    """The synchronous twin of AsyncLedger, for Client, the command line and the
    transactions of plain ``def`` handlers."""

    def __init__(self, pool: ConnectionPool[SyncConn]) -> None:
        self._pool = pool

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
            configure=_session_setup,
        )
        with translated():
            pool.open(wait=True, timeout=timeout_s)
        return cls(pool)

    def close(self) -> None:
        self._pool.close()

    def wait_final(self, task_id: int, timeout_s: float | None = None) -> types.Task:
        """The task once it is final, woken by the ledger's NOTIFY; TimeoutError
        after timeout_s. Holds a connection of its own while it waits."""
        try:
            with translated():
                return finals.wait_sync(
                    _conninfo(self._pool.conninfo), task_id, lambda: self.get(task_id), timeout_s
                )
        except errors.LedgerUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise exc.__cause__ from None  # the wait's own timeout, not an outage
            raise

    def _run(self, plan: queries.Plan[T], conn: SyncConn | None = None) -> T:
        """Run plan on conn (the caller's transaction), or on a pooled connection."""
        if conn is not None:
            return _run(plan, conn)
        with translated(), self._pool.connection() as pooled:
            return _run(plan, pooled)

    def transaction(
        self, *, lock_wait_s: float | None = None, idle_s: float | None = None
    ) -> Transaction:
        """A transaction, begun at its first statement (see Transaction)."""
        return Transaction(self._pool, lock_wait_s=lock_wait_s, idle_s=idle_s)

    def enqueue_task(self, task: types.NewTask, conn: SyncConn | None = None) -> types.Task:
        """Enqueue; the task with ``created`` set (one round trip unless a key replays)."""
        return self._run(queries.enqueue_task(task), conn)

    def enqueue_tasks(
        self, tasks: Sequence[types.NewTask], conn: SyncConn | None = None
    ) -> list[types.Task]:
        """enqueue_task for many tasks in one transaction (all or nothing), in order."""
        return self._run(queries.enqueue_tasks(tasks), conn)

    def enqueue_handing_off(
        self, tasks: Sequence[types.NewTask], *, many: bool
    ) -> tuple[list[types.Task], list[types.DueTask]]:
        """Enqueue in one statement, marking the created tasks that are due at
        once QUEUED for the caller to push to Redis (see task_hand_off)."""
        return self._run(queries.enqueue_handing_off(tasks, many=many))

    def cancel(self, task_id: int) -> types.TaskStatus:
        return self._run(queries.cancel(task_id))

    def retry(self, task_id: int) -> types.TaskStatus:
        return self._run(queries.retry(task_id))

    def get(self, task_id: int) -> types.Task:
        """The task with its attempt history."""
        return self._run(queries.get(task_id))

    def list_tasks(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
        limit: int = types.LIST_LIMIT_DEFAULT,
        before_id: int | None = None,
    ) -> types.TaskPage:
        """A page of tasks, newest first, older than before_id if given."""
        return self._run(queries.list_tasks(status, queue, task_type, limit, before_id))

    def task_types(self) -> list[types.TaskTypeInfo]:
        """The task types workers registered, with how many live workers serve each."""
        return self._run(queries.task_types())

    def queue_summary(self) -> list[types.QueueSummary]:
        """Every queue's counts by status, oldest due age and last minute's finishes.

        Scans the whole tasks table: for operators, not for a scrape loop."""
        return self._run(queries.queue_summary())

    def configure_queue(self, queue: str, settings: types.JsonObject) -> types.JsonObject:
        """Merge settings into queue's (a key set to None removes it); all of them now.
        InvalidInput (LQ422) names an unknown key or a bad value."""
        return self._run(queries.configure_queue(queue, settings))

    def pause_queue(self, queue: str) -> types.QueuePaused:
        """No task of queue starts until it is resumed; whether this changed it."""
        return self._run(queries.pause_queue(queue))

    def resume_queue(self, queue: str) -> types.QueuePaused:
        return self._run(queries.resume_queue(queue))

    def list_schedules(self) -> list[types.Schedule]:
        return self._run(queries.list_schedules())

    def pause_schedule(self, name: str) -> None:
        """ScheduleNotFound for an unknown name; pausing a paused one is a no-op."""
        self._run(queries.pause_schedule(name))

    def resume_schedule(self, name: str) -> None:
        """ScheduleNotFound for an unknown name; fires from the first slot after now."""
        self._run(queries.resume_schedule(name))

    def unschedule_task(self, name: str) -> None:
        """Delete the schedule (its tasks stay); ScheduleNotFound for an unknown name."""
        self._run(queries.unschedule_task(name))
