"""Flow control's metrics in a real worker: a claim the ledger deferred counts in
ledgerq_claims_deferred_total{queue, reason}, with bounded label values."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import helpers
import psycopg
import pytest

from ledgerq import Context, Registry, config, metrics
from ledgerq.types import DueTask, TaskId

Conn = psycopg.Connection[Any]


def deferred(queue: str, reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "ledgerq_claims_deferred_total", {"queue": queue, "reason": reason}
    )
    return value or 0.0


async def test_a_deferred_claim_counts_by_queue_and_reason(
    settings: config.Settings, db: Conn
) -> None:
    queue = f"mail-{uuid.uuid4().hex[:8]}"  # the registry is process-wide: a series of our own
    tasks = Registry()

    @tasks.task("mail", queue=queue)
    async def mail(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    before = deferred(queue, "paused")
    async with helpers.running(settings, tasks, dispatcher=False) as s:
        task_id = await s.enqueue("mail")
        db.execute("SELECT ledgerq.pause_queue(%s)", (queue,))
        # A copy of the id already in Redis when the queue was paused: the claim defers it.
        await s.dispatch.push([DueTask(TaskId(task_id), queue, 0)])
        deadline = asyncio.get_running_loop().time() + 10
        while deferred(queue, "paused") == before:
            assert asyncio.get_running_loop().time() < deadline, "no deferral was counted"
            await asyncio.sleep(0.02)
    assert deferred(queue, "paused") == before + 1
    row = db.execute("SELECT status, waiting_on, attempts FROM ledgerq.tasks WHERE id = %s",
                     (task_id,)).fetchone()  # fmt: skip
    assert row == ("PENDING", "paused", 0)


@pytest.mark.parametrize(
    ("reason", "label"),
    [("per_key_max_running", "per_key_max_running"), ("something new", "other")],
)
def test_deferral_labels_are_bounded(reason: str, label: str) -> None:
    assert metrics.deferral_labels("mail", reason) == (metrics.QUEUE_LABEL("mail"), label)
