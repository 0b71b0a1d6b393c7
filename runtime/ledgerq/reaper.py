"""The reaper: calls ``reap_stuck()`` every ``interval_s`` (REAPER_INTERVAL_DEFAULT_S).

``reap_stuck`` recovers RUNNING tasks whose lease expired (a worker crashed or
stalled: the attempt is recorded as lost and the task retried with backoff, or
DEAD on its last attempt) and QUEUED tasks whose delivery was never claimed.
Several reapers may run at once (SKIP LOCKED keeps them apart), and pg_cron can
do the same job instead:
``SELECT cron.schedule('ledgerq-reap', '* * * * *', 'SELECT ledgerq.reap_stuck()')``.

A killed worker's task runs again within its lease plus this interval (plus
its backoff).

It also prunes (unless ``prune_interval_s`` is None): every
``prune_interval_s`` (PRUNE_INTERVAL_DEFAULT_S) it deletes SUCCEEDED and
CANCELLED tasks finished more than ``retention`` ago (a PostgreSQL interval
text; a queue's own ``retention`` setting wins), with their attempts, by
calling ``prune_tasks_batch`` until a batch comes back short. Each batch is its
own autocommitted statement, so no lock and no snapshot lives longer than one
batch (see sql/functions/retention.sql), and one pass stops after
PRUNE_PASS_BUDGET_S so a big first backlog never delays the recovery of stuck
tasks: the next pass continues right after the next sweep. Deleted tasks count
in ``ledgerq_tasks_pruned_total``.

After each sweep it vacuums ledgerq.tasks or ledgerq.attempts when one holds
more than ``vacuum_dead_rows`` dead row versions (0: never). A queue updates a
task row about four times in its life, so at 2,000 tasks/s the table gains
8,000 dead rows a second, and autovacuum visits a database at most once per
``autovacuum_naptime`` (1 min by default): hundreds of thousands of dead rows
before it even starts. VACUUM (SKIP_LOCKED) takes no lock that blocks the
queue's reads or writes.

Log events (logger ``ledgerq.reaper``): ``reaper.reaped``, ``reaper.pruned``
with the counts, ``reaper.vacuumed`` with the table, ``ledger.unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from ledgerq import errors, metrics, service
from ledgerq.ledger import AsyncLedger

REAPER_INTERVAL_DEFAULT_S = 5.0
PRUNE_INTERVAL_DEFAULT_S = 60.0
RETENTION_DEFAULT = "7 days"
PRUNE_BATCH_SIZE_DEFAULT = 1000
PRUNE_PASS_BUDGET_S = 2.0
VACUUM_DEAD_ROWS_DEFAULT = 50_000

_UNITS = (
    "microseconds?|us|milliseconds?|ms|seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|"
    "days?|d|weeks?|w|months?|mons?|years?|yrs?|y"
)
_INTERVAL_TEXT = re.compile(
    rf"(?:\d+(?:\.\d+)?\s*(?:{_UNITS})\b\s*)+|\d+:\d{{1,2}}(?::\d{{1,2}}(?:\.\d+)?)?",
    re.IGNORECASE,
)


def check_retention(text: str) -> str:
    """``text`` stripped, if it is a non-negative PostgreSQL interval such as
    ``7 days``, ``2 seconds``, ``1 hour 30 minutes`` or ``00:00:30``; else ConfigError.

    Checked before the reaper connects, so a typo is a usage error at once, not
    a failed prune every minute. (PostgreSQL checks it again.)"""
    cleaned = text.strip()
    if not _INTERVAL_TEXT.fullmatch(cleaned):
        raise errors.ConfigError(
            f"retention must be a PostgreSQL interval >= 0 such as '7 days' or '2 seconds',"
            f" got {text!r}"
        )
    return cleaned


log = logging.getLogger("ledgerq.reaper")


class Reaper:
    """Recovers stuck tasks on an interval."""

    def __init__(
        self,
        ledger: AsyncLedger,
        *,
        interval_s: float = REAPER_INTERVAL_DEFAULT_S,
        prune_interval_s: float | None = PRUNE_INTERVAL_DEFAULT_S,
        retention: str = RETENTION_DEFAULT,
        prune_batch_size: int = PRUNE_BATCH_SIZE_DEFAULT,
        vacuum_dead_rows: int = VACUUM_DEAD_ROWS_DEFAULT,
    ):
        if interval_s <= 0:
            raise errors.ConfigError(f"reaper interval must be > 0 seconds, got {interval_s}")
        if prune_interval_s is not None and prune_interval_s <= 0:
            raise errors.ConfigError(f"prune interval must be > 0 seconds, got {prune_interval_s}")
        if vacuum_dead_rows < 0:
            raise errors.ConfigError(f"vacuum dead rows must be >= 0, got {vacuum_dead_rows}")
        if prune_batch_size < 1:
            raise errors.ConfigError(f"prune batch size must be >= 1, got {prune_batch_size}")
        self.ledger = ledger
        self.interval_s = interval_s
        #: None: never prune.
        self.prune_interval_s = prune_interval_s
        self.retention = check_retention(retention)
        self.prune_batch_size = prune_batch_size
        #: 0: never vacuum.
        self.vacuum_dead_rows = vacuum_dead_rows
        self._stopping = asyncio.Event()
        #: Tasks moved since start.
        self.reaped = 0
        #: Tasks deleted since start.
        self.pruned = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run_once(self) -> int:
        """One sweep; returns how many tasks it moved."""
        moved = await self.ledger.reap()
        if moved:
            log.info("reaper.reaped %d task(s)", moved)
        self.reaped += moved
        return moved

    async def prune_once(self, budget_s: float | None = None) -> tuple[int, bool]:
        """Delete due finished tasks, a batch per statement, until a batch comes
        back short or ``budget_s`` is spent; returns (deleted, whether more may be due)."""
        loop = asyncio.get_running_loop()
        deadline = None if budget_s is None else loop.time() + budget_s
        deleted = 0
        more = True
        while not self._stopping.is_set():
            n = await self.ledger.prune_tasks_batch(self.retention, self.prune_batch_size)
            deleted += n
            self.pruned += n
            metrics.TASKS_PRUNED.inc(n)
            if n < self.prune_batch_size:
                more = False
                break
            if deadline is not None and loop.time() >= deadline:
                break
        if deleted:
            log.info("reaper.pruned %d task(s)", deleted)
        return deleted, more

    async def vacuum_once(self) -> list[str]:
        """VACUUM the ledger's tables that hold more than vacuum_dead_rows dead rows."""
        if not self.vacuum_dead_rows:
            return []
        tables = await self.ledger.churned_tables(self.vacuum_dead_rows)
        for table in tables:
            await self.ledger.vacuum(table)
            log.info("reaper.vacuumed ledgerq.%s", table)
        return tables

    async def run(self) -> None:
        """Sweep every interval, and prune every prune interval, until stop() is called."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        failures = 0
        while not self._stopping.is_set():
            try:
                await self.run_once()
                if self.prune_interval_s is not None and loop.time() >= next_prune:
                    _, more = await self.prune_once(PRUNE_PASS_BUDGET_S)
                    # A backlog left over continues right after the next sweep.
                    next_prune = loop.time() + (0.0 if more else self.prune_interval_s)
                await self.vacuum_once()
                failures = 0
            except errors.LedgerError as exc:
                # Unreachable or refused (a deadlock, a statement timeout, a
                # missing schema): the next sweep tries again; a reaper must
                # outlive its database.
                failures += 1
                log.warning("ledger.unavailable %s (retrying)", exc.message)
            timeout = self.interval_s
            if self.prune_interval_s is not None:
                timeout = min(timeout, max(0.0, next_prune - loop.time()))
            if failures:
                # A failed pass leaves the prune due at once: without this
                # floor the loop would retry, and log, without pause.
                timeout = max(timeout, service.reconnect_delay_s(failures))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=timeout)
