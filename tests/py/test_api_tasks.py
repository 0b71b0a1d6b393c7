"""The HTTP API's task routes against real PostgreSQL and Redis: enqueue, batch,
read, list, cancel and retry, with every status code the README names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from api_support import api_client

from ledgerq import config

TASK_KEYS = {
    "id", "type", "queue", "status", "priority", "payload", "attempts", "max_attempts",
    "run_at", "idempotency_key", "concurrency_key", "result", "last_error", "created_at", "started_at",
    "finished_at", "cancel_requested", "attempt_history",
}  # fmt: skip

Db = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
async def client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


async def post_task(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"type": "email.send", **fields}
    response = await client.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


# --- POST /tasks -------------------------------------------------------------------


async def test_post_task_creates_a_pending_task_and_answers_201(
    client: httpx.AsyncClient, db: Db
) -> None:
    response = await client.post(
        "/tasks",
        json={"type": "email.send", "payload": {"to": "a@b.c"}, "queue": "mail", "priority": 7,
              "max_attempts": 3},
    )  # fmt: skip

    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == TASK_KEYS | {"created"}
    assert body["created"] is True
    assert body["status"] == "PENDING"
    assert (body["type"], body["queue"], body["priority"], body["max_attempts"]) == (
        "email.send", "mail", 7, 3,
    )  # fmt: skip
    assert body["payload"] == {"to": "a@b.c"}
    assert body["attempts"] == 0
    assert body["attempt_history"] == []
    # Committed before the answer: another connection sees it.
    row = db.execute(
        "SELECT status, task_type, queue FROM ledgerq.tasks WHERE id = %s", (body["id"],)
    ).fetchone()
    assert row == ("PENDING", "email.send", "mail")


async def test_post_task_answer_is_the_task_get_returns(client: httpx.AsyncClient) -> None:
    created = await post_task(
        client,
        payload={"b": [1, 2.5, None], "a": {"nested": True}},
        run_at="2030-01-01T12:00:00+02:00",
        idempotency_key="answer-matches-get",
    )

    fetched = (await client.get(f"/tasks/{created['id']}")).json()

    assert created.pop("created") is True
    assert created == fetched
    assert fetched["run_at"] == "2030-01-01T10:00:00+00:00"


async def test_post_task_with_defaults_is_due_now_in_the_default_queue(
    client: httpx.AsyncClient,
) -> None:
    before = datetime.now(UTC)
    body = await post_task(client)

    assert (body["queue"], body["priority"], body["max_attempts"]) == ("default", 0, 5)
    assert body["payload"] == {}
    assert body["run_at"] == body["created_at"]
    assert abs(datetime.fromisoformat(body["created_at"]) - before) < timedelta(seconds=5)


async def test_delay_seconds_puts_run_at_that_far_ahead(client: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    body = await post_task(client, delay_seconds=3600)

    run_at = datetime.fromisoformat(body["run_at"])
    assert timedelta(seconds=3599) < run_at - before < timedelta(seconds=3610)


async def test_replaying_an_idempotency_key_answers_200_with_the_same_task(
    client: httpx.AsyncClient, db: Db
) -> None:
    first = await post_task(client, payload={"n": 1}, idempotency_key="welcome-42")

    again = await client.post(
        "/tasks", json={"type": "email.send", "payload": {"n": 1}, "idempotency_key": "welcome-42"}
    )

    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["created"] is False
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (1,)


async def test_idempotency_key_header_works_like_the_body_field(client: httpx.AsyncClient) -> None:
    task = {"type": "email.send", "payload": {"n": 1}}
    first = await client.post("/tasks", json=task, headers={"Idempotency-Key": "hdr-1"})
    replay_by_header = await client.post("/tasks", json=task, headers={"Idempotency-Key": "hdr-1"})
    replay_by_body = await client.post("/tasks", json={**task, "idempotency_key": "hdr-1"})

    assert first.status_code == 201
    assert first.json()["idempotency_key"] == "hdr-1"
    assert replay_by_header.status_code == 200
    assert replay_by_body.status_code == 200
    assert first.json()["id"] == replay_by_header.json()["id"] == replay_by_body.json()["id"]


async def test_idempotency_key_header_and_body_field_must_agree(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/tasks",
        json={"type": "email.send", "idempotency_key": "one"},
        headers={"Idempotency-Key": "two"},
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"
    assert "idempotency_key" in response.json()["error"]["message"]


async def test_an_invalid_idempotency_key_header_is_422_naming_it(
    client: httpx.AsyncClient, db: Db
) -> None:
    response = await client.post(
        "/tasks", json={"type": "email.send"}, headers={"Idempotency-Key": "k" * 513}
    )

    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("Idempotency-Key:")
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)


async def test_reusing_a_key_with_a_different_payload_is_409(
    client: httpx.AsyncClient, db: Db
) -> None:
    await post_task(client, payload={"n": 1}, idempotency_key="k")

    response = await client.post(
        "/tasks", json={"type": "email.send", "payload": {"n": 2}, "idempotency_key": "k"}
    )
    other_type = await client.post(
        "/tasks", json={"type": "sms.send", "payload": {"n": 1}, "idempotency_key": "k"}
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_conflict"
    assert "'k'" in response.json()["error"]["message"]
    assert other_type.status_code == 409
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (1,)


# --- POST /tasks/batch ----------------------------------------------------------------


async def test_batch_answers_one_result_per_item_in_input_order(
    client: httpx.AsyncClient, db: Db
) -> None:
    existing = await post_task(client, payload={"n": 0}, idempotency_key="old")
    await client.post(f"/tasks/{existing['id']}/cancel")

    response = await client.post(
        "/tasks/batch",
        json={
            "tasks": [
                {"type": "a", "payload": {"n": 1}},
                {"type": "email.send", "payload": {"n": 0}, "idempotency_key": "old"},
                {"type": "b", "queue": "other", "delay_seconds": 60},
                {"type": "c", "idempotency_key": "new"},
            ]
        },
    )

    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["created"] for r in results] == [True, False, True, True]
    assert [r["status"] for r in results] == ["PENDING", "CANCELLED", "PENDING", "PENDING"]
    assert results[1]["id"] == existing["id"]
    new_ids = [r["id"] for r in results if r["created"]]
    rows = db.execute(
        "SELECT id, task_type, queue FROM ledgerq.tasks WHERE id = ANY(%s) ORDER BY id", (new_ids,)
    ).fetchall()
    assert rows == [
        (new_ids[0], "a", "default"),
        (new_ids[1], "b", "other"),
        (new_ids[2], "c", "default"),
    ]


async def test_batch_is_all_or_nothing_on_a_conflicting_key(
    client: httpx.AsyncClient, db: Db
) -> None:
    await post_task(client, payload={"n": 1}, idempotency_key="taken")

    response = await client.post(
        "/tasks/batch",
        json={
            "tasks": [
                {"type": "a"},
                {"type": "b"},
                {"type": "email.send", "idempotency_key": "taken"},
            ]
        },
    )

    assert response.status_code == 409
    assert response.json()["error"]["message"].startswith("tasks[2]")
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (1,)


async def test_batch_with_one_invalid_item_is_422_naming_it_and_enqueues_none(
    client: httpx.AsyncClient, db: Db
) -> None:
    response = await client.post(
        "/tasks/batch",
        json={"tasks": [{"type": "a"}, {"type": "b"}, {"type": "c", "priority": "high"}]},
    )

    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("tasks[2].priority:")
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)


async def test_batch_of_1000_is_accepted_and_1001_is_422(client: httpx.AsyncClient, db: Db) -> None:
    full = await client.post("/tasks/batch", json={"tasks": [{"type": "t"}] * 1000})
    over = await client.post("/tasks/batch", json={"tasks": [{"type": "t"}] * 1001})

    assert full.status_code == 200
    ids = [r["id"] for r in full.json()["results"]]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    assert over.status_code == 422
    assert over.json()["error"]["message"].startswith("tasks:")
    assert "1000" in over.json()["error"]["message"]
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (1000,)


# --- GET /tasks/{id} --------------------------------------------------------------------


async def test_get_task_shows_attempts_result_and_last_error(
    client: httpx.AsyncClient, db: Db
) -> None:
    task_id = (await post_task(client, max_attempts=2))["id"]
    db.execute("SELECT * FROM ledgerq.claim_task(%s, 'worker-a')", (task_id,))
    db.execute("SELECT ledgerq.complete_task(%s, 1, false, error => 'boom')", (task_id,))
    db.execute("UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,))
    db.execute("SELECT * FROM ledgerq.claim_task(%s, 'worker-b')", (task_id,))
    db.execute("SELECT ledgerq.complete_task(%s, 2, true, result => '{\"sent\": 1}')", (task_id,))

    response = await client.get(f"/tasks/{task_id}")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == TASK_KEYS
    assert (body["status"], body["attempts"], body["result"]) == ("SUCCEEDED", 2, {"sent": 1})
    assert body["last_error"] == "boom"
    history = body["attempt_history"]
    assert [(a["attempt"], a["worker_id"], a["outcome"], a["error"]) for a in history] == [
        (1, "worker-a", "failed", "boom"),
        (2, "worker-b", "succeeded", None),
    ]
    assert all(a["started_at"] and a["finished_at"] for a in history)


async def test_get_unknown_task_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/tasks/424242")

    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "task 424242 does not exist"}
    }


@pytest.mark.parametrize("task_id", ["abc", "0", "-1", "9223372036854775808"])
async def test_get_task_with_an_impossible_id_is_422_naming_task_id(
    client: httpx.AsyncClient, task_id: str
) -> None:
    response = await client.get(f"/tasks/{task_id}")

    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("task_id:")


# --- GET /tasks --------------------------------------------------------------------------


async def test_listing_pages_through_every_task_once_newest_first(
    client: httpx.AsyncClient,
) -> None:
    created = (
        await client.post("/tasks/batch", json={"tasks": [{"type": "t"} for _ in range(23)]})
    ).json()["results"]
    expected = sorted((r["id"] for r in created), reverse=True)

    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get("/tasks", params=params)
        assert response.status_code == 200
        page = response.json()
        assert set(page) == {"tasks", "next_cursor"}
        seen += [t["id"] for t in page["tasks"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == expected
    assert pages == 5


async def test_listing_an_exact_multiple_of_the_limit_ends_without_an_empty_page(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/tasks/batch", json={"tasks": [{"type": "t"}] * 4})

    first = (await client.get("/tasks", params={"limit": 2})).json()
    second = (
        await client.get("/tasks", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()

    assert len(first["tasks"]) == len(second["tasks"]) == 2
    assert second["next_cursor"] is None


async def test_listing_filters_by_status_queue_and_type(client: httpx.AsyncClient) -> None:
    a = await post_task(client, type="a", queue="q1")
    b = await post_task(client, type="b", queue="q1")
    c = await post_task(client, type="a", queue="q2")
    await client.post(f"/tasks/{c['id']}/cancel")

    async def ids(**params: Any) -> list[int]:
        response = await client.get("/tasks", params=params)
        assert response.status_code == 200
        return [t["id"] for t in response.json()["tasks"]]

    assert await ids() == [c["id"], b["id"], a["id"]]
    assert await ids(queue="q1") == [b["id"], a["id"]]
    assert await ids(type="a") == [c["id"], a["id"]]
    assert await ids(status="CANCELLED") == [c["id"]]
    assert await ids(status="PENDING", type="a") == [a["id"]]
    assert await ids(queue="nowhere") == []


async def test_listing_includes_each_tasks_attempt_history(
    client: httpx.AsyncClient, db: Db
) -> None:
    ran = await post_task(client)
    await post_task(client)
    db.execute("SELECT * FROM ledgerq.claim_task(%s, 'w1')", (ran["id"],))

    tasks = (await client.get("/tasks")).json()["tasks"]

    assert [len(t["attempt_history"]) for t in tasks] == [0, 1]
    assert tasks[1]["attempt_history"][0]["worker_id"] == "w1"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "BOGUS"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "YmVmb3JlOjA"}, "cursor"),  # before:0, well-formed base64 but no id
        ({"queue": "a\x00b"}, "queue"),
    ],
)
async def test_listing_with_a_bad_parameter_is_422_naming_it(
    client: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    response = await client.get("/tasks", params=params)

    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(f"{field}:")


# --- cancel / retry -------------------------------------------------------------------


async def test_cancel_then_retry_answers_each_new_status(client: httpx.AsyncClient) -> None:
    task_id = (await post_task(client))["id"]

    cancelled = await client.post(f"/tasks/{task_id}/cancel")
    retried = await client.post(f"/tasks/{task_id}/retry")

    assert cancelled.status_code == 200
    assert cancelled.json() == {"id": task_id, "status": "CANCELLED"}
    assert retried.status_code == 200
    assert retried.json() == {"id": task_id, "status": "PENDING"}
    assert (await client.get(f"/tasks/{task_id}")).json()["status"] == "PENDING"


async def test_cancelling_a_running_task_requests_cancellation(
    client: httpx.AsyncClient, db: Db
) -> None:
    task_id = (await post_task(client))["id"]
    db.execute("SELECT * FROM ledgerq.claim_task(%s, 'w1')", (task_id,))

    response = await client.post(f"/tasks/{task_id}/cancel")

    assert response.json() == {"id": task_id, "status": "RUNNING"}
    assert (await client.get(f"/tasks/{task_id}")).json()["cancel_requested"] is True


async def test_retrying_a_task_that_is_not_dead_or_cancelled_is_409(
    client: httpx.AsyncClient,
) -> None:
    task_id = (await post_task(client))["id"]

    response = await client.post(f"/tasks/{task_id}/retry")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "invalid_transition"
    assert "PENDING" in response.json()["error"]["message"]


@pytest.mark.parametrize("action", ["cancel", "retry"])
async def test_cancel_or_retry_of_an_unknown_task_is_404(
    client: httpx.AsyncClient, action: str
) -> None:
    response = await client.post(f"/tasks/777/{action}")

    assert response.status_code == 404
    assert response.json()["error"] == {"code": "not_found", "message": "task 777 does not exist"}
