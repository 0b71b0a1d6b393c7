"""The ``ledgerq`` command line: click entry points that wire settings to services.

Every command exits non-zero with a one-line message (no traceback) when
PostgreSQL or Redis cannot be reached or its input is invalid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import prometheus_client

from ledgerq import __version__, admin, config, errors, logs, metrics, migrations, supervise
from ledgerq.dispatch import Dispatch
from ledgerq.dispatcher import (
    BATCH_SIZE_DEFAULT,
    POLL_INTERVAL_DEFAULT_S,
    Dispatcher,
)
from ledgerq.ledger import AsyncLedger, Ledger
from ledgerq.reaper import REAPER_INTERVAL_DEFAULT_S, Reaper
from ledgerq.registry import Registry
from ledgerq.worker import CONCURRENCY_DEFAULT, GRACE_DEFAULT_S, LEASE_DEFAULT_S, Worker

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(func: F) -> F:
    """--database-url, --redis-url, --redis-prefix, --redis-cluster on a command."""
    func = click.option(
        "--redis-cluster/--no-redis-cluster",
        default=None,
        help="Treat the Redis URL as a Redis Cluster node [env LEDGERQ_REDIS_CLUSTER].",
    )(func)
    func = click.option(
        "--redis-prefix",
        metavar="PREFIX",
        help="Prefix of every Redis key [env LEDGERQ_REDIS_PREFIX; default ledgerq].",
    )(func)
    func = click.option(
        "--redis-url",
        metavar="URL",
        help="The dispatcher [env LEDGERQ_REDIS_URL; default redis://127.0.0.1:6379/0].",
    )(func)
    func = click.option(
        "--database-url",
        metavar="URL",
        help="The ledger [env LEDGERQ_DATABASE_URL; default "
        "postgresql://postgres@127.0.0.1:5432/postgres].",
    )(func)
    return func


def settings_from(options: dict[str, Any]) -> config.Settings:
    return config.Settings.from_env(
        database_url=options.pop("database_url", None),
        redis_url=options.pop("redis_url", None),
        redis_prefix=options.pop("redis_prefix", None),
        redis_cluster=options.pop("redis_cluster", None),
    )


def one_line_errors(func: F) -> F:
    """Turn ledgerq errors into a one-line message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.LedgerqError as exc:
            click.echo(f"ledgerq: {exc.message}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group(cls=admin.OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ledgerq")
def main() -> None:
    """ledgerq: a task queue whose ledger is PostgreSQL and whose dispatcher is Redis."""


@main.group(invoke_without_command=True)
@connection_options
@click.pass_context
@one_line_errors
def migrate(ctx: click.Context, /, **options: Any) -> None:
    """Create or update the ledgerq schema (idempotent; safe to run concurrently)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_from(options)
    applied = migrations.migrate(settings.database_url)
    target = settings.redacted_database_url()
    if applied:
        click.echo(f"applied {len(applied)} migration(s) to {target}: {', '.join(applied)}")
    else:
        click.echo(f"schema up to date at {target}")
    click.echo(f"functions re-applied ({len(migrations.function_files())} files)")


@migrate.command("show")
@click.argument("name")
@one_line_errors
def migrate_show(name: str) -> None:
    """Print one migration's raw SQL (by number, e.g. 1, or file name)."""
    click.echo(migrations.show(name), nl=False)


# --- services ----------------------------------------------------------------


def setup_logging(level: str | None = None) -> None:
    """Log lines to stderr at level, in LEDGERQ_LOG_FORMAT (see ledgerq.logs)."""
    logs.configure(level)


def log_options(func: F) -> F:
    """--log-level and --log-format on a service command. The command receives
    log_level resolved (the option, else LEDGERQ_LOG_LEVEL, else INFO; any
    case); the format reaches setup_logging, and child processes, through
    LEDGERQ_LOG_FORMAT."""

    @functools.wraps(func)
    def wrapper(*args: Any, log_level: str | None, log_format: str | None, **kwargs: Any) -> Any:
        try:
            level = logs.level_name(log_level)
            if log_format is not None:
                os.environ["LEDGERQ_LOG_FORMAT"] = logs.format_name(log_format)
            logs.format_name()
        except errors.ConfigError as exc:
            click.echo(f"ledgerq: {exc.message}", err=True)
            sys.exit(2)
        return func(*args, log_level=level, **kwargs)

    wrapper = click.option(
        "--log-format", metavar="text|json",
        help="One line of text, or one JSON object, per event [env LEDGERQ_LOG_FORMAT; default text].",
    )(wrapper)  # fmt: skip
    wrapper = click.option(
        "--log-level", metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, any case [env LEDGERQ_LOG_LEVEL; default INFO].",
    )(wrapper)  # fmt: skip
    return wrapper  # type: ignore[return-value]


def load_registry(app: str) -> Registry:
    """MODULE:ATTRIBUTE → the Registry it names (the current directory is importable)."""
    module_name, _, attribute = app.partition(":")
    if not module_name or not attribute:
        raise errors.ConfigError(f"--app must look like MODULE:REGISTRY, got {app!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise errors.ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    registry = getattr(module, attribute, None)
    if not isinstance(registry, Registry):
        raise errors.ConfigError(f"{app!r} is not a ledgerq Registry")
    return registry


async def open_services(
    settings: config.Settings, *, pool_size: int = 4
) -> tuple[AsyncLedger, Dispatch]:
    """The ledger and the dispatcher, both checked reachable."""
    ledger = await AsyncLedger.connect(settings.database_url, max_size=pool_size)
    dispatch = Dispatch.connect(
        settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster
    )
    try:
        await dispatch.ping()
    except errors.LedgerqError:
        await ledger.close()
        await dispatch.close()
        raise
    return ledger, dispatch


def run_until_signalled(main_coro: Callable[[], Awaitable[None]], stop: Callable[[], None]) -> None:
    """Run main_coro; SIGTERM/SIGINT call stop() (a second signal exits at once)."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                os._exit(1)
            stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await main_coro()

    asyncio.run(runner())


def warn_undeclared_queues(queues: list[str] | None, registry: Registry, app: str) -> None:
    """A warning (not an error: tasks may name any queue) for --queues naming a
    queue none of the registry's task types declares, most likely a typo."""
    declared = registry.queues()
    undeclared = [q for q in queues or () if q not in declared]
    if undeclared:
        click.echo(
            f"ledgerq: warning: --queues names {', '.join(undeclared)}, which no task type of "
            f"{app} declares (they declare {', '.join(declared)}); a typo?",
            err=True,
        )


def _split_queues(queues: str | None) -> list[str] | None:
    if not queues:
        return None
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise errors.ConfigError("--queues must name at least one queue")
    return names


def _worker_process(
    settings: config.Settings,
    app: str,
    queues: list[str] | None,
    concurrency: int,
    lease_s: int,
    grace_s: float,
    log_level: str,
    metrics_port: int | None = None,
    parent_pid: int | None = None,
) -> None:
    """One worker process: its own event loop, pools and Redis connections.

    A child of ``worker --processes N`` (parent_pid set) leaves the terminal's
    process group, so a Ctrl-C reaches only the parent, which passes exactly
    one SIGTERM on (a second signal would stop a worker at once); and it dies
    with the parent.
    """
    if parent_pid is not None:
        os.setpgrp()
        supervise.die_with_parent(parent_pid)
    setup_logging(log_level)
    registry = load_registry(app)
    if metrics_port is not None:
        prometheus_client.start_http_server(
            metrics_port, addr="127.0.0.1", registry=metrics.REGISTRY
        )
    holder: dict[str, Worker] = {}
    sync_ledger: list[Ledger] = []

    def get_sync_ledger() -> Ledger:
        if not sync_ledger:
            sync_ledger.append(Ledger.connect(settings.database_url, max_size=concurrency))
        return sync_ledger[0]

    async def main_coro() -> None:
        ledger, dispatch = await open_services(settings, pool_size=min(concurrency + 4, 50))
        worker = holder["worker"] = Worker(
            registry, ledger, dispatch, queues=queues, concurrency=concurrency,
            lease_s=lease_s, grace_s=grace_s, sync_ledger=get_sync_ledger,
        )  # fmt: skip
        try:
            await worker.run()
        finally:
            await ledger.close()
            await dispatch.close()
            if sync_ledger:
                sync_ledger[0].close()

    def stop() -> None:
        if "worker" in holder:
            holder["worker"].stop()
        else:
            raise SystemExit(0)

    try:
        run_until_signalled(main_coro, stop)
    except errors.LedgerqError as exc:
        click.echo(f"ledgerq: {exc.message}", err=True)
        sys.exit(1)
    if "worker" in holder and holder["worker"].abandoned_threads:
        # Handler threads still running were left to their leases; Python would
        # wait for them at exit, so leave now (the ledger has everything).
        sys.stderr.flush()
        os._exit(0)


@main.command()
@click.option("--app", required=True, metavar="MODULE:REGISTRY", help="Where the Registry is.")
@click.option("--queues", metavar="A,B", help="Queues to serve, in preference order "
              "[default: every queue the registry's tasks declare].")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(1, 10_000), default=CONCURRENCY_DEFAULT,
              show_default=True, help="Handlers running at once per process.")  # fmt: skip
@click.option("--processes", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes to run.")  # fmt: skip
@click.option("--lease-seconds", type=click.IntRange(3, 86_400), default=LEASE_DEFAULT_S,
              show_default=True, help="Lease per attempt; heartbeats renew it every third.")  # fmt: skip
@click.option("--grace-seconds", type=click.FloatRange(0), default=GRACE_DEFAULT_S,
              show_default=True, help="On SIGTERM/SIGINT, how long running tasks may finish "
              "before they are handed back.")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65_535), metavar="PORT",
              help="Serve this worker's Prometheus metrics on 127.0.0.1:PORT/metrics "
              "(with --processes N, process i uses PORT+i).")  # fmt: skip
@log_options
@connection_options
@one_line_errors
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
    settings = settings_from(options)
    # Fail fast, with a one-line message, before forking.
    registry = load_registry(app)
    if len(registry) == 0:
        click.echo(f"ledgerq: {app} has no task types: a worker would serve nothing", err=True)
        sys.exit(2)
    queue_list = _split_queues(queues)
    warn_undeclared_queues(queue_list, registry, app)
    args = (settings, app, queue_list, concurrency, lease_seconds, grace_seconds, log_level)
    if processes == 1:
        _worker_process(*args, metrics_port)
        return
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_worker_process,
            args=(*args, metrics_port + i if metrics_port else None, os.getpid()),
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
    failed = [c.exitcode for c in children if c.exitcode not in (0, None)]
    if failed:
        sys.exit(1)


@main.command()
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=BATCH_SIZE_DEFAULT,
              show_default=True, help="Tasks moved to Redis per transaction.")  # fmt: skip
@click.option("--poll-interval", type=click.FloatRange(0.01), default=POLL_INTERVAL_DEFAULT_S,
              show_default=True, help="Seconds between polls when no NOTIFY arrives.")  # fmt: skip
@log_options
@connection_options
@one_line_errors
def dispatcher(batch_size: int, poll_interval: float, log_level: str, **options: Any) -> None:
    """Move due tasks from PostgreSQL to Redis (woken by NOTIFY, and polling)."""
    settings = settings_from(options)
    setup_logging(log_level)
    holder: dict[str, Dispatcher] = {}

    async def main_coro() -> None:
        ledger, dispatch = await open_services(settings)
        service = holder["service"] = Dispatcher(
            ledger, dispatch, database_url=settings.database_url,
            batch_size=batch_size, poll_interval_s=poll_interval,
        )  # fmt: skip
        try:
            await service.run()
        finally:
            await ledger.close()
            await dispatch.close()

    run_until_signalled(main_coro, lambda: holder["service"].stop() if holder else None)


@main.command()
@click.option("--interval", type=click.FloatRange(0.05), default=REAPER_INTERVAL_DEFAULT_S,
              show_default=True, help="Seconds between sweeps.")  # fmt: skip
@click.option("--once", is_flag=True, help="Sweep once, print how many tasks moved, and exit.")
@log_options
@connection_options
@one_line_errors
def reaper(interval: float, once: bool, log_level: str, **options: Any) -> None:
    """Recover stuck tasks: expired leases, and deliveries never claimed."""
    settings = settings_from(options)
    setup_logging(log_level)
    holder: dict[str, Reaper] = {}

    async def main_coro() -> None:
        ledger = await AsyncLedger.connect(settings.database_url, max_size=2)
        service = holder["service"] = Reaper(ledger, interval_s=interval)
        try:
            if once:
                click.echo(f"reaped {await service.run_once()} task(s)")
            else:
                await service.run()
        finally:
            await ledger.close()

    run_until_signalled(main_coro, lambda: holder["service"].stop() if holder else None)


API_POOL_SIZE = 10


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on.")  # fmt: skip
@click.option("--api-token", metavar="TOKEN", help="Require `Authorization: Bearer TOKEN` "
              "on every route but /healthz and /readyz [env LEDGERQ_API_TOKEN].")  # fmt: skip
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--access-log", is_flag=True, help="Log every request (off by default: it is slow).")
@log_options
@connection_options
@one_line_errors
def api(
    host: str,
    port: int,
    api_token: str | None,
    insecure: bool,
    access_log: bool,
    log_level: str,
    **options: Any,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json) until SIGTERM/SIGINT."""
    # Imported here so the other commands do not pay for loading FastAPI.
    from ledgerq.api import app as api_app
    from ledgerq.api import server as api_server

    settings = settings_from(options)
    if api_token:
        settings = dataclasses.replace(settings, api_token=api_token)
    if settings.api_token is None and not insecure and not api_server.is_loopback(host):
        click.echo(
            f"ledgerq: refusing to serve on {host} without an API token: set --api-token "
            "or LEDGERQ_API_TOKEN, or pass --insecure",
            err=True,
        )
        sys.exit(2)
    setup_logging(log_level)

    async def main_coro() -> None:
        # Redis is not needed to start: most routes read or write PostgreSQL
        # only, and /readyz reports Redis until it answers.
        ledger = await AsyncLedger.connect(settings.database_url, max_size=API_POOL_SIZE)
        dispatch = Dispatch.connect(
            settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster
        )
        try:
            await dispatch.ping()
        except errors.DispatchError as exc:
            logging.getLogger("ledgerq.api").warning(
                "dispatch.unavailable %s; serving anyway (/readyz answers 503 until it answers)",
                exc.message,
            )
        try:
            app = api_app.create_app(settings, ledger=ledger, dispatch=dispatch)
            await api_server.serve(app, host=host, port=port, access_log=access_log)
        finally:
            await ledger.close()
            await dispatch.close()

    with asyncio.Runner(loop_factory=api_server.loop_factory()) as runner:
        runner.run(main_coro())


# The operator, development and demo commands live in ledgerq.cli_ops; importing
# it registers them on `main` (it uses the helpers above, hence the late import).
from ledgerq import cli_ops  # noqa: E402, F401
