"""Pickup latency against the floor of its design, in one run.

    .venv/bin/python bench/floor_bench.py                  # 200 and 1,000 tasks/s, 3 rounds
    .venv/bin/python bench/floor_bench.py --rates 200 --rounds 5 --tasks 1000

Three paths from "about to enqueue" to "handler's first line", each into an
idle consumer at a steady offered rate, taking turns within every round (the
machine is noisy; compare within a run, as ratios):

- ledgerq:      ``ledgerq.Client.enqueue`` (with its hand-off to Redis) into a
                real ``ledgerq worker`` process and dispatcher.
- redis floor:  the same design with no library code: a plain INSERT of a
                QUEUED row into ledgerq.tasks (committed), ZADD of its id,
                BZPOPMIN in a uvloop process, a plain claim (UPDATE to RUNNING
                plus the attempt row, committed), then the "handler".
- notify floor: PostgreSQL's own path, the one a PostgreSQL-only queue such as
                pgqueuer takes, with no library code: INSERT and pg_notify in
                one committed statement, LISTEN in a uvloop process, the same
                plain claim, then the "handler".

Both floors keep what the guarantees require (two durable commits before the
handler: the enqueue's and the claim's) and nothing else: no validation,
idempotency, flow control, fencing checks or metrics. They show what any
queue built this way can reach on this machine, and so which targets are
reachable by trimming ledgerq and which would need another design.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from ledgerq import Client, config
from runtime_bench import REDIS_URL, drop_database, fresh_database, stack, wait_all_succeeded

# A QUEUED row as task_hand_off leaves it, in the columns the table requires.
INSERT_QUEUED = """
    INSERT INTO ledgerq.tasks (task_type, payload, queue, max_attempts, status, queued_at)
    VALUES ('floor', %s, 'floor', 5, 'QUEUED', now()) RETURNING id
"""
INSERT_NOTIFY = """
    WITH t AS (
        INSERT INTO ledgerq.tasks (task_type, payload, queue, max_attempts, status, queued_at)
        VALUES ('floor', %s, 'floor', 5, 'QUEUED', now()) RETURNING id
    )
    SELECT id, pg_notify('floor', id::text) FROM t
"""
# What claim_task must do at the least: the row RUNNING under a lease, its
# attempt counted and opened, in one committed statement.
CLAIM = """
    WITH c AS (
        UPDATE ledgerq.tasks t
        SET status = 'RUNNING', attempts = t.attempts + 1, worker_id = 'floor',
            lease_expires_at = now() + interval '30 seconds', queued_at = NULL,
            started_at = now()
        WHERE t.id = %s AND t.status = 'QUEUED'
        RETURNING t.id, t.attempts, t.worker_id, t.started_at, t.payload
    ), opened AS (
        INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, started_at)
        SELECT c.id, c.attempts, c.worker_id, c.started_at FROM c
    )
    SELECT payload FROM c
"""
ZSET = "floor-bench:queue"


def _consumer(db_url: str, via: str, ready: Any, results: Any) -> None:
    """The floor's worker: takes ids (from Redis or from NOTIFY), claims each,
    and records when its "handler" started; ends at the sentinel id 0."""
    import uvloop
    from redis import asyncio as aioredis

    async def claimed_latency(conn: psycopg.AsyncConnection[Any], task_id: int) -> float:
        cur = await conn.execute(CLAIM, (task_id,))
        (payload,) = (await cur.fetchall())[0]
        return (time.time() - payload["sent"]) * 1000

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
        latencies: list[float] = []
        if via == "redis":
            client = aioredis.Redis.from_url(REDIS_URL)
            ready.set()
            while True:
                popped = await client.bzpopmin(ZSET, 0)
                task_id = int(popped[1])
                if task_id == 0:
                    break
                latencies.append(await claimed_latency(conn, task_id))
            await client.aclose()
        else:
            listener = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
            await listener.execute("LISTEN floor")
            ready.set()
            async for note in listener.notifies():
                task_id = int(note.payload)
                if task_id == 0:
                    break
                latencies.append(await claimed_latency(conn, task_id))
            await listener.close()
        await conn.close()
        results.put(latencies)

    uvloop.run(main())


def _paced(n: int, rate: float, send: Callable[[], None]) -> None:
    next_at = time.perf_counter()
    for _ in range(n):
        send()
        next_at += 1.0 / rate
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)


def floor(db_url: str, via: str, n: int, rate: float) -> list[float]:
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    consumer = context.Process(target=_consumer, args=(db_url, via, ready, results))
    consumer.start()
    ready.wait(30)
    r = redis.Redis.from_url(REDIS_URL)
    with psycopg.connect(db_url, autocommit=True) as conn:

        def send() -> None:
            payload = Jsonb({"sent": time.time()})
            if via == "redis":
                (task_id,) = conn.execute(INSERT_QUEUED, (payload,)).fetchall()[0]
                r.zadd(ZSET, {str(task_id): 0})
            else:
                conn.execute(INSERT_NOTIFY, (payload,)).fetchall()

        _paced(10, 50, send)  # warm up both processes
        time.sleep(0.5)
        _paced(n, rate, send)
        if via == "redis":
            r.zadd(ZSET, {"0": 1})
        else:
            conn.execute("SELECT pg_notify('floor', '0')")
        latencies = results.get(timeout=120)[10:]
    consumer.join(30)
    r.close()
    return sorted(latencies)


def ledgerq_path(db_url: str, n: int, rate: float) -> list[float]:
    with psycopg.connect(db_url, autocommit=True) as conn, stack(db_url) as s:
        conn.execute("TRUNCATE ledgerq.tasks CASCADE")
        s.start("dispatcher")
        s.start("worker", "--app", "bench_app:tasks", "--queues", "bench", "--concurrency", "20")
        settings = config.Settings(database_url=db_url, redis_url=REDIS_URL, redis_prefix=s.prefix)
        sent: dict[int, float] = {}
        with Client(settings) as client:
            client.enqueue("bench.stamp", queue="bench")  # all the way through once
            wait_all_succeeded(conn, 1, timeout_s=30)
            time.sleep(0.5)

            def send() -> None:
                at = time.time()
                sent[client.enqueue("bench.stamp", queue="bench").id] = at

            _paced(n, rate, send)
        wait_all_succeeded(conn, n + 1)
        rows = conn.execute(
            "SELECT id, (result #>> '{}')::float8 FROM ledgerq.tasks WHERE id = ANY(%s)",
            (list(sent),),
        ).fetchall()
    return sorted((started - sent[task_id]) * 1000 for task_id, started in rows)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per path and round")
    parser.add_argument("--rates", default="200,1000", help="offered rates, tasks/s")
    parser.add_argument("--rounds", type=int, default=3, help="each path once per round")
    args = parser.parse_args()
    name = f"ledgerq_bench_floor_{os.getpid()}"
    db_url = fresh_database(name)
    paths: dict[str, Callable[[int, float], list[float]]] = {
        "ledgerq": lambda n, rate: ledgerq_path(db_url, n, rate),
        "redis floor": lambda n, rate: floor(db_url, "redis", n, rate),
        "notify floor": lambda n, rate: floor(db_url, "notify", n, rate),
    }
    try:
        for rate in (float(r) for r in args.rates.split(",")):
            p50s: dict[str, list[float]] = {path: [] for path in paths}
            print(f"pickup latency at {rate:,.0f} tasks/s offered, {args.tasks} tasks a path")
            print(f"| round | {'path'.ljust(12)} | p50 ms | p95 ms | p99 ms |")
            print(f"|------:|{'-' * 14}|-------:|-------:|-------:|")
            for round_no in range(1, args.rounds + 1):
                for path, run in paths.items():
                    values = run(args.tasks, rate)
                    p50s[path].append(pct(values, 0.5))
                    print(
                        f"| {round_no:5d} | {path.ljust(12)} | {pct(values, 0.5):6.2f} "
                        f"| {pct(values, 0.95):6.2f} | {pct(values, 0.99):6.2f} |",
                        flush=True,
                    )
            median = {path: statistics.median(values) for path, values in p50s.items()}
            print(
                f"median p50: ledgerq {median['ledgerq']:.2f} ms, redis floor "
                f"{median['redis floor']:.2f} ms, notify floor {median['notify floor']:.2f} ms; "
                f"ledgerq / redis floor {median['ledgerq'] / median['redis floor']:.2f}x, "
                f"redis floor / notify floor "
                f"{median['redis floor'] / median['notify floor']:.2f}x\n",
                flush=True,
            )
    finally:
        drop_database(name)
        redis.Redis.from_url(REDIS_URL).delete(ZSET)


if __name__ == "__main__":
    sys.exit(main())
