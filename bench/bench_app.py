"""Task handlers for bench/runtime_bench.py: `ledgerq worker --app bench_app:tasks`."""

from __future__ import annotations

import asyncio
import time

from ledgerq import Context, Registry

tasks = Registry()


@tasks.task("bench.noop", queue="bench")
async def noop(ctx: Context, payload: dict[str, object]) -> None:
    return None


@tasks.task("bench.sleep", queue="bench")
async def sleep(ctx: Context, payload: dict[str, float]) -> None:
    await asyncio.sleep(payload.get("seconds", 0.01))


@tasks.task("bench.stamp", queue="bench")
async def stamp(ctx: Context, payload: dict[str, object]) -> float:
    """Returns when the handler started, for pickup latency."""
    return time.time()


@tasks.task("bench.hop", queue="bench")
async def hop(ctx: Context, payload: dict[str, object]) -> float:
    """Returns when the handler started on the machine-wide monotonic clock,
    for the per-hop stamps of runtime_bench.py hops."""
    return time.monotonic()
