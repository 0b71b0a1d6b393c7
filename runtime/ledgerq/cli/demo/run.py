"""``ledgerq demo``: the whole system, end to end, checked against the ledger.

Against a PostgreSQL server and a Redis (the local ones by default) it

1. recreates a database of its own (``ledgerq_demo``), migrates it and adds the
   demo app's execution logs (see ``app``), under a Redis prefix
   of its own (``ledgerq-demo``);
2. starts ``ledgerq api``, ``ledgerq dispatcher``, ``ledgerq reaper --interval
   0.5`` and two ``ledgerq worker --lease-seconds 3`` processes (see
   ``ledgerq.cli.supervise``);
3. drives a workload through the HTTP API (``workload``): a long ``operation.run`` whose
   worker it kills with SIGKILL mid-task (then starts a replacement), a batch
   of ``email.send``, ``payment.charge`` and ``operation.run`` tasks, the same
   payment submitted five times at once with one idempotency key and once more
   with other content, an email that fails twice after sending and succeeds on
   its third attempt, an invalid payload, an unknown task type, an operation
   that exhausts its attempts, and a request the API must refuse; and, in a queue
   under flow-control limits, a big tenant's backlog beside a small tenant's few
   tasks, enqueued while the queue is paused (``flow``);
4. shows live progress, then a summary of each guarantee the README lists and
   whether this run upheld it, checked against what the ledger recorded (``checks``);
5. stops every process it started (also on Ctrl-C or failure) and exits 0 only
   if every guarantee held. The database is kept for exploring with
   ``ledgerq show`` unless ``--drop`` is given; it is recreated on the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO
from urllib.parse import quote, urlsplit

import click
import psycopg
from psycopg import sql

from ledgerq import config, display, errors, migrations
from ledgerq.cli import common, render, supervise
from ledgerq.cli.demo import app as demo_app
from ledgerq.cli.demo import checks, flow, periodic, workload
from ledgerq.ledger import AsyncLedger, probe

DATABASE_NAME_DEFAULT = "ledgerq_demo"
REDIS_PREFIX_DEFAULT = "ledgerq-demo"
TIMEOUT_DEFAULT_S = 90.0


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """What ``ledgerq demo`` was asked to do."""

    settings: config.Settings  # database_url names the server; the demo uses its own database
    database_name: str = DATABASE_NAME_DEFAULT
    drop: bool = False
    timeout_s: float = TIMEOUT_DEFAULT_S


# --- database and processes -------------------------------------------------------------


# --- database and processes -------------------------------------------------------------


def database_url_for(server_url: str, name: str) -> str:
    """server_url with its database replaced by name."""
    return urlsplit(server_url)._replace(path="/" + quote(name, safe="")).geturl()


def recreate_database(server_url: str, name: str) -> str:
    """Drop and create the demo database, migrate it, add the demo's logs; its URL."""
    with errors_from_psycopg(), psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = database_url_for(server_url, name)
    migrations.migrate(url)
    with errors_from_psycopg(), psycopg.connect(url, autocommit=True) as conn:
        demo_app.create_schema(conn)
    return url


def drop_database(server_url: str, name: str) -> None:
    with errors_from_psycopg(), psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def errors_from_psycopg() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise workload.DemoFailed(
            f"PostgreSQL refused the demo's setup: {errors.first_line(exc)}"
        ) from exc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


# --- the demo ------------------------------------------------------------------------------


# --- the demo ------------------------------------------------------------------------------


def run_demo(options: Options, out: TextIO | None = None) -> int:
    """Run the demo; 0 if every guarantee held, 1 if not (or it could not run), 130 on Ctrl-C."""
    screen = render.Screen(out or sys.stdout)
    try:
        import httpx  # noqa: F401  (the demo's HTTP client, from the dev extras)
    except ImportError:
        raise workload.DemoFailed(
            "ledgerq demo needs httpx: pip install httpx (scripts/setup installs it)"
        ) from None
    server = options.settings.database_url
    probe(server)
    asyncio.run(_ping_redis(options.settings))
    screen.block(
        click.style("ledgerq demo", bold=True)
        + f": PostgreSQL {options.settings.redacted_database_url()} (database "
        f"{options.database_name}), Redis {display.redact(options.settings.redis_url)} (prefix "
        f"{options.settings.redis_prefix})"
    )
    url = recreate_database(server, options.database_name)
    screen.step(f"database {options.database_name} created and migrated")
    settings = dataclasses.replace(options.settings, database_url=url)
    log_dir = Path(tempfile.mkdtemp(prefix="ledgerq-demo-"))
    log_path = log_dir / "services.log"
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    code = 1
    with log_path.open("ab") as log_file:
        group = supervise.ProcessGroup(settings, output=log_file)
        try:
            code = asyncio.run(_demo(settings, group, screen, options, log_path))
        except KeyboardInterrupt:
            screen.step("interrupted: stopping everything the demo started")
            code = 130
        except errors.LedgerqError as exc:
            screen.step(click.style(f"demo failed: {exc.message}", fg="red"))
            screen.block(f"  last lines of {log_path}:\n{log_tail(log_path)}")
            code = 1
        finally:
            codes = group.stop(timeout_s=10)
            signal.signal(signal.SIGTERM, previous_term)
            screen.step(
                f"all {len(codes)} processes the demo started have exited; their logs: {log_path}"
            )
    if options.drop:
        drop_database(server, options.database_name)
    elif code in (0, 1):
        screen.block(
            "explore this run's ledger, e.g. the killed worker's task: ledgerq show 1 "
            f"--database-url {settings.redacted_database_url()}"
        )
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _demo(
    settings: config.Settings,
    group: supervise.ProcessGroup,
    screen: render.Screen,
    options: Options,
    log_path: Path,
) -> int:
    import httpx  # the demo's HTTP client; imported here so other commands do not load it

    port = free_port()
    # INFO: services.log then tells the run's story (one line per task outcome).
    group.start("api", ["api", "--port", str(port), "--log-level", "INFO"])
    for n in range(1, periodic.DISPATCHERS + 1):  # two: each schedule slot still fires once
        group.start(f"dispatcher-{n}", ["dispatcher", "--log-level", "INFO"])
    group.start(
        "reaper", ["reaper", "--interval", str(checks.REAPER_INTERVAL_S), "--log-level", "INFO"]
    )
    workers = [group.start(f"worker-{n}", workload.worker_args()) for n in (1, 2)]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + options.timeout_s
    ledger = await AsyncLedger.connect(settings.database_url, max_size=2)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            await workload.wait_ready(http, group, deadline)
            await periodic.register(ledger)
            pids = ", ".join(str(c.pid) for c in group.children)
            screen.step(
                f"started api (:{port}), {periodic.DISPATCHERS} dispatchers, reaper (every {checks.REAPER_INTERVAL_S:g} s) and "
                f"2 workers (lease {checks.LEASE_S} s); pids {pids}"
            )
            run = checks.Run()
            await workload.kill_a_worker(http, group, workers, screen, run, deadline)
            await workload.submit_workload(http, screen, run)
            tenants = await flow.submit(http, ledger, screen, run)
            await workload.watch(http, group, screen, run, deadline)
            await periodic.wait_slots(settings, screen, deadline)
        results, extra = await checks.verify(ledger, settings, run)
        results += await flow.verify(ledger, tenants)
        results.append(await asyncio.to_thread(periodic.check, settings))
    finally:
        await ledger.close()
    screen.block("")
    screen.block(extra)
    screen.block("")
    screen.block(checks.render_checks(results))
    held = all(c.upheld for c in results)
    verdict = (
        click.style("every guarantee held in this run", fg="green", bold=True)
        if held
        else click.style("a guarantee was VIOLATED in this run", fg="red", bold=True)
    )
    screen.block("")
    screen.step(verdict)
    if not held:
        screen.block(f"  last lines of {log_path}:\n{log_tail(log_path)}")
    return 0 if held else 1


async def _ping_redis(settings: config.Settings) -> None:
    async with common.dispatch_connected(settings, timeout_s=5):
        pass
