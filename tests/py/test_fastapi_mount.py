"""The HTTP API inside an existing FastAPI app (examples/fastapi_app.py): mounted
under /queue with ledgerq.api.lifespan, and AsyncClient in the app's own routes."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from test_public_surface import load_example

import ledgerq.api
from ledgerq import config

Conn = psycopg.Connection[Any]


@pytest.fixture
def example(settings: config.Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in {
        "LEDGERQ_DATABASE_URL": settings.database_url,
        "LEDGERQ_REDIS_URL": settings.redis_url,
        "LEDGERQ_REDIS_PREFIX": settings.redis_prefix,
    }.items():
        monkeypatch.setenv(name, value)
    return load_example("fastapi_app")


async def test_the_mounted_api_and_the_apps_own_routes_work_in_one_app(
    example: Any, db: Conn
) -> None:
    app: FastAPI = example.app
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),  # what uvicorn does for the outer app
        httpx.AsyncClient(transport=transport, base_url="http://app.test") as http,
    ):
        signed = await http.post("/signup", params={"email": "ada@example.com"})
        assert signed.status_code == 200, signed.text
        task_id = signed.json()["task_id"]
        shown = await http.get(f"/queue/tasks/{task_id}")
        assert shown.status_code == 200, shown.text
        assert (shown.json()["type"], shown.json()["payload"]) == (
            "email.send",
            {"to": "ada@example.com"},
        )
        assert (await http.get("/queue/readyz")).status_code == 200

        db.execute("SELECT ledgerq.cancel_task(%s)", (task_id,))
        status = await http.get(f"/signup/{task_id}")
        assert status.json()["status"] == "CANCELLED"


async def test_a_mounted_api_without_its_lifespan_says_how_to_start_it(
    settings: config.Settings,
) -> None:
    outer = FastAPI()
    outer.mount("/queue", ledgerq.api.create_app(settings))
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as http:
        reply = await http.get("/queue/tasks/1")
    # The public answer names only what is down; the log says to run the lifespan.
    assert reply.status_code == 503
