"""The dashboard over HTTP: sign-in, roles, cookie flags, CSRF, escaping, and
every page and action against real PostgreSQL and Redis."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_support import api_client
from fastapi.routing import APIRoute
from ui_support import (
    ADMIN_TOKEN,
    READER_TOKEN,
    Db,
    csrf_of,
    enqueue,
    make_dead,
    make_succeeded,
    queue_paused,
    queue_settings,
    status_of,
    with_roles,
)

from ledgerq import config

CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
async def open_client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


@pytest.fixture
async def roles_client(settings: config.Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a dashboard with an admin and a read-only token; nobody signed in."""
    async with api_client(with_roles(settings), token=ADMIN_TOKEN) as c:
        yield c


async def sign_in(client: httpx.AsyncClient, token: str) -> str:
    """Sign client in with token; the CSRF token of its session."""
    response = await client.post("/ui/login", data={"token": token})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ui/"
    page = await client.get("/ui/")
    assert page.status_code == 200
    return csrf_of(page.text)


def changing_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path with sample parameters) of every changing route of app."""
    samples = {"{task_id}": "1", "{queue}": "default", "{name}": "nightly"}
    found = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        for method in sorted(route.methods & CHANGING):
            path = route.path
            for param, value in samples.items():
                path = path.replace(param, value)
            assert "{" not in path, f"no sample value for a parameter of {route.path}"
            found.append((method, path))
    return found


# --- an open dashboard ----------------------------------------------------------------


async def test_open_dashboard_shows_queues_and_issues_a_strict_httponly_cookie(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    enqueue(db, queue="mail")
    make_dead(db, queue="mail")
    response = await open_client.get("/ui/")
    assert response.status_code == 200
    assert 'data-queue="mail"' in response.text
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("ledgerq_session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= flags
    assert "secure" not in flags  # plain HTTP, no trusted proxy
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


async def test_every_page_renders(open_client: httpx.AsyncClient, db: Db) -> None:
    dead = make_dead(db)
    for path in ("/ui/", "/ui/tasks", f"/ui/tasks/{dead}", "/ui/dead", "/ui/schedules",
                 "/ui/workers", "/ui/tasks?status=DEAD&queue=default&type=email.send"):  # fmt: skip
        response = await open_client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"].startswith("text/html")


async def test_ui_root_and_login_redirect_in_an_open_dashboard(
    open_client: httpx.AsyncClient,
) -> None:
    assert (await open_client.get("/ui")).headers["location"] == "/ui/"
    assert (await open_client.get("/ui/login")).headers["location"] == "/ui/"


async def test_unknown_task_page_is_404(open_client: httpx.AsyncClient) -> None:
    response = await open_client.get("/ui/tasks/424242")
    assert response.status_code == 404
    assert "Task 424242 does not exist." in response.text


async def test_blank_filters_mean_no_filter_and_a_bad_status_is_422(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    task_id = enqueue(db)
    response = await open_client.get("/ui/tasks?status=&queue=&type=")
    assert response.status_code == 200
    assert f'href="/ui/tasks/{task_id}"' in response.text
    assert (await open_client.get("/ui/tasks?status=NOPE")).status_code == 422
    assert (await open_client.get("/ui/tasks?queue=a%00b")).status_code == 422


async def test_search_finds_a_task_by_id_and_by_idempotency_key(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    keyed = enqueue(db, idempotency_key="order-77")
    other = enqueue(db)
    by_key = await open_client.get("/ui/tasks", params={"q": "order-77"})
    assert f'href="/ui/tasks/{keyed}"' in by_key.text
    assert f'href="/ui/tasks/{other}"' not in by_key.text
    by_id = await open_client.get("/ui/tasks", params={"q": str(other)})
    assert f'href="/ui/tasks/{other}"' in by_id.text
    assert f'href="/ui/tasks/{keyed}"' not in by_id.text
    none = await open_client.get("/ui/tasks", params={"q": "no-such-key"})
    assert 'id="no-tasks"' in none.text


async def test_task_page_shows_attempts_effects_and_result(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    task_id = make_succeeded(db, worker_id="worker-zeta")
    db.execute("SELECT ledgerq.record_effect('mail:42', %s)", (task_id,))
    page = (await open_client.get(f"/ui/tasks/{task_id}")).text
    assert "worker-zeta" in page
    assert "mail:42" in page
    assert "&#34;sent&#34;: true" in page or "&quot;sent&quot;: true" in page
    assert 'class="span o-succeeded"' in page


async def test_task_page_shows_the_concurrency_key_escaped(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    keyed = enqueue(db, concurrency_key="tenant-<b>7</b>")
    plain = enqueue(db)
    page = (await open_client.get(f"/ui/tasks/{keyed}")).text
    assert '<dd id="concurrency-key">tenant-&lt;b&gt;7&lt;/b&gt;</dd>' in page
    page = (await open_client.get(f"/ui/tasks/{plain}")).text
    assert '<dd id="concurrency-key">\u2013</dd>' in page


async def test_payload_and_error_holding_script_are_escaped(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    from psycopg.types.json import Jsonb

    evil = "<script>alert('x')</script>"
    task_id = make_dead(db, task_type=evil, error=evil, payload=Jsonb({"html": evil}), queue=evil)
    for path in (f"/ui/tasks/{task_id}", "/ui/dead", "/ui/tasks", "/ui/"):
        page = (await open_client.get(path)).text
        assert "<script>alert" not in page, path
        assert "&lt;script&gt;alert(" in page, path


async def test_overview_counts_live_statuses_and_the_last_hour(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    for _ in range(3):
        enqueue(db, queue="q1")
    make_dead(db, queue="q1")
    make_succeeded(db, queue="q1")
    make_succeeded(db, queue="q1")
    page = (await open_client.get("/ui/")).text
    row = re.search(r'<tr data-queue="q1">(.*?)</tr>', page, re.S)
    assert row is not None
    cells = re.findall(r'<td class="num[^"]*">(?:<a [^>]*>)?([^<]*)', row.group(1))
    # pending, queued, running, dead, succeeded (1 h), cancelled (1 h), oldest pending
    assert cells[:6] == ["3", "0", "0", "1", "2", "0"]
    assert "(3 tasks; peak 3/min)" in page


async def test_workers_page_lists_workers_from_registrations_and_attempts(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    db.execute(
        "INSERT INTO ledgerq.workers (worker_id, queues, task_types, concurrency) "
        "VALUES ('registered-1', '{mail}', '{email.send}', 4)"
    )
    make_succeeded(db, worker_id="attempt-only-2")
    db.execute(
        "INSERT INTO ledgerq.workers (worker_id, queues, task_types, concurrency, last_seen_at) "
        "VALUES ('long-gone-3', '{mail}', '{email.send}', 4, now() - interval '10 minutes')"
    )
    page = (await open_client.get("/ui/workers")).text
    assert "registered-1" in page
    assert "attempt-only-2" in page
    assert "long-gone-3" not in page


async def test_retry_through_the_dashboard_moves_a_dead_task_to_pending(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    task_id = make_dead(db)
    csrf = csrf_of((await open_client.get(f"/ui/tasks/{task_id}")).text)
    response = await open_client.post(f"/ui/tasks/{task_id}/retry", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/tasks/{task_id}"
    assert status_of(db, task_id) == "PENDING"
    again = await open_client.post(f"/ui/tasks/{task_id}/retry", data={"csrf_token": csrf})
    assert again.status_code == 409
    assert "only DEAD or CANCELLED" in again.text


async def test_cancel_through_the_dashboard(open_client: httpx.AsyncClient, db: Db) -> None:
    task_id = enqueue(db)
    csrf = csrf_of((await open_client.get(f"/ui/tasks/{task_id}")).text)
    response = await open_client.post(f"/ui/tasks/{task_id}/cancel", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert status_of(db, task_id) == "CANCELLED"


async def test_retry_selected_retries_only_the_selected(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    a, b, c = make_dead(db), make_dead(db), make_dead(db)
    csrf = csrf_of((await open_client.get("/ui/dead")).text)
    response = await open_client.post(
        "/ui/dead/retry", data={"csrf_token": csrf, "task_id": [str(a), str(c), "junk"]}
    )
    assert response.status_code == 303
    assert [status_of(db, t) for t in (a, b, c)] == ["PENDING", "DEAD", "PENDING"]


async def test_retry_all_of_a_queue_leaves_other_queues_dead(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    mail = [make_dead(db, queue="mail") for _ in range(3)]
    other = make_dead(db, queue="other")
    csrf = csrf_of((await open_client.get("/ui/dead?queue=mail")).text)
    response = await open_client.post(
        "/ui/dead/retry-all", data={"csrf_token": csrf, "queue": "mail"}
    )
    assert response.status_code == 303
    assert {status_of(db, t) for t in mail} == {"PENDING"}
    assert status_of(db, other) == "DEAD"


async def test_queue_forms_pause_resume_and_configure_through_the_ledger(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    enqueue(db, queue="mail")
    csrf = csrf_of((await open_client.get("/ui/")).text)
    paused = await open_client.post("/ui/queues/mail/pause", data={"csrf_token": csrf})
    assert (paused.status_code, paused.headers["location"]) == (303, "/ui/")
    assert queue_paused(db, "mail")
    saved = await open_client.post(
        "/ui/queues/mail/settings",
        data={"csrf_token": csrf, "max_running": "4", "rate_per_second": "0.5", "burst": ""},
    )
    assert saved.status_code == 303
    assert queue_settings(db, "mail") == {"max_running": 4, "rate_per_second": 0.5}
    page = (await open_client.get("/ui/")).text
    row = re.search(r'<tr data-queue="mail">(.*?)</tr>', page, re.S)
    assert row is not None and "paused" in row.group(1) and "max_running=4" in row.group(1)

    refused = await open_client.post(
        "/ui/queues/mail/settings", data={"csrf_token": csrf, "max_running": "many"}
    )
    assert refused.status_code == 422
    assert "max_running: must be a number" in refused.text
    refused = await open_client.post(
        "/ui/queues/mail/settings", data={"csrf_token": csrf, "per_key_max_running": "-1"}
    )
    assert refused.status_code == 422
    assert "per_key_max_running" in refused.text
    assert queue_settings(db, "mail") == {"max_running": 4, "rate_per_second": 0.5}

    resumed = await open_client.post("/ui/queues/mail/resume", data={"csrf_token": csrf})
    assert resumed.status_code == 303
    assert not queue_paused(db, "mail")


async def test_a_post_without_or_with_a_wrong_csrf_token_is_refused(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    task_id = make_dead(db)
    await open_client.get("/ui/")  # a session cookie, but no token in the form
    missing = await open_client.post(f"/ui/tasks/{task_id}/retry", data={})
    wrong = await open_client.post(f"/ui/tasks/{task_id}/retry", data={"csrf_token": "x" * 43})
    assert (missing.status_code, wrong.status_code) == (403, 403)
    assert "CSRF" in missing.text
    assert status_of(db, task_id) == "DEAD"


async def test_a_csrf_token_of_another_session_is_refused(
    settings: config.Settings, db: Db
) -> None:
    task_id = make_dead(db)
    async with api_client(with_roles(settings), token=ADMIN_TOKEN) as first:
        other_csrf = await sign_in(first, ADMIN_TOKEN)
        first.cookies.clear()
        await sign_in(first, ADMIN_TOKEN)  # a new session: a new CSRF token
        response = await first.post(f"/ui/tasks/{task_id}/retry", data={"csrf_token": other_csrf})
    assert response.status_code == 403
    assert status_of(db, task_id) == "DEAD"


# --- roles and sessions ---------------------------------------------------------------


async def test_pages_redirect_to_login_until_signed_in(roles_client: httpx.AsyncClient) -> None:
    for path in ("/ui/", "/ui/tasks", "/ui/dead", "/ui/workers", "/ui/schedules", "/ui/tasks/1"):
        response = await roles_client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/ui/login"
    login = await roles_client.get("/ui/login")
    assert login.status_code == 200
    assert 'name="token"' in login.text


async def test_a_wrong_token_is_refused_and_never_echoed_or_logged(
    roles_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    guess = "wrong-guess-987654321"
    response = await roles_client.post("/ui/login", data={"token": guess})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert guess not in response.text
    good = await roles_client.post("/ui/login", data={"token": ADMIN_TOKEN})
    assert good.status_code == 303
    page = await roles_client.get("/ui/")
    for text in (response.text, page.text, caplog.text):
        assert guess not in text
        assert ADMIN_TOKEN not in text
        assert READER_TOKEN not in text


async def test_sign_in_sets_a_strict_httponly_cookie_and_logout_clears_it(
    roles_client: httpx.AsyncClient,
) -> None:
    response = await roles_client.post("/ui/login", data={"token": ADMIN_TOKEN})
    flags = {p.strip().lower() for p in response.headers["set-cookie"].split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= flags
    assert "secure" not in flags
    page = await roles_client.get("/ui/")
    csrf = csrf_of(page.text)
    assert 'id="role">admin<' in page.text
    without = await roles_client.post("/ui/logout", data={})
    assert without.status_code == 403
    out = await roles_client.post("/ui/logout", data={"csrf_token": csrf})
    assert out.status_code == 303
    assert out.headers["location"] == "/ui/login"
    assert "max-age=0" in out.headers["set-cookie"].lower()
    assert (await roles_client.get("/ui/")).status_code == 303


async def test_cookie_is_secure_only_behind_a_trusted_https_proxy(
    settings: config.Settings,
) -> None:
    https = {"X-Forwarded-Proto": "https"}
    async with api_client(with_roles(settings), token=ADMIN_TOKEN) as untrusted:
        plain = await untrusted.post("/ui/login", data={"token": ADMIN_TOKEN}, headers=https)
    async with api_client(
        with_roles(settings), token=ADMIN_TOKEN, trust_forwarded_proto=True
    ) as trusted:
        proxied = await trusted.post("/ui/login", data={"token": ADMIN_TOKEN}, headers=https)
        direct = await trusted.post("/ui/login", data={"token": ADMIN_TOKEN})
    assert "secure" not in plain.headers["set-cookie"].lower().split("; ")
    assert "secure" in proxied.headers["set-cookie"].lower().split("; ")
    assert "secure" not in direct.headers["set-cookie"].lower().split("; ")


async def test_a_forged_or_tampered_cookie_is_not_a_session(
    roles_client: httpx.AsyncClient,
) -> None:
    await roles_client.post("/ui/login", data={"token": READER_TOKEN})
    value = roles_client.cookies["ledgerq_session"]
    assert value.startswith("reader.")
    roles_client.cookies.clear()
    roles_client.cookies.set("ledgerq_session", "admin." + value.split(".", 1)[1], path="/ui")
    assert (await roles_client.get("/ui/")).status_code == 303


async def test_read_only_session_sees_every_page_with_disabled_buttons(
    roles_client: httpx.AsyncClient, db: Db
) -> None:
    task_id = make_dead(db)
    await sign_in(roles_client, READER_TOKEN)
    for path in ("/ui/", "/ui/tasks", "/ui/dead", "/ui/workers", "/ui/schedules"):
        page = await roles_client.get(path)
        assert page.status_code == 200, path
        assert 'id="readonly-notice"' in page.text
    task_page = (await roles_client.get(f"/ui/tasks/{task_id}")).text
    assert re.search(r'<button type="submit" class="" id="retry" disabled', task_page)


async def test_read_only_session_is_refused_every_dashboard_change(
    roles_client: httpx.AsyncClient, db: Db
) -> None:
    task_id = make_dead(db)
    queued = enqueue(db)
    csrf = await sign_in(roles_client, READER_TOKEN)
    app = roles_client.app  # type: ignore[attr-defined]
    routes = [
        (m, p) for m, p in changing_routes(app)
        if p.startswith("/ui/") and p not in ("/ui/login", "/ui/logout")
    ]  # fmt: skip
    assert len(routes) >= 9
    for method, path in routes:
        path = path.replace("/tasks/1/", f"/tasks/{task_id}/")
        body = {"csrf_token": csrf, "task_id": [str(task_id)], "max_running": "3"}
        response = await roles_client.request(method, path, data=body)
        assert response.status_code == 403, (method, path, response.text)
        assert "read-only" in response.text
    cancel = await roles_client.post(f"/ui/tasks/{queued}/cancel", data={"csrf_token": csrf})
    assert cancel.status_code == 403
    assert (status_of(db, task_id), status_of(db, queued)) == ("DEAD", "PENDING")


async def test_read_only_token_reads_the_json_api_and_is_refused_every_change(
    roles_client: httpx.AsyncClient, db: Db
) -> None:
    task_id = make_dead(db)
    reader = {"Authorization": f"Bearer {READER_TOKEN}"}
    assert (await roles_client.get(f"/tasks/{task_id}", headers=reader)).status_code == 200
    assert (await roles_client.get("/queues", headers=reader)).status_code == 200
    app = roles_client.app  # type: ignore[attr-defined]
    routes = [(m, p) for m, p in changing_routes(app) if not p.startswith("/ui")]
    assert ("POST", "/tasks") in routes
    for method, path in routes:
        path = path.replace("/tasks/1/", f"/tasks/{task_id}/")
        response = await roles_client.request(method, path, json={"type": "x"}, headers=reader)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "forbidden"
    assert status_of(db, task_id) == "DEAD"
    count = db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone()
    assert count is not None and count[0] == 1
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    retried = await roles_client.post(f"/tasks/{task_id}/retry", headers=admin)
    assert retried.status_code == 200


async def test_bearer_token_does_not_open_the_dashboard(roles_client: httpx.AsyncClient) -> None:
    # The dashboard signs browsers in by cookie only; a bearer header there is ignored.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await roles_client.get("/ui/", headers=admin)).status_code == 303


def test_read_only_token_needs_an_admin_token_and_must_differ() -> None:
    from ledgerq import errors

    with pytest.raises(errors.ConfigError, match="needs an admin"):
        config.Settings(api_readonly_token=READER_TOKEN)
    with pytest.raises(errors.ConfigError, match="must differ"):
        config.Settings(api_token=ADMIN_TOKEN, api_readonly_token=ADMIN_TOKEN)
    settings = config.Settings.from_env(
        {"LEDGERQ_API_TOKEN": ADMIN_TOKEN, "LEDGERQ_API_READONLY_TOKEN": READER_TOKEN}
    )
    assert settings.api_readonly_token == READER_TOKEN


async def test_task_list_pages_older_tasks_with_before(
    open_client: httpx.AsyncClient, db: Db
) -> None:
    ids = [enqueue(db) for _ in range(53)]
    first = (await open_client.get("/ui/tasks")).text
    shown = [int(i) for i in re.findall(r'<td class="num"><a href="/ui/tasks/(\d+)"', first)]
    assert shown == ids[::-1][:50]
    link = re.search(r'href="/ui/tasks\?[^"]*before=(\d+)"', first)
    assert link is not None and int(link.group(1)) == ids[3]
    rest = (await open_client.get(f"/ui/tasks?before={link.group(1)}")).text
    older = [int(i) for i in re.findall(r'<td class="num"><a href="/ui/tasks/(\d+)"', rest)]
    assert older == ids[2::-1]
    assert "before=" not in rest
