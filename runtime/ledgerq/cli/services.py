"""The service commands: ``migrate``, ``worker``, ``dispatcher``, ``reaper``, ``api``.

Each builds its service from the settings (the only place besides
``api.create_app`` that builds concrete objects from configuration), checks
PostgreSQL and Redis are reachable before it starts (one line and exit 1 if
not), and serves until SIGTERM/SIGINT (``service.run_until_signalled``): the
first signal stops it gracefully and it exits 0, a second exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any

import click
import prometheus_client

from ledgerq import config, errors, metrics, migrations, service
from ledgerq.cli import common, supervise
from ledgerq.dispatch import Dispatch
from ledgerq.dispatcher import BATCH_SIZE_DEFAULT, POLL_INTERVAL_DEFAULT_S, Dispatcher
from ledgerq.ledger import AsyncLedger
from ledgerq.reaper import PRUNE_INTERVAL_DEFAULT_S, VACUUM_DEAD_ROWS_DEFAULT, Reaper
from ledgerq.worker import GRACE_DEFAULT_S, Worker

# --- migrate ------------------------------------------------------------------------------


@click.group(invoke_without_command=True)
@common.connection_options
@click.pass_context
def migrate(ctx: click.Context, /, **options: Any) -> None:
    """Create or update the ledgerq schema (idempotent; safe to run concurrently)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = common.settings_from(options)
    applied = migrations.migrate(settings.database_url)
    target = settings.redacted_database_url()
    if applied:
        click.echo(f"applied {len(applied)} migration(s) to {target}: {', '.join(applied)}")
    else:
        click.echo(f"schema up to date at {target}")
    click.echo(f"functions re-applied ({len(migrations.function_files())} files)")


@migrate.command("show")
@click.argument("name")
def migrate_show(name: str) -> None:
    """Print one migration's raw SQL (by number, e.g. 1, or file name)."""
    click.echo(migrations.show(name), nl=False)


# --- worker ---------------------------------------------------------------------------------


def _worker_process(
    settings: config.Settings,
    app: str,
    queues: list[str] | None,
    concurrency: int,
    lease_s: int,
    grace_s: float,
    log_level: str,
    metrics_port: int | None = None,
) -> None:
    """One worker process: its own event loop, pools and Redis connections."""
    common.setup_logging(log_level)
    registry = common.load_registry(app)
    if metrics_port is not None:
        prometheus_client.start_http_server(
            metrics_port, addr="127.0.0.1", registry=metrics.REGISTRY
        )

    async def serve(runner: service.Runner) -> int:
        pool_size = min(concurrency + 4, 50)
        async with common.connected(settings, pool_size=pool_size) as (ledger, dispatch):
            worker = Worker(
                registry, ledger, dispatch, queues=queues, concurrency=concurrency,
                lease_s=lease_s, grace_s=grace_s,
            )  # fmt: skip
            await runner.serve(worker)
            return worker.abandoned_threads

    if service.run_until_signalled(serve):
        # Handler threads still running were left to their leases; Python would
        # wait for them at exit, so leave now (the ledger has everything).
        sys.stderr.flush()
        os._exit(0)


def _worker_child(parent_pid: int, *args: Any) -> None:
    """A child of ``worker --processes N``: it leaves the terminal's process group,
    so a Ctrl-C reaches only the parent, which passes exactly one SIGTERM on (a
    second signal would stop a worker at once); and it dies with the parent."""
    os.setpgrp()
    supervise.die_with_parent(parent_pid)
    try:
        _worker_process(*args)
    except errors.LedgerqError as exc:
        sys.exit(common.report(exc))


@click.command()
@common.worker_options
@click.option("--grace-seconds", type=click.FloatRange(0), default=GRACE_DEFAULT_S,
              show_default=True, help="On SIGTERM/SIGINT, how long running tasks may finish "
              "before they are handed back.")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65_535), metavar="PORT",
              help="Serve this worker's Prometheus metrics on 127.0.0.1:PORT/metrics "
              "(with --processes N, process i uses PORT+i).")  # fmt: skip
@common.log_level_option
@common.connection_options
def worker(
    app: str,
    queues: str | None,
    concurrency: int,
    processes: int,
    lease_seconds: int,
    grace_seconds: float,
    metrics_port: int | None,
    log_level: str,
    **options: Any,
) -> None:
    """Run task handlers: pop ids from Redis, claim them, run them, record outcomes.

    SIGTERM/SIGINT: stop taking work, let running tasks finish within the grace
    period, hand back the rest, exit 0.
    """
    settings = common.settings_from(options)
    # Fail fast, with a one-line message, before forking.
    registry = common.load_registry(app)
    if len(registry) == 0:
        raise errors.ConfigError(f"{app} has no task types: a worker would serve nothing")
    queue_list = common.split_queues(queues)
    common.warn_undeclared_queues(queue_list, registry, app)
    args = (settings, app, queue_list, concurrency, lease_seconds, grace_seconds, log_level)
    if processes == 1:
        _worker_process(*args, metrics_port)
        return
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_worker_child,
            args=(os.getpid(), *args, metrics_port + i if metrics_port else None),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    forwarded = False

    def forward(_signum: int, _frame: object) -> None:
        # Exactly one SIGTERM per child: their graceful stop. A second signal
        # to the parent is the operator insisting: stop them at once.
        nonlocal forwarded
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGKILL if forwarded else signal.SIGTERM)
        forwarded = True

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    if any(c.exitcode not in (0, None) for c in children):
        sys.exit(1)


# --- dispatcher, reaper ---------------------------------------------------------------------


@click.command()
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=BATCH_SIZE_DEFAULT,
              show_default=True, help="Tasks moved to Redis per transaction.")  # fmt: skip
@click.option("--poll-interval", type=click.FloatRange(0.01), default=POLL_INTERVAL_DEFAULT_S,
              show_default=True, help="Seconds between polls when no NOTIFY arrives.")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65_535), metavar="PORT",
              help="Serve this dispatcher's Prometheus metrics (schedule slots) on "
              "127.0.0.1:PORT/metrics.")  # fmt: skip
@common.log_level_option
@common.connection_options
def dispatcher(
    batch_size: int, poll_interval: float, metrics_port: int | None, log_level: str,
    **options: Any,
) -> None:  # fmt: skip
    """Move due tasks from PostgreSQL to Redis (woken by NOTIFY, and polling), and fire
    the schedules' due slots every second."""
    settings = common.settings_from(options)
    common.setup_logging(log_level)
    if metrics_port is not None:
        prometheus_client.start_http_server(
            metrics_port, addr="127.0.0.1", registry=metrics.REGISTRY
        )

    async def serve(runner: service.Runner) -> None:
        async with common.connected(settings) as (ledger, dispatch):
            dispatcher = Dispatcher(
                ledger, dispatch, database_url=settings.database_url,
                batch_size=batch_size, poll_interval_s=poll_interval,
            )  # fmt: skip
            await runner.serve(dispatcher)

    service.run_until_signalled(serve)


@click.command()
@common.reaper_interval_option("--interval", "Seconds between sweeps.")
@click.option("--once", is_flag=True, help="Sweep once (and prune once, unless --no-prune), "
              "print how many tasks moved and were deleted, and exit.")  # fmt: skip
@click.option("--prune-interval", type=click.FloatRange(0.05), default=PRUNE_INTERVAL_DEFAULT_S,
              show_default=True, metavar="S", help="Seconds between prunes.")  # fmt: skip
@common.retention_option
@click.option("--no-prune", is_flag=True, help="Never delete finished tasks (prune with "
              "pg_cron or prune_tasks() instead).")  # fmt: skip
@click.option("--vacuum-dead-rows", type=click.IntRange(0), default=VACUUM_DEAD_ROWS_DEFAULT,
              show_default=True, metavar="N", help="After a sweep, VACUUM ledgerq.tasks or "
              "ledgerq.attempts when it holds more than N dead rows (0: leave it to "
              "autovacuum).")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65_535), metavar="PORT",
              help="Serve this reaper's Prometheus metrics (tasks pruned) on "
              "127.0.0.1:PORT/metrics.")  # fmt: skip
@common.log_level_option
@common.connection_options
def reaper(
    interval: float, once: bool, prune_interval: float, retention: str, no_prune: bool,
    vacuum_dead_rows: int, metrics_port: int | None, log_level: str, **options: Any,
) -> None:  # fmt: skip
    """Recover stuck tasks (expired leases, deliveries never claimed) every --interval,
    delete finished tasks older than --retention every --prune-interval, and vacuum
    the ledger's tables when they hold many dead rows."""
    settings = common.settings_from(options)
    common.setup_logging(log_level)
    if metrics_port is not None:
        prometheus_client.start_http_server(
            metrics_port, addr="127.0.0.1", registry=metrics.REGISTRY
        )

    async def serve(runner: service.Runner) -> None:
        ledger = await AsyncLedger.connect(settings.database_url, max_size=2)
        try:
            reaper = Reaper(
                ledger, interval_s=interval, retention=retention,
                prune_interval_s=None if no_prune else prune_interval,
                vacuum_dead_rows=vacuum_dead_rows,
            )  # fmt: skip
            if once:
                reaped = await reaper.run_once()
                if no_prune:
                    click.echo(f"reaped {reaped} task(s)")
                else:
                    pruned, _ = await reaper.prune_once()
                    click.echo(f"reaped {reaped} task(s), pruned {pruned} task(s)")
            else:
                await runner.serve(reaper)
        finally:
            await ledger.close()

    service.run_until_signalled(serve)


# --- api ----------------------------------------------------------------------------------------


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on.")  # fmt: skip
@click.option("--api-token", metavar="TOKEN", help="Require `Authorization: Bearer TOKEN` "
              "on every route but /healthz and /readyz [env LEDGERQ_API_TOKEN].")  # fmt: skip
@click.option("--api-readonly-token", metavar="TOKEN", help="A second token that reads "
              "everything and changes nothing: changing routes answer 403, in the API and the "
              "dashboard [env LEDGERQ_API_READONLY_TOKEN].")  # fmt: skip
@click.option("--trust-forwarded-proto", is_flag=True, help="Behind a TLS-terminating proxy: "
              "believe its X-Forwarded-Proto header, so the dashboard's session cookie is "
              "marked Secure. Only when every request comes through that proxy.")  # fmt: skip
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--access-log", is_flag=True, help="Log every request (off by default: it is slow).")
@common.log_level_option
@common.connection_options
def api(
    host: str,
    port: int,
    api_token: str | None,
    api_readonly_token: str | None,
    trust_forwarded_proto: bool,
    insecure: bool,
    access_log: bool,
    log_level: str,
    **options: Any,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json) and the operators' dashboard
    (/ui/) until SIGTERM/SIGINT."""
    # Imported here so the other commands do not pay for loading FastAPI.
    from ledgerq.api import app as api_app
    from ledgerq.api import server as api_server

    settings = common.settings_from(
        options, api_token=api_token, api_readonly_token=api_readonly_token
    )
    if settings.api_token is None and not insecure and not api_server.is_loopback(host):
        raise errors.ConfigError(
            f"refusing to serve on {host} without an API token: set --api-token "
            "or LEDGERQ_API_TOKEN, or pass --insecure"
        )
    common.setup_logging(log_level)

    async def serve() -> None:
        pool_size = api_app.POOL_SIZE_DEFAULT
        # Redis is not needed to start: most routes read or write PostgreSQL
        # only, and /readyz reports Redis until it answers.
        ledger = await AsyncLedger.connect(settings.database_url, max_size=pool_size)
        dispatch = Dispatch.connect(
            settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster
        )
        try:
            try:
                await dispatch.ping()
            except errors.DispatchError as exc:
                logging.getLogger("ledgerq.api").warning(
                    "dispatch.unavailable %s; serving anyway (/readyz answers 503 until it "
                    "answers)", exc.message,
                )  # fmt: skip
            app = api_app.create_app(
                settings,
                ledger=ledger,
                dispatch=dispatch,
                trust_forwarded_proto=trust_forwarded_proto,
            )
            # uvicorn handles SIGTERM/SIGINT itself: a graceful shutdown, then return.
            await api_server.serve(app, host=host, port=port, access_log=access_log)
        finally:
            await ledger.close()
            await dispatch.close()

    with asyncio.Runner(loop_factory=service.loop_factory()) as runner:
        runner.run(serve())
