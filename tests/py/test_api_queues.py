"""The queue routes' flow control: PUT /queues/{queue}/settings, POST
/queues/{queue}/pause|resume, and GET /queues showing each queue's pause and
settings, against the ledger's real configure_queue, pause_queue and resume_queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from api_support import api_client
from ui_support import ADMIN_TOKEN, READER_TOKEN, enqueue, with_roles

from ledgerq import config

Conn = psycopg.Connection[Any]


@pytest.fixture
async def client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


def view(db: Conn) -> dict[str, tuple[bool, dict[str, Any]]]:
    rows = db.execute("SELECT queue, paused, settings FROM ledgerq.queue_settings").fetchall()
    return {queue: (paused, settings) for queue, paused, settings in rows}


async def test_put_settings_merges_and_answers_every_setting(
    client: httpx.AsyncClient, db: Conn
) -> None:
    response = await client.put(
        "/queues/mail/settings", json={"max_running": 10, "per_key_max_running": 2}
    )
    assert (response.status_code, response.json()) == (
        200, {"max_running": 10, "per_key_max_running": 2},
    )  # fmt: skip
    response = await client.put(
        "/queues/mail/settings",
        json={"max_running": None, "rate_per_second": 2.5, "retention": "3 days"},
    )
    merged = {"per_key_max_running": 2, "rate_per_second": 2.5, "retention": "3 days"}
    assert (response.status_code, response.json()) == (200, merged)
    assert view(db) == {"mail": (False, merged)}
    # An empty object changes nothing and answers the settings as they are.
    assert (await client.put("/queues/mail/settings", json={})).json() == merged


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"max_running": 0}, "max_running"),
        ({"max_running": "5"}, "max_running"),
        ({"per_key_max_running": 1.5}, "per_key_max_running"),
        ({"burst": True}, "burst"),
        ({"rate_per_second": -0.5}, "rate_per_second"),
        ({"retry_rate_per_second": "fast"}, "retry_rate_per_second"),
        ({"retention": ""}, "retention"),
        ({"max_runing": 3}, "max_runing"),
        # Passes the route's types; the ledger's own check refuses it (LQ422).
        ({"retention": "forever and a day"}, "retention"),
    ],
)
async def test_a_bad_setting_is_a_422_naming_the_key(
    client: httpx.AsyncClient, db: Conn, body: dict[str, Any], key: str
) -> None:
    await client.put("/queues/mail/settings", json={"max_running": 4})
    response = await client.put("/queues/mail/settings", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert key in error["message"], error
    assert view(db) == {"mail": (False, {"max_running": 4})}


@pytest.mark.parametrize("body", [[1, 2], "max_running=5", None])
async def test_a_body_that_is_not_an_object_is_a_422(client: httpx.AsyncClient, body: Any) -> None:
    response = await client.put("/queues/mail/settings", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


async def test_pause_and_resume_answer_the_state_and_whether_it_changed(
    client: httpx.AsyncClient, db: Conn
) -> None:
    first = await client.post("/queues/mail/pause")
    assert (first.status_code, first.json()) == (
        200, {"queue": "mail", "paused": True, "changed": True},
    )  # fmt: skip
    again = await client.post("/queues/mail/pause")
    assert again.json() == {"queue": "mail", "paused": True, "changed": False}
    assert view(db) == {"mail": (True, {})}
    resumed = await client.post("/queues/mail/resume")
    assert resumed.json() == {"queue": "mail", "paused": False, "changed": True}
    assert (await client.post("/queues/mail/resume")).json()["changed"] is False
    assert view(db) == {"mail": (False, {})}


async def test_get_queues_shows_pause_and_settings_also_for_queues_without_tasks(
    client: httpx.AsyncClient, db: Conn
) -> None:
    enqueue(db, queue="mail")
    await client.put("/queues/billing/settings", json={"max_running": 3})
    await client.post("/queues/reports/pause")
    queues = {q["queue"]: q for q in (await client.get("/queues")).json()["queues"]}
    assert list(queues) == ["billing", "mail", "reports"]
    assert (queues["mail"]["paused"], queues["mail"]["settings"]) == (False, {})
    assert queues["mail"]["counts"]["PENDING"] == 1
    assert (queues["billing"]["paused"], queues["billing"]["settings"]) == (
        False, {"max_running": 3},
    )  # fmt: skip
    assert (queues["reports"]["paused"], queues["reports"]["settings"]) == (True, {})
    assert queues["reports"]["counts"] == dict.fromkeys(
        ["PENDING", "QUEUED", "RUNNING", "SUCCEEDED", "DEAD", "CANCELLED"], 0
    )
    assert queues["reports"]["oldest_pending_age_seconds"] is None


async def test_a_queue_name_with_a_nul_character_is_a_422(client: httpx.AsyncClient) -> None:
    for response in (
        await client.post("/queues/a%00b/pause"),
        await client.put("/queues/a%00b/settings", json={"max_running": 1}),
    ):
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_input"


async def test_the_read_only_token_reads_queues_but_changes_nothing(
    settings: config.Settings, db: Conn
) -> None:
    async with api_client(with_roles(settings), token=ADMIN_TOKEN) as client:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        reader = {"Authorization": f"Bearer {READER_TOKEN}"}
        await client.put("/queues/mail/settings", json={"max_running": 2}, headers=admin)
        listed = (await client.get("/queues", headers=reader)).json()["queues"]
        assert [(q["queue"], q["settings"]) for q in listed] == [("mail", {"max_running": 2})]
        refused = [
            await client.put("/queues/mail/settings", json={"max_running": 9}, headers=reader),
            await client.post("/queues/mail/pause", headers=reader),
            await client.post("/queues/mail/resume", headers=reader),
        ]
        for response in refused:
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "forbidden"
        assert (await client.post("/queues/mail/pause")).status_code == 401
    assert view(db) == {"mail": (False, {"max_running": 2})}


async def test_the_openapi_document_describes_the_bodies(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths, components = document["paths"], document["components"]["schemas"]
    put = paths["/queues/{queue}/settings"]["put"]
    body_ref = put["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    settings_in = components[body_ref.rsplit("/", 1)[1]]
    assert set(settings_in["properties"]) == {
        "max_running", "per_key_max_running", "rate_per_second", "per_key_rate_per_second",
        "retry_rate_per_second", "burst", "retention",
    }  # fmt: skip
    assert settings_in["additionalProperties"] is False
    assert {"200", "422"} <= set(put["responses"])
    for action in ("pause", "resume"):
        answer = paths[f"/queues/{{queue}}/{action}"]["post"]["responses"]["200"]
        ref = answer["content"]["application/json"]["schema"]["$ref"]
        assert set(components[ref.rsplit("/", 1)[1]]["properties"]) == {
            "queue", "paused", "changed",
        }  # fmt: skip
    queue_out = components["QueueOut"]["properties"]
    assert {"paused", "settings"} <= set(queue_out)
