"""A private PostgreSQL with pg_cron, running ledgerq.reap_stuck(), prune_tasks() and
run_schedules() on a schedule.

pg_cron must be in shared_preload_libraries, so it cannot be tried on the shared
server: this starts a throwaway cluster of its own (initdb in a temporary
directory, a free port, fsync off) and tears it down afterwards. PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` user.

pg_cron 1.5 and later accept ``'1 seconds'`` schedules; the 1.4 that Debian
bookworm ships runs jobs only when a wall-clock minute begins. ``start()``
therefore prepares everything (stuck tasks, then the job) as early as it can,
and the test waits for the job's first run with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from ledgerq import migrations

PG_LIB = Path("/usr/lib/postgresql")
JOB_NAME = "ledgerq-reap"
JOB_COMMAND = "SELECT ledgerq.reap_stuck()"
PRUNE_JOB = "ledgerq-prune"
PRUNE_COMMAND = "SELECT ledgerq.prune_tasks()"
SCHEDULES_JOB = "ledgerq-schedules"
SCHEDULES_COMMAND = "SELECT ledgerq.run_schedules()"
SCHEDULE_NAME = "cron-tick"
SPEC_SCHEDULE = "* * * * *"
FAST_SCHEDULE = "1 seconds"
INSTALL_HINT = (
    "pg_cron is not installed for PostgreSQL {major}: "
    "apt-get install postgresql-{major}-cron (scripts/setup does this)"
)


class CronServerError(RuntimeError):
    """The private pg_cron server could not be set up."""


def bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory; pg_cron must be there too."""
    versions = sorted(
        (p for p in PG_LIB.glob("*") if (p / "bin" / "initdb").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    if not versions:
        raise CronServerError(f"no PostgreSQL server binaries under {PG_LIB}")
    newest = versions[-1]
    if not (newest / "lib" / "pg_cron.so").exists():
        raise CronServerError(INSTALL_HINT.format(major=newest.name))
    return newest / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CronServer:
    """A throwaway PostgreSQL cluster with pg_cron and the ledgerq schema."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ledgerq-pg-cron-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL will not run as root.
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.started = False
        self.schedule = SPEC_SCHEDULE
        self.task_ids: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10, **kwargs)

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            [*self.as_postgres, *command], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise CronServerError(
                f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()}"
                f"\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        return ""

    def start(self) -> None:
        """initdb, start, migrate, create stuck tasks, schedule the reaper job."""
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
        )
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                "-c shared_preload_libraries=pg_cron",
                "-c cron.database_name=postgres",
                # Jobs run in background workers, not over a libpq connection.
                "-c cron.use_background_workers=on",
                "-c max_worker_processes=16",
                "-c fsync=off",
            ]
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.started = True
        migrations.migrate(self.url)
        with self.connect() as conn:
            conn.execute("CREATE EXTENSION pg_cron")
            self._make_stuck_tasks(conn)
            self._make_old_tasks(conn)
            conn.execute(
                "SELECT ledgerq.schedule_task(name => %s, cron => '@every 5 seconds',"
                " task_type => 'report.build')",
                (SCHEDULE_NAME,),
            )
            self._schedule(conn)

    def _make_stuck_tasks(self, conn: psycopg.Connection[Any]) -> None:
        """A crashed worker's tasks (lease expired) and a delivery Redis lost."""
        for name, max_attempts in (("retry", 3), ("last-attempt", 1), ("lost-delivery", 3)):
            row = conn.execute(
                "SELECT id FROM ledgerq.enqueue_task(task_type => 'email.send',"
                " max_attempts => %s, idempotency_key => %s)",
                (max_attempts, name),
            ).fetchone()
            assert row is not None
            self.task_ids[name] = int(row[0])
        conn.execute("SELECT ledgerq.task_take_due(batch_size => 10)")  # all three QUEUED
        conn.execute(
            "SELECT * FROM ledgerq.claim_tasks(task_ids => %s, worker_id => 'crashed-worker',"
            " lease_seconds => 30)",
            ([self.task_ids["retry"], self.task_ids["last-attempt"]],),
        )
        conn.execute(
            "UPDATE ledgerq.tasks SET lease_expires_at = now() - interval '1 minute'"
            " WHERE status = 'RUNNING'"
        )
        conn.execute(
            "UPDATE ledgerq.tasks SET queued_at = now() - interval '5 minutes'"
            " WHERE status = 'QUEUED'"
        )

    def _make_old_tasks(self, conn: psycopg.Connection[Any]) -> None:
        """Tasks that finished ten days ago, with their attempts: two SUCCEEDED (prune_tasks
        deletes them) and a DEAD one (kept: include_dead is off by default)."""
        for name, status in (("old-1", "SUCCEEDED"), ("old-2", "SUCCEEDED"), ("old-dead", "DEAD")):
            row = conn.execute(
                "INSERT INTO ledgerq.tasks (task_type, queue, status, attempts, started_at,"
                " finished_at) VALUES ('email.send', 'default', %s, 1,"
                " now() - interval '10 days', now() - interval '10 days') RETURNING id",
                (status,),
            ).fetchone()
            assert row is not None
            self.task_ids[name] = int(row[0])
            conn.execute(
                "INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, finished_at, outcome)"
                " VALUES (%s, 1, 'old-worker', now() - interval '10 days', %s)",
                (row[0], "succeeded" if status == "SUCCEEDED" else "failed"),
            )

    def _schedule(self, conn: psycopg.Connection[Any]) -> None:
        """Schedule the reaper, pruning and the schedules: every second where pg_cron can,
        else every minute (the README's lines)."""
        jobs = (
            (JOB_NAME, JOB_COMMAND),
            (PRUNE_JOB, PRUNE_COMMAND),
            (SCHEDULES_JOB, SCHEDULES_COMMAND),
        )
        try:
            with conn.transaction():
                for name, command in jobs:
                    conn.execute("SELECT cron.schedule(%s, %s, %s)", (name, FAST_SCHEDULE, command))
            self.schedule = FAST_SCHEDULE
        except psycopg.errors.InvalidParameterValue:
            for name, command in jobs:
                conn.execute("SELECT cron.schedule(%s, %s, %s)", (name, SPEC_SCHEDULE, command))
            self.schedule = SPEC_SCHEDULE

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(CronServerError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
