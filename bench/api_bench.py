"""API ingress benchmark: latency at a steady rate, single-request and batch throughput.

Runs a real ``ledgerq api`` subprocess on a database of its own (created,
migrated, and dropped afterwards) and measures:

1. latency of ``POST /tasks`` at a steady 200 requests/s for ~10 s from one
   keep-alive httpx client (a request delayed by a slow predecessor is timed
   from its scheduled moment; the client's own cost, ~0.3 ms, is in the numbers);
2. the most ``POST /tasks`` requests/s the one API process sustains, driven by
   several keep-alive connections from a separate load process;
3. tasks/s through ``POST /tasks/batch`` with 1,000-task batches.

Before them, the floor: the same latency run against bench/floor_app.py, a bare
FastAPI endpoint that INSERTs into a plain table with psycopg, served by the same
code as ``ledgerq api``; the table gives POST /tasks's p50 as a multiple of it.

Every request is a real enqueue committed to PostgreSQL (synchronous_commit as
the server has it). The machine's cores are shared by the load process, the
API process and PostgreSQL, so the throughput numbers are a floor for a
machine where the client runs elsewhere.

The load process (2) speaks HTTP/1.1 over raw asyncio streams: httpx spends
more CPU per request than the API does, and on two shared cores it would
measure itself. Run ``--load-client httpx`` to see that for yourself.

    .venv/bin/python bench/api_bench.py [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from psycopg import sql

from ledgerq import migrations
from ledgerq.service import loop_factory

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
LEDGERQ = str(Path(sys.executable).with_name("ledgerq"))
ADMIN_URL = os.environ.get(
    "LEDGERQ_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("LEDGERQ_REDIS_URL", "redis://127.0.0.1:6379/0")
TASK = {"type": "email.send", "payload": {"to": "someone@example.com", "template": "welcome"}}

TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0
TARGET_SINGLE_RPS = 3000
TARGET_BATCH_TPS = 50_000
# POST /tasks p50 within this of the floor, a bare FastAPI + psycopg INSERT endpoint
# on the same machine in the same run (bench/floor_app.py).
TARGET_FLOOR_RATIO = 1.15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """A fresh migrated database, dropped afterwards."""
    name = f"ledgerq_bench_api_{os.getpid()}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        migrations.migrate(url)
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def synchronous_commit(url: str) -> str:
    """The server's synchronous_commit: with it off, commits do not wait for the disk."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW synchronous_commit").fetchone()
    return str(row[0]) if row else "unknown"


@contextlib.contextmanager
def api_process(
    database_url: str, port: int, *, floor: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """``ledgerq api`` on port (or, with floor, bench/floor_app.py), up and answering /healthz."""
    env = {
        **os.environ,
        "LEDGERQ_DATABASE_URL": database_url,
        "LEDGERQ_REDIS_URL": REDIS_URL,
        "LEDGERQ_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
    }
    env.pop("LEDGERQ_API_TOKEN", None)
    if floor:
        command = [sys.executable, str(REPO / "bench" / "floor_app.py"), database_url, str(port)]
    else:
        command = [LEDGERQ, "api", "--port", str(port), "--log-level", "WARNING"]
    proc = subprocess.Popen(command, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"ledgerq api exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("ledgerq api did not answer /healthz within 30 s")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- 1. latency at a steady rate --------------------------------------------------


def steady_latency(base_url: str, rate: float, seconds: float) -> list[float]:
    """Latencies (s) of POST /tasks sent at a fixed rate from one keep-alive connection.

    httpx's synchronous client: its asynchronous one spends ~0.4 ms more per
    request in the client, which would be most of what is measured. A request
    is timed from its scheduled moment when the one before it answered late
    (so a stall counts against every request it delays, with no coordinated
    omission), and from its actual send otherwise (so the client's own timer
    slack does not).
    """
    body = json.dumps(TASK).encode()
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    failures = 0
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for _ in range(50):  # warm the connection and the server's code paths
            client.post("/tasks", content=body, headers=headers).raise_for_status()
        start = time.perf_counter() + 0.01
        late = False  # the previous request answered after this one was due
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            response = client.post("/tasks", content=body, headers=headers)
            ended = time.perf_counter()
            if response.status_code != 201:
                failures += 1
            latencies.append(ended - (scheduled if late else sent))
            late = ended > start + (i + 1) / rate
    if failures:
        raise SystemExit(f"{failures} requests failed during the latency run")
    return latencies


# --- 2. single-request throughput (separate process) --------------------------------

_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


async def _raw_connection(
    port: int, request: bytes, deadline: float, counts: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = _LENGTH.search(head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            status = int(head[9:12])
            counts[status] = counts.get(status, 0) + 1
    finally:
        writer.close()


async def _httpx_connection(
    client: httpx.AsyncClient, body: bytes, deadline: float, counts: dict[int, int]
) -> None:
    while time.perf_counter() < deadline:
        response = await client.post(
            "/tasks", content=body, headers={"content-type": "application/json"}
        )
        counts[response.status_code] = counts.get(response.status_code, 0) + 1


async def _load(
    port: int, connections: int, seconds: float, kind: str
) -> tuple[dict[int, int], float]:
    body = json.dumps(TASK).encode()
    request = (
        b"POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    counts: dict[int, int] = {}
    started = time.perf_counter()
    deadline = started + seconds
    if kind == "raw":
        await asyncio.gather(
            *(_raw_connection(port, request, deadline, counts) for _ in range(connections))
        )
    else:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
            await asyncio.gather(
                *(_httpx_connection(client, body, deadline, counts) for _ in range(connections))
            )
    return counts, time.perf_counter() - started


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on uvloop when it is installed: less client overhead in the numbers."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


def _load_process(port: int, connections: int, seconds: float, kind: str, out: Any) -> None:
    out.send(run_fast(_load(port, connections, seconds, kind)))


def single_throughput(
    port: int, connections: int, seconds: float, kind: str
) -> tuple[float, dict[int, int]]:
    """Requests/s of POST /tasks from a separate process with several keep-alive connections."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    proc = context.Process(target=_load_process, args=(port, connections, seconds, kind, sender))
    proc.start()
    counts, elapsed = receiver.recv()
    proc.join()
    return counts.get(201, 0) / elapsed, counts


# --- 3. batch throughput -----------------------------------------------------------------


async def batch_throughput(
    base_url: str, seconds: float, concurrency: int, size: int = 1000
) -> float:
    """Tasks/s through POST /tasks/batch, size tasks a batch, concurrency batches in flight."""
    body = json.dumps({"tasks": [TASK] * size}).encode()
    headers = {"content-type": "application/json"}
    done = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        (await client.post("/tasks/batch", content=body, headers=headers)).raise_for_status()
        started = time.perf_counter()
        deadline = started + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.post("/tasks/batch", content=body, headers=headers)
                response.raise_for_status()
                done += size

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return done / elapsed


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def main() -> None:
    """Run the three measurements against one ledgerq api and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of the latency run")
    parser.add_argument("--rate", type=float, default=200, help="requests/s in the latency run")
    parser.add_argument(
        "--connections", type=int, default=32, help="connections in the throughput run"
    )
    parser.add_argument("--throughput-seconds", type=float, default=8)
    parser.add_argument("--load-client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--batch-concurrency", type=int, default=2)
    args = parser.parse_args()

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    # The floor first: a bare FastAPI + psycopg INSERT, on a database of its own.
    with bench_database() as database_url, api_process(database_url, port, floor=True):
        floor = sorted(steady_latency(base_url, args.rate, args.seconds))
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    with bench_database() as database_url, api_process(database_url, port) as api:
        latencies = steady_latency(base_url, args.rate, args.seconds)
        cpu_before, started = cpu_seconds(api.pid), time.perf_counter()
        rps, counts = single_throughput(
            port, args.connections, args.throughput_seconds, args.load_client
        )
        single_cpu = (cpu_seconds(api.pid) - cpu_before) / (time.perf_counter() - started)
        cpu_before, started = cpu_seconds(api.pid), time.perf_counter()
        tps = run_fast(batch_throughput(base_url, args.throughput_seconds, args.batch_concurrency))
        batch_cpu = (cpu_seconds(api.pid) - cpu_before) / (time.perf_counter() - started)

    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    mean = statistics.fmean(latencies)
    other = {k: v for k, v in counts.items() if k != 201}
    floor_p50 = floor[len(floor) // 2]
    floor_p99 = floor[min(len(floor) - 1, int(len(floor) * 0.99))]
    rows = [
        (f"floor (bare FastAPI + INSERT) @ {args.rate:g}/s, p50", _ms(floor_p50), "", ""),
        (f"floor (bare FastAPI + INSERT) @ {args.rate:g}/s, p99", _ms(floor_p99), "", ""),
        ("POST /tasks p50 / floor p50", f"{p50 / floor_p50:.2f}x", f"<= {TARGET_FLOOR_RATIO:g}x", p50 / floor_p50 <= TARGET_FLOOR_RATIO),
        (f"POST /tasks latency @ {args.rate:g}/s, mean", _ms(mean), "", ""),
        (f"POST /tasks latency @ {args.rate:g}/s, p50", _ms(p50), f"< {TARGET_P50_MS:g} ms", p50 * 1e3 < TARGET_P50_MS),
        (f"POST /tasks latency @ {args.rate:g}/s, p99", _ms(p99), f"< {TARGET_P99_MS:g} ms", p99 * 1e3 < TARGET_P99_MS),
        (f"POST /tasks single, {args.connections} conns ({args.load_client})", f"{rps:,.0f} req/s", f">= {TARGET_SINGLE_RPS:,}", rps >= TARGET_SINGLE_RPS),
        ("POST /tasks/batch, 1,000 per batch", f"{tps:,.0f} tasks/s", f">= {TARGET_BATCH_TPS:,}", tps >= TARGET_BATCH_TPS),
    ]  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"\nledgerq API ingress @ {commit or 'unknown'} ({os.cpu_count()} cores shared by client, API and PostgreSQL)"
    )
    print(f"{'measure':<46} {'result':>16} {'target':>12}  ok")
    for name, result, target, ok in rows:
        mark = "" if ok == "" else ("yes" if ok else "NO")
        print(f"{name:<46} {result:>16} {target:>12}  {mark}")
    print()  # the table ends here (`ledgerq bench` reads it up to a blank line)
    print(
        f"API process CPU: {single_cpu:.0%} of a core in the single run, "
        f"{batch_cpu:.0%} in the batch run; synchronous_commit {synchronous_commit(ADMIN_URL)}"
    )
    if other:
        print(f"non-201 answers in the throughput run: {other}")


if __name__ == "__main__":
    main()
