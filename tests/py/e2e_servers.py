"""A private Redis and a private PostgreSQL for the end-to-end tests that restart,
flush or kill them: each runs from a temporary directory on a free port, and
``close()`` SIGKILLs it and removes the directory, whatever the test did."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis
from e2e_helpers import PG_BIN, Proc, free_port, poll, tail


class PrivateRedis:
    """A redis-server of the test's own (no persistence), safe to FLUSHALL and restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None
        self._starts = itertools.count(1)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start (empty) on self.port and wait until it answers PING."""
        assert shutil.which("redis-server"), "redis-server is not installed"
        number = next(self._starts)
        self.proc = Proc(
            f"redis-server-{number}",
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), "--protected-mode", "no"],
            self.root / f"redis-{number}.log",
        )  # fmt: skip
        poll(self._pong, 10, f"redis-server on port {self.port} to answer", self.describe)

    def _pong(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            raise AssertionError(f"redis-server exited\n{self.describe()}")
        client = self.client()
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2)

    def kill(self) -> None:
        """kill -9 the server (its data is gone)."""
        assert self.proc is not None
        self.proc.send(signal.SIGKILL)
        self.proc.wait_exit(10)
        self.proc.kill_group()  # reaps it

    def restart(self) -> None:
        self.kill()
        self.start()

    def describe(self) -> str:
        return self.proc.describe() if self.proc is not None else "--- redis-server: not started"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill_group()


class PrivatePostgres:
    """A PostgreSQL 15 server of the test's own, run as the postgres user, safe to restart."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: that is private to root, and PostgreSQL
        # refuses to run as root.
        self.root = Path(tempfile.mkdtemp(prefix="ledgerq-e2e-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgresql.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._started = False

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _as_postgres(self, *argv: str, timeout_s: float = 60) -> None:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.root,
        )
        assert done.returncode == 0, (
            f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}\n{self.describe()}"
        )

    def start(self) -> None:
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale", "C",
        )  # fmt: skip
        self._started = True
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.log_path), "-w", "start",
        )  # fmt: skip

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut; returns once it accepts again."""
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
            "-m", "fast", "-w", "restart",
        )  # fmt: skip

    def describe(self) -> str:
        return f"--- postgresql {self.log_path}:\n{tail(self.log_path)}"

    def close(self) -> None:
        try:
            if self._started and (self.data / "postmaster.pid").exists():
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    self._as_postgres(
                        str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                        "stop", timeout_s=30,
                    )  # fmt: skip
                self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """If pg_ctl stop failed, SIGKILL the postmaster this object started."""
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().splitlines()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.data).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
