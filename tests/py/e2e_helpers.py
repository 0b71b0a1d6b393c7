"""End-to-end harness: real ``ledgerq`` processes, a private Redis, a private PostgreSQL.

``Deployment`` starts ``.venv/bin/ledgerq worker|dispatcher|reaper`` as child
processes, each in a session of its own (so ``worker --processes N`` children go
down with their parent), with ``LEDGERQ_*`` in the environment, an app module
(``APP_SOURCE``, written into the test's directory) as ``--app``, and that
directory as the working directory. Each process logs to a file in the test's
directory; every failure message carries the tail of every log.

Nothing leaks: ``Deployment.close()`` (and the private servers of
e2e_servers.py) SIGKILL what they started (fixtures call them in
teardown, whatever the test did). A process that exited is not reaped before
then (``waitid(WNOWAIT)`` reads its status), so its pid, which is also its
process group's id, cannot be reused by an unrelated process meanwhile.

Waiting is polling the ledger every 25 ms against a deadline (``wait_for``);
the handlers in ``APP_SOURCE`` record every run in ``e2e_runs`` (primary key
``(task_id, attempt)``) and every side effect in ``e2e_effects`` (no unique
key, so a second effect shows up as a second row).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

T = TypeVar("T")

LEDGERQ = Path(sys.executable).with_name("ledgerq")
POLL_S = 0.025
LEASE_S = 3
REAPER_INTERVAL_S = 0.5
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 25
PG_BIN = Path("/usr/lib/postgresql/15/bin")

APP_MODULE = "e2e_app"
APP_SOURCE = '''\
"""Handlers for the end-to-end tests: each run is recorded in e2e_runs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ledgerq import Context, NonRetryable, Registry

tasks = Registry()
DATABASE_URL = os.environ["LEDGERQ_DATABASE_URL"]
HERE = Path(__file__).resolve().parent
RUN_SQL = "INSERT INTO e2e_runs (task_id, attempt, pid) VALUES (%s, %s, %s)"
EFFECT_SQL = "INSERT INTO e2e_effects (task_id, attempt, pid) VALUES (%s, %s, %s)"
_pool: AsyncConnectionPool[Any] | None = None
_pool_lock = asyncio.Lock()


async def _connections() -> AsyncConnectionPool[Any]:
    global _pool
    async with _pool_lock:
        if _pool is None:
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                DATABASE_URL, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
            )
            await pool.open(wait=True)
            _pool = pool
    return _pool


async def record_run(ctx: Context) -> None:
    async with (await _connections()).connection() as conn:
        await conn.execute(RUN_SQL, (ctx.task_id, ctx.attempt, os.getpid()))


def record_run_sync(ctx: Context) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(RUN_SQL, (ctx.task_id, ctx.attempt, os.getpid()))


def released(ctx: Context) -> bool:
    return (HERE / f"release-{ctx.task_id}").exists()


@tasks.task("e2e.record")
async def record(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    await record_run(ctx)
    await asyncio.sleep(payload.get("sleep_s", 0))
    return {"n": payload.get("n"), "attempt": ctx.attempt}


@tasks.task("e2e.block", timeout=None)
async def block(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Blocks the listed attempts until the test creates release-<task_id>."""
    await record_run(ctx)
    if ctx.attempt in payload.get("block_attempts", [1]):
        while not released(ctx):
            await asyncio.sleep(0.02)
    return {"attempt": ctx.attempt}


def side_effect(task_id: int, attempt: int) -> dict[str, int]:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(EFFECT_SQL, (task_id, attempt, os.getpid()))
    return {"by_attempt": attempt}


@tasks.task("e2e.stale", timeout=None)
def stale(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Does its effect through ctx.once; attempt 1 then waits for release-<task_id>."""
    record_run_sync(ctx)
    effect = ctx.once(f"effect-{ctx.task_id}", side_effect, ctx.task_id, ctx.attempt)
    if ctx.attempt == 1:
        while not released(ctx):
            time.sleep(0.01)
    return {"attempt": ctx.attempt, "effect": effect}


@tasks.task("e2e.effect_tx")
async def effect_tx(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Writes its effect with once_in_transaction: it commits with the completion."""
    await record_run(ctx)

    async def write(conn: Any) -> dict[str, int]:
        await conn.execute(EFFECT_SQL, (ctx.task_id, ctx.attempt, os.getpid()))
        return {"by_attempt": ctx.attempt}

    effect = await ctx.once_in_transaction(f"effect-{ctx.task_id}", write)
    await asyncio.sleep(payload.get("sleep_s", 0))
    return {"attempt": ctx.attempt, "effect": effect}


@dataclasses.dataclass
class Item:
    n: int


@tasks.task("e2e.typed")
async def typed(ctx: Context, payload: Item) -> dict[str, int]:
    await record_run(ctx)
    return {"n": payload.n}


@tasks.task("e2e.non_retryable")
async def non_retryable(ctx: Context, payload: dict[str, Any]) -> None:
    await record_run(ctx)
    raise NonRetryable("refusing to charge a closed account")


@tasks.task("e2e.fail")
async def fail(ctx: Context, payload: dict[str, Any]) -> None:
    """Fails every attempt, retryably."""
    await record_run(ctx)
    raise RuntimeError(f"attempt {ctx.attempt} failed on purpose")


@tasks.task("e2e.non_json")
async def non_json(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    await record_run(ctx)
    return {"tags": {"a", "b"}}


@tasks.task("e2e.effect_tx_hold", timeout=3)
async def effect_tx_hold(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """once_in_transaction, then attempt 1 holds the transaction open (the test freezes it)."""
    await record_run(ctx)

    async def write(conn: Any) -> dict[str, int]:
        await conn.execute(EFFECT_SQL, (ctx.task_id, ctx.attempt, os.getpid()))
        return {"by_attempt": ctx.attempt}

    effect = await ctx.once_in_transaction(f"hold-{ctx.task_id}", write)
    while ctx.attempt == 1 and not released(ctx):
        await asyncio.sleep(0.02)
    return {"attempt": ctx.attempt, "effect": effect}


@tasks.task("e2e.once_unknown", timeout=None)
async def once_unknown(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """ctx.once whose effect blocks attempt 1 after it happened (the test kills it there)."""
    await record_run(ctx)

    async def effect() -> dict[str, int]:
        async with (await _connections()).connection() as conn:
            await conn.execute(EFFECT_SQL, (ctx.task_id, ctx.attempt, os.getpid()))
        while ctx.attempt == 1 and not released(ctx):
            await asyncio.sleep(0.02)
        return {"by_attempt": ctx.attempt}

    value = await ctx.once(f"unknown-{ctx.task_id}", effect, on_unknown=payload["policy"])
    return {"attempt": ctx.attempt, "effect": value}


@tasks.task("e2e.poison")
async def poison(ctx: Context, payload: dict[str, Any]) -> Any:
    """Returns or raises a value PostgreSQL cannot store, picked by payload["kind"]."""
    await record_run(ctx)
    kind = payload["kind"]
    if kind == "nan":
        return {"x": float("nan")}
    if kind == "nul":
        return "a\\x00b"
    if kind == "raise_nul":
        raise ValueError("bad\\x00byte")
    if kind == "huge":
        return {"blob": "x" * 2_000_000}
    raise AssertionError(kind)
'''

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS public.e2e_runs (
    task_id    bigint      NOT NULL,
    attempt    integer     NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (task_id, attempt)
);
CREATE TABLE IF NOT EXISTS public.e2e_effects (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id    bigint      NOT NULL,
    attempt    integer     NOT NULL,
    pid        integer     NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def poll(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: str,
    diagnostics: Callable[[], str] = lambda: "",
    check: Callable[[], None] = lambda: None,
) -> T:
    """predicate()'s first truthy value, polled every POLL_S; AssertionError after timeout_s.

    A psycopg OperationalError (the database restarting) counts as "not yet";
    check() runs before each poll and may fail the wait early.
    """
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        check()
        try:
            value = predicate()
        except psycopg.OperationalError as exc:
            value, last_error = None, f" (last error: {str(exc).strip()})"
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g} s waiting for {what}{last_error}\n{diagnostics()}"
            )
        time.sleep(POLL_S)


class Proc:
    """A child process in a session of its own, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, **popen: Any) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen,
            )
        #: Whether the test means this process to exit (so its exit is no failure).
        self.may_exit = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_status(self) -> int | None:
        """The exit code (-N for signal N), or None while it runs; does not reap it."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None or info.si_pid == 0:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    def alive(self) -> bool:
        return self.exit_status() is None

    def send(self, sig: signal.Signals) -> None:
        """Send sig to this process only (its own children are left alone)."""
        if sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            self.may_exit = True
        os.kill(self.pid, sig)

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to exit; its exit status."""
        self.may_exit = True
        status = poll(
            lambda: (self.exit_status(),) if not self.alive() else None,
            timeout_s,
            f"{self.name} (pid {self.pid}) to exit",
            lambda: self.describe(),
        )
        return status[0] if status[0] is not None else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout_s: float = 15) -> None:
        """Wait until the process has logged text."""
        poll(lambda: text in self.log(), timeout_s, f"{self.name} to log {text!r}", self.describe)

    def describe(self) -> str:
        status = self.exit_status()
        state = "running" if status is None else f"exited with {status}"
        return f"--- {self.name} (pid {self.pid}, {state}) {self.log_path}:\n{tail(self.log_path)}"

    def kill_group(self) -> None:
        """SIGKILL the process and everything in its session, then reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Deployment:
    """One test's ledgerq deployment: real CLI processes, and the ledger to inspect."""

    def __init__(self, root: Path, database_url: str, redis_url: str, redis_prefix: str) -> None:
        self.root = root
        self.database_url = database_url
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.app_dir = root / "app"
        self.log_dir = root / "logs"
        self.app_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.app_dir / f"{APP_MODULE}.py").write_text(APP_SOURCE)
        self.procs: list[Proc] = []
        self.extra_diagnostics: list[Callable[[], str]] = []
        #: More environment for the processes started from now on.
        self.extra_env: dict[str, str] = {}
        self._names = itertools.count(1)
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def __enter__(self) -> Deployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            print(self.diagnostics())  # pytest shows it with the failure
        self.close()

    def close(self) -> None:
        for proc in self.procs:
            proc.kill_group()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- processes -------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERQ_")}
        env.update(
            LEDGERQ_DATABASE_URL=self.database_url,
            LEDGERQ_REDIS_URL=self.redis_url,
            LEDGERQ_REDIS_PREFIX=self.redis_prefix,
            PYTHONDONTWRITEBYTECODE="1",
        )
        env.update(self.extra_env)
        return env

    def start(self, command: str, *args: str) -> Proc:
        """``ledgerq COMMAND ARGS...`` in the app directory."""
        assert LEDGERQ.exists(), f"{LEDGERQ} is missing: install the project into .venv"
        name = f"{command}-{next(self._names)}"
        proc = Proc(
            name,
            [str(LEDGERQ), command, *args],
            self.log_dir / f"{name}.log",
            cwd=self.app_dir,
            env=self.env(),
        )
        self.procs.append(proc)
        return proc

    def worker(
        self, *args: str, lease_s: int = LEASE_S, concurrency: int = 4, grace_s: float = 5
    ) -> Proc:
        return self.start(
            "worker", "--app", f"{APP_MODULE}:tasks", "--lease-seconds", str(lease_s),
            "--concurrency", str(concurrency), "--grace-seconds", str(grace_s), *args,
        )  # fmt: skip

    def dispatcher(self, *args: str) -> Proc:
        return self.start("dispatcher", "--poll-interval", str(POLL_INTERVAL_S), *args)

    def reaper(self, *args: str) -> Proc:
        return self.start("reaper", "--interval", str(REAPER_INTERVAL_S), *args)

    def migrate(self) -> None:
        """``ledgerq migrate`` against this deployment's database, and the test tables."""
        done = subprocess.run(
            [str(LEDGERQ), "migrate"], env=self.env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"ledgerq migrate failed:\n{done.stdout}{done.stderr}"
        self.create_tables()

    def create_tables(self) -> None:
        self.conn().execute(TABLES_SQL)

    def release(self, task_id: int) -> None:
        """Let a blocked e2e.block / e2e.stale attempt of task_id finish."""
        (self.app_dir / f"release-{task_id}").touch()

    # --- diagnostics and waiting -------------------------------------------------

    def diagnostics(self) -> str:
        parts = [proc.describe() for proc in self.procs]
        parts += [extra() for extra in self.extra_diagnostics]
        with contextlib.suppress(psycopg.Error):
            counts = self.status_counts()
            parts.append(f"--- ledger: {counts}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        """Fail at once if a process the test did not stop has exited."""
        dead = [p for p in self.procs if not p.may_exit and not p.alive()]
        if dead:
            names = ", ".join(p.name for p in dead)
            raise AssertionError(f"{names} exited unexpectedly\n{self.diagnostics()}")

    def assert_logs_clean(self) -> None:
        """No process logged a traceback: trouble a component expects (an outage, a
        bad task) is a one-line warning, and anything else is a bug."""
        noisy = [p.name for p in self.procs if "Traceback (most recent call last)" in p.log()]
        assert not noisy, f"traceback in the log of {', '.join(noisy)}\n{self.diagnostics()}"

    def wait_for(self, predicate: Callable[[], T | None], what: str, timeout_s: float = 20) -> T:
        return poll(predicate, timeout_s, what, self.diagnostics, self.check_alive)

    def wait_statuses(self, expected: dict[str, int], timeout_s: float = 20) -> None:
        """Wait until the ledger's task counts by status are exactly expected."""
        self.wait_for(
            lambda: self.status_counts() == expected, f"task counts {expected}", timeout_s
        )

    def wait_run(self, task_id: int, attempt: int, timeout_s: float = 20) -> tuple[Any, ...]:
        """Wait until attempt of task_id has started its handler; its e2e_runs row."""

        def started() -> tuple[Any, ...] | None:
            return self.query_one(
                "SELECT task_id, attempt, pid, started_at FROM e2e_runs "
                "WHERE task_id = %s AND attempt = %s",
                (task_id, attempt),
            )

        return self.wait_for(started, f"attempt {attempt} of task {task_id} to start", timeout_s)

    # --- the ledger ------------------------------------------------------------

    def conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit connection, reopened after the server restarted."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(self.database_url, autocommit=True, connect_timeout=5)
        return self._conn

    def reconnect(self) -> None:
        """Drop the connection (after a server restart: the old one is dead)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.conn().execute(sql.encode(), params).fetchall()

    def query_one(self, sql: str, params: Any = None) -> tuple[Any, ...] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def enqueue(self, task_type: str, payload: dict[str, Any] | None = None, **fields: Any) -> int:
        """One task through plain SQL (ledgerq.enqueue_task, named notation)."""
        names = ", ".join(f"{name} => %({name})s" for name in fields)
        sql = "SELECT id, created FROM ledgerq.enqueue_task(task_type => %(t)s, payload => %(p)s"
        sql += f", {names})" if names else ")"
        row = self.query_one(sql, {"t": task_type, "p": Jsonb(payload or {}), **fields})
        assert row is not None and row[1] is True
        return int(row[0])

    def enqueue_many(self, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Tasks through ledgerq.enqueue_tasks (all or nothing); their ids in order."""
        rows = self.query("SELECT id, created FROM ledgerq.enqueue_tasks(%s)", (Jsonb(tasks),))
        assert all(created for _, created in rows)
        return [int(task_id) for task_id, _ in rows]

    def status_counts(self) -> dict[str, int]:
        rows = self.query("SELECT status, count(*) FROM ledgerq.tasks GROUP BY status")
        return {status: int(n) for status, n in rows}

    def task(self, task_id: int) -> dict[str, Any]:
        row = self.query_one(
            "SELECT status, attempts, result, last_error, run_at FROM ledgerq.tasks WHERE id = %s",
            (task_id,),
        )
        assert row is not None, f"task {task_id} does not exist"
        return dict(zip(("status", "attempts", "result", "last_error", "run_at"), row, strict=True))

    def attempts(self, task_id: int) -> list[tuple[int, str | None, str | None]]:
        """(attempt, outcome, error) of each attempt of task_id, in order."""
        rows = self.query(
            "SELECT attempt, outcome, error FROM ledgerq.attempts WHERE task_id = %s "
            "ORDER BY attempt",
            (task_id,),
        )
        return [(int(a), o, e) for a, o, e in rows]

    def runs_per_task(self) -> dict[int, int]:
        """How many times each task's handler started (tasks that never ran are absent)."""
        rows = self.query("SELECT task_id, count(*) FROM e2e_runs GROUP BY task_id")
        return {int(task_id): int(n) for task_id, n in rows}

    def effects_per_task(self) -> dict[int, int]:
        rows = self.query("SELECT task_id, count(*) FROM e2e_effects GROUP BY task_id")
        return {int(task_id): int(n) for task_id, n in rows}

    def task_ids(self) -> list[int]:
        return [int(r[0]) for r in self.query("SELECT id FROM ledgerq.tasks ORDER BY id")]
