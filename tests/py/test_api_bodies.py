"""Bad request bodies: each gets a 4xx JSON error naming the field, nothing reaches
the ledger, and the app goes on serving (the next valid request succeeds)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from api_support import api_client

from ledgerq import config

Db = psycopg.Connection[tuple[Any, ...]]
JSON = {"content-type": "application/json"}


@pytest.fixture
async def client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_BODIES: list[tuple[str, bytes, str, str]] = [
    # (case, body, error code, start of the message: the field it names)
    ("not JSON", b"{type: email}", "invalid_json", "body: not valid JSON"),
    ("truncated JSON", b'{"type": "a"', "invalid_json", "body: not valid JSON"),
    ("invalid UTF-8", b'{"type": "caf\xe9"}', "invalid_json", "body: not valid UTF-8"),
    ("empty body", b"", "invalid_input", "body: a JSON object is required"),
    ("body is an array", b"[1, 2]", "invalid_input", "body:"),
    ("body is a string", b'"email.send"', "invalid_input", "body:"),
    ("type missing", b'{"payload": {}}', "invalid_input", "type: Field required"),
    ("type not a string", b'{"type": 5}', "invalid_input", "type:"),
    ("type blank", b'{"type": "   "}', "invalid_input", "type: must not be blank"),
    ("type too long", json.dumps({"type": "x" * 201}).encode(), "invalid_input", "type:"),
    ("payload not an object", b'{"type": "a", "payload": [1]}', "invalid_input", "payload:"),
    ("payload a string", b'{"type": "a", "payload": "{}"}', "invalid_input", "payload:"),
    ("priority a string", b'{"type": "a", "priority": "5"}', "invalid_input", "priority:"),
    ("priority a float", b'{"type": "a", "priority": 1.5}', "invalid_input", "priority:"),
    ("priority a bool", b'{"type": "a", "priority": true}', "invalid_input", "priority:"),
    ("priority too big", b'{"type": "a", "priority": 40000}', "invalid_input", "priority:"),
    ("max_attempts zero", b'{"type": "a", "max_attempts": 0}', "invalid_input", "max_attempts:"),
    ("negative delay", b'{"type": "a", "delay_seconds": -1}', "invalid_input", "delay_seconds:"),
    ("delay a string", b'{"type": "a", "delay_seconds": "5"}', "invalid_input", "delay_seconds:"),
    (
        "run_at and delay together",
        b'{"type": "a", "delay_seconds": 5, "run_at": "2030-01-01T00:00:00Z"}',
        "invalid_input",
        "body: give run_at or delay_seconds, not both",
    ),
    (
        "run_at without zone",
        b'{"type": "a", "run_at": "2030-01-01T00:00:00"}',
        "invalid_input",
        "run_at:",
    ),
    ("run_at a number", b'{"type": "a", "run_at": 1700000000}', "invalid_input", "run_at:"),
    (
        "run_at past year 9999 in UTC",
        b'{"type": "a", "run_at": "9999-12-31T23:59:59-14:00"}',
        "invalid_input",
        "run_at: must fall within years 1 to 9999 in UTC",
    ),
    (
        "run_at before year 1 in UTC",
        b'{"type": "a", "run_at": "0001-01-01T00:00:00+14:00"}',
        "invalid_input",
        "run_at: must fall within years 1 to 9999 in UTC",
    ),
    ("run_at infinity", b'{"type": "a", "run_at": "infinity"}', "invalid_input", "run_at:"),
    (
        "run_at year 10000",
        b'{"type": "a", "run_at": "+10000-01-01T00:00:00Z"}',
        "invalid_input",
        "run_at:",
    ),
    (
        "max_attempts over int32",
        b'{"type": "a", "max_attempts": 2147483648}',
        "invalid_input",
        "max_attempts:",
    ),
    ("max_attempts 2.5", b'{"type": "a", "max_attempts": 2.5}', "invalid_input", "max_attempts:"),
    ("run_at not a date", b'{"type": "a", "run_at": "tomorrow"}', "invalid_input", "run_at:"),
    (
        "empty idempotency_key",
        b'{"type": "a", "idempotency_key": ""}',
        "invalid_input",
        "idempotency_key:",
    ),
    (
        "misspelt field",
        b'{"type": "a", "delay_second": 5}',
        "invalid_input",
        "delay_second: Extra inputs",
    ),
    (
        "deeply nested payload",
        b'{"type": "a", "payload": {"x": ' + nested(100).encode() + b"}}",
        "invalid_json",
        "body: JSON nests deeper than 64 levels",
    ),
    ("deeply nested body", nested(100_000).encode(), "invalid_json", "body: JSON nests deeper"),
    ("NaN", b'{"type": "a", "payload": {"x": NaN}}', "invalid_json", "body: NaN is not valid JSON"),
    ("Infinity", b'{"type": "a", "payload": {"x": -Infinity}}', "invalid_json", "body: -Infinity"),
    (
        "huge number",
        b'{"type": "a", "payload": {"x": 1e400}}',
        "invalid_json",
        "body: the number 1e400",
    ),
    (
        "NUL in payload",
        b'{"type": "a", "payload": {"note": "a\\u0000b"}}',
        "invalid_json",
        "payload.note:",
    ),
    ("NUL in a key", b'{"type": "a", "payload": {"k\\u0000": 1}}', "invalid_json", "payload:"),
    ("lone surrogate", b'{"type": "\\ud800"}', "invalid_json", "type:"),
]


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
async def test_bad_body_is_refused_with_a_json_error_and_the_app_keeps_serving(
    client: httpx.AsyncClient, db: Db, body: bytes, code: str, message: str
) -> None:
    response = await client.post("/tasks", content=body, headers=JSON)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"].startswith(message), error["message"]
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)
    after = await client.post("/tasks", json={"type": "email.send"})
    assert after.status_code == 201


async def test_escaped_backslash_before_u0000_is_an_ordinary_string(
    client: httpx.AsyncClient,
) -> None:
    # "\\u0000" is a backslash followed by the text u0000, which jsonb stores fine.
    response = await client.post(
        "/tasks", content=b'{"type": "a", "payload": {"p": "C:\\\\u0000"}}', headers=JSON
    )

    assert response.status_code == 201
    assert response.json()["payload"] == {"p": "C:\\u0000"}


async def test_surrogate_pairs_are_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/tasks", content=b'{"type": "a", "payload": {"e": "\\ud83d\\ude00"}}', headers=JSON
    )

    assert response.status_code == 201
    assert response.json()["payload"] == {"e": "\U0001f600"}


async def test_non_json_content_type_is_422_saying_what_to_send(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/tasks", content=b'{"type": "a"}', headers={"content-type": "text/plain"}
    )

    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "body: must be a JSON object sent with Content-Type: application/json"
    )


async def test_body_over_the_limit_is_413(settings: config.Settings, db: Db) -> None:
    async with api_client(settings, max_body_bytes=1000) as client:
        at_limit = json.dumps({"type": "a", "payload": {"x": "y" * 900}}).encode().ljust(1000)
        over = json.dumps({"type": "a", "payload": {"x": "y" * 1000}}).encode()

        accepted = await client.post("/tasks", content=at_limit, headers=JSON)
        refused = await client.post("/tasks", content=over, headers=JSON)
        after = await client.post("/tasks", json={"type": "a"})

    assert accepted.status_code == 201
    assert refused.status_code == 413
    assert refused.json() == {
        "error": {"code": "body_too_large", "message": "request body is over 1000 bytes"}
    }
    assert after.status_code == 201
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (2,)


async def test_default_limit_is_one_mebibyte(client: httpx.AsyncClient) -> None:
    prefix, suffix = b'{"type": "a", "payload": {"x": "', b'"}}'
    filler = (1 << 20) - len(prefix) - len(suffix)

    exact = await client.post("/tasks", content=prefix + b"y" * filler + suffix, headers=JSON)
    over = await client.post("/tasks", content=prefix + b"y" * (filler + 1) + suffix, headers=JSON)

    assert exact.status_code == 201
    assert over.status_code == 413


async def test_body_limit_holds_without_a_content_length(settings: config.Settings) -> None:
    chunks_sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        yield b'{"type": "a", "payload": {"x": "'
        for _ in range(1000):  # 1000 x 1 KiB: far over the limit
            chunks_sent += 1
            yield b"y" * 1024
        yield b'"}}'

    async with api_client(settings, max_body_bytes=10_000) as client:
        response = await client.post("/tasks", content=stream(), headers=JSON)

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    # The server stopped reading soon after the limit, not at the end of the stream.
    assert chunks_sent < 20


async def test_batch_item_errors_name_the_item_and_field(client: httpx.AsyncClient) -> None:
    cases = {
        b'{"tasks": [{"type": "a"}, {"type": "b", "payload": 3}]}': "tasks[1].payload:",
        b'{"tasks": [{"type": "a", "delay_seconds": -5}]}': "tasks[0].delay_seconds:",
        b'{"tasks": {"type": "a"}}': "tasks:",
        b'{"task": []}': "tasks: Field required",
        b'{"tasks": [{"type": "a", "payload": {"n": "\\u0000"}}]}': "tasks[0].payload.n:",
    }
    for body, message in cases.items():
        response = await client.post("/tasks/batch", content=body, headers=JSON)
        assert response.status_code == 422, body
        assert response.json()["error"]["message"].startswith(message), response.json()


@pytest.mark.parametrize("path", ["/tasks", "/tasks/batch"])
async def test_run_at_at_the_edges_of_time_is_refused_before_anything_commits(
    client: httpx.AsyncClient, db: Db, path: str
) -> None:
    for run_at in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):
        task = {"type": "a", "run_at": run_at}
        body = {"tasks": [task]} if path.endswith("batch") else task
        response = await client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert "run_at" in response.json()["error"]["message"]
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)


async def test_run_at_at_the_last_and_first_utc_second_is_stored_and_read_back(
    client: httpx.AsyncClient,
) -> None:
    for run_at, utc in (
        ("9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59+00:00"),
        ("9999-12-31T23:59:59+14:00", "9999-12-31T09:59:59+00:00"),
        ("0001-01-01T00:00:00-14:00", "0001-01-01T14:00:00+00:00"),
    ):
        created = await client.post("/tasks", json={"type": "a", "run_at": run_at})
        assert created.status_code == 201, created.text
        fetched = await client.get(f"/tasks/{created.json()['id']}")
        assert fetched.status_code == 200
        assert fetched.json()["run_at"] == utc
    listed = await client.get("/tasks")
    assert listed.status_code == 200 and len(listed.json()["tasks"]) == 3


@pytest.mark.parametrize("path", ["/tasks", "/tasks/batch"])
async def test_integral_floats_are_integers_and_max_attempts_bounds_agree(
    client: httpx.AsyncClient, path: str
) -> None:
    task = {"type": "a", "priority": 5.0, "max_attempts": 2147483647}
    response = await client.post(path, json={"tasks": [task]} if path.endswith("batch") else task)
    assert response.status_code in (200, 201), response.text
    task_id = (
        response.json()["results"][0]["id"] if path.endswith("batch") else response.json()["id"]
    )
    stored = (await client.get(f"/tasks/{task_id}")).json()
    assert (stored["priority"], stored["max_attempts"]) == (5, 2147483647)


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_tasks_batch_answers_405_to_any_method_but_post(
    client: httpx.AsyncClient, method: str
) -> None:
    response = await client.request(method, "/tasks/batch")
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
