"""Helpers for the in-process runtime tests: deadlines instead of sleeps, the real
services running in the test's event loop, and a private Redis Cluster.

- ``eventually(probe, ...)`` polls (every POLL_S) until probe returns something
  truthy, and fails with what it last saw when the deadline passes.
- ``wait_for_status(ledger, task_id, "SUCCEEDED")`` is the common case.
- ``running(settings, registry, ...)`` runs a Worker, a Dispatcher and (if asked)
  a Reaper as asyncio tasks in the test's loop, and on exit stops them, awaits
  them, closes every pool and checks that no ledgerq task was left behind.
- ``LocalRedisCluster`` starts and stops a 3-node Redis Cluster in a temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest
import redis

from ledgerq import config
from ledgerq.client import AsyncClient
from ledgerq.dispatch import Dispatch
from ledgerq.dispatcher import Dispatcher
from ledgerq.ledger import AsyncLedger
from ledgerq.reaper import Reaper
from ledgerq.registry import Registry
from ledgerq.types import Task, TaskStatus
from ledgerq.worker import Worker

T = TypeVar("T")
Conn = psycopg.Connection[Any]

POLL_S = 0.015
DEADLINE_S = 10.0


# --- waiting for events ----------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    deadline_s: float = DEADLINE_S,
    what: str = "a condition",
) -> T:
    """Await probe() every POLL_S until it returns something truthy; return that."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {deadline_s:g} s waiting for {what}; last: {value!r}"
            )
        await asyncio.sleep(POLL_S)


async def wait_for_status(
    ledger: AsyncLedger, task_id: int, *statuses: str, deadline_s: float = DEADLINE_S
) -> Task:
    """The task (with its attempt history) once its status is one of statuses."""
    wanted = {TaskStatus(s) for s in statuses}
    last: list[Task] = []

    async def probe() -> Task | None:
        task = await ledger.get(task_id)
        last[:] = [task]
        return task if task.status in wanted else None

    try:
        return await eventually(
            probe, deadline_s=deadline_s, what=f"task {task_id} to be {statuses}"
        )
    except AssertionError:
        seen = last[0] if last else None
        detail = (
            f"status={seen.status} attempts={seen.attempts} last_error={seen.last_error!r}"
            if seen
            else "never read"
        )
        raise AssertionError(
            f"task {task_id} did not reach {'/'.join(statuses)} within {deadline_s:g} s ({detail})"
        ) from None


async def wait_for_attempts(
    ledger: AsyncLedger, task_id: int, status: str, attempts: int, deadline_s: float = DEADLINE_S
) -> Task:
    """The task once it is in status with exactly `attempts` attempts made."""

    async def probe() -> Task | None:
        task = await ledger.get(task_id)
        return task if task.status == status and task.attempts == attempts else None

    return await eventually(
        probe, deadline_s=deadline_s, what=f"task {task_id} {status} after {attempts} attempt(s)"
    )


def pause_queue(settings: config.Settings, queue: str = "default") -> None:
    """Pause a queue from inside a handler's first attempt. The retry that attempt's
    failure schedules then stays PENDING, for the test to look at, until the test
    resumes the queue: a backoff drawn from [0, 1 s] is too short to be sure of
    seeing that state otherwise."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("SELECT ledgerq.pause_queue(%s)", (queue,))


async def wait_for_retry(ledger: AsyncLedger, task_id: int) -> Task:
    """The task once its first attempt failed and it was kept for another: seen
    PENDING after one attempt, or already further on (a short backoff can end
    between two probes)."""

    async def probe() -> Task | None:
        task = await ledger.get(task_id)
        retrying = task.status == TaskStatus.PENDING and task.attempts == 1
        return task if retrying or task.attempts >= 2 else None

    return await eventually(probe, what=f"task {task_id} to be retried after attempt 1")


def make_due(db: Conn, task_id: int) -> None:
    """Skip a retry's backoff: a PENDING task is due now (and the dispatcher is told)."""
    db.execute(
        "UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s AND status = 'PENDING'", (task_id,)
    )
    db.execute("SELECT pg_notify('ledgerq_tasks', '')")


async def run_retries(
    ledger: AsyncLedger, db: Conn, task_id: int, *final: str, deadline_s: float = DEADLINE_S
) -> Task:
    """Wait for a final status, making each retry due at once instead of after its backoff."""

    async def probe() -> Task | None:
        task = await ledger.get(task_id)
        if task.status in final:
            return task
        if task.status == TaskStatus.PENDING and task.attempts > 0:
            make_due(db, task_id)
        return None

    return await eventually(probe, deadline_s=deadline_s, what=f"task {task_id} to be {final}")


def attempts(db: Conn, task_id: int) -> list[tuple[int, str | None, str | None]]:
    """(attempt, outcome, first line of error) for each attempt of a task."""
    rows = db.execute(
        "SELECT attempt, outcome, error FROM ledgerq.attempts WHERE task_id = %s ORDER BY attempt",
        (task_id,),
    ).fetchall()
    return [(a, o, e.splitlines()[0] if e else None) for a, o, e in rows]


def expire_lease(db: Conn, task_id: int) -> None:
    """Make a RUNNING task's lease look expired, as if its worker stopped heartbeating."""
    updated = db.execute(
        "UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 second' "
        "WHERE id = %s AND status = 'RUNNING'",
        (task_id,),
    ).rowcount
    assert updated == 1, f"task {task_id} is not RUNNING"


def claim_by_sql(db: Conn, task_id: int, worker_id: str = "ghost", lease_s: int = 30) -> int:
    """Claim a task as another (simulated) worker; return the attempt number."""
    row = db.execute(
        "SELECT attempts FROM ledgerq.claim_task(task_id => %s, worker_id => %s, "
        "lease_seconds => %s)",
        (task_id, worker_id, lease_s),
    ).fetchone()
    assert row is not None, f"task {task_id} was not claimable"
    return int(row[0])


def complete_by_sql(db: Conn, task_id: int, attempt: int, result: str) -> str | None:
    """complete_task as the simulated worker, with {"by": result}."""
    row = db.execute(
        "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => true, "
        "result => jsonb_build_object('by', %s::text))",
        (task_id, attempt, result),
    ).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


# --- services in the test's loop ---------------------------------------------------


@dataclasses.dataclass
class Services:
    """A ledger, a Redis dispatch, a client, and the services running on them."""

    ledger: AsyncLedger
    dispatch: Dispatch
    client: AsyncClient
    worker: Worker | None = None
    dispatcher: Dispatcher | None = None
    reaper: Reaper | None = None
    tasks: dict[str, asyncio.Task[None]] = dataclasses.field(default_factory=dict)

    async def enqueue(
        self, task_type: str, payload: dict[str, Any] | None = None, **kw: Any
    ) -> int:
        task = await self.client.enqueue(task_type, payload, **kw)
        return int(task.id)

    async def stop_worker(self, deadline_s: float = DEADLINE_S) -> None:
        """stop() the worker and wait for run() to return (drain and hand-back included)."""
        assert self.worker is not None
        self.worker.stop()
        await asyncio.wait_for(asyncio.shield(self.tasks["worker"]), deadline_s)

    def start_worker(self, worker: Worker) -> None:
        self.worker = worker
        self.tasks["worker"] = asyncio.create_task(worker.run(), name="test-worker")


@contextlib.asynccontextmanager
async def running(
    settings: config.Settings,
    registry: Registry,
    *,
    worker: bool = True,
    dispatcher: bool = True,
    reaper: bool = False,
    queues: list[str] | None = None,
    concurrency: int = 4,
    lease_s: int = 30,
    grace_s: float = 5.0,
    poll_interval_s: float = 0.05,
    reaper_interval_s: float = 0.05,
) -> AsyncIterator[Services]:
    """The real Worker / Dispatcher / Reaper as tasks in this loop, torn down on exit.

    Without a running dispatcher the client does not hand tasks off to Redis
    either: nothing reaches Redis but what the test dispatches itself."""
    ledger = await AsyncLedger.connect(settings.database_url, max_size=12)
    dispatch = Dispatch.connect(
        settings.redis_url, settings.redis_prefix, cluster=settings.redis_cluster
    )
    client = AsyncClient(
        settings, registry=registry, ledger=ledger, dispatch=dispatch, hand_off=dispatcher
    )
    services = Services(ledger, dispatch, client)
    try:
        if dispatcher:
            services.dispatcher = Dispatcher(
                ledger, dispatch, database_url=settings.database_url,
                poll_interval_s=poll_interval_s,
            )  # fmt: skip
            services.tasks["dispatcher"] = asyncio.create_task(
                services.dispatcher.run(), name="test-dispatcher"
            )
        if reaper:
            services.reaper = Reaper(ledger, interval_s=reaper_interval_s)
            services.tasks["reaper"] = asyncio.create_task(
                services.reaper.run(), name="test-reaper"
            )
        if worker:
            services.start_worker(
                Worker(
                    registry,
                    ledger,
                    dispatch,
                    queues=queues,
                    concurrency=concurrency,
                    lease_s=lease_s,
                    grace_s=grace_s,
                    worker_id="test-worker",
                )
            )
        yield services
    finally:
        for service in (services.worker, services.dispatcher, services.reaper):
            if service is not None:
                service.stop()
        results = await asyncio.wait_for(
            asyncio.gather(*services.tasks.values(), return_exceptions=True), DEADLINE_S
        )
        await ledger.close()
        await dispatch.close()
        leftover = [
            t.get_name()
            for t in asyncio.all_tasks()
            if t is not asyncio.current_task() and not t.done()
        ]
        assert not leftover, f"asyncio tasks left running: {leftover}"
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"a service crashed: {failures!r}"


def worker(tasks: Registry, s: Services, **options: Any) -> Worker:
    """A Worker on the services' ledger and Redis, called test-worker unless told."""
    return Worker(tasks, s.ledger, s.dispatch, **({"worker_id": "test-worker"} | options))


def assert_no_handler_thread_left_busy() -> None:
    """After a test: idle handler threads exit once their worker shuts its executor
    down; a busy one (a sync handler nobody released) would leak into the next test."""
    threads = [t for t in threading.enumerate() if t.name.startswith("ledgerq-handler")]
    for thread in threads:
        thread.join(2)
    assert not [t.name for t in threads if t.is_alive()]


# --- a private Redis Cluster -------------------------------------------------------


def _free_port() -> int:
    """A free TCP port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclasses.dataclass
class LocalRedisCluster:
    """Three redis-server masters in cluster mode, in a temp dir of their own."""

    ports: list[int]
    directory: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    @classmethod
    def start(cls, nodes: int = 3) -> LocalRedisCluster:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            pytest.fail(
                "redis-server and redis-cli are needed for the cluster tests", pytrace=False
            )
        directory = tempfile.mkdtemp(prefix="ledgerq-cluster-")
        cluster = cls([], directory)
        try:
            while len(cluster.ports) < nodes:
                port = _free_port()
                if port in cluster.ports:
                    continue
                subprocess.run(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        os.path.join(directory, f"nodes-{port}.conf"),
                        "--dir",
                        directory,
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--daemonize",
                        "yes",
                        "--logfile",
                        os.path.join(directory, f"redis-{port}.log"),
                        "--pidfile",
                        os.path.join(directory, f"redis-{port}.pid"),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=10,
                )
                cluster.ports.append(port)
            for port in cluster.ports:
                cluster._wait(port, lambda c: bool(c.ping()))
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in cluster.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            for port in cluster.ports:
                cluster._wait(
                    port,
                    lambda c: b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO"),  # type: ignore[no-untyped-call]
                )
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @staticmethod
    def _wait(port: int, ready: Callable[[redis.Redis], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=port, socket_connect_timeout=1)
        try:
            while True:
                with contextlib.suppress(redis.exceptions.RedisError):
                    if ready(client):
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis Cluster node {port} did not become ready")
                time.sleep(0.02)
        finally:
            client.close()

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key of a test's namespace (its hash tag puts them on one node)."""
        for port in self.ports:
            client = redis.Redis(port=port)
            try:
                keys = list(client.scan_iter(match=f"{{{prefix}}}*", count=1000))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()

    def stop(self) -> None:
        for port in self.ports:
            subprocess.run(
                ["redis-cli", "-p", str(port), "shutdown", "nosave"],
                capture_output=True, timeout=10, check=False,
            )  # fmt: skip
        shutil.rmtree(self.directory, ignore_errors=True)


_shared_cluster: list[LocalRedisCluster] = []


def shared_cluster(pytest_config: pytest.Config) -> LocalRedisCluster:
    """One cluster per test run, shared by every module that asks; stopped at the end."""
    if not _shared_cluster:
        _shared_cluster.append(LocalRedisCluster.start())
        pytest_config.add_cleanup(_stop_shared_cluster)
    return _shared_cluster[0]


def _stop_shared_cluster() -> None:
    while _shared_cluster:
        _shared_cluster.pop().stop()
