"""Queue routes: ``GET /queues``, the state of every queue that has tasks.

Counts by status per queue, the oldest due task's age and the last minute's
finishes: one full pass over the tasks table, so for people and ``ledgerq
stats``, not for a poll loop (``GET /metrics`` is cheap to scrape). The
shape of a queue is ``QueueSummary.to_json()``, the same ``ledgerq stats
--json`` prints.
"""

from __future__ import annotations

import enum

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ledgerq.api import schemas
from ledgerq.api.state import services

_TAGS: list[str | enum.Enum] = ["operations"]


def register(api: APIRouter) -> None:
    """Add the queue routes to api.

    Added to the app's own router rather than included from another: FastAPI
    matches an included router's routes twice, at a cost on every request.
    """

    @api.get(
        "/queues",
        tags=_TAGS,
        response_model=None,
        summary="Per queue: counts by status, oldest pending age, throughput",
        responses={
            200: {"model": schemas.QueuesOut, "description": "Every queue with tasks."},
            **schemas.error_responses(500, 503),
        },
    )
    async def queues(request: Request) -> Response:
        """Every queue that has tasks, in name order."""
        summary = await services(request).ledger.queue_summary()
        return JSONResponse({"queues": [q.to_json() for q in summary]})
