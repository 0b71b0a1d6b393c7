"""The HTTP API's operations side: health and readiness, auth, metrics, queues,
the app's own lifespan, and errors that are always JSON."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from api_support import TOKEN, api_client, free_port
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from ledgerq import config
from ledgerq.api import create_app
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger

Db = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
async def client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


# --- health -----------------------------------------------------------------------------


async def test_healthz_and_readyz_answer_ok_when_everything_is_up(
    client: httpx.AsyncClient,
) -> None:
    health = await client.get("/healthz")
    ready = await client.get("/readyz")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ok"})


async def test_readyz_is_503_naming_redis_when_redis_is_unreachable(
    settings: config.Settings,
) -> None:
    dead_redis = Dispatch.connect(f"redis://127.0.0.1:{free_port()}/0", settings.redis_prefix)
    try:
        async with api_client(settings, dispatch=dead_redis) as client:
            ready = await client.get("/readyz")
            health = await client.get("/healthz")
    finally:
        await dead_redis.close()

    assert ready.status_code == 503
    body = ready.json()
    assert body["error"]["code"] == "not_ready"
    # Nothing of the driver's message (host, port) reaches a public route.
    assert body["error"]["message"] == "Redis unavailable"
    assert body["checks"] == {"postgresql": "ok", "redis": "unavailable"}
    assert "127.0.0.1" not in ready.text
    assert health.status_code == 200


async def test_readyz_is_503_naming_postgresql_when_it_is_unreachable(
    settings: config.Settings,
) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        min_size=1,
        open=False,
        timeout=0.5,
    )
    await pool.open(wait=False)
    try:
        async with api_client(settings, ledger=AsyncLedger(pool)) as client:
            ready = await client.get("/readyz")
            enqueue = await client.post("/tasks", json={"type": "a"})
    finally:
        await pool.close()

    assert ready.status_code == 503
    body = ready.json()
    assert body["error"]["message"] == "PostgreSQL unavailable"
    assert body["checks"] == {"postgresql": "unavailable", "redis": "ok"}
    assert "127.0.0.1" not in ready.text
    assert enqueue.status_code == 503
    assert enqueue.json()["error"] == {"code": "unavailable", "message": "PostgreSQL unavailable"}


# --- auth -----------------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/tasks"),
    ("POST", "/tasks/batch"),
    ("GET", "/tasks"),
    ("GET", "/tasks/1"),
    ("POST", "/tasks/1/cancel"),
    ("POST", "/tasks/1/retry"),
    ("GET", "/queues"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/no-such-route"),
]


@pytest.fixture
async def secured(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings, token=TOKEN) as c:
        yield c


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token-000000", f"Basic {TOKEN}", TOKEN, "Bearer "]
)
async def test_with_a_token_set_every_route_but_health_needs_it(
    secured: httpx.AsyncClient, method: str, path: str, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}

    response = await secured.request(method, path, headers=headers, json={"type": "a"})

    assert response.status_code == 401
    assert response.json() == {
        "error": {"code": "unauthorized", "message": "missing or invalid bearer token"}
    }
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_the_right_token_gets_through(
    secured: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await secured.request(
        method, path, headers={"authorization": f"Bearer {TOKEN}"}, json={"tasks": []}
    )

    assert response.status_code != 401


async def test_the_bearer_scheme_is_case_insensitive(secured: httpx.AsyncClient) -> None:
    response = await secured.post(
        "/tasks", json={"type": "a"}, headers={"authorization": f"bearer {TOKEN}"}
    )

    assert response.status_code == 201


async def test_health_checks_stay_open_with_a_token_set(secured: httpx.AsyncClient) -> None:
    assert (await secured.get("/healthz")).status_code == 200
    assert (await secured.get("/readyz")).status_code == 200


async def test_without_a_token_set_no_route_asks_for_one(client: httpx.AsyncClient) -> None:
    assert (await client.post("/tasks", json={"type": "a"})).status_code == 201
    assert (await client.get("/queues")).status_code == 200


async def test_openapi_declares_the_bearer_scheme_only_when_a_token_is_set(
    secured: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    secured_schema = (
        await secured.get("/openapi.json", headers={"authorization": f"Bearer {TOKEN}"})
    ).json()
    open_schema = (await client.get("/openapi.json")).json()

    assert secured_schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert secured_schema["paths"]["/tasks"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in secured_schema["paths"]["/healthz"]["get"]
    assert "securitySchemes" not in open_schema.get("components", {})


# --- errors are JSON ---------------------------------------------------------------------------


async def test_unknown_route_is_404_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/nowhere")

    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "no such route"}}


async def test_wrong_method_is_405_json(client: httpx.AsyncClient) -> None:
    response = await client.delete("/tasks")

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_an_unexpected_exception_is_a_generic_500_logged_server_side(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/boom", boom)  # type: ignore[attr-defined]

    with caplog.at_level(logging.ERROR, logger="ledgerq.api"):
        response = await client.get("/boom")
    after = await client.get("/healthz")

    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "code": "internal_error",
            "message": "internal error; the server log has the details",
        }
    }
    assert "secret" not in response.text
    (record,) = [r for r in caplog.records if r.name == "ledgerq.api"]
    assert record.getMessage() == "unhandled error in GET /boom"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "secret internals"
    assert after.status_code == 200


# --- metrics ---------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_metrics_has_the_contract_names(client: httpx.AsyncClient) -> None:
    await client.post("/tasks", json={"type": "a"})

    text = (await client.get("/metrics")).text
    names = {family.name for family in text_string_to_metric_families(text)}

    assert {
        "ledgerq_tasks_enqueued", "ledgerq_tasks_started", "ledgerq_tasks_succeeded",
        "ledgerq_tasks_retried", "ledgerq_tasks_dead", "ledgerq_tasks_cancelled",
        "ledgerq_task_duration_seconds", "ledgerq_pickup_latency_seconds",
        "ledgerq_worker_inflight", "ledgerq_queue_depth", "ledgerq_queue_oldest_pending_seconds",
        "ledgerq_queue_paused", "ledgerq_claims_deferred",
    } <= names  # fmt: skip
    assert "ledgerq_tasks_enqueued_total{" in text


async def test_enqueued_counter_counts_tasks_the_api_created(client: httpx.AsyncClient) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"  # the registry is process-wide: labels of our own
    key = ("ledgerq_tasks_enqueued_total", frozenset({("type", "a"), ("queue", queue)}))
    before = (await scrape(client)).get(key, 0.0)

    await client.post("/tasks", json={"type": "a", "queue": queue, "idempotency_key": queue})
    await client.post("/tasks", json={"type": "a", "queue": queue, "idempotency_key": queue})
    await client.post("/tasks/batch", json={"tasks": [{"type": "a", "queue": queue}] * 3})
    await client.post("/tasks", json={"type": "a", "queue": queue, "priority": "x"})

    assert (await scrape(client))[key] == before + 4  # the replay and the 422 add nothing


async def test_queue_depth_gauges_follow_the_ledger_at_each_scrape(
    client: httpx.AsyncClient,
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    pending = ("ledgerq_queue_depth", frozenset({("queue", queue), ("status", "PENDING")}))
    cancelled_ids = []
    for _ in range(3):
        response = await client.post("/tasks", json={"type": "a", "queue": queue})
        cancelled_ids.append(response.json()["id"])
    await client.post(f"/tasks/{cancelled_ids[0]}/cancel")

    first = await scrape(client)
    for task_id in cancelled_ids[1:]:
        await client.post(f"/tasks/{task_id}/cancel")
    second = await scrape(client)

    assert first[pending] == 2
    assert first[("ledgerq_queue_oldest_pending_seconds", frozenset({("queue", queue)}))] >= 0
    assert second[pending] == 0  # drained: reads 0 rather than vanishing


async def test_queue_paused_gauge_follows_pause_and_resume(client: httpx.AsyncClient) -> None:
    idle, busy = (f"q-{uuid.uuid4().hex[:8]}" for _ in range(2))
    await client.post("/tasks", json={"type": "a", "queue": busy})
    await client.post(f"/queues/{idle}/pause")  # a queue with no task at all

    first = await scrape(client)
    await client.post(f"/queues/{idle}/resume")
    await client.post(f"/queues/{busy}/pause")
    second = await scrape(client)

    def paused(found: dict[Any, float], queue: str) -> float | None:
        return found.get(("ledgerq_queue_paused", frozenset({("queue", queue)})))

    assert (paused(first, idle), paused(first, busy)) == (1, 0)
    assert (paused(second, idle), paused(second, busy)) == (0, 1)


# --- queues ------------------------------------------------------------------------------------


async def test_queues_reports_counts_age_and_last_minutes_finishes(
    client: httpx.AsyncClient,
) -> None:
    ids = [
        (await client.post("/tasks", json={"type": "a", "queue": "mail"})).json()["id"]
        for _ in range(3)
    ]
    await client.post("/tasks", json={"type": "a", "queue": "later", "delay_seconds": 600})
    await client.post(f"/tasks/{ids[0]}/cancel")

    response = await client.get("/queues")

    assert response.status_code == 200
    queues = {q["queue"]: q for q in response.json()["queues"]}
    assert list(queues) == ["later", "mail"]
    mail = queues["mail"]
    assert mail["counts"] == {
        "PENDING": 2, "QUEUED": 0, "RUNNING": 0, "SUCCEEDED": 0, "DEAD": 0, "CANCELLED": 1,
    }  # fmt: skip
    assert mail["finished_last_minute"] == 1
    assert 0 <= mail["oldest_pending_age_seconds"] < 60
    # A task not yet due is not waiting: no age.
    assert queues["later"]["oldest_pending_age_seconds"] is None
    assert queues["later"]["counts"]["PENDING"] == 1


# --- lifespan ----------------------------------------------------------------------------------


async def test_app_opens_and_closes_its_own_connections_when_given_none(
    settings: config.Settings,
) -> None:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        ready = await client.get("/readyz")
        created = await client.post("/tasks", json={"type": "a"})
        services = app.state.services

    assert ready.status_code == 200
    assert created.status_code == 201
    assert app.state.services is None
    assert services.ledger.closed
