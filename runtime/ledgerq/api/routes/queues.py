"""Queue routes: ``GET /queues``, the state of every queue, and its flow control:
``PUT /queues/{queue}/settings``, ``POST /queues/{queue}/pause`` and
``POST /queues/{queue}/resume``.

``GET /queues`` counts tasks by status per queue, the oldest due task's age
and the last minute's finishes, with each queue's pause and settings: one full
pass over the tasks table, so for people and ``ledgerq stats``/``ledgerq
queues``, not for a poll loop (``GET /metrics`` is cheap to scrape). The shape
of a queue is ``QueueSummary.to_json()``, the same ``ledgerq queues --json``
prints. A queue that was configured or paused is listed even with no tasks.

The changes are calls of the ledger's ``configure_queue``, ``pause_queue``
and ``resume_queue``; the ledger checks every setting (a refusal is a 422
naming the key), and a pause holds for every worker at once.
"""

from __future__ import annotations

import enum
from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import JSONResponse, Response

from ledgerq.api import schemas
from ledgerq.api.state import services

_TAGS: list[str | enum.Enum] = ["operations"]
_FLOW_TAGS: list[str | enum.Enum] = ["flow control"]

QueuePath = Annotated[schemas.Name, Path(description="The queue's name.")]


def register(api: APIRouter) -> None:
    """Add the queue routes to api.

    Added to the app's own router rather than included from another: FastAPI
    matches an included router's routes twice, at a cost on every request.
    """

    @api.get(
        "/queues",
        tags=_TAGS,
        response_model=None,
        summary="Per queue: counts by status, oldest pending age, throughput, pause, settings",
        responses={
            200: {
                "model": schemas.QueuesOut,
                "description": "Every queue with tasks, and every configured or paused queue.",
            },
            **schemas.error_responses(500, 503),
        },
    )
    async def queues(request: Request) -> Response:
        """Every queue that has tasks or was configured or paused, in name order."""
        summary = await services(request).ledger.queue_summary()
        return JSONResponse({"queues": [q.to_json() for q in summary]})

    @api.put(
        "/queues/{queue}/settings",
        tags=_FLOW_TAGS,
        response_model=None,
        summary="Change a queue's flow-control settings",
        responses={
            200: {
                "model": schemas.QueueSettingsOut,
                "description": "All of the queue's settings after the change.",
            },
            **schemas.error_responses(413, 422, 500, 503),
        },
    )
    async def configure_queue(
        request: Request, queue: QueuePath, body: schemas.QueueSettingsIn
    ) -> Response:
        """Set the keys given (null removes one); the others stay as they were."""
        changes = body.model_dump(exclude_unset=True)
        merged = await services(request).ledger.configure_queue(queue, changes)
        return JSONResponse(merged)

    @api.post(
        "/queues/{queue}/pause",
        tags=_FLOW_TAGS,
        response_model=None,
        summary="Pause a queue",
        responses={
            200: {"model": schemas.QueuePausedOut, "description": "The queue is paused."},
            **schemas.error_responses(422, 500, 503),
        },
    )
    async def pause_queue(request: Request, queue: QueuePath) -> Response:
        """No task of the queue starts until it is resumed (running ones finish); enqueues
        are still accepted. Durable, and it holds for every worker at once."""
        paused = await services(request).ledger.pause_queue(queue)
        return JSONResponse(paused.to_json())

    @api.post(
        "/queues/{queue}/resume",
        tags=_FLOW_TAGS,
        response_model=None,
        summary="Resume a queue",
        responses={
            200: {"model": schemas.QueuePausedOut, "description": "The queue runs again."},
            **schemas.error_responses(422, 500, 503),
        },
    )
    async def resume_queue(request: Request, queue: QueuePath) -> Response:
        """Tasks of the queue start again, as the other settings allow."""
        resumed = await services(request).ledger.resume_queue(queue)
        return JSONResponse(resumed.to_json())
