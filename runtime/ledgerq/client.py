"""Client and AsyncClient: enqueue, get, cancel and retry tasks from Python, and
configure, pause and resume queues.

    client = Client()                 # reads LEDGERQ_* from the environment
    task = client.enqueue("email.send", {"to": "a@b.c"}, idempotency_key="welcome-42")
    task.id, task.created, task.status
    client.configure_queue("email", max_running=20, per_key_max_running=2)

``enqueue(..., conn=my_psycopg_connection)`` runs inside the caller's
transaction: the task exists only if that transaction commits.

A task's queue and max_attempts, when the call gives none: the ledger's rule
(the task type's registered values, else ``default`` and 5), except that a
client given a ``registry=`` sends the values that registry declares for the
types it holds (the code this process would run is the best witness).

Hand-off: an enqueue on the client's own connection marks the tasks it creates
that are due at once QUEUED in the same statement and, right after the commit,
pushes them to Redis itself, so a worker can take them without waiting for the
dispatcher's round trip. The ledger stays the truth: a push that fails (Redis
down, this process killed in between) leaves QUEUED tasks that the
dispatcher's redelivery sweep pushes again. Tasks of a queue under flow control
(one with a row in ledgerq.queues: paused, limited or configured), or with a
concurrency key, are left PENDING for the dispatcher. After a failed push the
client leaves every task to the dispatcher for HAND_OFF_PAUSE_S.
``hand_off=False`` turns it off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from ledgerq import config, errors, jsonvalue, metrics, storable, types
from ledgerq.dispatch import Dispatch, HandOff, HandOffGate
from ledgerq.ledger import AsyncConn, AsyncLedger, Ledger, SyncConn

_TASK_FIELDS = {
    "task_type", "payload", "queue", "priority", "run_at", "delay", "max_attempts",
    "idempotency_key", "concurrency_key",
}  # fmt: skip


class _Defaults:
    """Turns enqueue arguments into a NewTask, with the registry's defaults
    (None, the ledger's to fill in, for a type the registry does not hold)."""

    def __init__(self, registry: types.TaskTypes | None) -> None:
        self.registry = registry

    def new_task(
        self,
        task_type: str,
        payload: object = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        delay: float | timedelta = 0,
        run_at: datetime | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        concurrency_key: str | None = None,
    ) -> types.NewTask:
        definition = self.registry.get(task_type) if self.registry is not None else None
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if delay < 0:
            raise errors.InvalidInput(f"delay must be >= 0 seconds, got {delay}")
        if run_at is not None and delay:
            raise errors.InvalidInput("give run_at or delay, not both")
        if delay:
            try:
                run_at = datetime.now().astimezone() + timedelta(seconds=delay)
            except OverflowError:
                raise errors.InvalidInput(f"delay of {delay} s is past year 9999") from None
        if run_at is not None:
            run_at = storable.run_at(run_at)
        _check_sendable(
            texts={"task_type": task_type, "queue": queue, "idempotency_key": idempotency_key,
                   "concurrency_key": concurrency_key},
            integers={"priority": priority, "max_attempts": max_attempts},
        )  # fmt: skip
        # `is None`, not `or`: an explicit "" or 0 is bad input for the ledger
        # to refuse (LQ422), not a request for the default.
        if queue is None and definition is not None:
            queue = definition.queue
        if max_attempts is None and definition is not None:
            max_attempts = definition.max_attempts
        return types.NewTask(
            task_type=task_type,
            payload=jsonvalue.payload(payload),
            queue=queue,
            priority=priority,
            run_at=run_at,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            concurrency_key=concurrency_key,
        )

    def from_mapping(self, item: Mapping[str, Any]) -> types.NewTask:
        unknown = set(item) - _TASK_FIELDS
        if unknown:
            raise errors.InvalidInput(f"unknown task field(s): {', '.join(sorted(unknown))}")
        if "task_type" not in item:
            raise errors.InvalidInput("every task needs a task_type")
        fields = dict(item)
        return self.new_task(fields.pop("task_type"), fields.pop("payload", None), **fields)


_INT32 = range(-(2**31), 2**31)


def _check_sendable(texts: Mapping[str, str | None], integers: Mapping[str, int | None]) -> None:
    """Refuse, naming the field, what the driver could not even send: text with
    NUL, an integer beyond PostgreSQL's integer. The ledger checks the rest."""
    for name, text in texts.items():
        if text is not None and "\x00" in text:
            raise errors.InvalidInput(f"{name} must not contain U+0000")
    for name, number in integers.items():
        if isinstance(number, bool) or (number is not None and not isinstance(number, int)):
            raise errors.InvalidInput(f"{name} must be an integer, got {number!r}")
        if number is not None and number not in _INT32:
            raise errors.InvalidInput(f"{name} is out of range, got {number}")


def _seconds(timeout: float | timedelta | None) -> float | None:
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if timeout is not None and timeout < 0:
        raise errors.InvalidInput(f"timeout must be >= 0 seconds, got {timeout}")
    return timeout


def queue_settings(settings: Mapping[str, object]) -> types.JsonObject:
    """configure_queue's keyword arguments as the JSON object the ledger takes.

    A ``timedelta`` (``retention``) becomes interval text; None stays None (it
    removes the setting). Which keys exist and which values they allow is the
    ledger's to say (LQ422 naming the key); values that are not JSON at all
    (NaN, a set) are refused here, naming the key, before anything is sent.
    """
    out: types.JsonObject = {}
    for key, value in settings.items():
        if isinstance(value, timedelta):
            seconds = value.total_seconds()
            value = f"{int(seconds) if seconds.is_integer() else seconds!r} seconds"
        out[key] = jsonvalue.plain(value, strict=True, where=key)
    return out


def _count_enqueued(tasks: Iterable[types.Task]) -> None:
    for task in tasks:
        if task.created:
            metrics.TASKS_ENQUEUED.labels(*metrics.task_labels(task.type, task.queue)).inc()


class Client:
    """Synchronous client of the ledger."""

    def __init__(
        self,
        settings: config.Settings | None = None,
        *,
        registry: types.TaskTypes | None = None,
        ledger: Ledger | None = None,
        hand_off: bool = True,
    ) -> None:
        self.settings = settings or config.Settings.from_env()
        self._defaults = _Defaults(registry)
        self._ledger = ledger
        self._owns_ledger = ledger is None  # a given ledger is its giver's to close
        self._hand_off = HandOffGate(hand_off)
        self._redis: HandOff | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger.connect(self.settings.database_url)
        return self._ledger

    def close(self) -> None:
        """Close what the client opened (not a ledger it was given)."""
        if self._ledger is not None and self._owns_ledger:
            self._ledger.close()
            self._ledger = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def _enqueue(
        self, news: Sequence[types.NewTask], conn: SyncConn | None, *, many: bool
    ) -> list[types.Task]:
        if conn is not None or not self._hand_off.ready():
            if many:
                return self.ledger.enqueue_tasks(news, conn)
            return [self.ledger.enqueue_task(news[0], conn)]
        tasks, handed = self.ledger.enqueue_handing_off(news, many=many)
        if handed:
            if self._redis is None:
                s = self.settings
                self._redis = HandOff.connect(s.redis_url, s.redis_prefix, cluster=s.redis_cluster)
            try:
                self._redis.push(handed)
            except errors.DispatchError as exc:
                self._hand_off.failed(len(handed), exc.message)
        return tasks

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enqueue(
        self,
        task_type: str,
        payload: object = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        delay: float | timedelta = 0,
        run_at: datetime | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        concurrency_key: str | None = None,
        conn: SyncConn | None = None,
    ) -> types.Task:
        """Create a task (or return the one its idempotency key already names)."""
        new = self._defaults.new_task(
            task_type, payload, idempotency_key=idempotency_key, priority=priority,
            delay=delay, run_at=run_at, queue=queue, max_attempts=max_attempts,
            concurrency_key=concurrency_key,
        )  # fmt: skip
        (task,) = self._enqueue([new], conn, many=False)
        _count_enqueued([task])
        return task

    def enqueue_many(
        self, tasks: Sequence[Mapping[str, Any]], conn: SyncConn | None = None
    ) -> list[types.Task]:
        """Create many tasks in one all-or-nothing call; results in input order."""
        news = [self._defaults.from_mapping(item) for item in tasks]
        results = (
            self._enqueue(news, conn, many=True) if news else self.ledger.enqueue_tasks(news, conn)
        )
        _count_enqueued(results)
        return results

    def get(self, task_id: int) -> types.Task:
        return self.ledger.get(task_id)

    def wait(self, task_id: int, timeout: float | timedelta | None = None) -> types.Task:
        """The task once it is final (SUCCEEDED, DEAD or CANCELLED), woken by the
        ledger, not by polling; raises TimeoutError after timeout (None: no limit)."""
        return self.ledger.wait_final(task_id, _seconds(timeout))

    def cancel(self, task_id: int) -> types.TaskStatus:
        return self.ledger.cancel(task_id)

    def retry(self, task_id: int) -> types.TaskStatus:
        return self.ledger.retry(task_id)

    def configure_queue(self, queue: str, **settings: object) -> types.JsonObject:
        """Set some of queue's settings (a None removes one; the others stay);
        returns all of them. InvalidInput names an unknown key or a bad value."""
        return self.ledger.configure_queue(queue, queue_settings(settings))

    def pause_queue(self, queue: str) -> bool:
        """No task of queue starts until it is resumed (running ones finish);
        enqueues are still accepted. False if it was paused already."""
        return self.ledger.pause_queue(queue).changed

    def resume_queue(self, queue: str) -> bool:
        """Tasks of queue start again. False if it was not paused."""
        return self.ledger.resume_queue(queue).changed


class AsyncClient:
    """Asynchronous client of the ledger: the same calls as Client, awaited."""

    def __init__(
        self,
        settings: config.Settings | None = None,
        *,
        registry: types.TaskTypes | None = None,
        ledger: AsyncLedger | None = None,
        dispatch: Dispatch | None = None,
        hand_off: bool = True,
    ) -> None:
        """Given a ``dispatch`` (a process that has one already), hand-offs go
        through it, and close() leaves it open, like a given ledger."""
        self.settings = settings or config.Settings.from_env()
        self._defaults = _Defaults(registry)
        self._ledger = ledger
        self._owns_ledger = ledger is None
        self._hand_off = HandOffGate(hand_off)
        self._redis = dispatch
        self._owns_redis = dispatch is None

    async def ledger(self) -> AsyncLedger:
        if self._ledger is None:
            self._ledger = await AsyncLedger.connect(self.settings.database_url)
        return self._ledger

    async def close(self) -> None:
        """Close what the client opened (not a ledger or dispatch it was given)."""
        if self._ledger is not None and self._owns_ledger:
            await self._ledger.close()
            self._ledger = None
        if self._redis is not None and self._owns_redis:
            await self._redis.close()
            self._redis = None

    async def _enqueue(
        self, news: Sequence[types.NewTask], conn: AsyncConn | None, *, many: bool
    ) -> list[types.Task]:
        ledger = await self.ledger()
        if conn is not None or not self._hand_off.ready():
            if many:
                return await ledger.enqueue_tasks(news, conn)
            return [await ledger.enqueue_task(news[0], conn)]
        tasks, handed = await ledger.enqueue_handing_off(news, many=many)
        if handed:
            if self._redis is None:
                s = self.settings
                self._redis = Dispatch.connect(
                    s.redis_url, s.redis_prefix, cluster=s.redis_cluster,
                    timeout_s=HandOff.TIMEOUT_S,
                )  # fmt: skip
            await self._hand_off.push(self._redis, handed)
        return tasks

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def enqueue(
        self,
        task_type: str,
        payload: object = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        delay: float | timedelta = 0,
        run_at: datetime | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        concurrency_key: str | None = None,
        conn: AsyncConn | None = None,
    ) -> types.Task:
        """Create a task (or return the one its idempotency key already names)."""
        new = self._defaults.new_task(
            task_type, payload, idempotency_key=idempotency_key, priority=priority,
            delay=delay, run_at=run_at, queue=queue, max_attempts=max_attempts,
            concurrency_key=concurrency_key,
        )  # fmt: skip
        (task,) = await self._enqueue([new], conn, many=False)
        _count_enqueued([task])
        return task

    async def enqueue_many(
        self, tasks: Sequence[Mapping[str, Any]], conn: AsyncConn | None = None
    ) -> list[types.Task]:
        """Create many tasks in one all-or-nothing call; results in input order."""
        news = [self._defaults.from_mapping(item) for item in tasks]
        if news:
            results = await self._enqueue(news, conn, many=True)
        else:
            results = await (await self.ledger()).enqueue_tasks(news, conn)
        _count_enqueued(results)
        return results

    async def get(self, task_id: int) -> types.Task:
        return await (await self.ledger()).get(task_id)

    # The README's signature, shared with Client.wait; the same as asyncio.timeout.
    async def wait(self, task_id: int, timeout: float | timedelta | None = None) -> types.Task:  # noqa: ASYNC109
        """The task once it is final (SUCCEEDED, DEAD or CANCELLED), woken by the
        ledger, not by polling; raises TimeoutError after timeout (None: no limit).
        Any number of waits share one listening connection."""
        return await (await self.ledger()).wait_final(task_id, _seconds(timeout))

    async def cancel(self, task_id: int) -> types.TaskStatus:
        return await (await self.ledger()).cancel(task_id)

    async def retry(self, task_id: int) -> types.TaskStatus:
        return await (await self.ledger()).retry(task_id)

    async def configure_queue(self, queue: str, **settings: object) -> types.JsonObject:
        """Set some of queue's settings (a None removes one; the others stay);
        returns all of them. InvalidInput names an unknown key or a bad value."""
        return await (await self.ledger()).configure_queue(queue, queue_settings(settings))

    async def pause_queue(self, queue: str) -> bool:
        """No task of queue starts until it is resumed (running ones finish);
        enqueues are still accepted. False if it was paused already."""
        return (await (await self.ledger()).pause_queue(queue)).changed

    async def resume_queue(self, queue: str) -> bool:
        """Tasks of queue start again. False if it was not paused."""
        return (await (await self.ledger()).resume_queue(queue)).changed
