"""A task type's registered queue and max_attempts are the defaults of every
enqueue path (SQL, HTTP, the command line, the clients), and concurrency keys
travel through all of them."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from api_support import api_client
from cli_support import invoke
from helpers import Conn, eventually, running, wait_for_status

from ledgerq import config, errors
from ledgerq.client import AsyncClient, Client
from ledgerq.registry import Context, Registry
from ledgerq.types import TaskStatus

tasks = Registry()


@tasks.task("t", queue="orders", max_attempts=1)
async def always_fails(ctx: Context, payload: dict[str, Any]) -> None:
    raise RuntimeError("fails every attempt")


def stored(db: Conn, task_id: int) -> tuple[str, int]:
    row = db.execute(
        "SELECT queue, max_attempts FROM ledgerq.tasks WHERE id = %s", (task_id,)
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def cli_enqueue(settings: config.Settings, *args: str) -> dict[str, Any]:
    result = invoke(["enqueue", *args, "--json"], settings)
    assert result.exit_code == 0, result.output + result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return body


async def test_every_enqueue_path_takes_the_registered_queue_and_max_attempts(
    settings: config.Settings, db: Conn
) -> None:
    async with running(settings, tasks, queues=["orders"]) as s:

        async def registered() -> bool:
            return any(t.task_type == "t" for t in await s.ledger.task_types())

        await eventually(registered, what="the worker's registration")

        row = db.execute("SELECT id FROM ledgerq.enqueue_task(task_type => 't')").fetchone()
        assert row is not None
        by_sql: int = row[0]
        row = db.execute(
            """SELECT id FROM ledgerq.enqueue_tasks('[{"task_type": "t"}]')"""
        ).fetchone()
        assert row is not None
        by_sql_batch: int = row[0]

        async with api_client(settings) as http:
            by_http = (await http.post("/tasks", json={"type": "t"})).json()
            by_http_batch = (
                await http.post("/tasks/batch", json={"tasks": [{"type": "t", "queue": None}]})
            ).json()["results"][0]
        by_cli = await asyncio.to_thread(cli_enqueue, settings, "t")
        async with AsyncClient(settings) as plain_async:
            by_async = await plain_async.enqueue("t")
            [by_async_many] = await plain_async.enqueue_many([{"task_type": "t"}])

        def sync_enqueues() -> list[Any]:
            with Client(settings) as plain:
                return [plain.enqueue("t"), *plain.enqueue_many([{"task_type": "t"}])]

        by_sync, by_sync_many = await asyncio.to_thread(sync_enqueues)

        # What each answer says is what was stored.
        answers = [
            by_http,
            by_cli,
            *(t.to_json() for t in (by_async, by_async_many, by_sync, by_sync_many)),
        ]
        assert {(a["queue"], a["max_attempts"]) for a in answers} == {("orders", 1)}

        ids = [
            by_sql,
            by_sql_batch,
            by_http["id"],
            by_http_batch["id"],
            *(a["id"] for a in answers[1:]),
        ]
        assert len(set(ids)) == 9
        for task_id in ids:
            assert stored(db, task_id) == ("orders", 1)
            # The worker serving only "orders" ran each once, as registered.
            final = await wait_for_status(s.ledger, task_id, "DEAD")
            assert final.attempts == 1 and len(final.attempt_history) == 1


async def test_explicit_values_win_and_unregistered_types_get_default_and_5(
    settings: config.Settings, db: Conn
) -> None:
    db.execute(
        """SELECT ledgerq.worker_register('w', '{orders}',
               '[{"task_type": "t", "queue": "orders", "max_attempts": 1}]')"""
    )
    async with api_client(settings) as http:
        explicit = (
            await http.post("/tasks", json={"type": "t", "queue": "q", "max_attempts": 7})
        ).json()
        half = (await http.post("/tasks", json={"type": "t", "max_attempts": 7})).json()
        other = (await http.post("/tasks", json={"type": "unregistered"})).json()
        batch = (
            await http.post(
                "/tasks/batch",
                json={"tasks": [{"type": "t", "queue": "q"}, {"type": "unregistered"}]},
            )
        ).json()["results"]
    assert (explicit["queue"], explicit["max_attempts"]) == ("q", 7)
    assert (half["queue"], half["max_attempts"]) == ("orders", 7)
    assert (other["queue"], other["max_attempts"]) == ("default", 5)
    assert [stored(db, r["id"]) for r in batch] == [("q", 1), ("default", 5)]

    by_cli = await asyncio.to_thread(
        cli_enqueue, settings, "t", "--queue", "cli-q", "--max-attempts", "2"
    )
    assert (by_cli["queue"], by_cli["max_attempts"]) == ("cli-q", 2)
    assert stored(db, by_cli["id"]) == ("cli-q", 2)
    unregistered_cli = await asyncio.to_thread(cli_enqueue, settings, "unregistered")
    assert (unregistered_cli["queue"], unregistered_cli["max_attempts"]) == ("default", 5)


async def test_a_client_given_a_registry_sends_that_registrys_values(
    settings: config.Settings, db: Conn
) -> None:
    db.execute(
        """SELECT ledgerq.worker_register('w', '{orders}',
               '[{"task_type": "t", "queue": "orders", "max_attempts": 1}]')"""
    )
    local = Registry()

    @local.task("t", queue="local-q", max_attempts=4)
    async def handler(ctx: Context, payload: dict[str, Any]) -> None: ...

    async with AsyncClient(settings, registry=local) as client:
        declared = await client.enqueue("t")
        not_declared = await client.enqueue("elsewhere")
    assert (declared.queue, declared.max_attempts) == ("local-q", 4)
    assert stored(db, declared.id) == ("local-q", 4)
    assert (not_declared.queue, not_declared.max_attempts) == ("default", 5)


async def test_concurrency_key_travels_through_http_clients_and_cli(
    settings: config.Settings, db: Conn
) -> None:
    async with api_client(settings) as http:
        one = (await http.post("/tasks", json={"type": "t", "concurrency_key": "tenant-1"})).json()
        [many] = (
            await http.post(
                "/tasks/batch", json={"tasks": [{"type": "t", "concurrency_key": "tenant-2"}]}
            )
        ).json()["results"]
        none = (await http.post("/tasks", json={"type": "t"})).json()
        fetched = (await http.get(f"/tasks/{many['id']}")).json()
        listed = (await http.get("/tasks")).json()["tasks"]
    assert one["concurrency_key"] == "tenant-1"
    assert none["concurrency_key"] is None
    assert fetched["concurrency_key"] == "tenant-2"
    assert {t["id"]: t["concurrency_key"] for t in listed} == {
        one["id"]: "tenant-1", many["id"]: "tenant-2", none["id"]: None,
    }  # fmt: skip

    async with AsyncClient(settings) as client:
        by_client = await client.enqueue("t", concurrency_key="tenant-3")
        [by_many] = await client.enqueue_many([{"task_type": "t", "concurrency_key": "tenant-4"}])
        assert (await client.get(by_client.id)).concurrency_key == "tenant-3"
    assert by_client.concurrency_key == "tenant-3"
    assert by_many.concurrency_key == "tenant-4"

    by_cli = await asyncio.to_thread(
        cli_enqueue, settings, "t", "--concurrency-key", "tenant\x1b]0;x\x07-5"
    )
    assert by_cli["concurrency_key"] == "tenant\x1b]0;x\x07-5"
    shown = await asyncio.to_thread(invoke, ["show", str(by_cli["id"])], settings)
    assert shown.exit_code == 0, shown.output
    [line] = [ln for ln in shown.stdout.splitlines() if "concurrency key" in ln]
    assert "\x1b" not in line and "\x07" not in line
    assert line.split()[-1].startswith("tenant\\x1b]0;x\\x07-5")
    rows = db.execute("SELECT concurrency_key FROM ledgerq.tasks ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [
        "tenant-1", "tenant-2", None, "tenant-3", "tenant-4", "tenant\x1b]0;x\x07-5",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "value", [5, {"k": 1}, "", "   ", "k" * 513, None], ids=lambda v: repr(v)[:12]
)
@pytest.mark.parametrize("path", ["/tasks", "/tasks/batch"])
async def test_a_bad_concurrency_key_is_a_422_naming_the_field(
    settings: config.Settings, db: Conn, path: str, value: Any
) -> None:
    task = {"type": "t", "concurrency_key": value}
    async with api_client(settings) as http:
        response = await http.post(path, json={"tasks": [task]} if path.endswith("batch") else task)
    if value is None:  # null is "no key"
        assert response.status_code in (200, 201), response.text
        return
    assert response.status_code == 422, response.text
    assert "concurrency_key" in response.json()["error"]["message"]
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)


async def test_client_and_cli_refuse_a_blank_concurrency_key_naming_it(
    settings: config.Settings, db: Conn
) -> None:
    async with AsyncClient(settings) as client:
        with pytest.raises(errors.InvalidInput, match="concurrency_key"):
            await client.enqueue("t", concurrency_key=" ")
    result = await asyncio.to_thread(invoke, ["enqueue", "t", "--concurrency-key", ""], settings)
    assert result.exit_code != 0 and "concurrency_key" in result.stderr
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)


async def test_a_replay_with_another_concurrency_key_answers_the_first_task(
    settings: config.Settings,
) -> None:
    async with api_client(settings) as http:
        first = await http.post(
            "/tasks", json={"type": "t", "idempotency_key": "k", "concurrency_key": "a"}
        )
        again = await http.post(
            "/tasks", json={"type": "t", "idempotency_key": "k", "concurrency_key": "b"}
        )
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["concurrency_key"] == "a"
    assert again.json()["status"] == TaskStatus.PENDING.value


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_attempts": 2**31}, "max_attempts is out of range"),
        ({"priority": -(2**31) - 1}, "priority is out of range"),
        ({"priority": True}, "priority must be an integer"),
        ({"concurrency_key": "a\x00b"}, "concurrency_key must not contain U+0000"),
        ({"idempotency_key": "a\x00b"}, "idempotency_key must not contain U+0000"),
        ({"queue": "a\x00b"}, "queue must not contain U+0000"),
    ],
    ids=lambda v: repr(v)[:24],
)
async def test_client_refuses_what_the_driver_cannot_send_naming_the_field(
    settings: config.Settings, db: Conn, options: dict[str, Any], words: str
) -> None:
    async with AsyncClient(settings) as client:
        with pytest.raises(errors.InvalidInput, match=re.escape(words)):
            await client.enqueue("t", **options)
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)


async def test_a_naive_run_at_is_answered_as_stored(settings: config.Settings) -> None:
    async with AsyncClient(settings) as client:
        for naive in (datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59)):
            task = await client.enqueue("t", run_at=naive)
            assert task.run_at == (await client.get(task.id)).run_at == naive.replace(tzinfo=UTC)
