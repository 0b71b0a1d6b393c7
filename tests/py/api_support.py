"""Helpers for the HTTP API tests: an in-process client and a real ``ledgerq api``.

``api_client`` serves ``create_app()`` through httpx's ASGI transport on the
test's own database and Redis namespace. ``api_process`` runs the real command
as a subprocess on a free port and waits (with a deadline) for /healthz.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from ledgerq import config
from ledgerq.api import create_app
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger

LEDGERQ = str(Path(sys.executable).with_name("ledgerq"))
TOKEN = "test-token-0123456789"
STARTUP_DEADLINE_S = 30.0


@contextlib.asynccontextmanager
async def api_client(
    settings: config.Settings,
    *,
    token: str | None = None,
    ledger: AsyncLedger | None = None,
    dispatch: Dispatch | None = None,
    **app_options: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for create_app() on settings' database and Redis namespace.

    The app's ledger and dispatcher are the ones given, or opened here (and
    closed afterwards). ``client.app`` is the app, for tests that add routes.
    """
    settings = dataclasses.replace(settings, api_token=token)
    own_ledger = ledger or await AsyncLedger.connect(settings.database_url, max_size=4)
    own_dispatch = dispatch or Dispatch.connect(settings.redis_url, settings.redis_prefix)
    try:
        app = create_app(settings, ledger=own_ledger, dispatch=own_dispatch, **app_options)
        # raise_app_exceptions stays on: an exception escaping the app fails the test.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledgerq.test") as client:
            client.app = app  # type: ignore[attr-defined]
            try:
                yield client
            finally:
                # httpx's transport runs no lifespan: finish the app's hand-off
                # pushes here, as its shutdown would, before Redis is closed.
                if app.state.services is not None:
                    await app.state.services.enqueuer.flush()
    finally:
        if ledger is None:
            await own_ledger.close()
        if dispatch is None:
            await own_dispatch.close()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command_env(settings: config.Settings) -> dict[str, str]:
    """The environment for a ledgerq command on settings' database and namespace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERQ_")}
    env.update(
        LEDGERQ_DATABASE_URL=settings.database_url,
        LEDGERQ_REDIS_URL=settings.redis_url,
        LEDGERQ_REDIS_PREFIX=settings.redis_prefix,
    )
    return env


@dataclasses.dataclass
class ApiProcess:
    """A running ``ledgerq api`` and the URL it serves."""

    proc: subprocess.Popen[str]
    base_url: str

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextlib.contextmanager
def api_process(settings: config.Settings, *args: str) -> Iterator[ApiProcess]:
    """``ledgerq api`` on a free port, answering /healthz (or a failed test)."""
    port = free_port()
    proc = subprocess.Popen(
        [LEDGERQ, "api", "--port", str(port), "--log-level", "WARNING", *args],
        env=command_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = ApiProcess(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"ledgerq api exited with {proc.returncode}: {output}")
            try:
                if httpx.get(f"{running.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(f"ledgerq api did not answer within {STARTUP_DEADLINE_S} s")
            time.sleep(0.02)
        yield running
    finally:
        if proc.poll() is None:
            running.stop()
        if proc.stdout:
            proc.stdout.close()
