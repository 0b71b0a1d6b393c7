"""The dashboard's pages (GET): queues, tasks, a task, dead tasks, schedules, workers.

Each read is one or two ``AsyncLedger`` calls; none scans the tasks table
(``ledgerq.reads`` and ``ledgerq.queries`` say which index serves each)."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from starlette.responses import Response

from ledgerq import errors
from ledgerq.api import schemas
from ledgerq.api.state import services
from ledgerq.api.ui import common, render, sessions
from ledgerq.types import QUEUE_SETTING_KEYS, TaskId, TaskStatus

_TAGS: list[str | enum.Enum] = ["dashboard"]
PAGE_SIZE = 50
DEAD_PAGE_SIZE = 100
#: PostgreSQL text cannot hold U+0000: refuse it with the 422 of a bad parameter.
NO_NUL = r"^[^\x00]*$"
StatusFilter = Annotated[str | None, Query(pattern="^(|" + "|".join(TaskStatus.__members__) + ")$")]
#: Where the next page of a listing starts: the last id shown (ids are never reused).
BeforeId = Annotated[int | None, Query(ge=1, le=schemas.BIGINT_MAX)]
TextFilter = Annotated[str | None, Query(max_length=200, pattern=NO_NUL)]
SCRIPT = resources.files("ledgerq.api.ui").joinpath("static/dashboard.js").read_bytes()


def _signed_in(request: Request) -> tuple[sessions.Session | None, str | None]:
    """The session, and a cookie to set when an open dashboard issues one."""
    keys = common.ui_state(request).keys
    session = common.current_session(request)
    if session is None and keys.open:
        session, cookie = keys.issue(sessions.Role.ADMIN)
        return session, cookie
    return session, None


async def _show(
    request: Request, template: str, *, nav: str, title: str, status_code: int = 200, **ctx: Any
) -> Response:
    session, cookie = _signed_in(request)
    if session is None:
        return common.redirect("/ui/login")
    response = render.page(
        template,
        status_code=status_code,
        session=session,
        features=await common.features(request),
        refresh_s=ctx.pop("refresh_s", common.REFRESH_S),
        nav=nav,
        title=title,
        now=datetime.now(UTC),
        **ctx,
    )
    if cookie is not None:
        common.ui_state(request).keys.set_cookie(response, request, cookie)
    return response


def register(app: FastAPI) -> None:
    """Add the dashboard's pages to app."""
    router = app.router

    @router.get("/ui", tags=_TAGS, include_in_schema=False)
    async def ui_root() -> Response:
        return common.redirect("/ui/")

    @router.get("/ui/static/dashboard.js", tags=_TAGS, include_in_schema=False, response_model=None)
    async def script() -> Response:
        return Response(
            SCRIPT,
            media_type="text/javascript",
            headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @router.get(
        "/ui/",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: queues",
        responses=common.html_responses(200, 303),
    )
    async def overview(request: Request) -> Response:
        """Counts by status, throughput over the last hour, oldest pending age, settings."""
        ledger = services(request).ledger
        depths = await ledger.queue_depths()
        buckets = await ledger.finished_per_minute()
        settings = {s.queue: s for s in await ledger.queue_settings()}
        now = datetime.now(UTC)
        return await _show(
            request,
            "overview.html",
            nav="queues",
            title="Queues",
            queues=render.queue_rows(depths, buckets, settings),
            chart=render.throughput_chart(buckets, now),
            statuses=list(TaskStatus),
            setting_keys=QUEUE_SETTING_KEYS,
        )

    @router.get(
        "/ui/tasks",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: tasks",
        responses=common.html_responses(200, 303),
    )
    async def task_list(
        request: Request,
        status: StatusFilter = None,
        queue: TextFilter = None,
        task_type: Annotated[
            str | None, Query(alias="type", max_length=200, pattern=NO_NUL)
        ] = None,
        q: Annotated[str | None, Query(max_length=512, pattern=NO_NUL)] = None,
        before: BeforeId = None,
    ) -> Response:
        """Tasks newest first, filtered by status, queue and type; or found by id or key.

        A blank filter (the form's "any") means no filter."""
        ledger = services(request).ledger
        status, queue, task_type = status or None, queue or None, task_type or None
        search = (q or "").strip()
        next_before = None
        if search:
            # An id (primary key) or an idempotency key (tasks_idempotency_key_idx).
            ids: list[int] = []
            if search.isdigit() and 0 < int(search) <= schemas.BIGINT_MAX:
                ids.append(int(search))
            by_key = await ledger.task_id_by_key(search)
            if by_key is not None:
                ids.append(by_key)
            found = await ledger.get_many(sorted(set(ids), reverse=True)) if ids else []
            found.sort(key=lambda t: t.id, reverse=True)
        else:
            before_id = before
            page = await ledger.list_tasks(
                status=status,
                queue=queue,
                task_type=task_type,
                limit=PAGE_SIZE,
                before_id=before_id,
            )
            found = page.tasks
            if page.next_before_id is not None:
                next_before = page.next_before_id
        return await _show(
            request,
            "tasks.html",
            nav="tasks",
            title="Tasks",
            tasks=found,
            statuses=list(TaskStatus),
            filters={
                "status": status or "",
                "queue": queue or "",
                "type": task_type or "",
                "q": search,
            },
            next_before=next_before,
        )

    @router.get(
        "/ui/tasks/{task_id}",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: a task",
        responses=common.html_responses(200, 303, 404),
    )
    async def task_page(
        request: Request,
        task_id: Annotated[int, Path(ge=1, le=schemas.BIGINT_MAX)],
    ) -> Response:
        """Payload, result, last error, attempts on a timeline, recorded effects."""
        ledger = services(request).ledger
        try:
            task = await ledger.get(task_id)
        except errors.TaskNotFound:
            return await _show(
                request,
                "refused.html",
                nav="tasks",
                title="Not found",
                status_code=404,
                message=f"Task {task_id} does not exist.",
                refresh_s=None,
            )
        effects = await ledger.effects_of([TaskId(task_id)])
        now = datetime.now(UTC)
        return await _show(
            request,
            "task.html",
            nav="tasks",
            title=f"Task {task.id}",
            task=task,
            spans=render.timeline(task.attempt_history, now),
            timeline_end=max((a.finished_at or now for a in task.attempt_history), default=now),
            effects=effects,
        )

    @router.get(
        "/ui/dead",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: dead tasks",
        responses=common.html_responses(200, 303),
    )
    async def dead(
        request: Request,
        queue: TextFilter = None,
        before: BeforeId = None,
    ) -> Response:
        """DEAD tasks newest first (tasks_dead_idx), to retry one, some or all."""
        ledger = services(request).ledger
        queue = queue or None
        before_id = before
        page = await ledger.list_tasks(
            status="DEAD", queue=queue, limit=DEAD_PAGE_SIZE, before_id=before_id
        )
        found = page.tasks
        next_before = None
        if page.next_before_id is not None:
            next_before = page.next_before_id
        total = await ledger.dead_count(queue)
        return await _show(
            request,
            "dead.html",
            nav="dead",
            title="Dead tasks",
            tasks=found,
            total=total,
            queue=queue or "",
            next_before=next_before,
        )

    @router.get(
        "/ui/schedules",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: schedules",
        responses=common.html_responses(200, 303),
    )
    async def schedules(request: Request) -> Response:
        """Every schedule, its next run and last task (once the ledger has schedules)."""
        feats = await common.features(request)
        found = await services(request).ledger.list_schedules() if feats.schedules else []
        return await _show(
            request, "schedules.html", nav="schedules", title="Schedules", schedules=found
        )

    @router.get(
        "/ui/workers",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: workers seen in the last 5 minutes",
        responses=common.html_responses(200, 303),
    )
    async def workers(request: Request) -> Response:
        """Workers that registered, heartbeat or finished an attempt lately."""
        found = await services(request).ledger.workers_seen()
        return await _show(request, "workers.html", nav="workers", title="Workers", workers=found)

    @router.get(
        "/ui/login",
        tags=_TAGS,
        response_model=None,
        summary="Dashboard: sign in",
        responses=common.html_responses(200, 303),
    )
    async def login_page(request: Request) -> Response:
        """The sign-in form (an open dashboard needs none)."""
        keys = common.ui_state(request).keys
        if keys.open or common.current_session(request) is not None:
            return common.redirect("/ui/")
        return render.page("login.html", error=None, **common.bare_context())
