"""The task app ``ledgerq demo`` runs: ``ledgerq worker --app ledgerq.cli.demo.app:tasks``.

Its task types each leave its side effect in an
execution log the demo later counts (tables in the demo database's ``demo``
schema; none has a unique constraint, so an effect that ran twice would show
as two rows):

- ``email.send`` sends through a pretend mail provider (a row in
  ``demo.email_logs``, written over a connection of the provider's own, as an
  outside system would be) inside ``ctx.once``; ``flaky_failures: N`` makes
  the first N attempts fail *after* the send, as a dropped SMTP reply would.
- ``payment.charge`` writes ``demo.payment_logs`` with
  ``ctx.once_in_transaction``: the row, the effect record and the task's
  completion commit together.
- ``operation.run`` sleeps ``seconds`` (a long job), fails every attempt when
  ``fail`` is set, and otherwise writes ``demo.operation_logs`` with
  ``ctx.once_in_transaction``.
- ``tenant.sync`` (queue ``tenants``, the flow-control part) does the same for
  one tenant, whose name is the task's concurrency key.

Handlers reach the demo database through ``LEDGERQ_DATABASE_URL``, which the
demo sets for the workers it starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import psycopg

from ledgerq import Context, Registry, Retryable

tasks = Registry()

LOG_TABLES = ("email_logs", "payment_logs", "operation_logs")
#: The effect key prefix each log's rows carry.
LOG_PREFIXES = {"email_logs": "email:", "payment_logs": "payment:", "operation_logs": "operation:"}

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS demo;
CREATE TABLE IF NOT EXISTS demo.email_logs (
    effect_key text NOT NULL, task_id bigint NOT NULL, recipient text NOT NULL,
    template text NOT NULL, sent_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS demo.payment_logs (
    effect_key text NOT NULL, task_id bigint NOT NULL, account text NOT NULL,
    amount_cents bigint NOT NULL, charged_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS demo.operation_logs (
    effect_key text NOT NULL, task_id bigint NOT NULL, operation text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
"""

# The demo's own tables, with names from LOG_TABLES only.
_COUNT_QUERIES = {
    "email_logs": "SELECT effect_key, count(*) FROM demo.email_logs GROUP BY effect_key",
    "payment_logs": "SELECT effect_key, count(*) FROM demo.payment_logs GROUP BY effect_key",
    "operation_logs": "SELECT effect_key, count(*) FROM demo.operation_logs GROUP BY effect_key",
}


def create_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the demo's execution logs."""
    conn.execute(SCHEMA_SQL)


def log_rows(conn: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    """For each execution log: rows per effect key."""
    return {
        table: {str(key): int(n) for key, n in conn.execute(query).fetchall()}
        for table, query in _COUNT_QUERIES.items()
    }


def _database_url() -> str:
    return os.environ.get("LEDGERQ_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


_schema_ready = False


async def _ensure_schema() -> None:
    """Create the execution logs on first use, so the app also serves a database the
    demo did not prepare (compose.yaml's worker). Under an advisory lock: concurrent
    CREATE ... IF NOT EXISTS from several workers can still collide in the catalog."""
    global _schema_ready
    if _schema_ready:
        return
    async with await psycopg.AsyncConnection.connect(_database_url()) as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('ledgerq.demo.schema'))")
        await conn.execute(SCHEMA_SQL)
    _schema_ready = True


@dataclasses.dataclass
class Email:
    """An email to send."""

    to: str
    template: str
    flaky_failures: int = 0


@dataclasses.dataclass
class Charge:
    """A card payment to take."""

    account: str
    amount_cents: int
    currency: str = "EUR"


@dataclasses.dataclass
class Operation:
    """A ledger operation (month-end close, statement rebuild...)."""

    name: str
    seconds: float = 0.0
    fail: bool = False


async def _mail_provider_send(effect_key: str, task_id: int, email: Email) -> str:
    """The pretend mail provider: an outside system, so a connection of its own."""
    async with await psycopg.AsyncConnection.connect(_database_url(), autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO demo.email_logs (effect_key, task_id, recipient, template) "
            "VALUES (%s, %s, %s, %s)",
            (effect_key, task_id, email.to, email.template),
        )
    return f"msg-{task_id}"


# The demo's schedule (see ``periodic``) fires into a queue of its own, so the
# workload's progress and checks count only the tasks the workload submitted.
SCHEDULE_QUEUE = "demo-schedules"


@tasks.task("demo.tick", queue=SCHEDULE_QUEUE, max_attempts=1, timeout=10)
async def tick(ctx: Context, payload: dict[str, Any]) -> None:
    """A schedule's slot: nothing to do but exist once."""


@tasks.task("email.send", max_attempts=5, timeout=10)
async def send_email(ctx: Context, payload: Email) -> dict[str, Any]:
    """Send once, whatever happens after the send."""
    await _ensure_schema()
    key = f"email:{ctx.task_id}"
    message_id = await ctx.once(key, _mail_provider_send, key, ctx.task_id, payload)
    if ctx.attempt <= payload.flaky_failures:
        raise Retryable(f"SMTP connection reset before the reply (attempt {ctx.attempt})")
    return {"message_id": message_id, "attempt": ctx.attempt}


@tasks.task("payment.charge", max_attempts=5, timeout=10)
async def charge(ctx: Context, payload: Charge) -> dict[str, Any]:
    """Record the charge exactly once, in the transaction that completes the task."""
    await _ensure_schema()
    key = f"payment:{ctx.task_id}"

    async def write(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        await conn.execute(
            "INSERT INTO demo.payment_logs (effect_key, task_id, account, amount_cents) "
            "VALUES (%s, %s, %s, %s)",
            (key, ctx.task_id, payload.account, payload.amount_cents),
        )
        return {"charged_cents": payload.amount_cents, "currency": payload.currency}

    result: dict[str, Any] = await ctx.once_in_transaction(key, write)
    return result


@tasks.task("operation.run", max_attempts=5, timeout=20)
async def run_operation(ctx: Context, payload: Operation) -> dict[str, Any]:
    """A long job that applies its operation exactly once."""
    await _ensure_schema()
    if payload.seconds > 0:
        await asyncio.sleep(payload.seconds)
    if payload.fail:
        raise RuntimeError(f"operation {payload.name} failed: the period is locked")
    key = f"operation:{ctx.task_id}"

    async def write(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        await conn.execute(
            "INSERT INTO demo.operation_logs (effect_key, task_id, operation) VALUES (%s, %s, %s)",
            (key, ctx.task_id, payload.name),
        )
        return {"applied": payload.name}

    result: dict[str, Any] = await ctx.once_in_transaction(key, write)
    return result


#: The queue of the demo's flow-control part (see ``flow``): two tenants under limits.
TENANT_QUEUE = "tenants"


@dataclasses.dataclass
class TenantSync:
    """One tenant's sync job: a short wait on an outside system."""

    tenant: str
    n: int = 0
    seconds: float = 0.2


@tasks.task("tenant.sync", queue=TENANT_QUEUE, max_attempts=5, timeout=20)
async def sync_tenant(ctx: Context, payload: TenantSync) -> dict[str, Any]:
    """Sleep, then apply the sync exactly once (an operation log row)."""
    await _ensure_schema()
    await asyncio.sleep(payload.seconds)
    key = f"operation:{ctx.task_id}"

    async def write(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        await conn.execute(
            "INSERT INTO demo.operation_logs (effect_key, task_id, operation) VALUES (%s, %s, %s)",
            (key, ctx.task_id, f"sync {payload.tenant} #{payload.n}"),
        )
        return {"synced": payload.tenant}

    result: dict[str, Any] = await ctx.once_in_transaction(key, write)
    return result
