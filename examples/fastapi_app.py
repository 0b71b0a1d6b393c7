"""ledgerq inside an existing FastAPI app: `uvicorn fastapi_app:app` (from this folder).

- Your own routes enqueue with one shared AsyncClient, opened and closed by
  your app's lifespan.
- The ledgerq HTTP API is mounted under /queue; a mounted app's lifespan does
  not run by itself, so your lifespan runs it with ledgerq.api.lifespan.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request

import ledgerq.api
from ledgerq import AsyncClient
from ledgerq.config import Settings

settings = Settings.from_env()
queue_api = ledgerq.api.create_app(settings)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncClient(settings) as client, ledgerq.api.lifespan(queue_api):
        app.state.ledgerq = client
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/queue", queue_api)


@app.post("/signup")
async def signup(request: Request, email: str) -> dict[str, object]:
    client: AsyncClient = request.app.state.ledgerq
    task = await client.enqueue("email.send", {"to": email}, idempotency_key=f"welcome:{email}")
    return {"task_id": task.id, "status": task.status}


@app.get("/signup/{task_id}")
async def signup_status(request: Request, task_id: int) -> dict[str, object]:
    client: AsyncClient = request.app.state.ledgerq
    try:
        task = await client.wait(task_id, timeout=5)  # woken by the ledger, not polled
    except TimeoutError:
        task = await client.get(task_id)
    return {"task_id": task.id, "status": task.status, "result": task.result}
