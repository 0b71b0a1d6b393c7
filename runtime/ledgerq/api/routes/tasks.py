"""Task routes: enqueue (one or a batch), read, list, cancel, retry.

Every state change goes through the ledger's SQL functions (enqueue_task,
enqueue_tasks, cancel_task, retry_task); a reply is sent only after the
change has committed. Listings page newest first with an opaque cursor that
encodes the last id seen, so a page never repeats or skips a task, however
many are enqueued in between.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import enum
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.responses import JSONResponse, Response

from ledgerq import metrics, types
from ledgerq.api import errors as api_errors
from ledgerq.api import schemas
from ledgerq.api.state import services

_CURSOR = re.compile(r"^before:([1-9][0-9]{0,18})$")

#: The longest GET /tasks/{id}?wait=S holds a request open.
WAIT_MAX_S = 60.0

TaskIdPath = Annotated[int, Path(ge=1, le=schemas.BIGINT_MAX, description="The task's id.")]


def _new_task(item: schemas.TaskCreate, idempotency_key: str | None) -> types.NewTask:
    run_at = item.run_at
    if item.delay_seconds:
        # The API host's clock: a delay of seconds tolerates the usual NTP skew.
        run_at = datetime.now(UTC) + timedelta(seconds=item.delay_seconds)
    return types.NewTask(
        task_type=item.type,
        payload=item.payload,
        queue=item.queue,
        priority=item.priority,
        run_at=run_at,
        max_attempts=item.max_attempts,
        idempotency_key=idempotency_key,
        concurrency_key=item.concurrency_key,
    )


async def _wait_final(request: Request, task_id: int, wait_s: float) -> types.Task | None:
    """The task once final (woken by the ledger's NOTIFY); None after wait_s, or
    as soon as the server begins to stop (it waits for open requests)."""
    waiting = asyncio.ensure_future(services(request).ledger.wait_final(task_id, wait_s))
    stopping = asyncio.ensure_future(request.app.state.stopping.wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not waiting.done():
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await waiting
        return None
    try:
        return waiting.result()
    except TimeoutError:
        return None


def encode_cursor(before_id: int) -> str:
    """An opaque cursor for the page after the task before_id."""
    return base64.urlsafe_b64encode(f"before:{before_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The id a cursor from encode_cursor stands for."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    match = _CURSOR.match(text)
    if match is None or int(match.group(1)) > schemas.BIGINT_MAX:
        raise api_errors.invalid_input("cursor: not a cursor this API returned")
    return int(match.group(1))


_IDEMPOTENCY_KEY = TypeAdapter(schemas.IdempotencyKey)
IDEMPOTENCY_KEY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The same as the body's idempotency_key (they must agree if both are given).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 512},
}


def idempotency_key_header(request: Request) -> str | None:
    """The Idempotency-Key header, validated like the body field.

    Read by hand rather than declared as a FastAPI Header parameter, which
    re-inspects the parameter's type on every request (most of the route's cost).
    """
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    try:
        return _IDEMPOTENCY_KEY.validate_python(value)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("header", "Idempotency-Key")} for error in exc.errors()]
        ) from None


_TAGS: list[str | enum.Enum] = ["tasks"]


def register(api: APIRouter) -> None:
    """Add the task routes to api.

    Added to the app's own router rather than included from another: FastAPI
    matches an included router's routes twice, at a cost on every request.
    """

    @api.post(
        "/tasks",
        tags=_TAGS,
        status_code=201,
        response_model=None,
        summary="Enqueue a task",
        openapi_extra={"parameters": [IDEMPOTENCY_KEY_PARAMETER]},
        responses={
            201: {"model": schemas.TaskOut, "description": "Created."},
            200: {"model": schemas.TaskOut, "description": "The task an idempotency key made."},
            **schemas.error_responses(409, 413, 422, 500, 503),
        },
    )
    async def create_task(request: Request, body: schemas.TaskCreate) -> Response:
        """Enqueue one task; the reply comes once it is committed to PostgreSQL."""
        key = body.idempotency_key
        header = idempotency_key_header(request)
        if header is not None:
            if key is not None and key != header:
                raise api_errors.invalid_input(
                    "idempotency_key: the body field and the Idempotency-Key header differ"
                )
            key = header
        new = _new_task(body, key)
        # Concurrent requests share transactions; each answer waits for its commit.
        task = await services(request).enqueuer.enqueue(new)
        if task.created:
            metrics.TASKS_ENQUEUED.labels(*metrics.task_labels(task.type, task.queue)).inc()
        return JSONResponse(task.to_json(), status_code=201 if task.created else 200)

    @api.post(
        "/tasks/batch",
        tags=_TAGS,
        response_model=None,
        summary="Enqueue up to 1,000 tasks, all or none",
        responses={
            200: {"model": schemas.BatchOut, "description": "One result per item, in order."},
            **schemas.error_responses(409, 413, 422, 500, 503),
        },
    )
    async def create_tasks(request: Request, body: schemas.BatchCreate) -> Response:
        """Enqueue every task in one transaction; one result per item, in input order."""
        ledger = services(request).ledger
        new_tasks = [_new_task(item, item.idempotency_key) for item in body.tasks]
        rows = await ledger.enqueue_many(new_tasks) if new_tasks else []
        replayed = [task_id for task_id, created, _ in rows if not created]
        # A replayed key's task may have moved on since: report its status now.
        current = {t.id: t.status for t in await ledger.get_many(replayed)} if replayed else {}
        made = collections.Counter(
            metrics.task_labels(new.task_type, queue)
            for new, (_, created, queue) in zip(new_tasks, rows, strict=True)
            if created
        )
        for (task_type, queue), count in made.items():
            metrics.TASKS_ENQUEUED.labels(task_type, queue).inc(count)
        results = [
            {
                "id": task_id,
                "status": (types.TaskStatus.PENDING if created else current[task_id]).value,
                "created": created,
            }
            for task_id, created, _ in rows
        ]
        return JSONResponse({"results": results})

    @api.api_route(
        "/tasks/batch", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def batch_wrong_method() -> Response:
        # Without this, GET /tasks/batch would match GET /tasks/{task_id}: a 422 about
        # task_id where the truth is that only POST serves this path.
        raise HTTPException(405, headers={"Allow": "POST"})

    @api.get(
        "/tasks/{task_id}",
        tags=_TAGS,
        response_model=None,
        summary="A task with its attempts",
        responses={
            200: {"model": schemas.TaskOut, "description": "The task."},
            **schemas.error_responses(404, 422, 500, 503),
        },
    )
    async def get_task(
        request: Request,
        task_id: TaskIdPath,
        wait: Annotated[
            float | None,
            Query(
                ge=0,
                le=WAIT_MAX_S,
                description="Answer once the task is final (SUCCEEDED, DEAD or CANCELLED), "
                f"or after this many seconds (at most {WAIT_MAX_S:g}) with its current state.",
            ),
        ] = None,
    ) -> Response:
        """The task, its attempt history, result and last error."""
        ledger = services(request).ledger
        if wait:
            final = await _wait_final(request, task_id, wait)
            if final is not None:
                return JSONResponse(final.to_json())
        task = await ledger.get(task_id)
        return JSONResponse(task.to_json())

    @api.get(
        "/tasks",
        tags=_TAGS,
        response_model=None,
        summary="List tasks, newest first",
        responses={
            200: {"model": schemas.TaskPage, "description": "A page of tasks."},
            **schemas.error_responses(422, 500, 503),
        },
    )
    async def list_tasks(
        request: Request,
        status: types.TaskStatus | None = None,
        queue: Annotated[schemas.Name | None, Query()] = None,
        task_type: Annotated[schemas.Name | None, Query(alias="type")] = None,
        limit: Annotated[int, Query(ge=1, le=types.LIST_LIMIT_MAX)] = types.LIST_LIMIT_DEFAULT,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        """A page of tasks matching every filter given; pass next_cursor for the next."""
        ledger = services(request).ledger
        before_id = decode_cursor(cursor) if cursor is not None else None
        page = await ledger.list_tasks(
            status=status.value if status is not None else None,
            queue=queue,
            task_type=task_type,
            limit=limit,
            before_id=before_id,
        )
        history = await ledger.attempts_of([t.id for t in page.tasks]) if page.tasks else {}
        tasks = [
            dataclasses.replace(t, attempt_history=history.get(t.id, ())).to_json()
            for t in page.tasks
        ]
        after = page.next_before_id
        next_cursor = encode_cursor(after) if after is not None else None
        return JSONResponse({"tasks": tasks, "next_cursor": next_cursor})

    @api.post(
        "/tasks/{task_id}/cancel",
        tags=_TAGS,
        response_model=None,
        summary="Cancel a task",
        responses={
            200: {"model": schemas.StatusOut, "description": "The task's status now."},
            **schemas.error_responses(404, 422, 500, 503),
        },
    )
    async def cancel_task(request: Request, task_id: TaskIdPath) -> Response:
        """PENDING/QUEUED → CANCELLED; RUNNING → cancellation requested (stays RUNNING)."""
        status = await services(request).ledger.cancel(task_id)
        return JSONResponse({"id": task_id, "status": status.value})

    @api.post(
        "/tasks/{task_id}/retry",
        tags=_TAGS,
        response_model=None,
        summary="Retry a DEAD or CANCELLED task",
        responses={
            200: {"model": schemas.StatusOut, "description": "The task's status now."},
            **schemas.error_responses(404, 409, 422, 500, 503),
        },
    )
    async def retry_task(request: Request, task_id: TaskIdPath) -> Response:
        """DEAD/CANCELLED → PENDING with a fresh attempt budget; 409 for other statuses."""
        status = await services(request).ledger.retry(task_id)
        return JSONResponse({"id": task_id, "status": status.value})
