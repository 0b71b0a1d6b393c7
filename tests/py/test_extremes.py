"""The extremes the ledger accepts are read back by every reader: a task at the
first and the last UTC second of years 1 to 9999, with the largest attempt budget,
the extreme priorities, and the longest type, queue and key the API takes, goes in
through the client and comes out through the client, the HTTP API, ``ledgerq
show``, listings, and a worker that claims and runs it."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from typing import Any

import cli_support
import helpers
import pytest
from api_support import api_client
from psycopg import sql

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


@pytest.mark.parametrize(
    ("server_zone", "client_zone"),
    [("Pacific/Kiritimati", "Etc/GMT+12"), ("Etc/GMT+12", "Pacific/Kiritimati")],
)
async def test_extremes_written_by_every_path_are_read_by_every_reader_in_any_time_zone(
    settings: config.Settings,
    db: helpers.Conn,
    monkeypatch: pytest.MonkeyPatch,
    server_zone: str,
    client_zone: str,
) -> None:
    # Shown in either zone, the first instant is 1 BC or the last is year 10000:
    # only a reader that reads in UTC gets them back.
    db.execute(
        sql.SQL("ALTER DATABASE {} SET TimeZone = {}").format(
            sql.Identifier(db.info.dbname), sql.Literal(server_zone)
        )
    )
    monkeypatch.setenv("PGTZ", client_zone)  # every connection opened below
    local_zone = os.environ.get("TZ")
    os.environ["TZ"] = client_zone  # what `ledgerq show` prints times in
    time.tzset()
    try:
        await _write_and_read_extremes(settings, db)
    finally:
        if local_zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = local_zone
        time.tzset()


async def _write_and_read_extremes(settings: config.Settings, db: helpers.Conn) -> None:
    first, last = FIRST, LAST.replace(microsecond=999999)
    written: dict[int, datetime] = {}
    db.execute("SET TimeZone = 'Pacific/Kiritimati'")
    for run_at in (first, last):
        row = db.execute(
            "SELECT id FROM ledgerq.enqueue_task(task_type => 'x', run_at => %s)", (run_at,)
        ).fetchone()
        assert row is not None
        written[row[0]] = run_at
    async with api_client(settings) as http:
        for run_at in (first, last):
            one = await http.post("/tasks", json={"type": "x", "run_at": run_at.isoformat()})
            assert one.status_code == 201, one.text
            assert datetime.fromisoformat(one.json()["run_at"]) == run_at
            written[one.json()["id"]] = run_at
            batch = await http.post(
                "/tasks/batch", json={"tasks": [{"type": "x", "run_at": run_at.isoformat()}]}
            )
            assert batch.status_code == 200, batch.text
            written[batch.json()["results"][0]["id"]] = run_at
    async with AsyncClient(settings) as client:
        for run_at in (first, last):
            task = await client.enqueue("x", run_at=run_at)
            assert task.run_at == run_at
            written[task.id] = run_at
        assert {t: (await client.get(t)).run_at for t in written} == written
    assert len(written) == 8

    async with api_client(settings) as http:
        for task_id, run_at in written.items():
            one = await http.get(f"/tasks/{task_id}")
            assert one.status_code == 200, one.text
            assert datetime.fromisoformat(one.json()["run_at"]) == run_at
        page = await http.get("/tasks")
        assert page.status_code == 200, page.text
        listed = {t["id"]: datetime.fromisoformat(t["run_at"]) for t in page.json()["tasks"]}
        assert listed == written

    for task_id, run_at in written.items():
        shown = await asyncio.to_thread(cli_support.invoke, ["show", str(task_id)], settings)
        assert shown.exit_code == 0, shown.output
        [due] = [line for line in shown.stdout.splitlines() if line.strip().startswith("due")]
        assert run_at.isoformat()[:10] in due, due  # local time, or UTC where local cannot be

    tasks = Registry()

    @tasks.task("x")
    async def handler(ctx: Context, payload: dict[str, Any]) -> str:
        return "ran"

    # A worker claims the tasks due since year 1 and decodes their rows.
    async with helpers.running(settings, tasks) as s:
        for task_id, run_at in written.items():
            if run_at == first:
                done = await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
                assert (done.result, done.run_at) == ("ran", first)
