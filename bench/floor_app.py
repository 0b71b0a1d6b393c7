"""The floor for ``POST /tasks`` in bench/api_bench.py: a bare FastAPI endpoint that
INSERTs the request's task into a plain table with psycopg and answers 201 with its
id, served by the same code as ``ledgerq api`` (uvicorn, httptools, uvloop when
installed, no access log). What is left between it and ``ledgerq api`` is ledgerq's own cost.

    python bench/floor_app.py DATABASE_URL PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ledgerq.api.server import serve
from ledgerq.service import loop_factory

TABLE = """
CREATE TABLE IF NOT EXISTS public.floor_tasks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


def create_app(database_url: str) -> FastAPI:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url, min_size=4, max_size=16, open=False, kwargs={"autocommit": True}
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute(TABLE)
        yield
        await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/tasks", status_code=201)
    async def create(request: Request) -> Response:
        body = await request.json()
        async with pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO public.floor_tasks (task_type, payload) VALUES (%s, %s) RETURNING id",
                (body["type"], Jsonb(body.get("payload"))),
            )
            row = await cur.fetchone()
        assert row is not None
        return Response(f'{{"id": {row[0]}}}', status_code=201, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    database_url, port = sys.argv[1], int(sys.argv[2])
    app = create_app(database_url)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(app, host="127.0.0.1", port=port))


if __name__ == "__main__":
    main()
