"""The operator commands: ``enqueue``, ``show``, ``stats``, ``types``, ``dead``, ``cancel``.

Each opens a small pool on the ledger, makes its calls and prints plain text
(``render``), or JSON with ``--json``. State changes go through the ledger's
SQL functions (``enqueue_task``, ``cancel_task``, ``retry_task``), never
through ad-hoc SQL. Listings page through the ledger ``PAGE_SIZE`` tasks at a
time, the bound every listing shares. Exit statuses follow ``common``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from ledgerq import errors, types
from ledgerq.cli import common, render
from ledgerq.client import Client
from ledgerq.ledger import Ledger

PAGE_SIZE = types.LIST_LIMIT_MAX
DEAD_LIST_DEFAULT = types.LIST_LIMIT_DEFAULT


# --- enqueue ------------------------------------------------------------------------------


def read_payload(text: str | None) -> str | None:
    """PAYLOAD_JSON as given: ``-`` reads standard input, ``@FILE`` reads FILE
    (for payloads too large for a command line); anything else is the JSON."""
    if text == "-":
        return sys.stdin.read()
    if text is not None and text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except OSError as exc:
            raise errors.InvalidInput(
                f"PAYLOAD_JSON: cannot read {path!r}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise errors.InvalidInput(f"PAYLOAD_JSON: {path!r} is not UTF-8 text") from None
    return text


def parse_payload(text: str | None) -> types.JsonObject:
    """PAYLOAD_JSON (or ``-``, or ``@FILE``) as a JSON object; InvalidInput otherwise."""
    text = read_payload(text)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.InvalidInput(f"PAYLOAD_JSON is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        kind = "array" if isinstance(value, list) else type(value).__name__
        if value is None:
            kind = "null"
        raise errors.InvalidInput(f"PAYLOAD_JSON must be a JSON object, got {kind}")
    return value


@click.command()
@click.argument("task_type", metavar="TYPE")
@click.argument("payload_json", required=False, metavar="[PAYLOAD_JSON]")
@click.option("--queue", metavar="NAME",
              help="Queue [default: the type's registered queue, else default].")  # fmt: skip
@click.option("--priority", type=click.IntRange(types.PRIORITY_MIN, types.PRIORITY_MAX),
              default=0, show_default=True, help="Higher runs first.")  # fmt: skip
@click.option("--delay", type=click.FloatRange(0), default=0, show_default=True,
              help="Seconds before the task is due.")  # fmt: skip
@click.option("--idempotency-key", metavar="KEY", help="Replaying a key returns its task.")
@click.option("--max-attempts", type=click.IntRange(1, 2**31 - 1),
              help="Attempts before DEAD [default: the type's registered value, else 5].")  # fmt: skip
@click.option("--concurrency-key", metavar="KEY",
              help="What the task competes for (a tenant, an outside API).")  # fmt: skip
@common.json_option
@common.connection_options
def enqueue(
    task_type: str,
    payload_json: str | None,
    queue: str | None,
    priority: int,
    delay: float,
    idempotency_key: str | None,
    max_attempts: int | None,
    concurrency_key: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Enqueue a task of TYPE with a JSON object PAYLOAD_JSON (default {}).

    PAYLOAD_JSON may be `-` (read standard input) or `@FILE` (read FILE), for
    payloads too large for a command line.
    """
    payload = parse_payload(payload_json)
    settings = common.settings_from(options)
    # Leaving the block closes the ledger's pool and the Redis connection the
    # client's hand-off opened.
    ledger = common.open_ledger(settings)
    with contextlib.closing(ledger), Client(settings, ledger=ledger) as client:
        task = client.enqueue(
            task_type, payload, queue=queue, priority=priority, delay=delay,
            idempotency_key=idempotency_key, max_attempts=max_attempts,
            concurrency_key=concurrency_key,
        )  # fmt: skip
    render.echo_json(task.to_json()) if as_json else click.echo(render.enqueued(task))


# --- show ---------------------------------------------------------------------------------


@click.command()
@click.argument("task_id", type=click.IntRange(1), metavar="ID")
@common.json_option
@common.connection_options
def show(task_id: int, as_json: bool, **options: Any) -> None:
    """Show a task and its attempt history."""
    ledger = common.open_ledger(common.settings_from(options))
    try:
        task = ledger.get(task_id)
    finally:
        ledger.close()
    render.echo_json(task.to_json()) if as_json else click.echo(render.task_detail(task))


# --- stats --------------------------------------------------------------------------------


@click.command()
@common.json_option
@common.connection_options
def stats(as_json: bool, **options: Any) -> None:
    """Per queue: tasks by status, ids waiting in Redis, oldest pending age, finished/min."""
    settings = common.settings_from(options)
    ledger = common.open_ledger(settings)
    try:
        summary = ledger.queue_summary()
    finally:
        ledger.close()

    async def lengths() -> dict[str, int]:
        # Redis is pinged even with no queues: stats reports Redis's side too.
        async with common.dispatch_connected(settings) as dispatch:
            return await dispatch.queue_lengths([q.queue for q in summary])

    redis_error: str | None = None
    try:
        in_redis: dict[str, int] | None = asyncio.run(lengths())
    except errors.DispatchError as exc:
        # What stats reports is the ledger's; Redis only adds its queue lengths.
        in_redis, redis_error = None, exc.message
    if as_json:
        body = render.stats_json(summary, in_redis or {})
        if in_redis is None:
            for queue in body["queues"]:
                queue["waiting_in_redis"] = None
            body["redis_error"] = redis_error
        render.echo_json(body)
    else:
        click.echo(render.stats(summary, in_redis))
    if redis_error is not None:
        click.echo(f"ledgerq: {redis_error}: the 'in Redis' counts are unknown", err=True)


# --- types --------------------------------------------------------------------------------


@click.command("types")
@common.json_option
@common.connection_options
def task_types(as_json: bool, **options: Any) -> None:
    """Task types workers registered: queue, max attempts, timeout, live workers."""
    ledger = common.open_ledger(common.settings_from(options))
    try:
        found = ledger.task_types()
    finally:
        ledger.close()
    if as_json:
        render.echo_json({"task_types": [t.to_json() for t in found]})
    else:
        click.echo(render.task_types(found))


# --- dead ---------------------------------------------------------------------------------


def dead_tasks(ledger: Ledger, *, queue: str | None, limit: int | None) -> Iterator[types.Task]:
    """DEAD tasks, newest first, a page at a time (all of them when limit is None)."""
    before: int | None = None
    left = limit
    while left is None or left > 0:
        size = PAGE_SIZE if left is None else min(left, PAGE_SIZE)
        page = ledger.list_tasks(status="DEAD", queue=queue, limit=size, before_id=before)
        yield from page.tasks
        if page.next_before_id is None:
            return
        before = page.next_before_id
        if left is not None:
            left -= len(page.tasks)


def retry_all(
    ledger: Ledger,
    *,
    queue: str | None,
    limit: int | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[int], list[int]]:
    """retry_task on every DEAD task (of queue), a page at a time.

    Returns (retried ids, skipped ids): a task skipped had left DEAD meanwhile
    (another operator retried it)."""
    retried: list[int] = []
    skipped: list[int] = []
    for task in dead_tasks(ledger, queue=queue, limit=limit):
        try:
            ledger.retry(task.id)
        except (errors.InvalidTransition, errors.TaskNotFound):
            skipped.append(task.id)
            continue
        retried.append(task.id)
        if progress is not None and len(retried) % PAGE_SIZE == 0:
            progress(len(retried))
    return retried, skipped


@click.command()
@click.option("--retry", "retry_id", type=click.IntRange(1), metavar="ID",
              help="Move this DEAD task back to PENDING.")  # fmt: skip
@click.option("--retry-all", is_flag=True, help="Retry every DEAD task (of --queue).")
@click.option("--queue", metavar="NAME", help="Only this queue.")
@click.option("--limit", type=click.IntRange(1), help=f"At most this many tasks "
              f"[listing default: {DEAD_LIST_DEFAULT}; --retry-all: all].")  # fmt: skip
@common.json_option
@common.connection_options
def dead(
    retry_id: int | None,
    retry_all: bool,
    queue: str | None,
    limit: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """List DEAD tasks (newest first) with their last error, or retry them."""
    if retry_id is not None and retry_all:
        raise click.UsageError(
            "give --retry ID or --retry-all, not both", ctx=click.get_current_context()
        )
    ledger = common.open_ledger(common.settings_from(options))
    try:
        result, text = _dead(ledger, retry_id, retry_all, queue, limit)
    finally:
        ledger.close()
    render.echo_json(result) if as_json else click.echo(text)


def _dead(
    ledger: Ledger, retry_id: int | None, retry_all_: bool, queue: str | None, limit: int | None
) -> tuple[types.JsonObject, str]:
    if retry_id is not None:
        status = ledger.retry(retry_id)
        return {"id": retry_id, "status": status.value}, (
            f"task {retry_id}: {render.styled_status(status)}"
        )
    if retry_all_:
        retried, skipped = retry_all(
            ledger, queue=queue, limit=limit,
            progress=lambda n: click.echo(f"retried {n} ...", err=True),
        )  # fmt: skip
        text = f"retried {len(retried)} DEAD task(s)" + (
            f"; {len(skipped)} had left DEAD meanwhile" if skipped else ""
        )
        return {"retried": len(retried), "skipped": len(skipped), "ids": retried}, text
    found = list(dead_tasks(ledger, queue=queue, limit=limit or DEAD_LIST_DEFAULT))
    return {"tasks": [t.to_json() for t in found]}, render.dead(found)


# --- cancel -------------------------------------------------------------------------------


@click.command()
@click.argument("task_id", type=click.IntRange(1), metavar="ID")
@common.json_option
@common.connection_options
def cancel(task_id: int, as_json: bool, **options: Any) -> None:
    """Cancel a task: at once if PENDING/QUEUED; a RUNNING one at its next heartbeat."""
    ledger = common.open_ledger(common.settings_from(options))
    try:
        status = ledger.cancel(task_id)
    finally:
        ledger.close()
    text, took_effect = render.cancelled(task_id, status)
    render.echo_json({"id": task_id, "status": status.value}) if as_json else click.echo(text)
    if not took_effect:
        sys.exit(1)
