"""The worker: pop task ids from Redis → claim_tasks → run handlers → complete_tasks.

One ``Worker`` is one process's event loop running up to ``concurrency``
handlers at once: ``async def`` handlers on the loop, plain ``def`` handlers in
a thread pool of the same size. Round trips per task are the cost, so
everything is batched: one Redis call pops as many ids as there are free slots,
one ``claim_tasks`` claims them, one ``complete_tasks`` records every outcome
that finished while the previous one was in flight, and one ``heartbeat_tasks``
renews every lease this worker holds. ``run()`` serves until ``stop()``;
``run_once()`` runs what is waiting now and says how many attempts ran (the
service shape of ``service.py``).

Options and defaults: ``concurrency`` (CONCURRENCY_DEFAULT), ``lease_s``
(LEASE_DEFAULT_S; heartbeats every third of it), ``grace_s``
(GRACE_DEFAULT_S: how long a stopping worker lets running handlers finish
before it hands their tasks back).

When it starts, a worker creates or updates its registry's schedules
(``@tasks.periodic``) in the ledger, one ``schedule_task`` each; an unchanged
schedule writes nothing and keeps its cursor, so restarts neither lose nor
repeat a slot. A bad cron expression or time zone stops it with a ConfigError.

Known limits: the worker never changes a task's status itself; the ledger
decides. A handler whose lease is lost (the worker stalled past its lease)
is cancelled when the worker learns it, but may already have done work: use
``ctx.once`` for side effects. A sync handler cannot be interrupted: on
timeout or cancellation its thread runs on, and its result is discarded.

Log events (logger ``ledgerq.worker``): ``worker.started``, ``worker.stopping``,
``worker.stopped``; one line per recorded outcome, with the task's id, type,
queue, attempt and duration: ``task.succeeded``, ``task.cancelled`` (INFO),
``task.retried``, ``task.lost`` (WARNING), ``task.dead`` (ERROR); also
``task.handed_back``, ``task.deferred`` (DEBUG: a claim refused by the queue's flow
control), ``task.abandoned``, ``task.unstorable``, ``task.unrecordable``,
``ledger.unavailable``, ``ledger.error``, ``dispatch.unavailable``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import time
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

from ledgerq import errors, jsonvalue, metrics, service, storable, types
from ledgerq.dispatch import POP_WAIT_MAX_S, Dispatch
from ledgerq.ledger import AsyncLedger
from ledgerq.registry import Context, Registry, TaskDefinition

CONCURRENCY_DEFAULT = 10
LEASE_DEFAULT_S = 30
GRACE_DEFAULT_S = 30.0
POP_WAIT_S = POP_WAIT_MAX_S
# How often a worker renews its registration: a third of the ledger's 30 s
# liveness window (worker_liveness()), so one missed renewal is harmless.
REGISTRATION_INTERVAL_S = 10.0
# A task handed back (its type is served by another live worker, not this
# one) is due again after this, so this worker does not spin on it.
HAND_BACK_DELAY_S = 1.0

log = logging.getLogger("ledgerq.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _Running:
    """A handler in flight."""

    __slots__ = ("ctx", "definition", "future", "lost", "task")

    def __init__(
        self, task: types.ClaimedTask, ctx: Context, definition: TaskDefinition | None
    ) -> None:
        self.task = task
        self.ctx = ctx
        self.definition = definition
        self.future: asyncio.Task[None] | None = None
        self.lost = False


class Worker:
    """Runs the handlers of one registry for the given queues."""

    def __init__(
        self,
        registry: Registry,
        ledger: AsyncLedger,
        dispatch: Dispatch,
        *,
        queues: list[str] | None = None,
        concurrency: int = CONCURRENCY_DEFAULT,
        lease_s: int = LEASE_DEFAULT_S,
        grace_s: float = GRACE_DEFAULT_S,
        worker_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise errors.ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if lease_s < 3:
            raise errors.ConfigError(f"lease must be >= 3 seconds, got {lease_s}")
        if len(registry) == 0:
            # It would send every task it received DEAD as an unknown type.
            raise errors.ConfigError(
                "the registry has no task types: register handlers with @registry.task(...)"
            )
        self.registry = registry
        self.ledger = ledger
        self.dispatch = dispatch
        self.queues = queues or registry.queues() or ["default"]
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.worker_id = worker_id or new_worker_id()
        # By (task, attempt): a stalled attempt may still be running when its
        # task's next attempt is delivered to this same worker.
        self._running: dict[tuple[types.TaskId, int], _Running] = {}
        self._slot_freed = asyncio.Event()
        self._outcomes: list[tuple[types.Outcome, tuple[str, str]]] = []
        self._outcomes_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="ledgerq-handler"
        )
        #: Outcomes the ledger recorded, by resulting status (for tests and stats).
        self.completed: dict[str, int] = {}
        #: Claims flow control deferred, by (queue, reason) (for tests and stats).
        self.deferred: dict[tuple[str, str], int] = {}
        #: Sync handlers still running in threads when the worker stopped; the
        #: process should exit without waiting for them (their leases expire).
        self.abandoned_threads = 0
        # The task blocked in Redis's pop, if any: stop() cancels it there, so
        # the pop itself needs no helper tasks racing it against _stopping.
        self._blocked_in_pop: asyncio.Task[Any] | None = None

    # --- life cycle ----------------------------------------------------------

    def stop(self) -> None:
        """Stop taking work; run() then finishes within the grace period. A second
        call changes nothing (a Runner whose service failed stops them all again)."""
        if self._stopping.is_set():
            # The pop was cancelled already: _pop_wait consumes one cancel, and
            # a second would end run() itself, skipping the drain.
            return
        self._stopping.set()
        if self._blocked_in_pop is not None:
            self._blocked_in_pop.cancel()

    async def register_schedules(self) -> int:
        """Create or update the registry's schedules in the ledger; how many.

        ConfigError, naming the schedule, for one the ledger refuses (LQ422)."""
        schedules = self.registry.schedules()
        for schedule in schedules:
            try:
                await self.ledger.schedule_task(schedule)
            except errors.InvalidInput as exc:
                raise errors.ConfigError(f"schedule {schedule.name!r}: {exc.message}") from None
        return len(schedules)

    async def run(self) -> None:
        """Serve until stop() is called; then drain, hand back, and return."""
        await self.register_schedules()
        log.info(
            "worker.started id=%s queues=%s concurrency=%d lease=%ds",
            self.worker_id, ",".join(self.queues), self.concurrency, self.lease_s,
        )  # fmt: skip
        await self._register()
        completer = asyncio.create_task(self._complete_loop(), name="ledgerq-completer")
        heartbeater = asyncio.create_task(self._heartbeat_loop(), name="ledgerq-heartbeat")
        registration = asyncio.create_task(self._registration_loop(), name="ledgerq-registration")
        try:
            await self._fetch_loop()
            log.info("worker.stopping id=%s running=%d", self.worker_id, len(self._running))
            with contextlib.suppress(errors.LedgerError):
                # At once, so no task is handed back to this worker meanwhile;
                # if the ledger is down, the registration simply ages out.
                await self.ledger.worker_stop(self.worker_id)
            await self._drain()
        finally:
            heartbeater.cancel()
            registration.cancel()
            await asyncio.gather(heartbeater, registration, return_exceptions=True)
            self._outcomes_ready.set()
            self._stopping.set()
            try:
                # Normally instant (the drain left nothing running). If the fetch
                # loop failed before the drain, handlers may still be running:
                # record what finishes in time, leave the rest to their leases.
                await asyncio.wait_for(completer, timeout=max(self.grace_s, 1.0))
            except TimeoutError:
                log.warning(
                    "worker.stopped with %d task(s) left to their leases", len(self._running)
                )
            self._executor.shutdown(wait=False, cancel_futures=True)
            log.info("worker.stopped id=%s", self.worker_id)

    async def run_once(self) -> int:
        """Take the ids waiting now (up to concurrency, without blocking), claim them,
        run their handlers (heartbeats included) and record every outcome; how
        many attempts ran. For tests and one-shot use, not beside run()."""
        ids = await self.dispatch.pop(self.queues, self.concurrency - len(self._running))
        if not ids:
            return 0
        claimed, deferred = await self.ledger.claim_reporting(ids, self.worker_id, self.lease_s)
        self._count_deferred(deferred)
        started = [self._start(task) for task in claimed]
        heartbeater = asyncio.create_task(self._heartbeat_loop(), name="ledgerq-heartbeat")
        try:
            await asyncio.gather(*(r.future for r in started if r.future is not None))
        finally:
            heartbeater.cancel()
            await asyncio.gather(heartbeater, return_exceptions=True)
        await self._complete_waiting()
        return len(claimed)

    async def _drain(self) -> None:
        """Let running handlers finish within the grace period; hand back the rest.

        An async handler still running is cancelled, awaited, and only then
        handed back (task_release), so it cannot overlap the next attempt. A
        thread cannot be stopped: its task is left to its lease (the process
        exits, the lease expires, reap_stuck retries the task).
        """
        pending = [r.future for r in self._running.values() if r.future is not None]
        if pending:
            await asyncio.wait(pending, timeout=self.grace_s)
        leftovers = [r for r in self._running.values() if not r.lost]
        for running in leftovers:
            running.lost = True  # its outcome, if it comes, must not be recorded
            running.ctx.request_stop()
        cancellable = [r for r in leftovers if r.definition is None or r.definition.is_async]
        for running in cancellable:
            if running.future is not None:
                running.future.cancel()
        await asyncio.gather(
            *(r.future for r in cancellable if r.future is not None), return_exceptions=True
        )
        if cancellable:
            leases = [(r.task.id, r.task.attempt) for r in cancellable]
            with contextlib.suppress(errors.LedgerError):
                # If the ledger is down, the leases expire and reap_stuck recovers them.
                await self.ledger.release(leases, f"worker {self.worker_id} shut down")
        for running in leftovers:
            if running not in cancellable:
                self._running.pop((running.task.id, running.task.attempt), None)
                self.abandoned_threads += 1
                log.warning(
                    "task.abandoned id=%s attempt=%d: a thread cannot be stopped; "
                    "its lease will expire and the reaper will retry it",
                    running.task.id, running.task.attempt,
                )  # fmt: skip

    # --- registration ---------------------------------------------------------

    async def _register(self) -> None:
        """Tell the ledger which task types this worker serves, with their defaults."""
        registered = []
        for name in self.registry.names():
            definition = self.registry.get(name)
            assert definition is not None
            registered.append({
                "task_type": name, "queue": definition.queue,
                "max_attempts": definition.max_attempts, "timeout_seconds": definition.timeout_s,
            })  # fmt: skip
        await self.ledger.register_worker(self.worker_id, self.queues, registered, self.concurrency)

    async def _registration_loop(self) -> None:
        while True:
            await asyncio.sleep(REGISTRATION_INTERVAL_S)
            try:
                if not await self.ledger.worker_heartbeat(self.worker_id):
                    await self._register()  # the registration was removed meanwhile
            except errors.LedgerError as exc:
                log.warning("ledger.unavailable registration: %s", exc.message)

    # --- fetching ------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_either(self._slot_freed.wait())
                continue
            try:
                ids = await self.dispatch.pop(self.queues, free)
                if not ids:
                    first = await self._pop_wait()
                    # Redis answered: whatever failed before is over. An empty
                    # pop is an idle worker, never a failure to back off from.
                    failures = 0
                    if first is None:
                        continue
                    # Claim the one that woke us at once; under load the
                    # non-blocking pop above takes whole batches instead.
                    ids = [first]
                # Ids popped but not claimed (the ledger is unreachable) stay
                # QUEUED; the dispatcher finds them missing from Redis and
                # hands them out again.
                claimed, deferred = await self.ledger.claim_reporting(
                    ids, self.worker_id, self.lease_s
                )
                failures = 0
            except (errors.LedgerError, errors.DispatchError) as exc:
                # Unreachable, or a refusal such as a deadlock: either way the
                # ids stay QUEUED and come back; the worker must not die of it.
                failures += 1
                if isinstance(exc, errors.DispatchError):
                    event = "dispatch.unavailable"
                elif isinstance(exc, errors.LedgerUnavailable):
                    event = "ledger.unavailable"
                else:
                    event = "ledger.error"
                log.warning("%s %s (retrying)", event, exc.message)
                await self._wait_either(asyncio.sleep(service.reconnect_delay_s(failures)))
                continue
            self._count_deferred(deferred)
            for task in claimed:
                self._start(task)
            if claimed:
                # Let the handlers just started run to their first await before
                # this loop asks Redis for more: the next pop can wait, they
                # should not.
                await asyncio.sleep(0)

    def _count_deferred(self, deferred: list[types.Deferral]) -> None:
        """Tasks the claim refused for their queue's flow control: the ledger
        parked them and hands them out again when the limit allows, so the
        worker only counts them."""
        for deferral in deferred:
            key = (deferral.queue, deferral.reason)
            self.deferred[key] = self.deferred.get(key, 0) + 1
            metrics.CLAIMS_DEFERRED.labels(*metrics.deferral_labels(*key)).inc()
            log.debug(
                "task.deferred id=%s queue=%s reason=%s",
                deferral.id, deferral.queue, deferral.reason,
            )  # fmt: skip

    async def _pop_wait(self) -> types.TaskId | None:
        """The blocking pop, awaited in this task: the id that woke it reaches the
        claim without passing through another task (a wake-up less per pickup).
        None after the pop's timeout, or when stop() cancelled the pop."""
        if self._stopping.is_set():
            return None
        current = asyncio.current_task()
        self._blocked_in_pop = current
        try:
            return await self.dispatch.pop_wait(self.queues, POP_WAIT_S)
        except asyncio.CancelledError:
            # stop()'s own cancel is consumed here; any other one goes on. An id
            # Redis handed over just then stays QUEUED in the ledger, and the
            # dispatcher's sweep pushes it again (as for any pop not claimed).
            if current is None or not self._stopping.is_set() or current.uncancel() > 0:
                raise
            return None
        finally:
            self._blocked_in_pop = None

    async def _wait_either(self, awaitable: Any) -> Any:
        """Await awaitable, or give up (returning None) as soon as stop() is called."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        return None

    # --- running handlers ------------------------------------------------------

    def _start(self, task: types.ClaimedTask) -> _Running:
        ctx = Context(
            task_id=task.id,
            attempt=task.attempt,
            task_type=task.type,
            queue=task.queue,
            worker_id=self.worker_id,
            ledger=self.ledger,
            loop=asyncio.get_running_loop(),
        )
        running = _Running(task, ctx, self.registry.get(task.type))
        if running.definition is not None and running.definition.timeout_s is not None:
            ctx.transaction_timeout_s = running.definition.timeout_s + self.lease_s
        self._running[task.id, task.attempt] = running
        running.future = asyncio.create_task(self._run(running), name=f"ledgerq-task-{task.id}")
        return running

    async def _run(self, running: _Running) -> None:
        task, ctx, definition = running.task, running.ctx, running.definition
        if definition is None and await self._handed_back(task):
            self._running.pop((task.id, task.attempt), None)
            self._slot_freed.set()
            return
        labels = (task.type, task.queue)
        series = metrics.task_series(labels)
        series.started.inc()
        metrics.WORKER_INFLIGHT.inc()
        series.pickup.observe(max(0.0, (datetime.now(UTC) - task.run_at).total_seconds()))
        started = time.perf_counter()
        outcome: types.Outcome | None
        try:
            result = await self._call(task, ctx, definition)
            outcome = types.Outcome(task.id, task.attempt, succeeded=True, result=result)
        except asyncio.CancelledError:
            # Cancelled by a heartbeat ('cancel' or 'lost') or by shutdown.
            outcome = types.Outcome(
                task.id, task.attempt, succeeded=False, error="cancelled while running"
            )
        except BaseException as exc:
            retryable = definition.is_retryable(exc) if definition is not None else False
            outcome = types.Outcome(
                task.id, task.attempt, succeeded=False, error=_describe(exc), retryable=retryable
            )
        finally:
            metrics.WORKER_INFLIGHT.dec()
            elapsed = time.perf_counter() - started
            series.duration.observe(elapsed)
        # Logged once the ledger has said what the outcome made of the task.
        outcome = dataclasses.replace(outcome, duration_s=elapsed)
        try:
            await self._record(running, outcome, labels)
        finally:
            self._running.pop((task.id, task.attempt), None)
            self._slot_freed.set()

    async def _handed_back(self, task: types.ClaimedTask) -> bool:
        """No handler here: hand the task back if another live worker serves its
        type (a rolling deploy), without spending an attempt."""
        try:
            (status,) = await self.ledger.hand_back(
                [(task.id, task.attempt)], self.worker_id, HAND_BACK_DELAY_S
            )
        except errors.LedgerError as exc:
            # Neither hand it back nor fail it: the lease expires and the
            # reaper retries it (the attempt is spent, the task is not lost).
            log.warning("ledger.unavailable handing back task %s: %s", task.id, exc.message)
            return True
        if status is None:
            return False
        log.info(
            "task.handed_back id=%s type=%s queue=%s attempt=%d: no handler here, "
            "another live worker serves this type",
            task.id, task.type, task.queue, task.attempt,
            extra=_fields(task.id, task.type, task.queue, task.attempt, "handed_back"),
        )  # fmt: skip
        self.completed["HANDED_BACK"] = self.completed.get("HANDED_BACK", 0) + 1
        return True

    async def _record(
        self, running: _Running, outcome: types.Outcome, labels: tuple[str, str]
    ) -> None:
        """Queue the outcome for complete_tasks, or end the handler's transaction with it
        (its writes, its effect records and the completion commit together, or none)."""
        transaction = running.ctx.transaction
        if transaction is None:
            if not running.lost:  # a lost attempt's outcome would only be fenced
                self._queue(outcome, labels)
            return
        try:
            status = await transaction.finish(None if running.lost else outcome)
        except Exception as exc:
            # The transaction's connection failed (PostgreSQL restarted): its
            # writes did not commit, so record the attempt as failed the usual
            # way, and it is retried. Had the COMMIT gone through, the task
            # would be final and this outcome fenced out.
            reason = errors.first_line(exc)
            log.warning("ledger.unavailable completing task %s: %s", outcome.task_id, reason)
            error = f"the task's transaction did not commit: {reason}"
            failed = types.Outcome(
                outcome.task_id, outcome.attempt, False, error=error, duration_s=outcome.duration_s
            )
            self._queue(failed, labels)
            return
        if running.lost:
            return
        if status is not None:
            self._count(status, labels, outcome)
        elif outcome.succeeded:
            self._count(None, labels, outcome)  # fenced: another attempt owns the task
        else:
            self._queue(outcome, labels)  # rolled back; recorded as a failure below

    def _queue(self, outcome: types.Outcome, labels: tuple[str, str]) -> None:
        self._outcomes.append((outcome, labels))
        self._outcomes_ready.set()

    async def _call(
        self, task: types.ClaimedTask, ctx: Context, definition: TaskDefinition | None
    ) -> types.JsonValue:
        if definition is None:
            raise _internal(
                errors.NonRetryable(f"unknown task type {task.type!r}: no handler is registered")
            )
        try:
            payload = definition.parse_payload(task.payload)
        except errors.InvalidPayload as exc:
            raise _internal(exc) from None
        if definition.is_async:
            try:
                # asyncio.timeout, not wait_for: no extra task per handler.
                async with asyncio.timeout(definition.timeout_s):
                    result = await definition.fn(ctx, payload)
            except TimeoutError:
                raise _internal(
                    errors.Retryable(f"timed out after {definition.timeout_s:g} s")
                ) from None
        else:
            result = await self._call_in_thread(definition, ctx, payload)
        return _json_result(jsonvalue.plain(result))

    async def _call_in_thread(
        self, definition: TaskDefinition, ctx: Context, payload: Any
    ) -> types.JsonValue:
        """Run a plain ``def`` handler in the thread pool. A thread cannot be
        stopped: on timeout the attempt waits for it (ctx.cancelled tells the
        handler to give up), so the next attempt never overlaps this one."""
        future = asyncio.wrap_future(self._executor.submit(definition.fn, ctx, payload))
        done, _ = await asyncio.wait({future}, timeout=definition.timeout_s)
        if not done:
            ctx.request_stop()
            with contextlib.suppress(BaseException):
                await future
            raise _internal(errors.Retryable(f"timed out after {definition.timeout_s:g} s"))
        return future.result()

    # --- completing ------------------------------------------------------------

    async def _complete_loop(self) -> None:
        failures = 0
        while True:
            if not self._outcomes:
                if self._stopping.is_set() and not self._running:
                    return
                self._outcomes_ready.clear()
                await self._outcomes_ready.wait()
                continue
            try:
                await self._complete_waiting()
                failures = 0
            except errors.LedgerError as exc:
                # The outcomes wait for the next try: if the ledger stays away past
                # the lease, reap_stuck retries the task and this attempt is fenced.
                failures += 1
                log.warning(
                    "ledger.unavailable completing %d task(s): %s", len(self._outcomes), exc.message
                )
                if self._stopping.is_set() and failures > 5:
                    return
                await asyncio.sleep(service.reconnect_delay_s(failures))

    async def _complete_waiting(self) -> None:
        """Record every waiting outcome in one complete_tasks call. If the ledger
        is unreachable they stay waiting (LedgerUnavailable); any other refusal
        is not transient, and retrying the batch would fail the same way for
        ever: the outcomes are recorded one by one instead, so one the ledger
        cannot store fails its own task and no other."""
        batch, self._outcomes = self._outcomes, []
        try:
            statuses = await self.ledger.complete([outcome for outcome, _ in batch])
        except errors.LedgerUnavailable:
            self._outcomes = batch + self._outcomes
            raise
        except errors.LedgerError as exc:
            log.warning("ledger.error completing %d task(s): %s", len(batch), exc.message)
            await self._complete_one_by_one(batch)
            return
        for (outcome, labels), status in zip(batch, statuses, strict=True):
            self._count(status, labels, outcome)

    async def _complete_one_by_one(
        self, batch: list[tuple[types.Outcome, tuple[str, str]]]
    ) -> None:
        """Record each outcome alone; one the ledger refuses becomes a non-retryable
        failure naming why. If the ledger becomes unreachable, the outcomes not yet
        recorded wait again (LedgerUnavailable)."""
        for index, (outcome, labels) in enumerate(batch):
            try:
                try:
                    (status,) = await self.ledger.complete([outcome])
                except errors.LedgerUnavailable:
                    raise
                except errors.LedgerError as exc:
                    log.warning(
                        "task.unstorable id=%s attempt=%d: %s",
                        outcome.task_id, outcome.attempt, exc.message,
                    )  # fmt: skip
                    (status,) = await self.ledger.complete([_refused(outcome, exc.message)])
            except errors.LedgerUnavailable:
                self._outcomes = batch[index:] + self._outcomes
                raise
            except errors.LedgerError as exc:
                # Even the plain failure was refused: leave the task to its
                # lease (reap_stuck retries it) rather than stop completing.
                log.error(
                    "task.unrecordable id=%s attempt=%d: %s",
                    outcome.task_id, outcome.attempt, exc.message,
                )  # fmt: skip
                continue
            self._count(status, labels, outcome)

    def _count(
        self,
        status: types.TaskStatus | None,
        labels: tuple[str, str],
        outcome: types.Outcome | None = None,
    ) -> None:
        key = status.value if status is not None else "FENCED"
        self.completed[key] = self.completed.get(key, 0) + 1
        counter = metrics.task_series(labels).outcomes.get(status) if status is not None else None
        if counter is not None:
            counter.inc()
        if outcome is not None:
            _log_outcome(outcome, labels, status)

    # --- heartbeats ------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            leases = [(r.task.id, r.task.attempt) for r in self._running.values() if not r.lost]
            if not leases:
                continue
            try:
                states = await self.ledger.heartbeat(leases, self.lease_s)
            except errors.LedgerError as exc:
                log.warning("ledger.unavailable heartbeat: %s", exc.message)
                continue
            for task_id, attempt, state in states:
                running = self._running.get((task_id, attempt))
                if running is None or state == "ok":
                    continue
                running.ctx.request_stop()
                if state == "lost":
                    running.lost = True
                    log.warning(
                        "task.lost id=%s type=%s queue=%s attempt=%d: the lease was lost; "
                        "this attempt's outcome will not be recorded",
                        task_id, running.task.type, running.task.queue, running.task.attempt,
                        extra=_fields(task_id, running.task.type, running.task.queue,
                                      running.task.attempt, "lost"),
                    )  # fmt: skip
                if (
                    running.future is not None
                    and running.definition is not None
                    and running.definition.is_async
                ):
                    running.future.cancel()


# The outcome line of each status the ledger answered: event, level.
_OUTCOME_EVENTS: dict[types.TaskStatus | None, tuple[str, int]] = {
    types.TaskStatus.SUCCEEDED: ("task.succeeded", logging.INFO),
    types.TaskStatus.PENDING: ("task.retried", logging.WARNING),
    types.TaskStatus.DEAD: ("task.dead", logging.ERROR),
    types.TaskStatus.CANCELLED: ("task.cancelled", logging.INFO),
    # Fenced: another attempt owns the task (this one's lease was lost).
    None: ("task.lost", logging.WARNING),
}


def _fields(task_id: int, task_type: str, queue: str, attempt: int, status: str) -> dict[str, Any]:
    """The fields of a task's log line (JSON log lines carry them as keys)."""
    return {
        "task_id": task_id, "task_type": task_type, "queue": queue, "attempt": attempt,
        "status": status,
    }  # fmt: skip


def _log_outcome(
    outcome: types.Outcome, labels: tuple[str, str], status: types.TaskStatus | None
) -> None:
    """One line per recorded outcome: what the ledger made of the attempt."""
    event, level = _OUTCOME_EVENTS.get(status, ("task.finished", logging.INFO))
    if not log.isEnabledFor(level):
        return
    fields = _fields(outcome.task_id, labels[0], labels[1], outcome.attempt, event[5:])
    duration = outcome.duration_s
    fields["duration_s"] = round(duration, 6) if duration is not None else None
    text = (
        f"{event} id={outcome.task_id} type={labels[0]} queue={labels[1]} "
        f"attempt={outcome.attempt} duration={duration if duration is not None else 0:.3f}s"
    )
    if not outcome.succeeded:
        lines = (outcome.error or "").strip().splitlines()
        error = lines[0] if lines else ""
        fields["error"] = error
        text += f" error={error}"
    log.log(level, "%s", text, extra=fields)


def _describe(exc: BaseException) -> str:
    """The error the ledger keeps: a first line a person can read at a glance
    ("ValueError: bad amount"), then, for a handler's own exception, where it
    came from. Bounded, and cleaned of what PostgreSQL cannot store (NUL)."""
    summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if getattr(exc, "_ledgerq_internal", False):
        return storable.error_text(summary)
    trace = "".join(traceback.format_exception(exc, limit=-8)).strip()
    return storable.error_text(f"{summary}\n{trace}")


def _refused(outcome: types.Outcome, reason: str) -> types.Outcome:
    """The failure to record instead of an outcome the ledger refused to store."""
    what = "result" if outcome.succeeded else "outcome"
    error = storable.error_text(f"the ledger cannot store this attempt's {what}: {reason}")
    return types.Outcome(
        outcome.task_id, outcome.attempt, succeeded=False, error=error, retryable=False
    )


def _internal(exc: BaseException) -> BaseException:
    """Mark an error the worker itself raised: its traceback helps nobody."""
    exc._ledgerq_internal = True  # type: ignore[attr-defined]
    return exc


def _json_result(result: Any) -> types.JsonValue:
    """A handler's return value as JSON the ledger can store; anything else fails
    the attempt for good (the same value would fail every retry)."""
    try:
        return storable.result(result)
    except errors.NonRetryable as exc:
        raise _internal(exc) from None
