"""Serving the API with uvicorn inside a loop the caller owns.

``ledgerq api`` opens the ledger and the dispatcher itself (so an unreachable
PostgreSQL or Redis is a one-line error before anything listens), builds the
app around them and awaits ``serve()``. Speed comes from uvicorn's httptools
parser on a uvloop loop (both installed with ``uvicorn[standard]``) and no
access log unless asked for.

SIGTERM/SIGINT stop accepting connections, finish the requests in flight and
return, so the caller closes its pools and exits 0 (plain uvicorn re-raises
the signal after shutdown instead, which skips that and exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from ledgerq import service

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def is_loopback(host: str) -> bool:
    """Whether host only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class _Server(uvicorn.Server):
    """uvicorn's Server, handling signals on the running loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM start a graceful shutdown, and are not re-raised after it."""
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        service.accept_stop_signals()
        try:
            yield
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: object) -> None:
        """Begin the graceful shutdown, and end the app's long waits
        (GET /tasks/{id}?wait=S) at once: uvicorn waits for open requests."""
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        stopping = getattr(getattr(self.config.app, "state", None), "stopping", None)
        if isinstance(stopping, asyncio.Event):
            stopping.set()


async def serve(app: FastAPI, *, host: str, port: int, access_log: bool = False) -> None:
    """Serve app until SIGTERM/SIGINT; returns after a graceful shutdown."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        access_log=access_log,
        log_config=None,  # the command's logging setup applies
        server_header=False,
        proxy_headers=False,  # nothing here reads the client address
        lifespan="on",
    )
    await _Server(config).serve()
