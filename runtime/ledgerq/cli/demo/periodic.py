"""The demo's schedule: one ``@every 2 seconds`` schedule fired by two dispatchers.

``register`` creates the schedule ``demo.tick`` (task type ``demo.tick``, in
``app.SCHEDULE_QUEUE``) once the demo's processes are up; both dispatchers
call ``run_schedules`` every second. ``wait_slots`` waits until a few slots
have fired and shows them; ``check`` judges from the ledger that each slot
produced exactly one task: the tasks' idempotency keys are
``schedule:demo.tick:<slot>``, every slot from the first to the last is there
(none skipped) and there are exactly as many tasks as slots (none doubled).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import psycopg

from ledgerq import config, types
from ledgerq.cli import render
from ledgerq.cli.demo import app as demo_app
from ledgerq.cli.demo import checks
from ledgerq.ledger import AsyncLedger

NAME = "demo.tick"
EVERY = timedelta(seconds=2)
SLOTS_SHOWN = 3
KEY_PREFIX = f"schedule:{NAME}:"
DISPATCHERS = 2


async def register(ledger: AsyncLedger) -> None:
    await ledger.schedule_task(
        types.NewSchedule(
            NAME,
            f"@every {int(EVERY.total_seconds())} seconds",
            "demo.tick",
            queue=demo_app.SCHEDULE_QUEUE,
            max_attempts=1,
            # A slot both dispatchers missed (a stalled machine) is still
            # enqueued, once: the check can then insist on every slot.
            catch_up=timedelta(minutes=1),
        )
    )


def slot_tasks(settings: config.Settings) -> list[tuple[str, int]]:
    """(idempotency key, task id) of every task the schedule made, by key."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT idempotency_key, id FROM ledgerq.tasks WHERE queue = %s ORDER BY 1, 2",
            (demo_app.SCHEDULE_QUEUE,),
        ).fetchall()
    return [(str(key), int(task_id)) for key, task_id in rows]


async def wait_slots(settings: config.Settings, screen: render.Screen, deadline: float) -> None:
    """Wait until SLOTS_SHOWN slots have fired, then show them."""
    while True:
        fired = await asyncio.to_thread(slot_tasks, settings)
        if len(fired) >= SLOTS_SHOWN:
            break
        if time.monotonic() > deadline:
            screen.step(f"schedule {NAME}: only {len(fired)} slot(s) fired when the time was up")
            return
        await asyncio.sleep(0.2)
    shown = ", ".join(f"{key.removeprefix(KEY_PREFIX)} -> task {tid}" for key, tid in fired)
    screen.step(
        f"schedule {NAME} (@every {int(EVERY.total_seconds())} seconds), fired by "
        f"{DISPATCHERS} dispatchers: {shown}"
    )


def check(settings: config.Settings) -> checks.Check:
    fired = slot_tasks(settings)
    keys = [key for key, _ in fired]
    slots = sorted(
        datetime.strptime(key.removeprefix(KEY_PREFIX), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        for key in set(keys)
        if key.startswith(KEY_PREFIX)
    )
    expected = len(slots) and int((slots[-1] - slots[0]) / EVERY) + 1
    upheld = len(slots) >= SLOTS_SHOWN and len(fired) == len(slots) == expected
    span = f"{slots[0]:%H:%M:%S} to {slots[-1]:%H:%M:%S} UTC" if slots else "none"
    return checks.Check(
        "4. A schedule's slot becomes exactly one task",
        [
            f"{DISPATCHERS} dispatchers ran {NAME} (@every {int(EVERY.total_seconds())} seconds)"
            f": slots {span}",
            f"{expected} slots in that span, {len(slots)} with a task, {len(fired)} tasks "
            f"(keys {KEY_PREFIX}<slot>)",
        ],
        upheld,
    )
