"""Bearer-token authentication for every route except the health checks.

With ``LEDGERQ_API_TOKEN`` set, a request needs ``Authorization: Bearer
<token>``; anything else gets 401 before its body is read or its route is
looked up (so an unknown route answers 401 too, and reveals nothing). The
comparison takes constant time. /healthz and /readyz stay open so load
balancers and orchestrators can probe without a secret.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ledgerq.api import errors as api_errors

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class BearerAuthMiddleware:
    """Refuses requests that lack ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    def authorized(self, scope: Scope) -> bool:
        """Whether scope carries the right token (or needs none)."""
        if scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                # The scheme is case-insensitive (RFC 7235); the token is not.
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self._token
                )
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        await api_errors.unauthorized_response()(scope, receive, send)


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the bearer scheme in an OpenAPI schema, on every protected operation."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
            operation.setdefault("responses", {})["401"] = {
                "description": "Missing or wrong bearer token.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}
                },
            }
    return schema
