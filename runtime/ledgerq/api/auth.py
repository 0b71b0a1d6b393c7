"""Bearer-token authentication and roles for every route except the health checks.

With ``LEDGERQ_API_TOKEN`` set, a request needs ``Authorization: Bearer
<token>``; anything else gets 401 before its body is read or its route is
looked up (so an unknown route answers 401 too, and reveals nothing). With
``LEDGERQ_API_READONLY_TOKEN`` also set, that token may read (GET, HEAD) and
gets 403 for every other method: every changing route. Comparisons take
constant time. /healthz and /readyz stay open so load balancers and
orchestrators can probe without a secret. The dashboard (/ui) signs browsers
in with a session cookie and checks roles itself (``api.ui.sessions``).
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ledgerq.api import errors as api_errors

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: Methods the read-only token may use: they change nothing.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_dashboard(path: str) -> bool:
    """Whether path belongs to the dashboard, which authenticates by session cookie."""
    return path == "/ui" or path.startswith("/ui/")


class BearerAuthMiddleware:
    """Refuses requests that lack ``Authorization: Bearer <token>``, and changes
    asked for with the read-only token."""

    def __init__(self, app: ASGIApp, token: str, readonly_token: str | None = None) -> None:
        self.app = app
        self._token = token.encode()
        self._readonly_token = readonly_token.encode() if readonly_token is not None else None

    def access(self, scope: Scope) -> str:
        """ "ok", "unauthorized" (no or wrong token) or "forbidden" (read-only token, a change)."""
        if scope["path"] in OPEN_PATHS or is_dashboard(scope["path"]):
            return "ok"
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                # The scheme is case-insensitive (RFC 7235); the token is not.
                if scheme.lower() != b"bearer":
                    return "unauthorized"
                given = credentials.strip()
                is_admin = hmac.compare_digest(given, self._token)
                is_reader = self._readonly_token is not None and hmac.compare_digest(
                    given, self._readonly_token
                )
                if is_admin:
                    return "ok"
                if is_reader:
                    return "ok" if scope["method"] in READ_METHODS else "forbidden"
                return "unauthorized"
        return "unauthorized"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = self.access(scope)
        if verdict == "ok":
            await self.app(scope, receive, send)
        elif verdict == "forbidden":
            await api_errors.forbidden_response()(scope, receive, send)
        else:
            await api_errors.unauthorized_response()(scope, receive, send)


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the bearer scheme in an OpenAPI schema, on every protected operation."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema.get("paths", {}).items():
        if path in OPEN_PATHS or is_dashboard(path):
            continue
        for method, operation in operations.items():
            operation["security"] = [{"bearer": []}]
            responses = operation.setdefault("responses", {})
            responses["401"] = {
                "description": "Missing or wrong bearer token.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}
                },
            }
            if method.upper() not in READ_METHODS:
                responses["403"] = {
                    "description": "The read-only token may not change anything.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}
                    },
                }
    return schema
