"""``create_app()``: the one place the HTTP API's objects are built and wired.

Given a ledger and a dispatcher, the app uses them and leaves closing them to
the caller (tests, ``ledgerq api``, ``ledgerq run``). Given neither, it opens
both from the settings when it starts (the ASGI lifespan) and closes them when
it stops, so ``uvicorn 'module:app'`` works with a plain ``create_app(settings)``.
Mounted inside another app, its lifespan runs only through ``lifespan(app)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from ledgerq import __version__, config
from ledgerq.api import auth, body, state
from ledgerq.api import errors as api_errors
from ledgerq.api.routes import queues, schedules, system, tasks
from ledgerq.api.ui import routes as ui_routes
from ledgerq.api.ui import sessions
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger

#: Connections the API's pool keeps at most; each request holds one briefly.
POOL_SIZE_DEFAULT = 10


@contextlib.asynccontextmanager
async def lifespan(*apps: FastAPI) -> AsyncIterator[None]:
    """Run the lifespan of ledgerq apps mounted inside another ASGI app.

    A mounted sub-application's own lifespan never runs (Starlette runs only the
    outer app's), so its ledger and Redis connections would never open and every
    route would answer 503. Enter this in the outer app's lifespan::

        queue_api = create_app(Settings.from_env())

        @contextlib.asynccontextmanager
        async def app_lifespan(app: FastAPI):
            async with ledgerq.api.lifespan(queue_api):
                yield

        app = FastAPI(lifespan=app_lifespan)
        app.mount("/queue", queue_api)
    """
    async with contextlib.AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield


def create_app(
    settings: config.Settings,
    *,
    ledger: AsyncLedger | None = None,
    dispatch: Dispatch | None = None,
    max_body_bytes: int = body.MAX_BODY_BYTES_DEFAULT,
    trust_forwarded_proto: bool = False,
) -> FastAPI:
    """The ledgerq HTTP API and its dashboard (/ui/), with the README's routes,
    errors, auth and roles. trust_forwarded_proto: believe X-Forwarded-Proto
    (only behind a proxy every request goes through) when marking the
    dashboard's cookie Secure."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Open what was not given, and close only that."""
        if app.state.services is not None:
            yield
            return
        opened_ledger = ledger or await AsyncLedger.connect(
            settings.database_url, max_size=POOL_SIZE_DEFAULT
        )
        opened_dispatch = dispatch or Dispatch.connect(
            settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster
        )
        services = app.state.services = state.Services(opened_ledger, opened_dispatch)
        try:
            yield
        finally:
            app.state.services = None
            # Hand-offs still on their way to Redis finish first: their tasks
            # are QUEUED already, and a push cut off here would leave them to
            # the dispatcher's redelivery sweep (seconds later).
            await services.enqueuer.flush()
            if ledger is None:
                await opened_ledger.close()
            if dispatch is None:
                await opened_dispatch.close()

    app = FastAPI(
        title="ledgerq",
        version=__version__,
        summary="A task queue whose ledger is PostgreSQL and whose dispatcher is Redis.",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.max_body_bytes = max_body_bytes
    #: Set when the server begins a graceful shutdown: long waits answer at once.
    app.state.stopping = asyncio.Event()
    app.state.services = (
        state.Services(ledger, dispatch) if ledger is not None and dispatch is not None else None
    )
    # Routes sit on the app's own router (see routes.tasks.register).
    app.router.route_class = body.LimitedRoute
    tasks.register(app.router)
    system.register(app.router)
    queues.register(app.router)
    schedules.register(app.router)
    ui_routes.register(
        app,
        sessions.Keys.from_tokens(
            settings.api_token,
            settings.api_readonly_token,
            trust_forwarded_proto=trust_forwarded_proto,
        ),
    )
    api_errors.install(app)
    # The last added middleware runs first: the catch-all wraps auth.
    if settings.api_token is not None:
        app.add_middleware(
            auth.BearerAuthMiddleware,
            token=settings.api_token,
            readonly_token=settings.api_readonly_token,
        )
        plain_openapi = app.openapi

        def openapi() -> dict[str, Any]:
            """FastAPI's schema, with the bearer scheme declared."""
            if app.openapi_schema is None:
                app.openapi_schema = auth.document(plain_openapi())
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(api_errors.CatchAllMiddleware)
    return app
