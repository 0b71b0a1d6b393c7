"""Test helpers: run handlers in-process against a real ledger, without a worker.

    from ledgerq import testing

    async def test_send_email(database_url):
        async with testing.ledger(database_url) as ledger:
            task = await testing.run_task(tasks, "email.send", {"to": "a@b.c"}, ledger=ledger)
        assert task.status == "SUCCEEDED"

``run_task`` enqueues a real task, claims it, runs its handler once with a real
``Context`` (``ctx.once`` and ``ctx.once_in_transaction`` record their effects
in the ledger), and records the outcome as a worker would: SUCCEEDED with the
result; PENDING for a retry or DEAD for a failure, whose exception is then
raised (``raise_errors=False`` returns the task instead).

Eager mode: ``EagerClient`` (an ``AsyncClient``) and ``SyncEagerClient`` (a
``Client``) run each task they enqueue inline, one attempt, before returning
it, so application code that enqueues can be unit-tested without a worker,
a dispatcher or Redis. A delayed task (``delay=``, ``run_at=`` in the future)
is not run: it is returned PENDING, as a worker would leave it.

Known limits: one attempt per call (a retry is recorded, not run); handler
timeouts apply to ``async def`` handlers only, as in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ledgerq import errors, jsonvalue
from ledgerq.client import AsyncClient, Client
from ledgerq.config import Settings
from ledgerq.ledger import AsyncLedger
from ledgerq.registry import Context, Registry
from ledgerq.types import ClaimedTask, JsonValue, Outcome, Task, TaskStatus

#: The worker id attempts run by these helpers are recorded under.
WORKER_ID = "ledgerq-testing"
LEASE_S = 300


@contextlib.asynccontextmanager
async def ledger(database_url: str) -> AsyncIterator[AsyncLedger]:
    """An AsyncLedger on database_url, closed when the block exits."""
    opened = await AsyncLedger.connect(database_url, max_size=4)
    try:
        yield opened
    finally:
        await opened.close()


async def run_task(
    registry: Registry,
    task_type: str,
    payload: object = None,
    *,
    ledger: AsyncLedger,
    raise_errors: bool = True,
    **enqueue_options: Any,
) -> Task:
    """Enqueue a task of task_type and run its handler once, in this process."""
    client = AsyncClient(ledger=ledger, hand_off=False)  # no Redis: it runs here
    task = await client.enqueue(task_type, payload, **enqueue_options)
    return await run_enqueued(registry, ledger, task.id, raise_errors=raise_errors)


async def run_enqueued(
    registry: Registry, ledger: AsyncLedger, task_id: int, *, raise_errors: bool = True
) -> Task:
    """Claim task task_id and run one attempt of it here; the task afterwards.
    A task that is not claimable now (delayed, running, final) is returned as it is."""
    claimed = await ledger.claim([task_id], WORKER_ID, LEASE_S)
    if not claimed:
        return await ledger.get(task_id)
    (task,) = claimed
    definition = registry.get(task.type)
    ctx = Context(
        task_id=task.id, attempt=task.attempt, task_type=task.type, queue=task.queue,
        worker_id=WORKER_ID, ledger=ledger, loop=asyncio.get_running_loop(),
    )  # fmt: skip
    failure: BaseException | None = None
    try:
        if definition is None:
            raise errors.NonRetryable(f"unknown task type {task.type!r}: no handler is registered")
        result = await _call(definition, ctx, task)
        outcome = Outcome(task.id, task.attempt, succeeded=True, result=result)
    except Exception as exc:
        failure = exc
        retryable = definition.is_retryable(exc) if definition is not None else False
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        outcome = Outcome(task.id, task.attempt, succeeded=False, error=error, retryable=retryable)
    await _complete(ledger, ctx, outcome)
    if failure is not None and raise_errors:
        raise failure
    return await ledger.get(task_id)


async def _call(definition: Any, ctx: Context, task: ClaimedTask) -> JsonValue:
    payload = definition.parse_payload(task.payload)
    if definition.is_async:
        async with asyncio.timeout(definition.timeout_s):
            value = await definition.fn(ctx, payload)
    else:
        value = await asyncio.to_thread(definition.fn, ctx, payload)
    plain = jsonvalue.plain(value)
    try:
        json.dumps(plain, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise errors.NonRetryable(f"handler returned a value that is not JSON: {exc}") from None
    return plain


async def _complete(ledger: AsyncLedger, ctx: Context, outcome: Outcome) -> None:
    """Record the outcome as the worker does: with the handler's transaction, a
    success commits with its writes; a failure rolls them back and is recorded
    on its own."""
    transaction = ctx.transaction
    if transaction is not None:
        status = await transaction.finish(outcome)
        if status is not None or outcome.succeeded:
            return  # committed, or fenced out by another attempt
    await ledger.complete([outcome])


class EagerClient(AsyncClient):
    """An AsyncClient that runs every task it enqueues at once, in this process
    (one attempt), and returns it afterwards. For unit tests of code that enqueues."""

    def __init__(self, registry: Registry, settings: Settings | None = None, **kw: Any) -> None:
        super().__init__(settings, **{"hand_off": False, **kw})  # no Redis: tasks run here
        self.eager_registry = registry

    async def enqueue(self, task_type: str, payload: object = None, **options: Any) -> Task:
        task = await super().enqueue(task_type, payload, **options)
        return await self._run(task)

    async def enqueue_many(
        self, tasks: Sequence[Mapping[str, Any]], conn: Any = None
    ) -> list[Task]:
        return [await self._run(t) for t in await super().enqueue_many(tasks, conn)]

    async def _run(self, task: Task) -> Task:
        if not task.created or task.status is not TaskStatus.PENDING:
            return task
        return await run_enqueued(self.eager_registry, await self.ledger(), task.id)


class SyncEagerClient(Client):
    """The synchronous EagerClient: each enqueue runs its task before returning.
    Call it where no event loop is running (it runs one per task)."""

    def __init__(self, registry: Registry, settings: Settings | None = None, **kw: Any) -> None:
        super().__init__(settings, **{"hand_off": False, **kw})  # no Redis: tasks run here
        self.eager_registry = registry

    def enqueue(self, task_type: str, payload: object = None, **options: Any) -> Task:
        task = super().enqueue(task_type, payload, **options)
        return self._run(task)

    def enqueue_many(self, tasks: Sequence[Mapping[str, Any]], conn: Any = None) -> list[Task]:
        return [self._run(t) for t in super().enqueue_many(tasks, conn)]

    def _run(self, task: Task) -> Task:
        if not task.created or task.status is not TaskStatus.PENDING:
            return task

        async def run() -> Task:
            async with ledger(self.settings.database_url) as opened:
                return await run_enqueued(self.eager_registry, opened, task.id)

        return asyncio.run(run())
