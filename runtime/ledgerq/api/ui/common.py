"""What the dashboard's pages and actions share: its state on the app, who is
signed in, form parsing and the refusal pages."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ledgerq import reads
from ledgerq.api import schemas
from ledgerq.api.state import services
from ledgerq.api.ui import render, sessions

#: Pages reload themselves this often (seconds).
REFRESH_S = 10
#: A form body larger than this is refused before it is parsed.
FORM_MAX_BYTES = 64 * 1024


@dataclasses.dataclass(slots=True)
class UiState:
    """The dashboard's keys, and the optional SQL objects the ledger has."""

    keys: sessions.Keys
    features: reads.Features | None = None


def ui_state(request: Request) -> UiState:
    state: UiState = request.app.state.ui
    return state


async def features(request: Request) -> reads.Features:
    """Asked of the ledger once (the first page served), then remembered: a
    migration that adds queue controls or schedules shows after a restart."""
    state = ui_state(request)
    if state.features is None:
        state.features = await services(request).ledger.dashboard_features()
    return state.features


def current_session(request: Request) -> sessions.Session | None:
    """The signed-in session of request, if its cookie is valid."""
    return ui_state(request).keys.read(request.cookies.get(sessions.COOKIE_NAME))


class Form:
    """A URL-encoded form body: its fields, several values per name allowed."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.pairs if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]


async def read_form(request: Request) -> Form | None:
    """The form request posted, or None if it is too large or not text."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > FORM_MAX_BYTES:
            return None
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode()
        return Form(parse_qsl(text, keep_blank_values=True, max_num_fields=2000))
    except (UnicodeDecodeError, ValueError):
        return None


def refusal(request: Request, status_code: int, message: str) -> Response:
    """An HTML page saying why an action was refused (no secret in it)."""
    return render.page(
        "refused.html",
        status_code=status_code,
        message=message,
        session=current_session(request),
        features=reads.Features(),
        refresh_s=None,
        title="Refused",
        nav="",
    )


def redirect(location: str) -> Response:
    """See-other to a path of the dashboard (never a URL taken from the request)."""
    return RedirectResponse(location, status_code=303, headers=render.SECURITY_HEADERS)


def html_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for dashboard answers, which are HTML pages."""
    descriptions = {
        200: "The page.",
        303: "Done (or not signed in): see the page named in Location.",
        401: "Wrong token.",
        403: "Refused: no valid CSRF token, not signed in, or a read-only session.",
        404: "No such task, queue or schedule.",
        409: "The task's status does not allow this.",
        422: "A setting's value is not allowed; the page names it.",
    }
    answers: dict[int | str, dict[str, Any]] = {
        s: {"description": descriptions[s]}
        if s == 303  # a redirect has no body
        else {"description": descriptions[s], "content": {"text/html": {}}}
        for s in statuses
    }
    # A malformed parameter, or the ledger unreachable: the API's JSON errors.
    for s, entry in schemas.error_responses(422, 503).items():
        answers.setdefault(s, {"content": {"text/html": {}}}).update(entry)
    return answers


def bare_context() -> dict[str, Any]:
    """Template values of a page shown to nobody signed in."""
    return {
        "session": None,
        "features": reads.Features(),
        "refresh_s": None,
        "nav": "",
        "title": "Sign in",
    }
