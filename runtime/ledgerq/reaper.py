"""The reaper: calls ``reap_stuck()`` every ``interval_s`` (REAPER_INTERVAL_DEFAULT_S).

``reap_stuck`` recovers RUNNING tasks whose lease expired (a worker crashed or
stalled: the attempt is recorded as lost and the task retried with backoff, or
DEAD on its last attempt) and QUEUED tasks whose delivery was never claimed.
Several reapers may run at once (SKIP LOCKED keeps them apart), and pg_cron can
do the same job instead:
``SELECT cron.schedule('ledgerq-reap', '* * * * *', 'SELECT ledgerq.reap_stuck()')``.

A killed worker's task runs again within its lease plus this interval (plus
its backoff). Log events (logger ``ledgerq.reaper``): ``reaper.reaped`` with
the count, ``ledger.unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ledgerq import errors
from ledgerq.ledger import AsyncLedger

REAPER_INTERVAL_DEFAULT_S = 5.0

log = logging.getLogger("ledgerq.reaper")


class Reaper:
    """Recovers stuck tasks on an interval."""

    def __init__(self, ledger: AsyncLedger, *, interval_s: float = REAPER_INTERVAL_DEFAULT_S):
        if interval_s <= 0:
            raise errors.ConfigError(f"reaper interval must be > 0 seconds, got {interval_s}")
        self.ledger = ledger
        self.interval_s = interval_s
        self._stopping = asyncio.Event()
        #: Tasks moved since start.
        self.reaped = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run_once(self) -> int:
        """One sweep; returns how many tasks it moved."""
        moved = await self.ledger.reap()
        if moved:
            log.info("reaper.reaped %d task(s)", moved)
        self.reaped += moved
        return moved

    async def run(self) -> None:
        """Sweep every interval until stop() is called."""
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except errors.LedgerError as exc:
                # Unreachable or refused (a deadlock, a statement timeout): the
                # next sweep tries again; a reaper must outlive its database.
                log.warning("ledger.unavailable %s (retrying)", exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval_s)
