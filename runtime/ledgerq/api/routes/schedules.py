"""Schedule routes: ``GET /schedules``, ``POST /schedules/{name}/pause`` and
``POST /schedules/{name}/resume``.

A schedule is created by the worker whose registry declares it
(``@tasks.periodic``), not over HTTP; operators list, pause and resume it
here. The shape of a schedule is ``Schedule.to_json()``, the same
``ledgerq schedules --json`` prints. An unknown name answers 404.
"""

from __future__ import annotations

import enum
from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import JSONResponse, Response

from ledgerq import errors
from ledgerq.api import schemas
from ledgerq.api.state import services

_TAGS: list[str | enum.Enum] = ["schedules"]

NamePath = Annotated[schemas.Name, Path(description="The schedule's name.")]


def register(api: APIRouter) -> None:
    """Add the schedule routes to api (on the app's own router, as queues.register)."""

    @api.get(
        "/schedules",
        tags=_TAGS,
        response_model=None,
        summary="Every schedule: its expression, time zone, task, next run and last slot",
        responses={
            200: {"model": schemas.SchedulesOut, "description": "Every schedule, by name."},
            **schemas.error_responses(500, 503),
        },
    )
    async def list_schedules(request: Request) -> Response:
        """Every schedule, in name order."""
        found = await services(request).ledger.list_schedules()
        return JSONResponse({"schedules": [s.to_json() for s in found]})

    @api.post(
        "/schedules/{name}/pause",
        tags=_TAGS,
        response_model=None,
        summary="Pause a schedule",
        responses={
            200: {"model": schemas.SchedulePausedOut, "description": "The schedule is paused."},
            **schemas.error_responses(404, 422, 500, 503),
        },
    )
    async def pause_schedule(request: Request, name: NamePath) -> Response:
        """No slot fires while paused; pausing a paused schedule changes nothing."""
        if not await services(request).ledger.pause_schedule(name):
            raise errors.ScheduleNotFound(f"schedule {name!r} does not exist")
        return JSONResponse({"name": name, "paused": True})

    @api.post(
        "/schedules/{name}/resume",
        tags=_TAGS,
        response_model=None,
        summary="Resume a schedule",
        responses={
            200: {"model": schemas.SchedulePausedOut, "description": "The schedule runs again."},
            **schemas.error_responses(404, 422, 500, 503),
        },
    )
    async def resume_schedule(request: Request, name: NamePath) -> Response:
        """Fires again from its first slot after now: the paused slots are skipped."""
        if not await services(request).ledger.resume_schedule(name):
            raise errors.ScheduleNotFound(f"schedule {name!r} does not exist")
        return JSONResponse({"name": name, "paused": False})
