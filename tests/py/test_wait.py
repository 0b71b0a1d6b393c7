"""Waiting for a task to finish: Client.wait, AsyncClient.wait and
GET /tasks/{id}?wait=S, woken by the ledger's NOTIFY on ledgerq_final.

The tests finish tasks from another connection, as a worker would, and count
the waiters' reads of the task: a waiter reads once when it starts and once
per announcement of its task, never on a timer."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import api_support
import helpers
import psycopg
import pytest

from ledgerq import AsyncClient, Client, config, errors
from ledgerq.ledger import AsyncLedger
from ledgerq.types import TaskStatus

Conn = psycopg.Connection[Any]
WAITERS = 200


def finish(db_url: str, task_ids: list[int], stamps: dict[int, float], gap_s: float = 0.0) -> None:
    """Claim and complete each task in a transaction of its own; stamp each commit."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for task_id in task_ids:
            attempt = helpers.claim_by_sql(conn, task_id)
            assert helpers.complete_by_sql(conn, task_id, attempt, "test") == "SUCCEEDED"
            stamps[task_id] = time.perf_counter()
            if gap_s:
                time.sleep(gap_s)


def enqueue_many(db: Conn, n: int) -> list[int]:
    rows = db.execute(
        "SELECT (ledgerq.enqueue_task(task_type => 'wait.me')).id FROM generate_series(1, %s)", (n,)
    ).fetchall()
    return [int(r[0]) for r in rows]


class CountingLedger(AsyncLedger):
    """An AsyncLedger that counts reads of a task (the waiters' only queries)."""

    reads = 0

    async def get(self, task_id: int) -> Any:
        type(self).reads += 1
        return await super().get(task_id)


async def test_many_concurrent_waiters_each_return_their_final_task_woken_by_the_ledger(
    settings: config.Settings, db: Conn, db_url: str, record_property: Any
) -> None:
    task_ids = enqueue_many(db, WAITERS)
    ledger = await CountingLedger.connect(db_url, max_size=8)
    CountingLedger.reads = 0
    client = AsyncClient(settings, ledger=ledger)
    returned: dict[int, float] = {}
    stamps: dict[int, float] = {}

    async def wait(task_id: int) -> Any:
        task = await client.wait(task_id, timeout=30)
        returned[task_id] = time.perf_counter()
        return task

    try:
        waiters = [asyncio.create_task(wait(t)) for t in task_ids]
        await helpers.eventually(
            lambda: _value(CountingLedger.reads >= WAITERS), what="every waiter's first read"
        )
        await asyncio.sleep(0.3)  # idle waiters: nothing may read the table meanwhile
        assert CountingLedger.reads == WAITERS
        await asyncio.to_thread(finish, db_url, task_ids, stamps, 0.002)
        tasks = await asyncio.gather(*waiters)
    finally:
        await ledger.close()

    assert [t.id for t in tasks] == task_ids
    assert {t.status for t in tasks} == {TaskStatus.SUCCEEDED}
    assert all(t.result == {"by": "test"} for t in tasks)
    # One read to start, one per announcement of its own task.
    assert CountingLedger.reads == 2 * WAITERS
    latencies_ms = sorted((returned[t] - stamps[t]) * 1000 for t in task_ids)
    p50 = statistics.median(latencies_ms)
    p99 = latencies_ms[int(len(latencies_ms) * 0.99) - 1]
    print(f"wait latency over {WAITERS} waiters: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    record_property("wait_latency_p50_ms", round(p50, 2))
    record_property("wait_latency_p99_ms", round(p99, 2))
    assert p99 < 500, latencies_ms[-5:]


async def _value(value: Any) -> Any:
    return value


async def test_async_wait_times_out_with_timeout_error_and_returns_a_final_task_at_once(
    settings: config.Settings, db: Conn
) -> None:
    (pending, done) = enqueue_many(db, 2)
    finish(db.info.dsn, [done], {})
    async with AsyncClient(settings) as client:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            await client.wait(pending, timeout=0.3)
        assert 0.3 <= time.perf_counter() - started < 2
        assert (await client.wait(done, timeout=0)).status == TaskStatus.SUCCEEDED
        with pytest.raises(errors.TaskNotFound):
            await client.wait(10**12, timeout=1)
        with pytest.raises(errors.InvalidInput, match="timeout"):
            await client.wait(pending, timeout=-1)


async def test_async_wait_survives_its_listening_connection_being_killed(
    settings: config.Settings, db: Conn, db_url: str
) -> None:
    (task_id,) = enqueue_many(db, 1)
    async with AsyncClient(settings) as client:
        waiter = asyncio.create_task(client.wait(task_id, timeout=20))
        await helpers.eventually(
            lambda: _value(_listeners(db)), what="the waiter's LISTEN connection"
        )
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE 'LISTEN ledgerq_final%%' AND pid <> pg_backend_pid()"
        )
        await helpers.eventually(lambda: _value(_listeners(db)), what="the LISTEN to come back")
        await asyncio.to_thread(finish, db_url, [task_id], {})
        task = await waiter
    assert task.status == TaskStatus.SUCCEEDED


def _listeners(db: Conn) -> int:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN ledgerq_final%%'"
        " AND pid <> pg_backend_pid() AND state = 'idle'"
    ).fetchone()
    return int(row[0]) if row else 0


def test_sync_wait_returns_when_another_connection_finishes_the_task(
    settings: config.Settings, db: Conn, db_url: str
) -> None:
    (task_id, other) = enqueue_many(db, 2)
    stamps: dict[int, float] = {}
    finisher = threading.Timer(0.2, finish, (db_url, [other, task_id], stamps))
    with Client(settings) as client:
        finisher.start()
        try:
            task = client.wait(task_id, timeout=10)
            returned = time.perf_counter()
        finally:
            finisher.join()
        with pytest.raises(TimeoutError, match="still PENDING"):
            client.wait(enqueue_many(db, 1)[0], timeout=0.2)
    assert task.status == TaskStatus.SUCCEEDED
    assert returned - stamps[task_id] < 1.0


async def test_get_task_with_wait_answers_when_final_or_after_the_wait_with_its_state(
    settings: config.Settings, db: Conn, db_url: str
) -> None:
    (task_id, pending) = enqueue_many(db, 2)
    async with api_support.api_client(settings) as http:
        timer = threading.Timer(0.2, finish, (db_url, [task_id], {}))
        timer.start()
        try:
            started = time.perf_counter()
            reply = await http.get(f"/tasks/{task_id}", params={"wait": 10})
        finally:
            timer.join()
        assert reply.status_code == 200
        assert reply.json()["status"] == "SUCCEEDED"
        assert time.perf_counter() - started < 5

        started = time.perf_counter()
        reply = await http.get(f"/tasks/{pending}", params={"wait": 0.3})
        assert (reply.status_code, reply.json()["status"]) == (200, "PENDING")
        assert time.perf_counter() - started >= 0.3

        too_long = await http.get(f"/tasks/{pending}", params={"wait": 61})
        assert too_long.status_code == 422
        assert "wait" in too_long.json()["error"]["message"]
        missing = await http.get("/tasks/999999", params={"wait": 1})
        assert missing.status_code == 404
