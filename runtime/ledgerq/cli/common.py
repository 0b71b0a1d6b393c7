"""What every command shares: the group class, the one rule from an error to an
exit status, the options written once, and opening the ledger and the dispatcher.

The exit status rule (``exit_code``), for every command:

- 0: done;
- 2: the command was asked for something it cannot do: a usage error (an
  unknown option, a bad value, a missing argument), invalid input
  (``InvalidInput``: a payload that is not a JSON object, a refused field) or
  invalid configuration (``ConfigError``: a bad URL, ``--app`` that names no
  Registry, an empty ``--queues``);
- 1: everything else: PostgreSQL or Redis unreachable, a refusal (no such task,
  an idempotency conflict, a task not in a state that allows it), a failure.

Either way stderr gets exactly one line and no traceback: usage errors as
``ledgerq CMD: message (see ledgerq CMD --help)``, the rest as ``ledgerq: message``.
``Group.main`` applies the rule to whatever a command raises, so commands just
raise; a worker child process started with ``--processes`` applies it through
``report``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import click

from ledgerq import config, display, errors, logs
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger, Ledger, probe
from ledgerq.reaper import REAPER_INTERVAL_DEFAULT_S, RETENTION_DEFAULT, check_retention
from ledgerq.registry import Registry
from ledgerq.worker import CONCURRENCY_DEFAULT, LEASE_DEFAULT_S

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


# --- errors: one rule, one line ------------------------------------------------------


def exit_code(exc: BaseException) -> int:
    """2 for usage errors, invalid input and invalid configuration; 1 for the rest."""
    if isinstance(exc, click.UsageError | errors.ConfigError | errors.InvalidInput):
        return 2
    return 1


def report(exc: errors.LedgerqError) -> int:
    """Print exc as one line on stderr; the exit status it calls for."""
    click.echo(f"ledgerq: {display.line(errors.first_line(exc))}", err=True)
    return exit_code(exc)


class Group(click.Group):
    """A click group that turns every failure of its commands into one line on
    stderr and the exit status ``exit_code`` gives it."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else (prog_name or "ledgerq")
            message = display.line(exc.format_message())
            click.echo(f"{path}: {message} (see {path} --help)", err=True)
            sys.exit(exit_code(exc))
        except click.ClickException as exc:
            click.echo(f"ledgerq: {display.line(exc.format_message())}", err=True)
            sys.exit(exit_code(exc))
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except errors.LedgerqError as exc:
            sys.exit(report(exc))
        sys.exit(result if isinstance(result, int) else 0)


# --- options written once ------------------------------------------------------------


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


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")(func)


def log_level_option(func: F) -> F:
    """--log-level and --log-format on a service command. The command receives
    log_level resolved (the option, else LEDGERQ_LOG_LEVEL, else INFO; any
    case); the format reaches setup_logging, and child processes, through
    LEDGERQ_LOG_FORMAT."""

    @functools.wraps(func)
    def wrapper(*args: Any, log_level: str | None, log_format: str | None, **kwargs: Any) -> Any:
        level = logs.level_name(log_level)  # ConfigError: one line, exit 2
        if log_format is not None:
            os.environ["LEDGERQ_LOG_FORMAT"] = logs.format_name(log_format)
        logs.format_name()
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


def worker_options(func: F) -> F:
    """--app, --queues, --concurrency, --processes, --lease-seconds: `worker` and `run`."""
    options = [
        click.option("--app", required=True, metavar="MODULE:REGISTRY", help="Where the Registry is."),
        click.option("--queues", metavar="A,B", help="Queues to serve, in preference order "
                     "[default: every queue the registry's tasks declare]."),
        click.option("--concurrency", type=click.IntRange(1, 10_000), default=CONCURRENCY_DEFAULT,
                     show_default=True, help="Handlers running at once per worker process."),
        click.option("--processes", type=click.IntRange(1, 256), default=1, show_default=True,
                     help="Worker processes to run."),
        click.option("--lease-seconds", type=click.IntRange(3, 86_400), default=LEASE_DEFAULT_S,
                     show_default=True, help="Lease per attempt; heartbeats renew it every third."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def reaper_interval_option(name: str, help_text: str) -> Callable[[F], F]:
    """The reaper's sweep interval, as `reaper --interval` and `run --reaper-interval`."""
    return click.option(
        name,
        type=click.FloatRange(0.05),
        default=REAPER_INTERVAL_DEFAULT_S,
        show_default=True,
        help=help_text,
    )


class RetentionText(click.ParamType[str]):
    """A PostgreSQL interval text such as '7 days' (reaper.check_retention): a bad one
    is a usage error (exit 2) naming the option, before anything connects."""

    name = "INTERVAL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_retention(str(value))
        except errors.ConfigError as exc:
            self.fail(exc.message, param, ctx)


def retention_option(func: F) -> F:
    """How long finished tasks are kept, as `reaper --retention` and `run --retention`."""
    return click.option(
        "--retention",
        type=RetentionText(),
        default=RETENTION_DEFAULT,
        show_default=True,
        help="Delete SUCCEEDED and CANCELLED tasks (with their attempts) finished longer "
        "ago than this PostgreSQL interval, e.g. '7 days' or '2 seconds'. A queue's own "
        "'retention' setting wins.",
    )(func)


# --- settings, logging, the task app -----------------------------------------------------


def settings_from(
    options: dict[str, Any], *, api_token: str | None = None, api_readonly_token: str | None = None
) -> config.Settings:
    """Settings from the environment, overridden by the connection options (and the
    API tokens) given."""
    return config.Settings.from_env(
        database_url=options.pop("database_url", None),
        redis_url=options.pop("redis_url", None),
        redis_prefix=options.pop("redis_prefix", None),
        redis_cluster=options.pop("redis_cluster", None),
        api_token=api_token,
        api_readonly_token=api_readonly_token,
    )


def setup_logging(level: str | None = None) -> None:
    """Log lines to stderr at level, in LEDGERQ_LOG_FORMAT (see ledgerq.logs)."""
    logs.configure(level)


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


def split_queues(queues: str | None) -> list[str] | None:
    """--queues a,b → ["a", "b"]; None when not given."""
    if not queues:
        return None
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise errors.ConfigError("--queues must name at least one queue")
    return names


# --- the ledger and the dispatcher, checked reachable --------------------------------------


@contextlib.asynccontextmanager
async def connected(
    settings: config.Settings, *, pool_size: int = 4
) -> AsyncIterator[tuple[AsyncLedger, Dispatch]]:
    """The ledger and the dispatcher, both checked reachable, closed on exit."""
    ledger = await AsyncLedger.connect(settings.database_url, max_size=pool_size)
    try:
        async with dispatch_connected(settings) as dispatch:
            yield ledger, dispatch
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def dispatch_connected(
    settings: config.Settings, *, timeout_s: float = 10
) -> AsyncIterator[Dispatch]:
    """The dispatcher, pinged (DispatchUnavailable at once if Redis is down)."""
    dispatch = Dispatch.connect(
        settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster,
        timeout_s=timeout_s,
    )  # fmt: skip
    try:
        await dispatch.ping()
        yield dispatch
    finally:
        await dispatch.close()


def open_ledger(settings: config.Settings) -> Ledger:
    """A small pool on the ledger for one command; LedgerUnavailable at once if it is down."""
    probe(settings.database_url)
    return Ledger.connect(settings.database_url, min_size=1, max_size=2)
