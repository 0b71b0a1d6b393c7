"""The schedule routes: GET /schedules, POST /schedules/{name}/pause|resume."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import psycopg
import pytest
from api_support import TOKEN, api_client
from ui_support import ADMIN_TOKEN, READER_TOKEN, with_roles

from ledgerq import config

Conn = psycopg.Connection[Any]


@pytest.fixture
async def client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


def add_schedule(db: Conn, name: str, cron: str = "@hourly", **fields: Any) -> None:
    arguments = ", ".join(f"{k} => %({k})s" for k in fields)
    db.execute(
        f"SELECT ledgerq.schedule_task(name => %(name)s, cron => %(cron)s,"
        f" task_type => 'job'{', ' + arguments if arguments else ''})",
        {"name": name, "cron": cron, **fields},
    )


async def test_get_schedules_lists_the_views_rows_by_name(
    client: httpx.AsyncClient, db: Conn
) -> None:
    assert (await client.get("/schedules")).json() == {"schedules": []}
    add_schedule(db, "nightly", "0 3 * * *", timezone="Europe/Berlin", queue="reports")
    add_schedule(db, "beat", "@every 5 seconds")
    response = await client.get("/schedules")
    assert response.status_code == 200
    body = response.json()["schedules"]
    assert [s["name"] for s in body] == ["beat", "nightly"]
    nightly = body[1]
    view = db.execute("SELECT next_run_at FROM ledgerq.schedules WHERE name = 'nightly'").fetchone()
    assert view is not None
    assert datetime.fromisoformat(nightly.pop("next_run_at")) == view[0]
    assert nightly == {
        "name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin",
        "task_type": "job", "queue": "reports", "paused": False, "last_slot": None,
        "last_task_id": None,
    }  # fmt: skip


async def test_pause_and_resume_change_the_schedule(client: httpx.AsyncClient, db: Conn) -> None:
    add_schedule(db, "beat", "@every 5 seconds")
    response = await client.post("/schedules/beat/pause")
    assert (response.status_code, response.json()) == (200, {"name": "beat", "paused": True})
    listed = (await client.get("/schedules")).json()["schedules"][0]
    assert (listed["paused"], listed["next_run_at"]) == (True, None)
    assert db.execute("SELECT paused FROM ledgerq.task_schedules").fetchone() == (True,)

    response = await client.post("/schedules/beat/resume")
    assert (response.status_code, response.json()) == (200, {"name": "beat", "paused": False})
    assert db.execute("SELECT paused FROM ledgerq.task_schedules").fetchone() == (False,)


@pytest.mark.parametrize("action", ["pause", "resume"])
async def test_an_unknown_schedule_is_a_json_404(client: httpx.AsyncClient, action: str) -> None:
    response = await client.post(f"/schedules/missing/{action}")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "schedule 'missing' does not exist"}
    }


async def test_a_name_with_a_nul_character_is_a_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/schedules/a%00b/pause")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


async def test_schedule_routes_need_the_token_when_one_is_set(settings: config.Settings) -> None:
    async with api_client(settings, token=TOKEN) as client:
        assert (await client.get("/schedules")).status_code == 401
        assert (await client.post("/schedules/x/pause")).status_code == 401
        authorised = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/schedules", headers=authorised)).status_code == 200


async def test_the_openapi_document_describes_the_schedule_routes(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/schedules"]) == {"get"}
    for action in ("pause", "resume"):
        operation = paths[f"/schedules/{{name}}/{action}"]["post"]
        assert {"200", "404", "422"} <= set(operation["responses"])


async def test_the_read_only_token_lists_schedules_but_cannot_pause_them(
    settings: config.Settings, db: Conn
) -> None:
    add_schedule(db, "beat", "@every 5 seconds")
    async with api_client(with_roles(settings), token=ADMIN_TOKEN) as client:
        reader = {"Authorization": f"Bearer {READER_TOKEN}"}
        listed = await client.get("/schedules", headers=reader)
        assert [s["name"] for s in listed.json()["schedules"]] == ["beat"]
        for action in ("pause", "resume"):
            response = await client.post(f"/schedules/beat/{action}", headers=reader)
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "forbidden"
    assert db.execute("SELECT paused FROM ledgerq.task_schedules").fetchone() == (False,)
