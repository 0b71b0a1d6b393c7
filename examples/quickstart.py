"""A minimal ledgerq app: `ledgerq worker --app quickstart:tasks` (from this folder)."""

from __future__ import annotations

import asyncio
import dataclasses

from ledgerq import Context, NonRetryable, Registry

tasks = Registry()


@dataclasses.dataclass
class Email:
    to: str
    subject: str = "hello"


@tasks.task("email.send", queue="default", max_attempts=5, timeout=30)
async def send_email(ctx: Context, payload: Email) -> dict[str, str]:
    message_id = await ctx.once(f"email:{ctx.task_id}", lambda: f"msg-{ctx.task_id}")
    return {"to": payload.to, "message_id": message_id}


@tasks.task("noop")
async def noop(ctx: Context, payload: dict[str, object]) -> None:
    return None


@tasks.task("sleep")
async def sleep(ctx: Context, payload: dict[str, float]) -> None:
    await asyncio.sleep(payload.get("seconds", 0.01))


@tasks.task("report.build")
def build_report(ctx: Context, payload: dict[str, object]) -> dict[str, object]:
    if payload.get("fail"):
        raise NonRetryable("the report definition is invalid")
    return {"rows": 3}
