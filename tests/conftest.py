"""Shared PostgreSQL fixtures: one migrated template per test run, a clone per test.

pytest-postgresql's no-process fixture (``postgresql_noproc``) serves the machine's
own server (the ``postgresql_host/port/user`` ini options in pyproject.toml) and
creates the run's template database, which ``ledgerq.migrations.migrate`` loads.
Each test that asks for ``db_url`` or ``db`` gets its own database cloned from that
template with ``CREATE DATABASE ... TEMPLATE`` (a few tens of ms), dropped after
the test, so tests may commit, LISTEN and race connections freely. Clones are
made a few ahead and dropped on background threads (``ClonePool``), so a test
rarely waits for either. ``empty_db_url`` is an empty database (for migrate
tests), and ``database_factory`` makes more clones inside one test.

Database names carry this process's id and a counter (``ledgerq_test_<pid>_<n>``),
so parallel runs never collide; databases left behind by a run that was killed
are dropped at the start of the next one.

If PostgreSQL cannot be reached, every test that needs it fails with a message
saying how to start it; nothing is skipped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from pytest_postgresql import factories
from pytest_postgresql.config import get_config
from pytest_postgresql.executors import NoopExecutor

from ledgerq import migrations

DB_PREFIX = "ledgerq_test_"
RUN_PREFIX = f"{DB_PREFIX}{os.getpid()}"
START_HINT = (
    "start it with `pg_ctlcluster --skip-systemctl-redirect 15 main start` "
    "(or run scripts/setup, which also starts Redis)"
)
_STALE_NAME = re.compile(rf"^{DB_PREFIX}(\d+)(_|$)")


@dataclasses.dataclass(frozen=True, slots=True)
class PgServer:
    """Where the test PostgreSQL listens, and how to reach its databases."""

    host: str
    port: int
    user: str
    password: str | None

    def url(self, dbname: str) -> str:
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit connection to the maintenance database."""
        return psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5)


def _migrate_template(*, host: str, port: int | str, user: str, dbname: str, **kwargs: Any) -> None:
    """pytest-postgresql loader: migrate the run's template database."""
    server = PgServer(host, int(port), user, kwargs.get("password"))
    migrations.migrate(server.url(dbname))


# The run's template: named after this process so parallel runs do not share it.
postgresql_noproc = factories.postgresql_noproc(dbname=RUN_PREFIX, load=[_migrate_template])


def _drop_database(admin: psycopg.Connection[tuple[Any, ...]], name: str) -> None:
    # DROP DATABASE re-checks for other sessions only every 100 ms, while the
    # backend of a connection a test just closed is gone within a millisecond
    # or two: wait for that briefly, end what a test left open (its threads',
    # a LISTENer's), and the drop takes ~20 ms instead of ~110.
    deadline = time.monotonic() + 0.05
    while _sessions(admin, name) and time.monotonic() < deadline:
        time.sleep(0.002)
    admin.execute(
        "SELECT pg_terminate_backend(pid, 1000) FROM pg_stat_activity WHERE datname = %s", (name,)
    )
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _sessions(admin: psycopg.Connection[tuple[Any, ...]], name: str) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
    ).fetchone()
    return int(row[0]) if row else 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_stale_databases(server: PgServer) -> None:
    """Drop test databases whose run (process) is gone: a killed run leaves them."""
    with server.admin() as admin:
        rows = admin.execute(
            "SELECT datname, datistemplate FROM pg_database WHERE datname LIKE %s",
            (DB_PREFIX + "%",),
        ).fetchall()
        for name, is_template in rows:
            match = _STALE_NAME.match(name)
            if match and not _pid_alive(int(match.group(1))):
                # Only a template needs unmarking before DROP. A database a killed
                # DROP left half-dropped (invalid) refuses ALTER, but drops.
                if is_template:
                    admin.execute(
                        sql.SQL("ALTER DATABASE {} WITH is_template false").format(
                            sql.Identifier(name)
                        )
                    )
                _drop_database(admin, name)


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    """The test PostgreSQL server; fails the test with a how-to if it is down."""
    config = get_config(request)
    server = PgServer(
        host=config.host, port=int(config.port or 5432), user=config.user, password=config.password
    )
    try:
        with server.admin() as admin:
            admin.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        pytest.fail(
            f"PostgreSQL is not reachable at {server.host}:{server.port} ({first_line}); {START_HINT}",
            pytrace=False,
        )
    _drop_stale_databases(server)
    return server


@pytest.fixture(scope="session")
def ledger_template(pg_server: PgServer, request: pytest.FixtureRequest) -> str:
    """The name of this run's migrated template database."""
    executor: NoopExecutor = request.getfixturevalue("postgresql_noproc")
    return executor.template_dbname


class ClonePool:
    """Clones of the run's template, made ahead and dropped on background threads.

    CREATE DATABASE costs ~30 ms on an idle server and several times that on a
    busy one, mostly waiting for WAL to reach disk; several at once share that
    wait. So a few clones are always being made while tests run, and a test's
    clone is dropped behind its back. Every clone comes from the untouched
    template: a prefetched one is as fresh as one made on demand.
    """

    def __init__(self, server: PgServer, template: str, ahead: int = 4) -> None:
        self._server = server
        self._template = template
        self._names = (f"{RUN_PREFIX}_{n}" for n in itertools.count(1))
        self._executor = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="pg-clone")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._ready: collections.deque[Future[str]] = collections.deque()
        self._dropping: list[Future[None]] = []
        self._live: set[str] = set()
        for _ in range(ahead):
            self._prefetch()

    def _admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn: psycopg.Connection[tuple[Any, ...]] | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._server.admin()
            with self._lock:
                self._connections.append(conn)
        return conn

    def _create(self, name: str, template: str) -> str:
        self._admin().execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
        return name

    def _drop(self, name: str) -> None:
        _drop_database(self._admin(), name)
        with self._lock:
            self._live.discard(name)

    def _prefetch(self) -> None:
        name = next(self._names)
        with self._lock:
            self._live.add(name)
        self._ready.append(self._executor.submit(self._create, name, self._template))

    def acquire(self, *, migrated: bool = True) -> str:
        """A new database's name: a clone of the template, or empty (from template0)."""
        if not migrated:
            name = next(self._names)
            with self._lock:
                self._live.add(name)
            return self._executor.submit(self._create, name, "template0").result()
        future = self._ready.popleft()
        self._prefetch()
        return future.result()

    def release(self, name: str) -> None:
        self._dropping.append(self._executor.submit(self._drop, name))

    def close(self) -> None:
        """Drop every database this pool made, and wait for it."""
        failures = [f.exception() for f in [*self._ready, *self._dropping]]
        with self._lock:
            live = list(self._live)
        for name in live:
            self._drop(name)
        self._executor.shutdown(wait=True)
        for conn in self._connections:
            conn.close()
        for failure in failures:
            if failure is not None:
                raise failure


@pytest.fixture(scope="session")
def database_factory(
    pg_server: PgServer, ledger_template: str
) -> Iterator[Callable[..., contextlib.AbstractContextManager[str]]]:
    """``with database_factory() as url:`` a fresh clone of the migrated template.

    ``database_factory(migrated=False)`` gives an empty database instead.
    Hypothesis tests use this to get a clean ledger per example.
    """
    pool = ClonePool(pg_server, ledger_template)

    @contextlib.contextmanager
    def make(*, migrated: bool = True) -> Iterator[str]:
        name = pool.acquire(migrated=migrated)
        try:
            yield pg_server.url(name)
        finally:
            pool.release(name)

    try:
        yield make
    finally:
        pool.close()


@pytest.fixture
def db_url(
    database_factory: Callable[..., contextlib.AbstractContextManager[str]],
) -> Iterator[str]:
    """The URL of a fresh, migrated database of this test's own."""
    with database_factory() as url:
        yield url


@pytest.fixture
def empty_db_url(
    database_factory: Callable[..., contextlib.AbstractContextManager[str]],
) -> Iterator[str]:
    """The URL of a fresh database with no ledgerq schema (for migrate tests)."""
    with database_factory(migrated=False) as url:
        yield url


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """An autocommit connection to this test's own migrated database."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn
