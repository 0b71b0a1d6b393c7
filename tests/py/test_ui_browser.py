"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by
Playwright), against a real ``ledgerq api`` on real PostgreSQL and Redis.

Each test saves a screenshot of every page it visits into tests/artifacts/ui/
(git-ignored), at 1280x800 and, for some pages, at a phone's 390x844.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import ApiProcess, api_process
from playwright.sync_api import Browser, Page, expect, sync_playwright
from ui_support import (
    ADMIN_TOKEN,
    READER_TOKEN,
    Db,
    enqueue,
    ensure_schedules,
    make_dead,
    make_retried_twice_and_running,
    make_succeeded,
    queue_paused,
    queue_settings,
    schedule_paused,
    status_of,
)

from ledgerq import config

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup (it installs Debian's chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def served(settings: config.Settings, db: Db) -> Iterator[ApiProcess]:
    """``ledgerq api`` with an admin and a read-only token, and a schedule."""
    ensure_schedules(db)
    with api_process(
        settings, "--api-token", ADMIN_TOKEN, "--api-readonly-token", READER_TOKEN
    ) as api:
        yield api


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP)
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    opened.on("dialog", lambda dialog: dialog.accept())
    yield opened
    context.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, base_url: str, token: str) -> None:
    page.goto(f"{base_url}/ui/")
    expect(page).to_have_url(f"{base_url}/ui/login")
    page.fill("#token", token)
    page.click("#sign-in")
    expect(page).to_have_url(f"{base_url}/ui/")


def test_admin_signs_in_sees_queues_retries_a_dead_task_and_signs_out(
    served: ApiProcess, page: Page, db: Db
) -> None:
    base = served.base_url
    for _ in range(2):
        enqueue(db, queue="mail")
    make_succeeded(db, queue="mail", worker_id="worker-blue")
    dead = make_dead(db, queue="mail", error="SMTP 550: mailbox <unavailable>")
    page.goto(f"{base}/ui/login")
    shot(page, "login")
    sign_in(page, base, ADMIN_TOKEN)
    expect(page.locator('tr[data-queue="mail"]')).to_be_visible()
    expect(page.locator("#role")).to_have_text("admin")
    shot(page, "queues")

    page.click("text=Dead")
    expect(page.locator("#dead")).to_contain_text("SMTP 550: mailbox <unavailable>")
    shot(page, "dead")
    page.click(f'a[href="/ui/tasks/{dead}"]')
    expect(page.locator("#task-status")).to_have_text("DEAD")
    expect(page.locator("#last-error")).to_have_text("SMTP 550: mailbox <unavailable>")
    shot(page, "task-dead")
    page.click("#retry")
    expect(page).to_have_url(f"{base}/ui/tasks/{dead}")
    expect(page.locator("#task-status")).to_have_text("PENDING")
    assert status_of(db, dead) == "PENDING"
    shot(page, "task-retried")

    page.goto(f"{base}/ui/tasks?queue=mail")
    expect(page.locator("#tasks tbody tr")).to_have_count(4)
    shot(page, "tasks")
    page.goto(f"{base}/ui/workers")
    expect(page.locator("#workers")).to_contain_text("worker-blue")
    shot(page, "workers")
    page.goto(f"{base}/ui/schedules")
    expect(page.locator("#schedules")).to_contain_text("nightly-report")
    shot(page, "schedules")

    page.click("#logout")
    expect(page).to_have_url(f"{base}/ui/login")
    page.goto(f"{base}/ui/dead")
    expect(page).to_have_url(f"{base}/ui/login")


def test_task_page_shows_every_attempt_on_its_timeline(
    served: ApiProcess, page: Page, db: Db
) -> None:
    base = served.base_url
    task_id = make_retried_twice_and_running(db, ("worker-a", "worker-b", "worker-c"))
    sign_in(page, base, ADMIN_TOKEN)
    page.goto(f"{base}/ui/tasks/{task_id}")
    expect(page.locator("#task-status")).to_have_text("RUNNING")
    expect(page.locator(".timeline .span")).to_have_count(3)
    expect(page.locator(".span.o-failed")).to_have_count(2)
    expect(page.locator(".span.o-running")).to_have_count(1)
    expect(page.locator("#attempts tbody tr")).to_have_count(3)
    expect(page.locator("#attempts")).to_contain_text("gateway timeout #2")
    expect(page.locator("#cancel")).to_be_enabled()
    shot(page, "task-attempts")
    page.click("#cancel")  # confirms in a dialog, accepted by the fixture
    expect(page.locator("#task-status")).to_have_text("RUNNING")
    expect(page.locator("dl.facts")).to_contain_text("requested")
    row = db.execute("SELECT cancel_requested FROM ledgerq.tasks WHERE id = %s", (task_id,))
    assert row.fetchone() == (True,)


def test_retry_selected_and_retry_all(served: ApiProcess, page: Page, db: Db) -> None:
    base = served.base_url
    first, second, third = (make_dead(db, queue="billing") for _ in range(3))
    other = make_dead(db, queue="mail")
    sign_in(page, base, ADMIN_TOKEN)
    page.goto(f"{base}/ui/dead?queue=billing")
    page.check(f'input[name=task_id][value="{first}"]')
    page.check(f'input[name=task_id][value="{third}"]')
    page.click("#retry-selected")
    expect(page).to_have_url(f"{base}/ui/dead")
    assert [status_of(db, t) for t in (first, second, third)] == ["PENDING", "DEAD", "PENDING"]
    expect(page.locator("#dead tbody tr")).to_have_count(2)

    page.goto(f"{base}/ui/dead?queue=billing")
    expect(page.locator("#dead-total")).to_contain_text("1 in billing")
    page.click("#retry-all")  # confirms in a dialog, accepted by the fixture
    expect(page).to_have_url(f"{base}/ui/dead")
    assert status_of(db, second) == "PENDING"
    assert status_of(db, other) == "DEAD"


def test_pause_and_resume_a_queue_and_a_schedule(served: ApiProcess, page: Page, db: Db) -> None:
    base = served.base_url
    enqueue(db, queue="mail")
    # Paused through SQL with no task: the page lists it all the same.
    db.execute("SELECT ledgerq.pause_queue('idle')")
    sign_in(page, base, ADMIN_TOKEN)
    expect(page.locator('tr[data-queue="idle"]')).to_contain_text("paused")
    page.click("#pause-mail")
    expect(page.locator('tr[data-queue="mail"]')).to_contain_text("paused")
    assert queue_paused(db, "mail")
    shot(page, "queues-paused")
    page.click("#resume-mail")
    expect(page.locator('tr[data-queue="mail"]')).not_to_contain_text("paused")
    assert not queue_paused(db, "mail")
    page.click("#resume-idle")
    expect(page.locator('tr[data-queue="idle"]')).not_to_contain_text("paused")
    assert not queue_paused(db, "idle")

    page.goto(f"{base}/ui/schedules")
    page.click("#schedules button:has-text('Pause')")
    expect(page.locator("#schedules")).to_contain_text("paused")
    assert schedule_paused(db, "nightly-report")
    page.click("#schedules button:has-text('Resume')")
    expect(page.locator("#schedules")).to_contain_text("active")
    assert not schedule_paused(db, "nightly-report")


def test_edit_a_queues_settings(served: ApiProcess, page: Page, db: Db) -> None:
    base = served.base_url
    enqueue(db, queue="mail")
    sign_in(page, base, ADMIN_TOKEN)
    form = page.locator('section[data-settings-queue="mail"]')
    form.locator("input[name=max_running]").fill("3")
    form.locator("input[name=per_key_max_running]").fill("1")
    form.locator("input[name=rate_per_second]").fill("2.5")
    form.locator("input[name=retention]").fill("3 days")
    form.locator("button").click()
    expect(page).to_have_url(f"{base}/ui/")
    expect(page.locator('tr[data-queue="mail"]')).to_contain_text("max_running=3")
    assert queue_settings(db, "mail") == {
        "max_running": 3, "per_key_max_running": 1, "rate_per_second": 2.5,
        "retention": "3 days",
    }  # fmt: skip
    expect(form.locator("input[name=max_running]")).to_have_value("3")
    shot(page, "queues-settings")

    # A blank field removes its setting; the others stay.
    form = page.locator('section[data-settings-queue="mail"]')
    form.locator("input[name=per_key_max_running]").fill("")
    form.locator("button").click()
    expect(page.locator('tr[data-queue="mail"]')).not_to_contain_text("per_key_max_running")
    assert queue_settings(db, "mail") == {
        "max_running": 3, "rate_per_second": 2.5, "retention": "3 days",
    }  # fmt: skip

    # A value the ledger refuses: a page naming the field, and nothing changes.
    form = page.locator('section[data-settings-queue="mail"]')
    form.locator("input[name=max_running]").fill("0")
    form.locator("button").click()
    expect(page.locator("#refused")).to_contain_text("max_running")
    shot(page, "queues-settings-refused")
    assert queue_settings(db, "mail")["max_running"] == 3


def test_read_only_session_sees_everything_and_every_button_is_refused(
    served: ApiProcess, page: Page, db: Db
) -> None:
    base = served.base_url
    dead = make_dead(db, queue="mail")
    pending = enqueue(db, queue="mail")
    sign_in(page, base, READER_TOKEN)
    expect(page.locator("#role")).to_have_text("read-only")
    expect(page.locator("#readonly-notice")).to_be_visible()
    shot(page, "readonly-queues")

    def refused(url: str, selector: str) -> None:
        page.goto(url)
        button = page.locator(selector).first
        expect(button).to_be_disabled()
        # A read-only page disables its buttons; enable one and the server still refuses.
        button.evaluate("b => { b.disabled = false; }")
        button.click()
        expect(page.locator("#refused")).to_contain_text("read-only")

    refused(f"{base}/ui/tasks/{dead}", "#retry")
    shot(page, "readonly-refused")
    refused(f"{base}/ui/tasks/{pending}", "#cancel")
    page.goto(f"{base}/ui/dead")
    page.check(f'input[name=task_id][value="{dead}"]')
    refused_button = page.locator("#retry-selected")
    refused_button.evaluate("b => { b.disabled = false; }")
    refused_button.click()
    expect(page.locator("#refused")).to_contain_text("read-only")
    refused(f"{base}/ui/dead", "#retry-all")
    refused(f"{base}/ui/", "#pause-mail")
    refused(f"{base}/ui/", ".settings-form button")
    refused(f"{base}/ui/schedules", "#schedules button")
    assert (status_of(db, dead), status_of(db, pending)) == ("DEAD", "PENDING")
    assert not queue_paused(db, "mail")
    assert not schedule_paused(db, "nightly-report")

    page.goto(f"{base}/ui/workers")
    page.click("#logout")
    expect(page).to_have_url(f"{base}/ui/login")


def test_a_form_posted_without_its_csrf_token_is_refused(
    served: ApiProcess, page: Page, db: Db
) -> None:
    base = served.base_url
    dead = make_dead(db)
    sign_in(page, base, ADMIN_TOKEN)
    page.goto(f"{base}/ui/tasks/{dead}")
    page.evaluate(
        "() => document.querySelectorAll('input[name=csrf_token]').forEach(i => i.remove())"
    )
    page.click("#retry")
    expect(page.locator("#refused")).to_contain_text("CSRF")
    assert status_of(db, dead) == "DEAD"


def test_pages_fit_a_phone(served: ApiProcess, browser: Browser, db: Db) -> None:
    base = served.base_url
    make_dead(db, queue="mail", error="timeout after 30 s")
    enqueue(db, queue="a-rather-long-queue-name")
    context = browser.new_context(viewport=PHONE, is_mobile=True, device_scale_factor=2)
    try:
        phone = context.new_page()
        sign_in(phone, base, ADMIN_TOKEN)
        for name, path in (("queues", "/ui/"), ("dead", "/ui/dead"), ("tasks", "/ui/tasks")):
            phone.goto(f"{base}{path}")
            # Nothing wider than the screen but the tables' own scrolling boxes.
            width = phone.evaluate("() => document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (path, width)
            shot(phone, f"phone-{name}")
        # Pausing a queue needs no sideways scroll: its button is on screen.
        phone.goto(f"{base}/ui/")
        for queue in ("mail", "a-rather-long-queue-name"):
            box = phone.locator(f"#pause-{queue}").bounding_box()
            assert box is not None and box["x"] + box["width"] <= PHONE["width"], (queue, box)
        phone.emulate_media(media="print")
        phone.goto(f"{base}/ui/dead")
        expect(phone.locator("#retry-selected")).to_be_hidden()
    finally:
        context.close()
