"""``ledgerq demo``: the whole system, end to end, checked against the ledger.

Against a PostgreSQL server and a Redis (the local ones by default) it

1. recreates a database of its own (``ledgerq_demo``), migrates it and adds the
   demo app's execution logs (see ``ledgerq.demo_app``), under a Redis prefix
   of its own (``ledgerq-demo``);
2. starts ``ledgerq api``, ``ledgerq dispatcher``, ``ledgerq reaper --interval
   0.5`` and two ``ledgerq worker --lease-seconds 3`` processes (see
   ``ledgerq.supervise``);
3. drives a workload through the HTTP API: a long ``operation.run`` whose
   worker it kills with SIGKILL mid-task (then starts a replacement), a batch
   of ``email.send``, ``payment.charge`` and ``operation.run`` tasks, the same
   payment submitted five times at once with one idempotency key and once more
   with other content, an email that fails twice after sending and succeeds on
   its third attempt, an invalid payload, an unknown task type, an operation
   that exhausts its attempts, and a request the API must refuse;
4. shows live progress, then a summary of each guarantee (README, Guarantees) and whether
   this run upheld it, checked against what the ledger recorded;
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
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

import click
import psycopg
from psycopg import sql

from ledgerq import config, demo_app, demo_checks, errors, migrations
from ledgerq.admin import styled_status
from ledgerq.demo_checks import DUPLICATE_SUBMITS, LEASE_S, REAPER_INTERVAL_S
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger, probe
from ledgerq.supervise import Child, ProcessGroup
from ledgerq.types import TaskStatus

DATABASE_NAME_DEFAULT = "ledgerq_demo"
REDIS_PREFIX_DEFAULT = "ledgerq-demo"
TIMEOUT_DEFAULT_S = 90.0
WORKER_CONCURRENCY = 8
EMAILS = 30
PAYMENTS = 15
OPERATIONS = 8
APP = "ledgerq.demo_app:tasks"


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """What ``ledgerq demo`` was asked to do."""

    settings: config.Settings  # database_url names the server; the demo uses its own database
    database_name: str = DATABASE_NAME_DEFAULT
    drop: bool = False
    timeout_s: float = TIMEOUT_DEFAULT_S


class DemoFailed(errors.LedgerqError):
    """The demo could not run."""


# --- output -------------------------------------------------------------------------


class Screen:
    """Step lines and a progress line that rewrites itself on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self._progress_shown = False
        self._last_line = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, text: str) -> None:
        self._end_progress()
        click.echo(f"{self.elapsed():5.1f}s  {text}", file=self.out, color=self.tty)

    def progress(self, text: str, *, force: bool = False) -> None:
        line = f"{self.elapsed():5.1f}s  {text}"
        if self.tty:
            click.echo(f"\r\x1b[2K{line}", file=self.out, nl=False, color=True)
            self._progress_shown = True
        elif force or time.monotonic() - self._last_line >= 1.0:
            click.echo(line, file=self.out)
            self._last_line = time.monotonic()

    def _end_progress(self) -> None:
        if self._progress_shown:
            click.echo("", file=self.out)
            self._progress_shown = False

    def block(self, text: str) -> None:
        self._end_progress()
        click.echo(text, file=self.out, color=self.tty)


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
        raise DemoFailed(f"PostgreSQL refused the demo's setup: {errors.first_line(exc)}") from exc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def worker_args() -> list[str]:
    return [
        "worker", "--app", APP, "--concurrency", str(WORKER_CONCURRENCY),
        "--lease-seconds", str(LEASE_S), "--grace-seconds", "2", "--log-level", "INFO",
    ]  # fmt: skip


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


async def check_redis(settings: config.Settings) -> None:
    dispatch = Dispatch.connect(
        settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster, timeout_s=5
    )
    try:
        await dispatch.ping()
    finally:
        await dispatch.close()


# --- the demo ------------------------------------------------------------------------------


def run_demo(options: Options, out: TextIO | None = None) -> int:
    """Run the demo; 0 if every guarantee held, 1 if not (or it could not run), 130 on Ctrl-C."""
    screen = Screen(out or sys.stdout)
    try:
        import httpx  # noqa: F401  (the demo's HTTP client, from the dev extras)
    except ImportError:
        raise DemoFailed(
            "ledgerq demo needs httpx: pip install httpx (scripts/setup installs it)"
        ) from None
    server = options.settings.database_url
    probe(server)
    asyncio.run(check_redis(options.settings))
    screen.block(
        click.style("ledgerq demo", bold=True)
        + f": PostgreSQL {options.settings.redacted_database_url()} (database "
        f"{options.database_name}), Redis {options.settings.redis_url} (prefix "
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
        group = ProcessGroup(settings, output=log_file)
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
    group: ProcessGroup,
    screen: Screen,
    options: Options,
    log_path: Path,
) -> int:
    import httpx  # the demo's HTTP client; imported here so other commands do not load it

    port = free_port()
    # INFO: services.log then tells the run's story (one line per task outcome).
    group.start("api", ["api", "--port", str(port), "--log-level", "INFO"])
    group.start("dispatcher", ["dispatcher", "--log-level", "INFO"])
    group.start("reaper", ["reaper", "--interval", str(REAPER_INTERVAL_S), "--log-level", "INFO"])
    workers = [group.start(f"worker-{n}", worker_args()) for n in (1, 2)]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + options.timeout_s
    ledger = await AsyncLedger.connect(settings.database_url, max_size=2)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            await _wait_ready(http, group, deadline)
            pids = ", ".join(str(c.pid) for c in group.children)
            screen.step(
                f"started api (:{port}), dispatcher, reaper (every {REAPER_INTERVAL_S:g} s) and "
                f"2 workers (lease {LEASE_S} s); pids {pids}"
            )
            run = demo_checks.Run()
            await _kill_a_worker(http, group, workers, screen, run, deadline)
            await _submit_workload(http, screen, run)
            await _watch(http, group, screen, run, deadline)
        checks, extra = await demo_checks.verify(ledger, settings, run)
    finally:
        await ledger.close()
    screen.block("")
    screen.block(extra)
    screen.block("")
    screen.block(demo_checks.render_checks(checks))
    held = all(c.upheld for c in checks)
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


async def _wait_ready(http: Any, group: ProcessGroup, deadline: float) -> None:
    while True:
        _no_crash(group, set())
        with contextlib.suppress(Exception):
            if (await http.get("/readyz")).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise DemoFailed("the API did not become ready in time")
        await asyncio.sleep(0.05)


def _no_crash(group: ProcessGroup, killed: set[int]) -> None:
    for child in group.exited():
        if child.pid not in killed:
            raise DemoFailed(f"{child.name} exited unexpectedly with status {child.returncode}")


async def _post(
    http: Any, run: demo_checks.Run, body: dict[str, Any], kind: str, expect: TaskStatus
) -> int:
    headers = {}
    if "idempotency_key" in body:
        headers["Idempotency-Key"] = body.pop("idempotency_key")
    reply = await http.post("/tasks", json=body, headers=headers)
    if reply.status_code not in (200, 201):
        raise DemoFailed(f"POST /tasks answered {reply.status_code}: {reply.text[:200]}")
    task_id = int(reply.json()["id"])
    run.accepted_ids.add(task_id)
    run.expected[task_id] = (kind, expect)
    return task_id


async def _kill_a_worker(
    http: Any,
    group: ProcessGroup,
    workers: list[Child],
    screen: Screen,
    run: demo_checks.Run,
    deadline: float,
) -> None:
    """A long operation; SIGKILL the worker running it; start a replacement."""
    task_id = await _post(
        http, run, {"type": "operation.run", "payload": {"name": "statement-rebuild", "seconds": 2.0}},
        "killed worker's task", TaskStatus.SUCCEEDED,
    )  # fmt: skip
    while True:
        task = (await http.get(f"/tasks/{task_id}")).json()
        if task["status"] == "RUNNING" and task["attempt_history"]:
            worker_id = task["attempt_history"][-1]["worker_id"]
            break
        _no_crash(group, set())
        if time.monotonic() > deadline:
            raise DemoFailed(f"task {task_id} never started running")
        await asyncio.sleep(0.02)
    pid = int(worker_id.rsplit(":", 2)[1])
    victim = next((w for w in workers if w.pid == pid), None)
    if victim is None:
        raise DemoFailed(f"task {task_id} runs on {worker_id}, not on a worker the demo started")
    group.kill(victim)
    victim.process.wait()
    run.killed_task, run.killed_worker, run.killed_at = task_id, worker_id, datetime.now(UTC)
    replacement = group.start("worker-3", worker_args())
    screen.step(
        f"task {task_id} (operation.run, 2 s) RUNNING on {victim.name}: killed it with SIGKILL "
        f"mid-task; started worker-3 (pid {replacement.pid}) in its place"
    )


async def _submit_workload(http: Any, screen: Screen, run: demo_checks.Run) -> None:
    batch = []
    kinds = []
    for n in range(EMAILS):
        batch.append(
            {"type": "email.send", "payload": {"to": f"user{n}@example.com", "template": "welcome"}}
        )
        kinds.append("email")
    for n in range(PAYMENTS):
        batch.append({
            "type": "payment.charge", "payload": {"account": f"acct-{n}", "amount_cents": 1000 + n},
            "idempotency_key": f"charge-{n}",
        })  # fmt: skip
        kinds.append("payment")
    for n in range(OPERATIONS):
        batch.append({"type": "operation.run", "payload": {"name": f"close-{n}"}})
        kinds.append("operation")
    reply = await http.post("/tasks/batch", json={"tasks": batch})
    if reply.status_code != 200:
        raise DemoFailed(f"POST /tasks/batch answered {reply.status_code}: {reply.text[:200]}")
    for kind, result in zip(kinds, reply.json()["results"], strict=True):
        run.accepted_ids.add(result["id"])
        run.expected[result["id"]] = (kind, TaskStatus.SUCCEEDED)
    screen.step(
        f"POST /tasks/batch: {EMAILS} email.send, {PAYMENTS} payment.charge, "
        f"{OPERATIONS} operation.run -> 200"
    )

    # The same payment, five times at once, one key: one task.
    body = {"type": "payment.charge", "payload": {"account": "acct-dup", "amount_cents": 4200}}
    replies = await asyncio.gather(
        *(
            http.post("/tasks", json=body, headers={"Idempotency-Key": "charge-dup"})
            for _ in range(DUPLICATE_SUBMITS)
        )
    )
    run.duplicate_codes = sorted(r.status_code for r in replies)
    run.duplicate_ids = {int(r.json()["id"]) for r in replies if r.status_code in (200, 201)}
    for task_id in run.duplicate_ids:
        run.accepted_ids.add(task_id)
        run.expected[task_id] = ("payment", TaskStatus.SUCCEEDED)
    codes = Counter(run.duplicate_codes)
    screen.step(
        f"POST /tasks x{DUPLICATE_SUBMITS} at once, Idempotency-Key charge-dup: "
        + ", ".join(f"{n} x {code}" for code, n in sorted(codes.items()))
        + f" -> task(s) {', '.join(map(str, sorted(run.duplicate_ids)))}"
    )
    other = {"type": "payment.charge", "payload": {"account": "acct-dup", "amount_cents": 9999}}
    conflict = await http.post("/tasks", json=other, headers={"Idempotency-Key": "charge-dup"})
    run.conflict_code = conflict.status_code
    screen.step(f"same key, different amount -> {conflict.status_code} {_error_code(conflict)}")

    run.flaky_task = await _post(
        http, run, {"type": "email.send", "payload": {"to": "flaky@example.com", "template": "receipt", "flaky_failures": 2}},
        "flaky email", TaskStatus.SUCCEEDED,
    )  # fmt: skip
    invalid = await _post(
        http, run, {"type": "payment.charge", "payload": {"account": "acct-x", "amount_cents": "lots"}},
        "invalid payload", TaskStatus.DEAD,
    )  # fmt: skip
    unknown = await _post(
        http,
        run,
        {"type": "sms.send", "payload": {"to": "+15550100"}},
        "unknown type",
        TaskStatus.DEAD,
    )
    exhausted = await _post(
        http, run, {"type": "operation.run", "payload": {"name": "locked-period", "fail": True}, "max_attempts": 3},
        "exhausts retries", TaskStatus.DEAD,
    )  # fmt: skip
    screen.step(
        f"flaky email {run.flaky_task} (fails twice after sending), invalid payload {invalid}, "
        f"unknown type {unknown}, always-failing operation {exhausted} (max 3 attempts)"
    )
    refused = await http.post(
        "/tasks", json={"type": "email.send", "payload": ["not", "an object"]}
    )
    run.refused_code = refused.status_code
    run.refused_message = _error_message(refused)
    screen.step(
        f"a payload that is not a JSON object -> {refused.status_code}: {run.refused_message}"
    )


def _error_code(reply: Any) -> str:
    with contextlib.suppress(Exception):
        return str(reply.json()["error"]["code"])
    return ""


def _error_message(reply: Any) -> str:
    with contextlib.suppress(Exception):
        return str(reply.json()["error"]["message"])
    return reply.text[:120]  # type: ignore[no-any-return]


async def _watch(
    http: Any, group: ProcessGroup, screen: Screen, run: demo_checks.Run, deadline: float
) -> None:
    """Progress by status until every accepted task is final."""
    killed = {c.pid for c in group.exited()}
    total = len(run.accepted_ids)
    while True:
        _no_crash(group, killed)
        queues = (await http.get("/queues")).json()["queues"]
        counts: Counter[str] = Counter()
        for q in queues:
            counts.update(q["counts"])
        final = sum(counts[s.value] for s in TaskStatus if s.is_final)
        parts = "  ".join(f"{styled_status(s)} {counts[s.value]:>3}" for s in TaskStatus)
        done = final >= total and sum(counts.values()) == total
        waiting = (
            ""
            if done
            # The last ones are usually a retry waiting out its backoff, or the
            # killed worker's task waiting for its lease to expire and the reaper.
            else f"; {total - final} running, or waiting for a retry's backoff or an expired lease"
        )
        screen.progress(f"{parts}   ({final}/{total} final{waiting})", force=done)
        if done:
            screen.step(f"all {total} accepted tasks reached a final state")
            return
        if time.monotonic() > deadline:
            raise DemoFailed(f"only {final} of {total} tasks were final when the time was up")
        await asyncio.sleep(0.2)
