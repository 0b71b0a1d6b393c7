"""Reading request bodies defensively: a size limit, strict UTF-8, bounded nesting.

FastAPI reads a body with ``await request.body()`` and parses it with
``await request.json()``; ``LimitedRoute`` hands endpoints a ``LimitedRequest``
whose two methods refuse, before anything recursive runs:

- a body over ``max_body_bytes`` (413), counted while it streams in, so a
  missing or lying Content-Length does not help;
- bytes that are not UTF-8, text that is not JSON, ``NaN``/``Infinity`` and
  numbers too large for a double (422: PostgreSQL's jsonb refuses them);
- nesting deeper than ``MAX_DEPTH`` (422), found by a scan that never recurses,
  because ``json.loads`` and validation do;
- strings holding U+0000 or a lone surrogate (422: PostgreSQL cannot store
  them), reported with the path of the field that holds one.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from ledgerq import types
from ledgerq.api import errors as api_errors

MAX_BODY_BYTES_DEFAULT = 1 << 20
MAX_DEPTH = 64

# A JSON string literal (the unrolled form: linear, no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_BRACKET_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}
# What may be an escaped NUL or surrogate (raw ones cannot occur in valid JSON
# text). A cheap filter: an escaped backslash followed by "u0000" matches too,
# and the walk over the parsed value then finds nothing.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def max_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text, without parsing it."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot be deeper than the limit: skip the scan (the usual case)
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    return max(itertools.accumulate(map(_BRACKET_DELTA.__getitem__, brackets)))


def _reject_constant(name: str) -> float:
    raise api_errors.invalid_json(f"body: {name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise api_errors.invalid_json(f"body: the number {text[:40]} is too large")
    return value


def _bad_string(value: types.JsonValue, path: str) -> str | None:
    """The path of the first string (or key) that PostgreSQL cannot store."""
    if isinstance(value, str):
        if "\x00" in value:
            return path
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _bad_string(key, path) or _bad_string(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _bad_string(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def parse_json(raw: bytes) -> types.JsonValue:
    """Parse a request body, refusing what PostgreSQL or the parser cannot take."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise api_errors.invalid_json(
            f"body: not valid UTF-8 (byte {exc.start} is 0x{raw[exc.start]:02x})"
        ) from None
    if max_depth(text) > MAX_DEPTH:
        raise api_errors.invalid_json(f"body: JSON nests deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise api_errors.invalid_json(
            f"body: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise api_errors.invalid_json(f"body: not valid JSON ({exc})") from None
    if "\\u" in text and _SUSPECT_ESCAPE.search(text):
        where = _bad_string(value, "")
        if where is not None:
            raise api_errors.invalid_json(
                f"{where or 'body'}: strings must not contain U+0000 or unpaired surrogates"
            )
    return value


class LimitedRequest(Request):
    """A Request whose body is size-limited while read, and parsed defensively."""

    async def body(self) -> bytes:
        """The body, read at most once; 413 as soon as it passes the app's limit."""
        if not hasattr(self, "_body"):
            limit: int = self.app.state.max_body_bytes
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise api_errors.body_too_large(limit)
            chunks: list[bytes] = []
            size = 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise api_errors.body_too_large(limit)
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        """The body parsed by parse_json (422 for anything it refuses)."""
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class LimitedRoute(APIRoute):
    """An APIRoute whose endpoints receive a LimitedRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, given a LimitedRequest over the same scope and stream."""
        handler = super().get_route_handler()

        async def limited_handler(request: Request) -> Response:
            return await handler(LimitedRequest(request.scope, request.receive))

        return limited_handler
