"""Waiting for tasks to reach a final status, woken by the ledger.

Every transition into SUCCEEDED, DEAD or CANCELLED sends the task's id on the
PostgreSQL channel ``ledgerq_final`` when it commits (migration 0005). A
waiter listens first, then reads the task, and reads it again only when its
id is announced: no polling, and no window between the read and the LISTEN in
which a final transition could be missed.

- ``FinalWatcher``: one LISTEN connection per process, shared by any number
  of concurrent waiters (``AsyncClient.wait``, ``GET /tasks/{id}?wait=S``).
  When its connection drops it wakes every waiter to read its task again, and
  listens again with a backoff.
- ``wait_sync``: the synchronous form (``Client.wait``), on a connection of
  its own for the duration of the wait.

Known limits: a waiter learns of a final status once its transaction commits
and the notification arrives (milliseconds). A task deleted while waited for
raises ``TaskNotFound`` at the next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg

from ledgerq.queries import FINAL_CHANNEL
from ledgerq.types import Task

RECONNECT_MAX_S = 5.0

log = logging.getLogger("ledgerq.finals")


def _ids(payload: str) -> list[int]:
    ids = []
    for part in payload.split(","):
        with contextlib.suppress(ValueError):
            ids.append(int(part))
    return ids


class FinalWatcher:
    """Wakes the waiters of a task id when the ledger announces it final."""

    def __init__(self, conninfo: str, fetch: Callable[[int], Awaitable[Task]]) -> None:
        self._conninfo = conninfo
        self._fetch = fetch
        self._waiters: dict[int, set[asyncio.Event]] = {}
        self._listening = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    async def wait(self, task_id: int, timeout_s: float | None = None) -> Task:
        """The task once it is final; TimeoutError after timeout_s (None: no limit)."""
        woken = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(woken)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._listen()
                except TimeoutError:
                    # Not listening in time: still, read the task once.
                    task = await self._fetch(task_id)
                    if task.status.is_final:
                        return task
                    raise
                # Cleared before the read: an announcement that arrives while
                # it runs is not lost.
                woken.clear()
                task = await self._fetch(task_id)
                if task.status.is_final:
                    return task
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError(
                        f"task {task_id} is still {task.status} after {timeout_s:g} s"
                    )
                async with asyncio.timeout_at(deadline):
                    await woken.wait()
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[task_id]

    async def _listen(self) -> None:
        """Return once the LISTEN is in place (start the listener if needed)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._run(), name="ledgerq-final-listener")
        await self._listening.wait()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {FINAL_CHANNEL}")
                    failures = 0
                    self._listening.set()
                    async for notify in conn.notifies():
                        for task_id in _ids(notify.payload):
                            for woken in self._waiters.get(task_id, ()):
                                woken.set()
            except psycopg.Error as exc:
                failures += 1
                log.warning("ledger.unavailable listen: %s", str(exc).strip().splitlines()[0])
            finally:
                # Announcements may have been missed: every waiter reads its
                # task again once the LISTEN is back.
                self._listening.clear()
                for waiters in self._waiters.values():
                    for woken in waiters:
                        woken.set()
            await asyncio.sleep(min(RECONNECT_MAX_S, 0.1 * 2**failures))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None


def wait_sync(
    conninfo: str, task_id: int, fetch: Callable[[], Task], timeout_s: float | None
) -> Task:
    """The synchronous wait: LISTEN on a connection of its own, read, and read
    again at each announcement of task_id; TimeoutError after timeout_s."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"LISTEN {FINAL_CHANNEL}")
        while True:
            task = fetch()
            if task.status.is_final:
                return task
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"task {task_id} is still {task.status} after {timeout_s:g} s"
                    )
                announced = [
                    n for n in conn.notifies(timeout=remaining, stop_after=1)
                    if task_id in _ids(n.payload)
                ]  # fmt: skip
                if announced:
                    break
