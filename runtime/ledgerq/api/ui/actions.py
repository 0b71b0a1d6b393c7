"""The dashboard's changes (POST forms): retry, cancel, retry the selected or
all dead tasks, pause/resume/configure a queue, pause/resume a schedule,
sign in and out.

Every form carries its session's CSRF token in ``csrf_token``; a POST without
a valid one, from nobody signed in, or from a read-only session is refused
(403) before anything changes. Every change is a call of the same SQL function
the HTTP API uses (retry_task, cancel_task, pause_queue, ...); each answers
with a redirect to the page that shows the result (post/redirect/get).
"""

from __future__ import annotations

import enum
import logging
from typing import Annotated

from fastapi import FastAPI, Path, Request
from starlette.responses import Response

from ledgerq import errors
from ledgerq.api import schemas
from ledgerq.api.state import services
from ledgerq.api.ui import common, render, sessions
from ledgerq.types import QUEUE_SETTING_KEYS, JsonObject, JsonValue

log = logging.getLogger("ledgerq.api.ui")

_TAGS: list[str | enum.Enum] = ["dashboard"]
#: The queue settings the settings form edits (configure_queue's keys), by kind.
INTEGER_SETTINGS = ("max_running", "per_key_max_running", "burst")
NUMBER_SETTINGS = ("rate_per_second", "per_key_rate_per_second", "retry_rate_per_second")
SETTING_KEYS = QUEUE_SETTING_KEYS
#: retry-all works through the DEAD tasks this many at a time.
RETRY_PAGE = 500

TaskIdPath = Annotated[int, Path(ge=1, le=schemas.BIGINT_MAX)]
NamePath = Annotated[str, Path(min_length=1, max_length=200)]
_CHANGE_RESPONSES = common.html_responses(303, 403, 404, 409, 422)


async def _authorize(request: Request) -> common.Form | Response:
    """The posted form, or the refusal to send instead of acting on it."""
    form = await common.read_form(request)
    session = common.current_session(request)
    if session is None:
        return common.refusal(request, 403, "You are not signed in (or your session expired).")
    if form is None or not sessions.csrf_valid(session, form.get("csrf_token")):
        return common.refusal(
            request, 403, "This form has no valid CSRF token. Reload the page and try again."
        )
    if not session.may_change:
        return common.refusal(request, 403, "This session is read-only: it cannot change anything.")
    return form


def _ledger_refusal(request: Request, exc: errors.LedgerError) -> Response:
    """The page for a change the ledger refused (its message names the task or field)."""
    if isinstance(exc, errors.TaskNotFound):
        return common.refusal(request, 404, str(exc))
    if isinstance(exc, errors.InvalidInput):
        return common.refusal(request, 422, str(exc))
    if isinstance(exc, errors.InvalidTransition):
        return common.refusal(request, 409, str(exc))
    raise exc


def _setting_value(key: str, text: str) -> JsonValue:
    """A settings form field as configure_queue takes it: blank removes the setting."""
    text = text.strip()
    if not text:
        return None
    try:
        if key in INTEGER_SETTINGS:
            return int(text)
        if key in NUMBER_SETTINGS:
            return float(text)
    except ValueError:
        raise errors.InvalidInput(f"{key}: must be a number, got {text!r}") from None
    return text


def register(app: FastAPI) -> None:
    """Add the dashboard's POST routes to app."""
    router = app.router

    @router.post(
        "/ui/tasks/{task_id}/retry",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: retry a task",
        responses=_CHANGE_RESPONSES,
    )
    async def retry(request: Request, task_id: TaskIdPath) -> Response:
        """retry_task: DEAD or CANCELLED → PENDING."""
        form = await _authorize(request)
        if isinstance(form, Response):
            return form
        try:
            await services(request).ledger.retry(task_id)
        except (errors.TaskNotFound, errors.InvalidTransition) as exc:
            return _ledger_refusal(request, exc)
        return common.redirect(f"/ui/tasks/{task_id}")

    @router.post(
        "/ui/tasks/{task_id}/cancel",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: cancel a task",
        responses=_CHANGE_RESPONSES,
    )
    async def cancel(request: Request, task_id: TaskIdPath) -> Response:
        """cancel_task: PENDING/QUEUED → CANCELLED; RUNNING → cancellation requested."""
        form = await _authorize(request)
        if isinstance(form, Response):
            return form
        try:
            await services(request).ledger.cancel(task_id)
        except (errors.TaskNotFound, errors.InvalidTransition) as exc:
            return _ledger_refusal(request, exc)
        return common.redirect(f"/ui/tasks/{task_id}")

    @router.post(
        "/ui/dead/retry",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: retry the selected dead tasks",
        responses=_CHANGE_RESPONSES,
    )
    async def retry_selected(request: Request) -> Response:
        """retry_task on each task_id in the form; one that left DEAD meanwhile is skipped."""
        form = await _authorize(request)
        if isinstance(form, Response):
            return form
        ids = {
            int(v) for v in form.all("task_id") if v.isdigit() and 0 < int(v) <= schemas.BIGINT_MAX
        }
        ledger = services(request).ledger
        retried = 0
        for task_id in sorted(ids):
            try:
                await ledger.retry(task_id)
                retried += 1
            except (errors.InvalidTransition, errors.TaskNotFound):
                continue  # another operator got there first
        log.info("dashboard retried %d of %d selected dead tasks", retried, len(ids))
        return common.redirect("/ui/dead")

    @router.post(
        "/ui/dead/retry-all",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: retry every dead task (of a queue)",
        responses=_CHANGE_RESPONSES,
    )
    async def retry_all(request: Request) -> Response:
        """retry_task on every DEAD task, or every one of the form's queue."""
        form = await _authorize(request)
        if isinstance(form, Response):
            return form
        queue = (form.get("queue") or "").strip() or None
        ledger = services(request).ledger
        retried = 0
        before: int | None = None
        while True:
            # tasks_dead_idx, newest first; retried tasks leave it as we go.
            page = await ledger.list_tasks(
                status="DEAD", queue=queue, limit=RETRY_PAGE, before_id=before
            )
            for task in page.tasks:
                try:
                    await ledger.retry(task.id)
                    retried += 1
                except (errors.InvalidTransition, errors.TaskNotFound):
                    continue
            if page.next_before_id is None:
                break
            before = page.next_before_id
        log.info("dashboard retried %d dead tasks", retried)
        return common.redirect("/ui/dead")

    async def _queue_change(request: Request, queue: str, pause: bool) -> Response:
        form = await _authorize(request)
        if isinstance(form, Response):
            return form
        ledger = services(request).ledger
        try:
            await (ledger.pause_queue(queue) if pause else ledger.resume_queue(queue))
        except errors.InvalidInput as exc:
            return _ledger_refusal(request, exc)
        return common.redirect("/ui/")

    @router.post(
        "/ui/queues/{queue}/pause",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: pause a queue",
        responses=_CHANGE_RESPONSES,
    )
    async def pause_queue(request: Request, queue: NamePath) -> Response:
        """pause_queue: no task of the queue starts until it is resumed."""
        return await _queue_change(request, queue, pause=True)

    @router.post(
        "/ui/queues/{queue}/resume",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: resume a queue",
        responses=_CHANGE_RESPONSES,
    )
    async def resume_queue(request: Request, queue: NamePath) -> Response:
        """resume_queue."""
        return await _queue_change(request, queue, pause=False)

    @router.post(
        "/ui/queues/{queue}/settings",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: change a queue's settings",
        responses=_CHANGE_RESPONSES,
    )
    async def queue_settings(request: Request, queue: NamePath) -> Response:
        """configure_queue with the form's fields (a blank field removes that setting)."""
        form = await _authorize(request)
        if isinstance(form, Response):
            return form
        try:
            settings: JsonObject = {
                key: _setting_value(key, value)
                for key in SETTING_KEYS
                if (value := form.get(key)) is not None
            }
            await services(request).ledger.configure_queue(queue, settings)
        except errors.InvalidInput as exc:
            return _ledger_refusal(request, exc)
        return common.redirect("/ui/")

    async def _schedule_change(request: Request, name: str, pause: bool) -> Response:
        form = await _authorize(request)
        if isinstance(form, Response):
            return form
        if not (await common.features(request)).schedules:
            return common.refusal(request, 404, "This ledger has no schedules yet.")
        ledger = services(request).ledger
        found = await (ledger.pause_schedule(name) if pause else ledger.resume_schedule(name))
        if not found:
            return common.refusal(request, 404, "No schedule has that name.")
        return common.redirect("/ui/schedules")

    @router.post(
        "/ui/schedules/{name}/pause",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: pause a schedule",
        responses=_CHANGE_RESPONSES,
    )
    async def pause_schedule(request: Request, name: NamePath) -> Response:
        """pause_schedule: its slots are not enqueued until it is resumed."""
        return await _schedule_change(request, name, pause=True)

    @router.post(
        "/ui/schedules/{name}/resume",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: resume a schedule",
        responses=_CHANGE_RESPONSES,
    )
    async def resume_schedule(request: Request, name: NamePath) -> Response:
        """resume_schedule."""
        return await _schedule_change(request, name, pause=False)

    @router.post(
        "/ui/login",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: sign in with a token",
        responses=common.html_responses(303, 401),
    )
    async def login(request: Request) -> Response:
        """Sign in with the admin or the read-only token; sets the session cookie."""
        keys = common.ui_state(request).keys
        form = await common.read_form(request)
        role = keys.role_of_token((form.get("token") if form else None) or "")
        if keys.open:
            role = sessions.Role.ADMIN
        if role is None:
            # Neither the token nor any part of it is logged or shown.
            log.warning("dashboard sign-in refused: wrong token")
            return render.page(
                "login.html", status_code=401, error="That token is not valid.",
                **common.bare_context(),
            )  # fmt: skip
        _, cookie = keys.issue(role)
        response = common.redirect("/ui/")
        keys.set_cookie(response, request, cookie)
        log.info("dashboard sign-in as %s", role.value)
        return response

    @router.post(
        "/ui/logout",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: sign out",
        responses=common.html_responses(303, 403),
    )
    async def logout(request: Request) -> Response:
        """Clears the session cookie (the CSRF token is required, as for any change)."""
        form = await common.read_form(request)
        session = common.current_session(request)
        if (
            session is None
            or form is None
            or not sessions.csrf_valid(session, form.get("csrf_token"))
        ):
            return common.refusal(request, 403, "This form has no valid CSRF token.")
        response = common.redirect("/ui/login")
        common.ui_state(request).keys.clear_cookie(response, request)
        return response
