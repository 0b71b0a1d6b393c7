"""The development commands: ``run``, ``demo``, ``bench``.

``run`` starts the API, a dispatcher, a reaper and workers as supervised child
processes (``supervise``); ``demo`` runs the whole system on a workload and
checks every guarantee against the ledger (``demo/``); ``bench`` runs the
benchmark scripts of a source checkout (``bench``). Exit statuses follow
``common``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from typing import Any

import click

from ledgerq import config, errors
from ledgerq.cli import bench as bench_runner
from ledgerq.cli import common, render, supervise
from ledgerq.ledger import probe

# `run` is for development: a Ctrl-C should not wait long for running tasks.
RUN_GRACE_DEFAULT_S = 5.0


@click.command()
@common.worker_options
@common.reaper_interval_option("--reaper-interval", "Seconds between reaper sweeps.")
@common.retention_option
@click.option("--grace-seconds", type=click.FloatRange(0), default=RUN_GRACE_DEFAULT_S,
              show_default=True, help="On Ctrl-C, how long running tasks may finish before "
              "they are handed back (short: this is for development).")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="API address.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="API port.")  # fmt: skip
@common.log_level_option
@common.connection_options
def run(
    app: str,
    queues: str | None,
    concurrency: int,
    processes: int,
    lease_seconds: int,
    reaper_interval: float,
    retention: str,
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
    from ledgerq.api import server as api_server  # loads FastAPI: only for this command

    settings = common.settings_from(options)
    registry = common.load_registry(app)  # fail fast, with one line, before starting anything
    common.warn_undeclared_queues(common.split_queues(queues), registry, app)
    if settings.api_token is None and not api_server.is_loopback(host):
        raise errors.ConfigError(f"refusing to serve the API on {host} without LEDGERQ_API_TOKEN")
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
        group.start("reaper", ["reaper", "--interval", str(reaper_interval),
                                "--retention", retention, *level])  # fmt: skip
        for n in range(1, processes + 1):
            group.start(f"worker-{n}", worker_args)
    except BaseException:
        group.stop(timeout_s=5)
        raise
    sys.exit(supervise.supervise(group, grace_s=grace_seconds))


async def _ping_redis(settings: config.Settings) -> None:
    async with common.dispatch_connected(settings, timeout_s=5):
        pass


@click.command()
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
    from ledgerq.cli.demo import run as demo_run  # loads httpx: only for this command

    settings = config.Settings.from_env(
        database_url=database_url, redis_url=redis_url, redis_prefix=redis_prefix,
        redis_cluster=redis_cluster,
    )  # fmt: skip
    options = demo_run.Options(settings, database_name, drop=drop, timeout_s=timeout)
    sys.exit(demo_run.run_demo(options))


@click.command()
@click.argument("suites", nargs=-1, metavar="[SUITE]...")
@click.option("--full", is_flag=True, help="Full sizes (minutes) instead of a quick run.")
@common.json_option
@common.connection_options
def bench(suites: tuple[str, ...], full: bool, as_json: bool, **options: Any) -> None:
    """Run the benchmarks under bench/ (SUITE: sql, runtime, api; default all) in one table."""
    settings = common.settings_from(options)
    probe(settings.database_url)

    def announce(name: str, script: str) -> None:
        click.echo(f"running bench/{script} ({'full' if full else 'quick'}) ...", err=True)

    runs = bench_runner.run_all(settings, suites, full=full, base_env=os.environ, announce=announce)
    if as_json:
        render.echo_json(
            [dataclasses.asdict(r) | {"output_file": str(r.output_file)} for r in runs]
        )
    else:
        rows = [[r.suite, r.measure, r.result, r.target, r.ok] for s in runs for r in s.rows]
        rows += [[s.suite, f"{s.script} FAILED (exit {s.returncode})", "", "", ""]
                 for s in runs if s.returncode != 0]  # fmt: skip
        click.echo(render.table(["suite", "measure", "result", "target", "ok"], rows))
        outputs = ", ".join(str(s.output_file) for s in runs)
        click.echo(f"full outputs: {outputs}")
    if any(s.returncode != 0 for s in runs):
        sys.exit(1)
