"""EnqueueBatcher: concurrent POST /tasks share transactions, yet each request
gets exactly the answer it would have had alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from api_support import api_client

from ledgerq import config, errors
from ledgerq.api.batcher import EnqueueBatcher
from ledgerq.ledger import AsyncLedger
from ledgerq.types import NewTask

Db = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
async def client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[AsyncLedger]:
    opened = await AsyncLedger.connect(db_url, max_size=4)
    yield opened
    await opened.close()


async def test_concurrent_posts_commit_in_fewer_transactions_than_requests(
    client: httpx.AsyncClient, db: Db
) -> None:
    responses = await asyncio.gather(
        *(client.post("/tasks", json={"type": "t", "payload": {"n": n}}) for n in range(60))
    )

    assert [r.status_code for r in responses] == [201] * 60
    by_n = {r.json()["payload"]["n"]: r.json()["id"] for r in responses}
    rows = dict(db.execute("SELECT (payload->>'n')::int, id FROM ledgerq.tasks").fetchall())
    assert rows == by_n
    (transactions,) = db.execute("SELECT count(DISTINCT xmin::text) FROM ledgerq.tasks").fetchone()
    assert transactions <= 1 + 4 * 2  # the first alone, then a few batches


async def test_a_conflicting_key_fails_only_its_own_request(
    client: httpx.AsyncClient, db: Db
) -> None:
    await client.post("/tasks", json={"type": "t", "payload": {"n": 1}, "idempotency_key": "k"})

    conflicting = {"type": "t", "payload": {"n": 2}, "idempotency_key": "k"}
    replay = {"type": "t", "payload": {"n": 1}, "idempotency_key": "k"}
    bodies = [{"type": "t"}] * 10 + [conflicting] + [{"type": "t"}] * 10 + [replay]
    responses = await asyncio.gather(*(client.post("/tasks", json=b) for b in bodies))

    assert [r.status_code for r in responses] == [201] * 10 + [409] + [201] * 10 + [200]
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (21,)


async def test_batcher_answers_each_caller_in_its_own_order(ledger: AsyncLedger) -> None:
    batcher = EnqueueBatcher(ledger, max_batch=7, max_in_flight=2)
    tasks = [NewTask("t", {"n": n % 25}, idempotency_key=f"key-{n % 25}") for n in range(50)]

    results = await asyncio.gather(*(batcher.enqueue(t) for t in tasks))

    assert [r.payload for r in results] == [{"n": n % 25} for n in range(50)]
    # The two calls with one key may share a batch or race in two concurrent
    # ones: which of them creates the task is up to commit order, but exactly
    # one does, and both answer with the same task.
    for first, second in zip(results[:25], results[25:], strict=True):
        assert first.id == second.id
        assert sorted([first.created, second.created]) == [False, True]
    assert len({r.id for r in results}) == 25


async def test_a_batch_fails_every_caller_when_postgresql_is_gone(ledger: AsyncLedger) -> None:
    batcher = EnqueueBatcher(ledger)
    await ledger.close()

    results = await asyncio.gather(
        *(batcher.enqueue(NewTask("t")) for _ in range(6)), return_exceptions=True
    )

    assert all(isinstance(r, errors.LedgerUnavailable) for r in results), results
