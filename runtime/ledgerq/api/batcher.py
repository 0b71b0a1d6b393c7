"""Coalescing concurrent ``POST /tasks`` requests into ``enqueue_tasks`` calls.

Every enqueue is a transaction, and every transaction waits for its WAL flush
and takes the database-wide NOTIFY lock at commit, so single enqueues from
many clients queue behind one another in PostgreSQL. ``EnqueueBatcher`` sends
a request's task at once when fewer than ``max_in_flight`` calls are under
way, and otherwise holds it until one returns, then sends everything that
gathered meanwhile as one ``enqueue_tasks`` call: one transaction, one flush,
one NOTIFY. An idle API adds no wait; a busy one commits hundreds of tasks per
transaction. Each request still gets its answer only after its task commits.

``enqueue_tasks`` is all or nothing, so one bad task (a reused idempotency key
with other content, say) would fail its batch-mates: when a batch is refused,
each of its tasks is sent again on its own and gets its own answer, exactly as
if it had come alone. A batch that fails because PostgreSQL is unavailable
fails every request in it.

Given the app's ``Dispatch``, it hands due tasks off to Redis as the clients do
(``task_hand_off``, see ``ledgerq.client``): the enqueue marks them QUEUED in
its own statement and, once it has committed, a background push puts them in
Redis while the request is answered. A push that fails or never happens (the
process dies) leaves QUEUED tasks that the dispatcher's sweep pushes again.
"""

from __future__ import annotations

import asyncio

from ledgerq import errors, types
from ledgerq.dispatch import Dispatch, HandOffGate
from ledgerq.ledger import AsyncLedger

MAX_BATCH_DEFAULT = 500
MAX_IN_FLIGHT_DEFAULT = 4

_Pending = tuple[types.NewTask, "asyncio.Future[types.Task]"]


class EnqueueBatcher:
    """Enqueues tasks for concurrent callers, in as few transactions as load allows."""

    def __init__(
        self,
        ledger: AsyncLedger,
        *,
        dispatch: Dispatch | None = None,
        max_batch: int = MAX_BATCH_DEFAULT,
        max_in_flight: int = MAX_IN_FLIGHT_DEFAULT,
    ) -> None:
        self.ledger = ledger
        self.dispatch = dispatch
        self._hand_off = HandOffGate(dispatch is not None)
        self._pushes: set[asyncio.Task[None]] = set()  # referenced until done
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._waiting: list[_Pending] = []
        self._in_flight = 0
        self._running: set[asyncio.Task[None]] = set()  # referenced until done

    async def enqueue(self, task: types.NewTask) -> types.Task:
        """Enqueue task; returns once it is committed (``created`` set, as enqueue_task)."""
        if not self._waiting and self._in_flight < self.max_in_flight:
            # Nothing to share a transaction with: send it from this coroutine,
            # without a task and a future in between.
            self._in_flight += 1
            try:
                (result,) = await self._enqueue([task], many=False)
                return result
            finally:
                self._in_flight -= 1
                self._send()
        future: asyncio.Future[types.Task] = asyncio.get_running_loop().create_future()
        self._waiting.append((task, future))
        self._send()
        return await future

    async def flush(self) -> None:
        """Wait for the hand-off pushes still in flight (each bounded by its timeout)."""
        if self._pushes:
            await asyncio.gather(*self._pushes, return_exceptions=True)

    def _send(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            self._in_flight += 1
            call = asyncio.create_task(self._run(batch))
            self._running.add(call)
            call.add_done_callback(self._done)

    def _done(self, call: asyncio.Task[None]) -> None:
        self._running.discard(call)
        self._in_flight -= 1
        self._send()

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                await self._one(*batch[0])
                return
            try:
                tasks = await self._enqueue([task for task, _ in batch], many=True)
            except errors.LedgerUnavailable:
                raise
            except errors.LedgerError:
                # One task spoiled the batch: every task gets its own answer.
                await asyncio.gather(*(self._one(task, future) for task, future in batch))
                return
            for (_, future), result in zip(batch, tasks, strict=True):
                if not future.done():  # done: its request was cancelled
                    future.set_result(result)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)

    async def _one(self, task: types.NewTask, future: asyncio.Future[types.Task]) -> None:
        try:
            (result,) = await self._enqueue([task], many=False)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    async def _enqueue(self, tasks: list[types.NewTask], *, many: bool) -> list[types.Task]:
        """enqueue_task (many=False) or enqueue_tasks, handing off what it can."""
        if self.dispatch is None or not self._hand_off.ready():
            if many:
                return await self.ledger.enqueue_tasks(tasks)
            return [await self.ledger.enqueue_task(tasks[0])]
        results, handed = await self.ledger.enqueue_handing_off(tasks, many=many)
        if handed:
            push = asyncio.create_task(self._hand_off.push(self.dispatch, handed))
            self._pushes.add(push)
            push.add_done_callback(self._pushes.discard)
        return results
