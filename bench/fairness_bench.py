"""Fairness under a flood: the pickup latency of a small key's tasks while one
key floods the queue, with real `ledgerq dispatcher` and `ledgerq worker`
processes against the local PostgreSQL and Redis.

    .venv/bin/python bench/fairness_bench.py                  # 100,000-task flood
    .venv/bin/python bench/fairness_bench.py --flood 20000 --configure max_running=50

One dispatcher and one worker (concurrency 50) serve the queue ``bench``. A
thread enqueues key A's flood (``--flood`` no-op tasks, in batches of 1,000, as
fast as the ledger takes them) while the main thread enqueues one task of key B
every ``1 / --rate`` seconds until A's flood has drained. B's pickup latency is
the time from its enqueue's commit to its handler's first line. Printed:

- B's p50 / p99 / max pickup, and how many of A's tasks were waiting (PENDING
  or QUEUED; counted once a second, the median and the most): without turns, a
  B task would wait behind all of them;
- the same B tasks' pickup with no flood, measured first in the same run, as
  the reference;
- A's drain rate.

``--flood-key ''`` floods with tasks without a key, for comparison: B's tasks
then wait behind the whole flood (the queue's order is priority, then turn).

``--configure KEY=VALUE`` gives the queue flow-control settings first (e.g.
``max_running=50``, ``per_key_max_running=20``); by default it has none, so the
dispatcher hands A's whole flood to Redis as it arrives.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from runtime_bench import drop_database, fresh_database, percentile, stack, wait_all_succeeded

QUEUE = "bench"
BATCH_MS: list[float] = []  # each flood batch's enqueue, for the report


def enqueue_flood(url: str, n: int, key: str | None, done: threading.Event) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, n, 1000):
            items = [
                {"task_type": "bench.noop", "queue": QUEUE, "concurrency_key": key}
                for _ in range(min(1000, n - start))
            ]
            began = time.perf_counter()
            conn.execute("SELECT count(*) FROM ledgerq.enqueue_tasks(%s)", (Jsonb(items),))
            BATCH_MS.append((time.perf_counter() - began) * 1000)
    done.set()


def enqueue_b(conn: psycopg.Connection[Any]) -> tuple[int, float]:
    row = conn.execute(
        "SELECT id FROM ledgerq.enqueue_task('bench.stamp', queue => %s, concurrency_key => 'B')",
        (QUEUE,),
    ).fetchone()
    assert row is not None
    return int(row[0]), time.time()


def a_waiting(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM ledgerq.tasks WHERE task_type = 'bench.noop'"
        " AND status IN ('PENDING', 'QUEUED')"
    ).fetchone()
    assert row is not None
    return int(row[0])


def pickups(conn: psycopg.Connection[Any], committed: dict[int, float]) -> list[float]:
    rows = conn.execute(
        "SELECT id, (result #>> '{}')::float8 FROM ledgerq.tasks WHERE id = ANY(%s) AND status = 'SUCCEEDED'",
        (list(committed),),
    ).fetchall()
    if len(rows) != len(committed):
        raise SystemExit(f"only {len(rows)} of {len(committed)} B tasks succeeded")
    return sorted((started - committed[task_id]) * 1000 for task_id, started in rows)


def run(flood: int, key: str | None, rate: float, settings: dict[str, Any]) -> None:
    name = f"ledgerq_bench_fair_{os.getpid()}"
    url = fresh_database(name)
    try:
        with psycopg.connect(url, autocommit=True) as conn, stack(url) as s:
            if settings:
                conn.execute("SELECT ledgerq.configure_queue(%s, %s)", (QUEUE, Jsonb(settings)))
            s.start("dispatcher")
            s.start("worker", "--app", "bench_app:tasks", "--queues", QUEUE, "--concurrency", "50")
            enqueue_b(conn)
            wait_all_succeeded(conn, 1, timeout_s=30)
            interval = 1.0 / rate

            # The reference: B alone.
            quiet: dict[int, float] = {}
            for _ in range(100):
                task_id, at = enqueue_b(conn)
                quiet[task_id] = at
                time.sleep(interval)
            wait_all_succeeded(conn, 101, timeout_s=60)
            reference = pickups(conn, quiet)

            # B beside A's flood.
            flooded = threading.Event()
            flooder = threading.Thread(target=enqueue_flood, args=(url, flood, key, flooded))
            started = time.monotonic()
            flooder.start()
            beside: dict[int, float] = {}
            # Counting the flood's waiting tasks reads them all: once a second,
            # so the count does not slow the drain it measures.
            behind: list[int] = []
            next_count = time.monotonic()
            while True:
                task_id, at = enqueue_b(conn)
                beside[task_id] = at
                if time.monotonic() >= next_count:
                    # Only a count taken once the whole flood is in says it drained.
                    complete = flooded.is_set()
                    waiting = a_waiting(conn)
                    behind.append(waiting)
                    next_count += 1.0
                    if complete and waiting == 0:
                        break
                time.sleep(interval)
            flooder.join()
            wait_all_succeeded(conn, 101 + flood + len(beside), timeout_s=600)
            drained_s = time.monotonic() - started
            under_flood = pickups(conn, beside)
    finally:
        drop_database(name)

    def line(label: str, values: list[float]) -> str:
        return (
            f"{label:<34} p50 {percentile(values, 50):7.2f} ms  p99 {percentile(values, 99):7.2f} ms"
            f"  max {values[-1]:7.2f} ms  ({len(values)} tasks)"
        )

    print(f"queue settings: {settings or 'none'}; flood key: {key}; B enqueued at {rate:g}/s")
    print(line("B pickup, no flood", reference))
    print(line(f"B pickup, A flooding {flood:,}", under_flood))
    print(
        f"{'A tasks waiting (once a second)':<34} median {statistics.median(behind):,.0f}"
        f"  max {max(behind):,}"
    )
    print(
        f"{'A flood drained':<34} {flood / drained_s:,.0f} tasks/s ({drained_s:.1f} s, with B beside it)"
    )
    print(
        f"{'A enqueue, batch of 1,000':<34} median {statistics.median(BATCH_MS):.0f} ms"
        f"  max {max(BATCH_MS):.0f} ms"
    )
    print(
        f"{'ratio p50 / p99 (flood : none)':<34} "
        f"{percentile(under_flood, 50) / percentile(reference, 50):.2f}x / "
        f"{percentile(under_flood, 99) / percentile(reference, 99):.2f}x"
    )


def setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, float(value) if "." in value else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flood", type=int, default=100_000, help="key A's tasks")
    parser.add_argument("--rate", type=float, default=20.0, help="key B's tasks per second")
    parser.add_argument(
        "--configure", action="append", default=[], type=setting, metavar="KEY=VALUE"
    )
    parser.add_argument(
        "--flood-key",
        default="A",
        help="the flood's concurrency key; '' for none (then the flood and B do not take turns)",
    )
    args = parser.parse_args()
    run(args.flood, args.flood_key or None, args.rate, dict(args.configure))


if __name__ == "__main__":
    main()
