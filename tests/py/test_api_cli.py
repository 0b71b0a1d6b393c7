"""``ledgerq api`` as a real process: serves, authenticates, refuses what it must,
and stops cleanly on SIGTERM."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import httpx
import psycopg
import pytest
from api_support import LEDGERQ, TOKEN, api_process, command_env, free_port

from ledgerq import config

pytestmark = pytest.mark.e2e


def test_ledgerq_api_serves_tasks_and_exits_0_on_sigterm(settings: config.Settings) -> None:
    with api_process(settings) as api, httpx.Client(base_url=api.base_url) as http:
        created = http.post("/tasks", json={"type": "email.send", "payload": {"to": "a@b.c"}})
        fetched = http.get(f"/tasks/{created.json()['id']}")
        ready = http.get("/readyz")
        exit_status = api.stop()

    assert created.status_code == 201
    assert fetched.status_code == 200
    assert fetched.json()["payload"] == {"to": "a@b.c"}
    assert ready.status_code == 200
    assert exit_status == 0


def test_ledgerq_api_with_a_token_requires_it(settings: config.Settings) -> None:
    with (
        api_process(settings, "--api-token", TOKEN) as api,
        httpx.Client(base_url=api.base_url) as http,
    ):
        without = http.post("/tasks", json={"type": "a"})
        with_token = http.post(
            "/tasks", json={"type": "a"}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        health = http.get("/healthz")

    assert without.status_code == 401
    assert with_token.status_code == 201
    assert health.status_code == 200


def run_api(settings: config.Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LEDGERQ, "api", "--port", str(free_port()), *args],
        env=command_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "api.example.com"])
def test_ledgerq_api_refuses_a_public_address_without_a_token(
    settings: config.Settings, host: str
) -> None:
    result = run_api(settings, "--host", host)

    assert result.returncode == 2
    assert result.stderr.startswith(f"ledgerq: refusing to serve on {host} without an API token")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_ledgerq_api_refuses_a_read_only_token_without_an_admin_token(
    settings: config.Settings,
) -> None:
    result = run_api(settings, "--api-readonly-token", "reader-0123456789")

    assert result.returncode == 2  # invalid configuration, like every command's
    assert result.stderr == (
        "ledgerq: a read-only API token needs an admin API token (LEDGERQ_API_TOKEN) too\n"
    )
    assert "reader-0123456789" not in result.stderr


def test_ledgerq_api_read_only_token_from_the_environment_reads_and_is_refused_changes(
    settings: config.Settings,
) -> None:
    reader = "reader-0123456789"
    port = free_port()
    env = {
        **command_env(settings),
        "LEDGERQ_API_TOKEN": TOKEN,
        "LEDGERQ_API_READONLY_TOKEN": reader,
    }
    proc = subprocess.Popen(
        [LEDGERQ, "api", "--port", str(port), "--log-level", "WARNING"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "ledgerq api did not start"
                    time.sleep(0.05)
            auth = {"authorization": f"Bearer {reader}"}
            listed = http.get("/tasks", headers=auth)
            refused = http.post("/tasks", json={"type": "a"}, headers=auth)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)

    assert listed.status_code == 200
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    assert reader not in output and TOKEN not in output


def test_ledgerq_api_refuses_a_token_too_short(settings: config.Settings) -> None:
    result = run_api(settings, "--api-token", "short")

    assert result.returncode == 2  # invalid configuration, like every command's
    assert result.stderr == "ledgerq: API token must be at least 8 characters\n"


def test_ledgerq_api_serves_the_ledger_without_redis_and_readyz_says_so(
    settings: config.Settings,
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    with (
        api_process(settings, "--redis-url", down) as api,
        httpx.Client(base_url=api.base_url) as http,
    ):
        created = http.post("/tasks", json={"type": "email.send"})
        fetched = http.get(f"/tasks/{created.json()['id']}")
        ready = http.get("/readyz")
        exit_status = api.stop()

    assert (created.status_code, fetched.status_code) == (201, 200)
    assert ready.status_code == 503
    assert "Redis" in ready.text
    assert exit_status == 0


def test_ledgerq_api_with_postgresql_unreachable_exits_with_one_line(
    settings: config.Settings,
) -> None:
    result = run_api(
        settings, "--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    )

    assert result.returncode == 1
    assert result.stderr.startswith("ledgerq: PostgreSQL is unavailable")
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_ledgerq_api_stopping_answers_open_waits_at_once_and_exits_0(
    settings: config.Settings, db: psycopg.Connection[Any]
) -> None:
    (row,) = db.execute("SELECT id FROM ledgerq.enqueue_task(task_type => 'slow')").fetchall()
    replies: list[httpx.Response] = []
    with api_process(settings) as api, httpx.Client(base_url=api.base_url, timeout=90) as http:
        waiter = threading.Thread(
            target=lambda: replies.append(http.get(f"/tasks/{row[0]}", params={"wait": 60}))
        )
        waiter.start()
        deadline = time.monotonic() + 20
        while not _listening(db) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _listening(db), "the wait never started listening"
        started = time.monotonic()
        exit_status = api.stop()
        waiter.join(30)
        took_s = time.monotonic() - started

    assert exit_status == 0
    assert [(r.status_code, r.json()["status"]) for r in replies] == [(200, "PENDING")]
    assert took_s < 10, f"stopping took {took_s:.1f} s with a 60 s wait open"


def _listening(db: psycopg.Connection[Any]) -> bool:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN ledgerq_final%%'"
        " AND pid <> pg_backend_pid()"
    ).fetchone()
    return bool(row and row[0])
