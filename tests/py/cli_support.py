"""Helpers for the command-line tests: running ``ledgerq``, processes, ports.

- ``invoke(args, settings)`` runs a command in-process with click's runner and
  the test's database and Redis prefix in its environment.
- ``ledgerq_process(args, env)`` starts the real ``ledgerq`` console script.
- ``descendants(pid)`` lists a process's children and their children (from
  /proc), ``alive(pid)`` says whether a pid still exists (zombies count as gone),
  ``processes_with_env(name, value)`` finds processes by an environment variable.
- ``closed_port()`` is a local TCP port nothing listens on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from click.testing import CliRunner, Result

from ledgerq import config
from ledgerq.cli import main

T = TypeVar("T")

LEDGERQ = str(Path(sys.executable).with_name("ledgerq"))
REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.02


def env_for(settings: config.Settings) -> dict[str, str]:
    return {
        "LEDGERQ_DATABASE_URL": settings.database_url,
        "LEDGERQ_REDIS_URL": settings.redis_url,
        "LEDGERQ_REDIS_PREFIX": settings.redis_prefix,
    }


def invoke(args: Sequence[str], settings: config.Settings | None = None) -> Result:
    """Run ``ledgerq ARGS`` in-process; stdout and stderr apart."""
    runner = CliRunner()
    env = env_for(settings) if settings is not None else {}
    return runner.invoke(main, list(args), env=env, prog_name="ledgerq", catch_exceptions=True)


def assert_one_line_failure(result: Result, code: int, *needles: str) -> str:
    """The command failed with exit code, one line on stderr containing needles."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def ledgerq_process(
    args: Sequence[str], env: dict[str, str], *, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """The real ``ledgerq ARGS`` in a session of its own (so a test signals only it)."""
    return subprocess.Popen(
        [LEDGERQ, *args],
        env={**os.environ, **env},
        cwd=cwd or REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_process(process: subprocess.Popen[str]) -> None:
    """Teardown: SIGKILL the process's whole group (its session) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.kill()
    process.communicate()


def poll(probe: Callable[[], T], *, deadline_s: float = 20.0, what: str = "a condition") -> T:
    """probe() every POLL_S until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last saw {value!r}")
        time.sleep(POLL_S)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below pid."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has name=value."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def free_port() -> int:
    return closed_port()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def no_traceback(*texts: Any) -> None:
    for text in texts:
        assert "Traceback" not in str(text), text
