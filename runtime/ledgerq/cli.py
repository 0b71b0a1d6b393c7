"""The ``ledgerq`` command line: click entry points that wire settings to services.

Every command exits non-zero with a one-line message (no traceback) when
PostgreSQL or Redis cannot be reached or its input is invalid.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ledgerq import __version__, config, errors, migrations

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
