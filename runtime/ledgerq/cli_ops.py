"""The ``ledgerq`` commands for operators, development and the demo.

``enqueue``, ``show``, ``stats``, ``types``, ``dead``, ``cancel`` (logic in ``ledgerq.admin``),
``run`` (``ledgerq.supervise``), ``demo`` (``ledgerq.demo``) and ``bench``
(``ledgerq.benchrun``), registered on ``ledgerq.cli.main`` when ``ledgerq.cli``
is imported. Each exits non-zero with one line on stderr when PostgreSQL or
Redis cannot be reached (1) or its input is invalid (2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ledgerq import admin, benchrun, config, errors, supervise
from ledgerq.cli import (
    _split_queues,
    connection_options,
    load_registry,
    log_options,
    main,
    settings_from,
    warn_undeclared_queues,
)
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import probe
from ledgerq.reaper import REAPER_INTERVAL_DEFAULT_S
from ledgerq.worker import CONCURRENCY_DEFAULT, LEASE_DEFAULT_S

F = TypeVar("F", bound=Callable[..., Any])

# `run` is for development: a Ctrl-C should not wait long for running tasks.
RUN_GRACE_DEFAULT_S = 5.0


# --- operators: enqueue, show, stats, dead, cancel (logic in ledgerq.admin) ----------


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")(func)


@main.command()
@click.argument("task_type", metavar="TYPE")
@click.argument("payload_json", required=False, metavar="[PAYLOAD_JSON]")
@click.option("--queue", metavar="NAME", help="Queue [default: default].")
@click.option("--priority", type=click.IntRange(-32768, 32767), default=0, show_default=True,
              help="Higher runs first.")  # fmt: skip
@click.option("--delay", type=click.FloatRange(0), default=0, show_default=True,
              help="Seconds before the task is due.")  # fmt: skip
@click.option("--idempotency-key", metavar="KEY", help="Replaying a key returns its task.")
@click.option("--max-attempts", type=click.IntRange(1), help="Attempts before DEAD [default: 5].")
@_json_option
@connection_options
@admin.command_errors
def enqueue(
    task_type: str,
    payload_json: str | None,
    queue: str | None,
    priority: int,
    delay: float,
    idempotency_key: str | None,
    max_attempts: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Enqueue a task of TYPE with a JSON object PAYLOAD_JSON (default {}).

    PAYLOAD_JSON may be `-` (read standard input) or `@FILE` (read FILE), for
    payloads too large for a command line.
    """
    payload = admin.parse_payload(payload_json)
    settings = settings_from(options)
    ledger = admin.open_ledger(settings)
    try:
        task = admin.enqueue(
            ledger, settings, task_type, payload, queue=queue, priority=priority,
            delay_s=delay, idempotency_key=idempotency_key, max_attempts=max_attempts,
        )  # fmt: skip
    finally:
        ledger.close()
    admin.echo_json(task.to_json()) if as_json else click.echo(admin.render_enqueued(task))


@main.command("types")
@_json_option
@connection_options
@admin.command_errors
def task_types(as_json: bool, **options: Any) -> None:
    """Task types workers registered: queue, max attempts, timeout, live workers."""
    ledger = admin.open_ledger(settings_from(options))
    try:
        types = ledger.task_types()
    finally:
        ledger.close()
    if as_json:
        admin.echo_json({"task_types": [t.to_json() for t in types]})
    else:
        click.echo(admin.render_types(types))


@main.command()
@click.argument("task_id", type=click.IntRange(1), metavar="ID")
@_json_option
@connection_options
@admin.command_errors
def show(task_id: int, as_json: bool, **options: Any) -> None:
    """Show a task and its attempt history."""
    ledger = admin.open_ledger(settings_from(options))
    try:
        task = ledger.get(task_id)
    finally:
        ledger.close()
    admin.echo_json(task.to_json()) if as_json else click.echo(admin.render_task(task))


@main.command()
@_json_option
@connection_options
@admin.command_errors
def stats(as_json: bool, **options: Any) -> None:
    """Per queue: tasks by status, ids waiting in Redis, oldest pending age, finished/min."""
    settings = settings_from(options)
    ledger = admin.open_ledger(settings)
    try:
        summary = ledger.queue_summary()
    finally:
        ledger.close()

    async def lengths() -> dict[str, int]:
        dispatch = Dispatch.connect(
            settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster
        )
        try:
            await dispatch.ping()  # even with no queues: stats reports Redis's side too
            return await dispatch.queue_lengths([q.queue for q in summary])
        finally:
            await dispatch.close()

    redis_error: str | None = None
    try:
        in_redis: dict[str, int] | None = asyncio.run(lengths())
    except errors.DispatchError as exc:
        # What stats reports is the ledger's; Redis only adds its queue lengths.
        in_redis, redis_error = None, exc.message
    if as_json:
        body = admin.stats_json(summary, in_redis or {})
        if in_redis is None:
            for queue in body["queues"]:
                queue["waiting_in_redis"] = None
            body["redis_error"] = redis_error
        admin.echo_json(body)
    else:
        click.echo(admin.render_stats(summary, in_redis))
    if redis_error is not None:
        click.echo(f"ledgerq: {redis_error}: the 'in Redis' counts are unknown", err=True)


@main.command()
@click.option("--retry", "retry_id", type=click.IntRange(1), metavar="ID",
              help="Move this DEAD task back to PENDING.")  # fmt: skip
@click.option("--retry-all", is_flag=True, help="Retry every DEAD task (of --queue).")
@click.option("--queue", metavar="NAME", help="Only this queue.")
@click.option("--limit", type=click.IntRange(1), help=f"At most this many tasks "
              f"[listing default: {admin.DEAD_LIST_DEFAULT}; --retry-all: all].")  # fmt: skip
@_json_option
@connection_options
@admin.command_errors
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
        admin.fail("give --retry ID or --retry-all, not both", 2)
    ledger = admin.open_ledger(settings_from(options))
    try:
        if retry_id is not None:
            status = ledger.retry(retry_id)
            result: Any = {"id": retry_id, "status": status.value}
            text = f"task {retry_id}: {admin.styled_status(status)}"
        elif retry_all:
            retried, skipped = admin.retry_all(
                ledger, queue=queue, limit=limit,
                progress=lambda n: click.echo(f"retried {n} ...", err=True),
            )  # fmt: skip
            result = {"retried": len(retried), "skipped": len(skipped), "ids": retried}
            text = f"retried {len(retried)} DEAD task(s)" + (
                f"; {len(skipped)} had left DEAD meanwhile" if skipped else ""
            )
        else:
            found = list(
                admin.dead_tasks(ledger, queue=queue, limit=limit or admin.DEAD_LIST_DEFAULT)
            )
            result = {"tasks": [t.to_json() for t in found]}
            text = admin.render_dead(found)
    finally:
        ledger.close()
    admin.echo_json(result) if as_json else click.echo(text)


@main.command()
@click.argument("task_id", type=click.IntRange(1), metavar="ID")
@_json_option
@connection_options
@admin.command_errors
def cancel(task_id: int, as_json: bool, **options: Any) -> None:
    """Cancel a task: at once if PENDING/QUEUED; a RUNNING one at its next heartbeat."""
    ledger = admin.open_ledger(settings_from(options))
    try:
        status = ledger.cancel(task_id)
    finally:
        ledger.close()
    text, took_effect = admin.render_cancelled(task_id, status)
    admin.echo_json({"id": task_id, "status": status.value}) if as_json else click.echo(text)
    if not took_effect:
        sys.exit(1)


# --- run, demo, bench ------------------------------------------------------------------


@main.command()
@click.option("--app", required=True, metavar="MODULE:REGISTRY", help="Where the Registry is.")
@click.option("--queues", metavar="A,B", help="Queues the workers serve [default: the registry's].")
@click.option("--concurrency", type=click.IntRange(1, 10_000), default=CONCURRENCY_DEFAULT,
              show_default=True, help="Handlers running at once per worker process.")  # fmt: skip
@click.option("--processes", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes.")  # fmt: skip
@click.option("--lease-seconds", type=click.IntRange(3, 86_400), default=LEASE_DEFAULT_S,
              show_default=True, help="Lease per attempt.")  # fmt: skip
@click.option("--reaper-interval", type=click.FloatRange(0.05), default=REAPER_INTERVAL_DEFAULT_S,
              show_default=True, help="Seconds between reaper sweeps.")  # fmt: skip
@click.option("--grace-seconds", type=click.FloatRange(0), default=RUN_GRACE_DEFAULT_S,
              show_default=True, help="On Ctrl-C, how long running tasks may finish before "
              "they are handed back (short: this is for development).")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="API address.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="API port.")  # fmt: skip
@log_options
@connection_options
@admin.command_errors
def run(
    app: str,
    queues: str | None,
    concurrency: int,
    processes: int,
    lease_seconds: int,
    reaper_interval: float,
    grace_seconds: float,
    host: str,
    port: int,
    log_level: str,
    **options: Any,
) -> None:
    """Run the API, a dispatcher, a reaper and workers together, for development.

    They run as child processes in one process group; one Ctrl-C or SIGTERM
    stops them all gracefully, letting running tasks finish within
    --grace-seconds (a second one kills them at once), and exits 0.
    """
    from ledgerq.api import server as api_server

    settings = settings_from(options)
    registry = load_registry(app)  # fail fast, with one line, before starting anything
    warn_undeclared_queues(_split_queues(queues), registry, app)
    if settings.api_token is None and not api_server.is_loopback(host):
        admin.fail(f"refusing to serve the API on {host} without LEDGERQ_API_TOKEN", 2)
    probe(settings.database_url)
    asyncio.run(_ping_redis(settings))
    group = supervise.ProcessGroup(settings)
    level = ["--log-level", log_level]
    worker_args = ["worker", "--app", app, "--concurrency", str(concurrency),
                   "--lease-seconds", str(lease_seconds), "--grace-seconds", str(grace_seconds),
                   *level]  # fmt: skip
    if queues:
        worker_args += ["--queues", queues]
    try:
        group.start("api", ["api", "--host", host, "--port", str(port), *level])
        group.start("dispatcher", ["dispatcher", *level])
        group.start("reaper", ["reaper", "--interval", str(reaper_interval), *level])
        for n in range(1, processes + 1):
            group.start(f"worker-{n}", worker_args)
    except BaseException:
        group.stop(timeout_s=5)
        raise
    sys.exit(supervise.supervise(group, grace_s=grace_seconds))


async def _ping_redis(settings: config.Settings) -> None:
    dispatch = Dispatch.connect(settings.redis_url, settings.redis_prefix,
                                cluster=settings.redis_cluster, timeout_s=5)  # fmt: skip
    try:
        await dispatch.ping()
    finally:
        await dispatch.close()


@main.command()
@click.option("--database-url", metavar="URL", help="The PostgreSQL server; the demo makes a "
              "database of its own there [env LEDGERQ_DATABASE_URL].")  # fmt: skip
@click.option("--database-name", default="ledgerq_demo", show_default=True,
              help="The demo's database, recreated on every run.")  # fmt: skip
@click.option("--redis-url", metavar="URL", help="The Redis [env LEDGERQ_REDIS_URL].")
@click.option("--redis-prefix", default="ledgerq-demo", show_default=True,
              help="The demo's Redis key prefix.")  # fmt: skip
@click.option("--redis-cluster/--no-redis-cluster", default=None, help="Redis is a cluster.")
@click.option("--drop", is_flag=True, help="Drop the demo database at the end.")
@click.option("--timeout", type=click.FloatRange(5), default=90, show_default=True,
              help="Give up after this many seconds.")  # fmt: skip
@admin.command_errors
def demo(
    database_url: str | None,
    database_name: str,
    redis_url: str | None,
    redis_prefix: str,
    redis_cluster: bool | None,
    drop: bool,
    timeout: float,
) -> None:
    """Run the whole system on a workload and check each guarantee against the ledger.

    Starts the API, a dispatcher, a reaper and two workers, kills a worker
    mid-task, and exits 0 only if every guarantee held.
    """
    from ledgerq import demo as demo_run

    settings = config.Settings.from_env(
        database_url=database_url, redis_url=redis_url, redis_prefix=redis_prefix,
        redis_cluster=redis_cluster,
    )  # fmt: skip
    options = demo_run.Options(settings, database_name, drop=drop, timeout_s=timeout)
    sys.exit(demo_run.run_demo(options))


@main.command()
@click.argument("suites", nargs=-1, metavar="[SUITE]...")
@click.option("--full", is_flag=True, help="Full sizes (minutes) instead of a quick run.")
@_json_option
@connection_options
@admin.command_errors
def bench(suites: tuple[str, ...], full: bool, as_json: bool, **options: Any) -> None:
    """Run the benchmarks under bench/ (SUITE: sql, runtime, api; default all) in one table."""
    settings = settings_from(options)
    probe(settings.database_url)

    def announce(name: str, script: str) -> None:
        click.echo(f"running bench/{script} ({'full' if full else 'quick'}) ...", err=True)

    runs = benchrun.run_all(settings, suites, full=full, base_env=os.environ, announce=announce)
    if as_json:
        admin.echo_json([dataclasses.asdict(r) | {"output_file": str(r.output_file)} for r in runs])
    else:
        rows = [[r.suite, r.measure, r.result, r.target, r.ok] for s in runs for r in s.rows]
        rows += [[s.suite, f"{s.script} FAILED (exit {s.returncode})", "", "", ""]
                 for s in runs if s.returncode != 0]  # fmt: skip
        click.echo(admin.table(["suite", "measure", "result", "target", "ok"], rows))
        outputs = ", ".join(str(s.output_file) for s in runs)
        click.echo(f"full outputs: {outputs}")
    if any(s.returncode != 0 for s in runs):
        sys.exit(1)
