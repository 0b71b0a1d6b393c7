"""The one place that turns failures into HTTP statuses and JSON error bodies.

Every error the API sends looks like ``{"error": {"code": ..., "message": ...}}``:

==============================================  ======  ========================
cause                                           status  code
==============================================  ======  ========================
ledgerq ``InvalidInput``, a bad field           422     ``invalid_input``
body not JSON / not UTF-8 / too deep            422     ``invalid_json``
body over the size limit                        413     ``body_too_large``
missing or wrong bearer token                   401     ``unauthorized``
a change asked for with the read-only token     403     ``forbidden``
``TaskNotFound``, unknown route                 404     ``not_found``
``IdempotencyConflict``                         409     ``idempotency_conflict``
``InvalidTransition``                           409     ``invalid_transition``
wrong method                                    405     ``method_not_allowed``
``LedgerUnavailable``, ``DispatchUnavailable``  503     ``unavailable``
/readyz with PostgreSQL or Redis down           503     ``not_ready``
anything else                                   500     ``internal_error``
==============================================  ======  ========================

A 500 carries a generic message; the exception and its traceback go to the
``ledgerq.api`` log, never to the client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ledgerq import display, errors

log = logging.getLogger("ledgerq.api")

INTERNAL_MESSAGE = "internal error; the server log has the details"

# Most specific first: the first class an exception is an instance of wins.
_LEDGERQ_STATUSES: tuple[tuple[type[errors.LedgerqError], int, str], ...] = (
    (errors.InvalidInput, 422, "invalid_input"),
    (errors.TaskNotFound, 404, "not_found"),
    (errors.IdempotencyConflict, 409, "idempotency_conflict"),
    (errors.InvalidTransition, 409, "invalid_transition"),
    (errors.LedgerUnavailable, 503, "unavailable"),
    (errors.DispatchUnavailable, 503, "unavailable"),
)
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    422: "invalid_input",
}


class RequestRejected(HTTPException):
    """A request refused before it reaches an endpoint, with its error code.

    An HTTPException, because FastAPI lets only those out of its body parsing
    unchanged; anything else there becomes a bare 400.
    """

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(status_code=status_code, detail=message)
        self.code = code


def invalid_json(message: str) -> RequestRejected:
    """The body is not usable JSON (syntax, encoding, nesting, NUL characters)."""
    return RequestRejected(422, "invalid_json", message)


def invalid_input(message: str) -> RequestRejected:
    """The request is well-formed but a field's value is not allowed."""
    return RequestRejected(422, "invalid_input", message)


def body_too_large(limit_bytes: int) -> RequestRejected:
    """The body is over the limit (checked while it is read)."""
    return RequestRejected(413, "body_too_large", f"request body is over {limit_bytes} bytes")


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON every error response carries."""
    return {"error": {"code": code, "message": message}}


def error_response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error response in the API's one error shape."""
    return JSONResponse(error_body(code, message), status_code=status_code, headers=headers)


def unauthorized_response() -> JSONResponse:
    """401 for a request without the right bearer token."""
    return error_response(
        401,
        "unauthorized",
        "missing or invalid bearer token",
        headers={"WWW-Authenticate": "Bearer"},
    )


def forbidden_response() -> JSONResponse:
    """403 for a change asked for with the read-only token."""
    return error_response(403, "forbidden", "the read-only token may not change anything")


def not_ready_response(down: Sequence[str], checked: Sequence[str]) -> JSONResponse:
    """503 naming each dependency in down ("PostgreSQL unavailable"), nothing more:
    the driver's message (hosts, ports, users) is for the log, not a public route.

    ``checks`` in the body maps each lower-cased checked name to "ok" or "unavailable".
    """
    body = error_body("not_ready", "; ".join(f"{name} unavailable" for name in down))
    body["checks"] = {name.lower(): "unavailable" if name in down else "ok" for name in checked}
    return JSONResponse(body, status_code=503)


def status_of(exc: errors.LedgerqError) -> tuple[int, str]:
    """The HTTP status and error code for a ledgerq error."""
    for cls, status_code, code in _LEDGERQ_STATUSES:
        if isinstance(exc, cls):
            return status_code, code
    return 500, "internal_error"


def field_name(loc: Sequence[int | str]) -> str:
    """``("body", "tasks", 3, "priority")`` → ``tasks[3].priority``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "missing" and loc == ("body",):
            message = "a JSON object is required"
        elif loc == ("body",) and isinstance(error.get("input"), bytes):
            # FastAPI hands over raw bytes when the content type is not JSON.
            message = "must be a JSON object sent with Content-Type: application/json"
        problems.append(f"{field_name(loc)}: {message}")
    return "; ".join(problems) or "invalid request"


async def _on_validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_input", _validation_message(exc))


async def _on_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = exc.code if isinstance(exc, RequestRejected) else _HTTP_CODES.get(exc.status_code)
    if exc.status_code == 404 and not isinstance(exc, RequestRejected):
        message = "no such route"
    elif exc.status_code == 405 and not isinstance(exc, RequestRejected):
        message = "method not allowed on this route"
    else:
        message = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return error_response(exc.status_code, code or "error", message, headers or None)


async def _on_ledgerq_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.LedgerqError)
    status_code, code = status_of(exc)
    if status_code == 500:
        log.error("request failed: %s", exc.message, exc_info=exc)
        return error_response(500, code, INTERNAL_MESSAGE)
    if status_code == 503:
        log.warning("request failed: %s", display.redact(exc.message))
        which = "PostgreSQL" if isinstance(exc, errors.LedgerError) else "Redis"
        return error_response(503, code, f"{which} unavailable")
    return error_response(status_code, code, exc.message)


def install(app: FastAPI) -> None:
    """Register the handlers for validation, HTTP and ledgerq errors on app."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(errors.LedgerqError, _on_ledgerq_error)


class CatchAllMiddleware:
    """Turns any exception that escaped the handlers into a logged, generic 500.

    Starlette's own last-resort handler re-raises after responding, which
    makes the server log a second traceback; this one logs once and stops.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a clean response; the server closes the connection
            body = json.dumps(error_body("internal_error", INTERNAL_MESSAGE)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
