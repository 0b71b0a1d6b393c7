"""End-to-end runtime benchmarks: real `ledgerq dispatcher` and `ledgerq worker`
processes against the local PostgreSQL and Redis.

    .venv/bin/python bench/runtime_bench.py            # everything
    .venv/bin/python bench/runtime_bench.py drain latency --tasks 20000

- drain:   N pre-enqueued no-op tasks, with 1 and with 2 worker processes;
           tasks/s from the first attempt's start to the last task's finish,
           as the ledger recorded them (every task must end SUCCEEDED).
- sleep:   N tasks that each `await asyncio.sleep(0.01)`, 2 processes, at
           several concurrencies.
- latency: pickup latency (enqueue committed -> handler starts) at a steady
           200 and 1,000 tasks/s into idle workers: p50, p90, p99, max.
- hops:    where that time goes: tasks enqueued through ``ledgerq.Client`` at
           200 and 1,000 tasks/s into a dispatcher and one worker process run
           under bench/hop_stamps.py; p50/p99 of each hop (enqueue call, commit ->
           NOTIFY -> due statement -> Redis push -> pop -> claim committed ->
           handler entered), and of the whole path.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis
from psycopg.types.json import Jsonb

from ledgerq import migrations

HERE = Path(__file__).resolve().parent
LEDGERQ = str(Path(sys.executable).with_name("ledgerq"))
ADMIN_URL = os.environ.get(
    "LEDGERQ_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("LEDGERQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def fresh_database(name: str) -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrations.migrate(url)
    return url


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stack:
    """A dispatcher and worker processes on one database and Redis prefix."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ,
            "LEDGERQ_DATABASE_URL": db_url,
            "LEDGERQ_REDIS_URL": REDIS_URL,
            "LEDGERQ_REDIS_PREFIX": self.prefix,
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, stamps: Path | None = None) -> None:
        """``ledgerq ARGS``; with stamps, under hop_stamps.py writing there at exit."""
        command = (
            [LEDGERQ]
            if stamps is None
            else [sys.executable, str(HERE / "hop_stamps.py"), str(stamps)]
        )
        self.procs.append(
            subprocess.Popen(
                [*command, *args, "--log-level", "WARNING"],
                cwd=HERE,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{{{self.prefix}}}*"))
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def stack(db_url: str) -> Iterator[Stack]:
    s = Stack(db_url)
    try:
        yield s
    finally:
        s.stop()


def enqueue(conn: psycopg.Connection, task_type: str, n: int, payload: dict[str, object]) -> None:
    batch = 1000
    for start in range(0, n, batch):
        items = [
            {"task_type": task_type, "payload": payload, "queue": "bench"}
            for _ in range(min(batch, n - start))
        ]
        conn.execute("SELECT count(*) FROM ledgerq.enqueue_tasks(%s)", (Jsonb(items),))


def wait_all_succeeded(conn: psycopg.Connection, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'SUCCEEDED'), "
            "count(*) FILTER (WHERE status IN ('DEAD', 'CANCELLED')) FROM ledgerq.tasks"
        ).fetchone()
        assert row is not None
        if row[1]:
            raise SystemExit(f"{row[1]} task(s) did not succeed")
        if row[0] >= n:
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {n} tasks")


def ledger_rate(conn: psycopg.Connection) -> tuple[float, float]:
    """(tasks/s, seconds) from the first attempt's start to the last task's finish."""
    row = conn.execute(
        "SELECT count(*), extract(epoch FROM max(t.finished_at) - min(a.started_at)) "
        "FROM ledgerq.tasks t JOIN ledgerq.attempts a ON a.task_id = t.id AND a.attempt = 1"
    ).fetchone()
    assert row is not None
    count, seconds = int(row[0]), float(row[1])
    return count / seconds, seconds


def drain(
    task_type: str, n: int, processes: int, concurrency: int, payload: dict[str, object]
) -> tuple[float, float]:
    name = f"ledgerq_bench_rt_{os.getpid()}"
    db_url = fresh_database(name)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn, stack(db_url) as s:
            enqueue(conn, task_type, n, payload)
            s.start("dispatcher", "--poll-interval", "0.2")
            for _ in range(processes):
                s.start("worker", "--app", "bench_app:tasks", "--queues", "bench",
                        "--concurrency", str(concurrency))  # fmt: skip
            wait_all_succeeded(conn, n)
            return ledger_rate(conn)
    finally:
        drop_database(name)


def latency(n: int, rate: float, processes: int) -> list[float]:
    name = f"ledgerq_bench_lat_{os.getpid()}"
    db_url = fresh_database(name)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn, stack(db_url) as s:
            s.start("dispatcher")
            for _ in range(processes):
                s.start(
                    "worker", "--app", "bench_app:tasks", "--queues", "bench", "--concurrency", "20"
                )
            # Warm up: wait until a task goes all the way through.
            conn.execute("SELECT ledgerq.enqueue_task('bench.stamp', queue => 'bench')")
            wait_all_succeeded(conn, 1, timeout_s=30)
            committed: dict[int, float] = {}
            interval = 1.0 / rate
            next_at = time.perf_counter()
            for _ in range(n):
                row = conn.execute(
                    "SELECT id FROM ledgerq.enqueue_task('bench.stamp', queue => 'bench')"
                ).fetchone()
                assert row is not None
                committed[row[0]] = time.time()
                next_at += interval
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            wait_all_succeeded(conn, n + 1)
            rows = conn.execute(
                "SELECT id, (result #>> '{}')::float8 FROM ledgerq.tasks WHERE id = ANY(%s)",
                (list(committed),),
            ).fetchall()
            return sorted((started - committed[task_id]) * 1000 for task_id, started in rows)
    finally:
        drop_database(name)


HOPS = ("call", "committed", "notify", "due", "push", "pop", "claim", "handler")


def hops(n: int, rate: float, hand_off: bool) -> dict[str, list[float]]:
    """Per-hop durations in ms (segment name -> sorted values) for n tasks at rate/s,
    enqueued with the client's hand-off or through the dispatcher."""
    import hop_stamps
    from ledgerq import Client, config

    name = f"ledgerq_bench_hops_{os.getpid()}"
    db_url = fresh_database(name)
    stamp_dir = Path(f"/tmp/{name}")
    stamp_dir.mkdir(exist_ok=True)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn, stack(db_url) as s:
            s.start("dispatcher", stamps=stamp_dir / "dispatcher.json")
            s.start("worker", "--app", "bench_app:tasks", "--queues", "bench",
                    "--concurrency", "20", stamps=stamp_dir / "worker.json")  # fmt: skip
            settings = config.Settings(
                database_url=db_url, redis_url=REDIS_URL, redis_prefix=s.prefix
            )
            hop_stamps.install()  # the client's own commit and push, if it hands off
            hop_stamps.STAMPS.clear()
            with Client(settings, hand_off=hand_off) as client:
                client.enqueue("bench.hop", queue="bench")  # warm up, all the way through
                wait_all_succeeded(conn, 1, timeout_s=30)
                stamps: dict[int, dict[str, float]] = {}
                interval = 1.0 / rate
                next_at = time.perf_counter()
                for _ in range(n):
                    called = time.monotonic()
                    task = client.enqueue("bench.hop", queue="bench")
                    stamps[task.id] = {"call": called, "returned": time.monotonic()}
                    next_at += interval
                    pause = next_at - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                wait_all_succeeded(conn, n + 1)
            rows = conn.execute(
                "SELECT id, (result #>> '{}')::float8 FROM ledgerq.tasks WHERE id = ANY(%s)",
                (list(stamps),),
            ).fetchall()
            for task_id, entered in rows:
                stamps[task_id]["handler"] = entered
        notifies: list[float] = []
        recorded = [(h, t, at) for h, t, at in hop_stamps.STAMPS]
        for process in ("dispatcher", "worker"):
            recorded += json.loads((stamp_dir / f"{process}.json").read_text())
        for hop, task_id, at in recorded:
            if task_id is None:
                notifies.append(at)
            elif task_id in stamps:
                stamps[task_id].setdefault(hop, at)  # the first time each hop happened
        notifies.sort()
        for task_stamps in stamps.values():
            # Without a hand-off the enqueue call returns right after its commit.
            task_stamps.setdefault("committed", task_stamps["returned"])
            # The first wake-up after the commit, if it came before the due statement.
            committed, due = task_stamps["committed"], task_stamps.get("due")
            index = bisect.bisect_left(notifies, committed)
            if due is not None and index < len(notifies) and notifies[index] <= due:
                task_stamps["notify"] = notifies[index]
        segments: dict[str, list[float]] = {}
        for task_stamps in stamps.values():
            present = [hop for hop in HOPS if hop in task_stamps]
            for before, after in itertools.pairwise(present):
                key = f"{before} -> {after}"
                segments.setdefault(key, []).append(
                    (task_stamps[after] - task_stamps[before]) * 1000
                )
            returned = (task_stamps["returned"] - task_stamps["call"]) * 1000
            segments.setdefault("call -> returned (enqueue)", []).append(returned)
            if "handler" in task_stamps:
                total = (task_stamps["handler"] - task_stamps["call"]) * 1000
                segments.setdefault("call -> handler (total)", []).append(total)
        return {key: sorted(values) for key, values in segments.items()}
    finally:
        drop_database(name)
        for path in stamp_dir.glob("*.json"):
            path.unlink()
        stamp_dir.rmdir()


def hop_table(n: int, rate: float, hand_off: bool, segments: dict[str, list[float]]) -> str:
    order = [f"{a} -> {b}" for a, b in itertools.combinations(HOPS, 2)]
    keys = sorted(segments, key=lambda k: order.index(k) if k in order else len(order))
    lines = [
        f"hops at {rate:,.0f} tasks/s ({n} tasks through ledgerq.Client, "
        f"{'hand-off' if hand_off else 'through the dispatcher'})",
        f"| {'segment'.ljust(26)} | tasks | p50 ms | p99 ms |",
        f"|{'-' * 28}|------:|-------:|-------:|",
    ]
    for key in keys:
        values = segments[key]
        lines.append(
            f"| {key.ljust(26)} | {len(values):5d} | {percentile(values, 50):6.2f} "
            f"| {percentile(values, 99):6.2f} |"
        )
    return "\n".join(lines)


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", nargs="*", default=["drain", "sleep", "latency", "hops"])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-tasks", type=int, default=2000)
    parser.add_argument("--rates", default="200,1000", help="offered rates for latency and hops")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.latency_tasks = 2000, 400
    results: list[tuple[str, str]] = []
    if "drain" in args.which:
        for processes in (1, 2):
            rate, secs = drain("bench.noop", args.tasks, processes, args.concurrency, {})
            results.append(
                (
                    f"drain {args.tasks} no-op tasks, {processes} process(es)",
                    f"{rate:,.0f} tasks/s ({secs:.2f} s)",
                )
            )
            print(results[-1], flush=True)
    if "sleep" in args.which:
        for concurrency in (25, 50, 100, 200, 400):
            rate, secs = drain("bench.sleep", args.tasks, 2, concurrency, {"seconds": 0.01})
            results.append(
                (
                    f"drain {args.tasks} sleep(10 ms) tasks, 2 processes x {concurrency}",
                    f"{rate:,.0f} tasks/s ({secs:.2f} s)",
                )
            )
            print(results[-1], flush=True)
    rates = [float(r) for r in args.rates.split(",")]
    if "hops" in args.which:
        for rate in rates:
            for hand_off in (False, True):
                segments = hops(args.latency_tasks, rate, hand_off)
                print(hop_table(args.latency_tasks, rate, hand_off, segments), flush=True)
    for rate in rates if "latency" in args.which else []:
        lat = latency(args.latency_tasks, rate, 2)
        results.append((
            f"pickup latency at {rate:,.0f} tasks/s ({len(lat)} tasks)",
            f"p50 {percentile(lat, 50):.2f} ms, p90 {percentile(lat, 90):.2f} ms, "
            f"p99 {percentile(lat, 99):.2f} ms, max {lat[-1]:.2f} ms, mean {statistics.fmean(lat):.2f} ms",
        ))  # fmt: skip
        print(results[-1], flush=True)
    if not results:
        return
    width = max(len(name) for name, _ in results)
    print()
    print(f"{'benchmark'.ljust(width)}  result")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in results:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
