"""The dispatcher: due PENDING tasks → Redis, woken by NOTIFY and by polling.

Each pass marks up to ``batch_size`` due tasks QUEUED (``task_take_due``:
priority, then run_at, then creation; SKIP LOCKED so several dispatchers share
the work) in one committed statement, then pushes their ids to Redis. A push
that fails is retried first thing on the next pass; a dispatcher that dies
between the two leaves QUEUED tasks that the redelivery sweep below (of any
dispatcher, and of this one when it starts again) pushes. Committing first
keeps a worker that pops an id from waiting on the dispatcher's row locks.
It drains in batches, then sleeps until a NOTIFY on ``ledgerq_tasks``
(an enqueue, a retry, a reap, a slot freed under a concurrency limit, a queue
resumed or reconfigured), the next task's ``run_at`` or rate-limit refill
(``task_next_run_at``), or ``poll_interval_s`` (POLL_INTERVAL_DEFAULT_S),
whichever comes first.

Flow control: ``task_take_due`` hands out only what can start (a paused
queue's tasks and those over a limit are parked in the ledger, not pushed).
Each pass first wakes tasks parked on a rate bucket that refilled
(``flow_wake_due``); the sweep also runs ``flow_rescue``, which wakes parked
tasks whose limit has room although no event woke them (``dispatcher.flow_rescued``).

Redelivery (every ``sweep_interval_s``, SWEEP_INTERVAL_DEFAULT_S): QUEUED tasks
handed out more than ``recheck_after_s`` ago are looked up in Redis, a whole
queue at a time. Missing (a worker popped the id and died before claiming it,
or Redis lost it) → pushed again, its ``queued_at`` restarted. The others
still wait in a long backlog: one row per queue (``task_queued_seen``) says
they were seen, so reap_stuck leaves them alone and the sweep skips the queue
for ``recheck_after_s``; a backlog of 100,000 costs no write per task. When
Redis's epoch changes (FLUSHALL, a restart without persistence) every QUEUED
task is checked at once. The sweep reads in pages of SWEEP_BATCH; between
them it hands out what a NOTIFY announced meanwhile, so a long backlog does
not hold up a new task for the length of its sweep.

Schedules: once a second (SCHEDULE_INTERVAL_S), as a step of its loop and not
on every wake-up, it calls ``schedule_fire`` (``run_schedules`` with a report)
before taking due tasks, so a slot's task is handed out in the same pass. Any
number of dispatchers may do so at once: the ledger fires each slot exactly
once (row locks and the slot's idempotency key), so a dispatcher killed and
started again neither loses nor doubles a slot. Counted in
``ledgerq_schedule_slots_total``.

Log events (logger ``ledgerq.dispatcher``): ``dispatcher.started``,
``dispatcher.redelivered``, ``dispatcher.redis_reset``, ``dispatcher.flow_rescued``, ``ledger.unavailable``,
``dispatch.unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import psycopg

from ledgerq import errors, metrics, queries, service, types
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger

BATCH_SIZE_DEFAULT = 500
POLL_INTERVAL_DEFAULT_S = 1.0
SWEEP_INTERVAL_DEFAULT_S = 5.0
RECHECK_AFTER_DEFAULT_S = 10.0
EPOCH_CHECK_INTERVAL_S = 1.0
SCHEDULE_INTERVAL_S = 1.0
SWEEP_BATCH = 1000

log = logging.getLogger("ledgerq.dispatcher")


class Dispatcher:
    """Moves due tasks from the ledger to Redis."""

    def __init__(
        self,
        ledger: AsyncLedger,
        dispatch: Dispatch,
        *,
        database_url: str,
        batch_size: int = BATCH_SIZE_DEFAULT,
        poll_interval_s: float = POLL_INTERVAL_DEFAULT_S,
        sweep_interval_s: float = SWEEP_INTERVAL_DEFAULT_S,
        recheck_after_s: float = RECHECK_AFTER_DEFAULT_S,
    ) -> None:
        self.ledger = ledger
        self.dispatch = dispatch
        self.database_url = database_url
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.sweep_interval_s = sweep_interval_s
        self.recheck_after_s = recheck_after_s
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._epoch: str | None = None
        self._unpushed: list[types.DueTask] = []
        #: Totals since start, for tests and stats.
        self.dispatched = 0
        self.redelivered = 0
        self.schedule_enqueued = 0

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run_once(self) -> int:
        """Dispatch every task due now; return how many were handed to Redis."""
        moved = 0
        if self._unpushed:
            await self.dispatch.push(self._unpushed)
            moved, self._unpushed = len(self._unpushed), []
        # Tasks parked on a rate limit whose bucket refilled go back in line
        # first (a transaction of its own: it takes flow locks before rows).
        await self.ledger.flow_wake_due()
        while True:
            due = await self.ledger.take_due(self.batch_size)
            try:
                await self.dispatch.push(due)
            except errors.DispatchError:
                self._unpushed = due  # QUEUED in the ledger: push them when Redis is back
                raise
            moved += len(due)
            if len(due) < self.batch_size:
                break
        self.dispatched += moved
        return moved

    async def fire_schedules(self, as_of: datetime | None = None) -> int:
        """Enqueue the schedule slots due at as_of (default: the ledger's now); how many."""
        fired = await self.ledger.schedule_fire(as_of)
        enqueued = 0
        for schedule in fired:
            # A slot whose key already held a task was enqueued before (by a
            # dispatcher that died before it could count it): counted there.
            if schedule.enqueued:
                metrics.SCHEDULE_SLOTS.labels(schedule.name, "enqueued").inc(schedule.enqueued)
            if schedule.skipped_overlap:
                metrics.SCHEDULE_SLOTS.labels(schedule.name, "skipped_overlap").inc(
                    schedule.skipped_overlap
                )
            enqueued += schedule.enqueued
        self.schedule_enqueued += enqueued
        return enqueued

    async def sweep(self, recheck_after_s: float | None = None) -> tuple[int, int]:
        """Check QUEUED tasks against Redis; return (still waiting, pushed again)."""
        older_than = self.recheck_after_s if recheck_after_s is None else recheck_after_s
        waiting_total = pushed_total = 0
        # One pass over every queue not vouched for within older_than, page by
        # page; then one row per queue vouches for all its tasks handed out
        # before the cutoff (task_queued_seen), instead of a write per task.
        as_of = await self.ledger.now()
        after: tuple[datetime, int] | None = None
        queues: set[str] = set()
        while True:
            page = await self.ledger.queued_stale(older_than, SWEEP_BATCH, as_of, after)
            if not page:
                break
            stale = [task for task, _ in page]
            present = await self.dispatch.waiting(stale)
            missing = [t for t, here in zip(stale, present, strict=True) if not here]
            if missing:
                await self.dispatch.push(missing)
                # Pushed again now: their own clock restarts.
                await self.ledger.queued_confirm([t.id for t in missing])
            queues.update(t.queue for t in stale)
            waiting_total += len(stale) - len(missing)
            pushed_total += len(missing)
            after = (page[-1][1], page[-1][0].id)
            if len(page) < SWEEP_BATCH:
                break
            # A long backlog takes many pages: what was enqueued meanwhile
            # (a NOTIFY woke us) is handed out between them, not after all.
            if self._wake.is_set():
                self._wake.clear()
                await self.run_once()
        if queues:
            await self.ledger.queued_seen(sorted(queues), older_than, as_of)
        if pushed_total:
            log.warning("dispatcher.redelivered %d task(s) missing from Redis", pushed_total)
        # The safety net of flow control: tasks parked on a limit that has room.
        rescued = await self.ledger.flow_rescue()
        if rescued:
            log.warning("dispatcher.flow_rescued %d parked task(s) no event had woken", rescued)
        self.redelivered += pushed_total
        return waiting_total, pushed_total

    async def check_epoch(self) -> bool:
        """Whether Redis lost its data since the last check (then sweep everything)."""
        epoch = await self.dispatch.epoch()
        changed = self._epoch is not None and epoch != self._epoch
        first = self._epoch is None
        self._epoch = epoch
        if changed:
            log.warning("dispatcher.redis_reset: Redis lost its data; re-checking QUEUED tasks")
        return changed or first

    async def run(self) -> None:
        """Serve until stop() is called."""
        log.info("dispatcher.started batch=%d poll=%.1fs", self.batch_size, self.poll_interval_s)
        listener = asyncio.create_task(self._listen(), name="ledgerq-listen")
        failures = 0
        next_sweep = next_epoch_check = next_schedules = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    # The epoch check is throttled: it is not on a task's path,
                    # and each wake-up should cost only the take and the push.
                    if loop.time() >= next_epoch_check:
                        next_epoch_check = loop.time() + EPOCH_CHECK_INTERVAL_S
                        if await self.check_epoch():
                            await self.sweep(recheck_after_s=0)
                            next_sweep = loop.time() + self.sweep_interval_s
                    if loop.time() >= next_schedules:
                        next_schedules = loop.time() + SCHEDULE_INTERVAL_S
                        await self.fire_schedules()
                    await self.run_once()
                    if loop.time() >= next_sweep:
                        await self.sweep()
                        next_sweep = loop.time() + self.sweep_interval_s
                    # Never past the next schedules step, whatever poll_interval_s.
                    sleep_s = min(
                        await self._sleep_budget(), max(0.0, next_schedules - loop.time())
                    )
                    failures = 0
                except (errors.LedgerError, errors.DispatchError) as exc:
                    failures += 1
                    event = (
                        "dispatch.unavailable"
                        if isinstance(exc, errors.DispatchError)
                        else "ledger.unavailable"
                    )
                    log.warning("%s %s (retrying)", event, exc.message)
                    sleep_s = service.reconnect_delay_s(failures)
                    next_epoch_check = 0.0  # Redis may have come back empty
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=sleep_s)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _sleep_budget(self) -> float:
        next_run_at = await self.ledger.next_run_at()
        if next_run_at is None:
            return self.poll_interval_s
        until_due = (next_run_at - datetime.now(UTC)).total_seconds()
        return max(0.0, min(self.poll_interval_s, until_due))

    async def _listen(self) -> None:
        """Set the wake event on every NOTIFY; reconnect when the connection drops."""
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {queries.NOTIFY_CHANNEL}")
                    failures = 0
                    self._wake.set()  # something may have been enqueued while we were away
                    async for _notify in conn.notifies():
                        self._wake.set()
            except psycopg.Error as exc:
                failures += 1
                log.warning("ledger.unavailable listen: %s", errors.first_line(exc))
                await asyncio.sleep(service.reconnect_delay_s(failures))
