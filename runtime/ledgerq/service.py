"""The shape every long-running service has, and what running one takes.

Worker, Dispatcher and Reaper are each a ``Service``: ``run()`` serves until
``stop()`` is called and then returns (a worker first lets running handlers
finish within its grace period); ``run_once()`` does one pass of the service's
work and says how much it did, so tests (and one-shot commands such as
``ledgerq reaper --once``) drive a service without timers or sleeps.

``reconnect_delay_s(failures)`` is how long a service waits after its nth
failure in a row to reach PostgreSQL or Redis: 0.2 s, doubling, at most
RECONNECT_MAX_S. A service never dies of an unreachable dependency; it logs,
waits, and tries again.

``run_until_signalled(main)`` runs ``main(runner)`` in a new event loop (uvloop's
when it is installed, as it is with ``uvicorn[standard]``: each wake-up of a
worker's pop, claim and handler start costs less there); the
services main hands to ``runner.serve()`` run until SIGTERM or SIGINT, which
stop them all gracefully (a signal that arrives while main is still opening
connections stops the services as soon as they start). A second signal exits
the process at once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")
RECONNECT_MAX_S = 5.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """A long-running service: run() until stop(); run_once() for one pass."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...

    async def run_once(self) -> int: ...


def reconnect_delay_s(failures: int) -> float:
    """Seconds to wait after the nth failure in a row to reach a dependency."""
    return min(RECONNECT_MAX_S, 0.1 * 2.0**failures)


class Runner:
    """Runs services until stopped; a stop asked for before they start applies when they do."""

    def __init__(self) -> None:
        self._services: list[Service] = []
        self.stopping = False

    def stop(self) -> None:
        """Ask every service (those already started and those yet to come) to stop."""
        self.stopping = True
        for service in self._services:
            service.stop()

    async def serve(self, *services: Service) -> None:
        """Run services side by side until they return; if one fails, stop the rest."""
        self._services.extend(services)
        if self.stopping:
            for service in services:
                service.stop()
        running = [asyncio.create_task(service.run()) for service in services]
        try:
            await asyncio.gather(*running)
        except BaseException:
            for service in services:
                service.stop()
            await asyncio.gather(*running, return_exceptions=True)
            raise


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop when it is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def accept_stop_signals() -> None:
    """Unblock SIGTERM/SIGINT once the running loop handles them.

    A supervised child starts with both blocked (``cli.supervise``), so a stop
    sent while it was starting is delivered here, to the graceful handler,
    instead of killing it; elsewhere they are not blocked and this does nothing.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def run_until_signalled(main: Callable[[Runner], Awaitable[T]]) -> T:
    """Run main(runner) in a new event loop and return what it returns; SIGTERM/SIGINT
    stop runner's services, a second signal exits the process at once (status 1)."""

    async def body() -> T:
        runner = Runner()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                os._exit(1)  # the operator insists: no more waiting for handlers
            runner.stop()

        for sig in _SIGNALS:
            loop.add_signal_handler(sig, on_signal)
        accept_stop_signals()
        try:
            return await main(runner)
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    # What the process built to get here (modules, the registry) lives as long
    # as it does: freeze it out of the collector's sight, so a full collection
    # walks only what serving makes (about 18 ms less pause each time for a
    # worker, a stall every task in flight would wait out).
    gc.freeze()
    with asyncio.Runner(loop_factory=loop_factory()) as loop_runner:
        return loop_runner.run(body())
