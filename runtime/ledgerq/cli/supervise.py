"""Child processes for ``ledgerq run`` and ``ledgerq demo``: one process group, stopped as one.

Each child is a real ``ledgerq`` command (``api``, ``dispatcher``, ``reaper``,
``worker``) started with this Python as ``python -m ledgerq.cli ARGS...``
(``cli/__main__.py``). The children share one process group of
their own, apart from the terminal's: a Ctrl-C reaches only the supervising
process, which then sends every child exactly one SIGTERM (each service's
graceful stop; a second signal would make it exit at once). ``stop()`` waits
``timeout_s`` for them and SIGKILLs whatever is left, so nothing outlives the
supervisor. On Linux each child also asks the kernel for a SIGTERM should the
supervisor itself die (``PR_SET_PDEATHSIG``), so even a ``kill -9`` of the
supervisor leaves no orphans.

A child is born with SIGTERM and SIGINT blocked (a signal mask survives
``exec``), and its service unblocks them once its event loop handles them
(``service.accept_stop_signals``). A stop sent while the child is still
importing or connecting then waits, pending, for its graceful handler; unblocked,
SIGTERM's default action would kill the child mid-start (status -15).

Connection settings reach the children through their ``LEDGERQ_*`` environment,
not their command lines, so a database password never shows in ``ps``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO

from ledgerq import config

STOP_TIMEOUT_DEFAULT_S = 45.0
# Beyond the workers' grace period: their hand-back and exit.
STOP_MARGIN_S = 10.0
# While stopping, how often to say who is still running.
REPORT_INTERVAL_S = 3.0
#: Set in every child's environment: the process it must die with.
SUPERVISOR_PID_ENV = "LEDGERQ_SUPERVISOR_PID"

_PR_SET_PDEATHSIG = 1
#: What stops a service gracefully; blocked in a child until its service handles them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask Linux for a SIGTERM when this process's parent dies (elsewhere: nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if expected_parent is not None and os.getppid() != expected_parent:
            sys.exit(1)  # the parent died before prctl took effect


def settings_env(settings: config.Settings) -> dict[str, str]:
    """The LEDGERQ_* variables that make a child use these settings."""
    env = {
        "LEDGERQ_DATABASE_URL": settings.database_url,
        "LEDGERQ_REDIS_URL": settings.redis_url,
        "LEDGERQ_REDIS_PREFIX": settings.redis_prefix,
        "LEDGERQ_REDIS_CLUSTER": "1" if settings.redis_cluster else "0",
    }
    if settings.api_token is not None:
        env["LEDGERQ_API_TOKEN"] = settings.api_token
    return env


@dataclasses.dataclass(slots=True)
class Child:
    """One supervised ``ledgerq`` command."""

    name: str
    args: tuple[str, ...]
    process: subprocess.Popen[bytes]
    signalled: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


class ProcessGroup:
    """Starts ``ledgerq`` commands as children in one process group; stops them all."""

    def __init__(
        self,
        settings: config.Settings,
        *,
        extra_env: Mapping[str, str] | None = None,
        output: IO[bytes] | None = None,
    ) -> None:
        self.env = {**os.environ, **settings_env(settings), **(extra_env or {})}
        self.env[SUPERVISOR_PID_ENV] = str(os.getpid())
        self.output = output
        self.children: list[Child] = []
        self._pgid = 0  # 0: the next child starts a new group

    def start(self, name: str, args: Sequence[str]) -> Child:
        """Start ``ledgerq ARGS...`` as the child called name."""
        command = [sys.executable, "-m", "ledgerq.cli", *args]
        process = None
        if self._pgid and any(c.returncode is None for c in self.children):
            with contextlib.suppress(PermissionError):
                process = self._popen(command, self._pgid)
        if process is None:
            # The first child, or every earlier one has exited: a new group.
            process = self._popen(command, 0)
            self._pgid = process.pid
        child = Child(name, tuple(args), process)
        self.children.append(child)
        return child

    def _popen(self, command: list[str], pgid: int) -> subprocess.Popen[bytes]:
        # The child inherits this thread's signal mask: see the module's docstring.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self.output,
                stderr=subprocess.STDOUT if self.output is not None else None,
                env=self.env,
                process_group=pgid,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def live(self) -> list[Child]:
        return [c for c in self.children if c.returncode is None]

    def exited(self) -> list[Child]:
        """Children that have exited (whatever their status)."""
        return [c for c in self.children if c.returncode is not None]

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Send one child a signal (the demo's SIGKILL of a worker mid-task)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)

    def terminate(self) -> None:
        """Ask every live child to stop: exactly one SIGTERM each."""
        for child in self.live():
            if not child.signalled:
                child.signalled = True
                self.kill(child, signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_TIMEOUT_DEFAULT_S) -> dict[str, int]:
        """SIGTERM every child, wait up to timeout_s, SIGKILL the rest; their exit codes."""
        self.terminate()
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.kill_all()
        return {c.name: c.process.wait() for c in self.children}

    def kill_all(self) -> None:
        """SIGKILL every child still alive, and anything else left in their group."""
        for child in self.live():
            # Signal the group only while a child of ours is still in it: a
            # group id outlives its last member only until the id is reused.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(child.pid) == self._pgid:
                    os.killpg(self._pgid, signal.SIGKILL)
            self.kill(child)
        for child in self.children:
            child.process.wait()


def supervise(
    group: ProcessGroup,
    *,
    stop_timeout_s: float = STOP_TIMEOUT_DEFAULT_S,
    grace_s: float | None = None,
) -> int:
    """Wait until SIGINT/SIGTERM or a child's exit, then stop every child.

    Returns 0 when a signal stopped the group and every child exited 0; 1 when
    a child exited on its own (it is named on stderr) or did not stop cleanly.
    A second signal SIGKILLs the children at once. With grace_s (the workers'
    grace period), the first signal says what the stop waits for, and the
    stop waits that long plus a margin before it kills what is left.
    """
    signals: list[int] = []
    if grace_s is not None:
        stop_timeout_s = grace_s + STOP_MARGIN_S

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        if len(signals) == 1:
            group.terminate()
            _say(_stopping_message(group, grace_s))

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        crashed: list[Child] = []
        while not signals and not crashed:
            crashed = group.exited()
            # A plain poll: waiting on N children and on signals at once is
            # what this loop is for, and five times a second is cheap.
            time.sleep(0.2)
        if crashed:
            for child in crashed:
                _say(f"{child.name} exited with status {child.returncode}; stopping the rest")
            group.terminate()
        deadline = time.monotonic() + stop_timeout_s
        next_report = time.monotonic() + REPORT_INTERVAL_S
        while group.live() and len(signals) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            if signals and time.monotonic() >= next_report and group.live():
                next_report += REPORT_INTERVAL_S
                names = ", ".join(c.name for c in group.live())
                _say(f"still waiting for {names} (Ctrl-C again to stop at once)")
        slow = [c.name for c in group.live()]
        if slow:
            _say(f"killing {', '.join(slow)}: still running")
    finally:
        group.kill_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [c for c in group.children if c.returncode != 0]
    for child in failed:
        if child not in crashed:
            _say(f"{child.name} exited with status {child.returncode}")
    return 1 if failed or crashed else 0


def _stopping_message(group: ProcessGroup, grace_s: float | None) -> str:
    workers = [c.name for c in group.live() if c.name.startswith("worker")]
    waits = (
        f"running tasks may finish for up to {grace_s:g} s, then they are handed back"
        if grace_s is not None and workers
        else "every component to stop"
    )
    return f"stopping: {waits}; press Ctrl-C again to stop at once"


def _say(message: str) -> None:
    print(f"ledgerq run: {message}", file=sys.stderr, flush=True)
