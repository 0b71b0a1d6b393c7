"""Operations routes: health, readiness and Prometheus metrics.

- ``GET /healthz``: the process answers; touches nothing else.
- ``GET /readyz``: PostgreSQL and Redis each answer a ping within
  ``READY_TIMEOUT_S``; otherwise 503 naming which is unavailable (the driver's
  reason goes to the log: it names hosts and ports).
- ``GET /metrics``: every metric in ``ledgerq.metrics.REGISTRY``; the queue
  depth gauges are read from the ledger at each scrape through partial
  indexes (live statuses and DEAD only: counting SUCCEEDED rows would scan the
  table), the paused gauge from the queues' settings (one row per configured
  queue). If PostgreSQL is down the scrape still succeeds without them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ledgerq import display, errors, metrics, types
from ledgerq.api import errors as api_errors
from ledgerq.api import schemas
from ledgerq.api.state import Services, services

log = logging.getLogger("ledgerq.api")

READY_TIMEOUT_S = 2.0
_AGE_STATUSES = (types.TaskStatus.PENDING, types.TaskStatus.QUEUED)


async def _problem(check: Awaitable[None]) -> str | None:
    """None if check finishes in time; otherwise why not."""
    try:
        await asyncio.wait_for(check, READY_TIMEOUT_S)
    except errors.LedgerqError as exc:
        return exc.message
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT_S:g} s"
    return None


async def refresh_queue_gauges(found: Services) -> None:
    """Set the queue depth, oldest-pending and paused gauges from the ledger."""
    try:
        depths = await found.ledger.queue_depths()
        configured = await found.ledger.queue_settings()
    except errors.LedgerUnavailable as exc:
        # Stale numbers would mislead more than missing ones.
        log.warning("queue gauges not refreshed: %s", exc.message)
        metrics.QUEUE_DEPTH.clear()
        metrics.QUEUE_OLDEST_PENDING.clear()
        metrics.QUEUE_PAUSED.clear()
        found.depth_series.clear()
        found.age_series.clear()
        found.paused_series.clear()
        return
    # Queues past the label limit are summed (ages: the oldest) under "other".
    counts: dict[tuple[str, str], int] = {}
    ages: dict[str, float] = {}
    queues: set[str] = set()
    for d in depths:
        queue = metrics.QUEUE_LABEL(d.queue)
        queues.add(queue)
        counts[queue, d.status.value] = counts.get((queue, d.status.value), 0) + d.count
        if d.status in _AGE_STATUSES and d.oldest_due_age_s is not None:
            ages[queue] = max(ages.get(queue, 0.0), d.oldest_due_age_s)
    # Series seen before and absent now read 0, so a drained queue shows as drained.
    for series in found.depth_series - counts.keys():
        metrics.QUEUE_DEPTH.labels(*series).set(0)
    for series, count in counts.items():
        metrics.QUEUE_DEPTH.labels(*series).set(count)
    found.depth_series |= counts.keys()
    found.age_series |= queues
    for queue in found.age_series:
        metrics.QUEUE_OLDEST_PENDING.labels(queue).set(ages.get(queue, 0.0))
    # Every queue with live tasks or settings reads 0 or 1 (``other``: 1 if
    # any queue under it is paused), so an alert can watch for paused == 1.
    paused: dict[str, int] = dict.fromkeys(queues, 0)
    for row in configured:
        queue = metrics.QUEUE_LABEL(row.queue)
        paused[queue] = max(paused.get(queue, 0), int(row.paused))
    found.paused_series |= paused.keys()
    for queue in found.paused_series:
        metrics.QUEUE_PAUSED.labels(queue).set(paused.get(queue, 0))


_TAGS: list[str | enum.Enum] = ["operations"]


def register(api: APIRouter) -> None:
    """Add the operations routes to api.

    Added to the app's own router rather than included from another: FastAPI
    matches an included router's routes twice, at a cost on every request.
    """

    @api.get(
        "/healthz", tags=_TAGS, response_model=schemas.HealthOut, summary="The process is alive"
    )
    async def healthz() -> Response:
        """Always 200 while the process serves requests."""
        return JSONResponse({"status": "ok"})

    @api.get(
        "/readyz",
        tags=_TAGS,
        response_model=schemas.HealthOut,
        summary="PostgreSQL and Redis are reachable",
        responses={503: {"model": schemas.NotReadyOut, "description": "Not ready."}},
    )
    async def readyz(request: Request) -> Response:
        """200 when both answer a ping; 503 naming the one(s) that did not."""
        found = services(request)
        pg, redis = await asyncio.gather(
            _problem(found.ledger.ping()), _problem(found.dispatch.ping())
        )
        if pg is None and redis is None:
            return JSONResponse({"status": "ok"})
        problems = {"PostgreSQL": pg, "Redis": redis}
        for name, why in problems.items():
            if why is not None:
                log.warning("not ready: %s unavailable: %s", name, display.redact(why))
        down = [name for name, why in problems.items() if why is not None]
        return api_errors.not_ready_response(down, list(problems))

    @api.get(
        "/metrics",
        tags=_TAGS,
        response_class=PlainTextResponse,
        summary="Prometheus metrics",
        responses={200: {"description": "Prometheus text format."}},
    )
    async def prometheus(request: Request) -> Response:
        """Every ledgerq metric of this process, queue gauges read just now."""
        await refresh_queue_gauges(services(request))
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
