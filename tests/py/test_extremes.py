"""The extremes the ledger accepts are read back by every reader: a task at the
first and the last UTC second of years 1 to 9999, with the largest attempt budget,
the extreme priorities, and the longest type, queue and key the API takes, goes in
through the client and comes out through the client, the HTTP API, ``ledgerq
show``, listings, and a worker that claims and runs it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import cli_support
import helpers
from api_support import api_client

from ledgerq import AsyncClient, Context, Registry, config

FIRST = datetime(1, 1, 1, 0, 0, 0, tzinfo=UTC)
LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
LONG_TYPE = "t" * 200
LONG_QUEUE = "q" * 200


async def test_extreme_values_go_in_through_the_client_and_come_out_everywhere(
    settings: config.Settings,
) -> None:
    tasks = Registry()

    @tasks.task(LONG_TYPE, queue=LONG_QUEUE)
    async def handler(ctx: Context, payload: dict[str, Any]) -> str:
        return "ran"

    async with AsyncClient(settings) as client:
        due = await client.enqueue(
            LONG_TYPE, {"x": 1}, run_at=FIRST, queue=LONG_QUEUE, priority=32767,
            max_attempts=2_147_483_647, idempotency_key="k" * 512,
        )  # fmt: skip
        later = await client.enqueue(
            LONG_TYPE, run_at=LAST, queue=LONG_QUEUE, priority=-32768, max_attempts=1
        )
        assert (await client.get(due.id)).run_at == FIRST
        assert (await client.get(later.id)).run_at == LAST

    async with api_client(settings) as http:
        for task, run_at in (
            (due, "0001-01-01T00:00:00+00:00"),
            (later, "9999-12-31T23:59:59+00:00"),
        ):
            one = await http.get(f"/tasks/{task.id}")
            assert one.status_code == 200 and one.json()["run_at"] == run_at
        page = await http.get("/tasks", params={"queue": LONG_QUEUE})
        assert page.status_code == 200 and len(page.json()["tasks"]) == 2
        assert (await http.get("/queues")).status_code == 200

    for task_id in (due.id, later.id):
        shown = cli_support.invoke(["show", str(task_id)], settings)
        assert shown.exit_code == 0, shown.output
    stats = await asyncio.to_thread(cli_support.invoke, ["stats"], settings)  # it runs a loop
    assert stats.exit_code == 0, stats.output

    # A worker claims the year-1 task (due since long ago) and decodes its row.
    async with helpers.running(settings, tasks, queues=[LONG_QUEUE]) as s:
        done = await helpers.wait_for_status(s.ledger, due.id, "SUCCEEDED")
    assert (done.result, done.attempts, done.max_attempts) == ("ran", 1, 2_147_483_647)
