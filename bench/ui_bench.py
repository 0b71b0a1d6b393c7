"""Dashboard benchmark: each page's server time at 1,000,000 tasks.

Builds a ledger of its own (a database created, migrated and dropped
afterwards) with ``ledger_data.populate`` (1,000,000 tasks over ~14 hours,
90% SUCCEEDED, 4% DEAD, live PENDING/QUEUED/RUNNING ones, their attempts)
plus 30,000 tasks finished over the last hour (the throughput chart's data)
and 20 registered workers; then loads each page 100 times through the app
in-process (httpx's ASGI transport, so the time is the server's: routing,
ledger queries, rendering; no socket) and prints p50/p99 per page, with the
plan of each page's queries checked for a sequential scan of tasks.

    .venv/bin/python bench/ui_bench.py [--rows 1000000] [--loads 100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
import ledger_data
from ledgerq import config, migrations, reads
from ledgerq.api import create_app
from ledgerq.dispatch import Dispatch
from ledgerq.ledger import AsyncLedger

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"

RECENT = """
INSERT INTO ledgerq.tasks (task_type, queue, status, attempts, run_at, created_at, started_at,
                           finished_at, result, last_error, worker_id)
SELECT 'email.send', CASE WHEN g % 4 = 0 THEN 'reports' ELSE 'default' END,
       CASE WHEN g % 50 = 0 THEN 'DEAD' ELSE 'SUCCEEDED' END, 1, f, f, f, f,
       CASE WHEN g % 50 = 0 THEN NULL ELSE '{"ok": true}'::jsonb END,
       CASE WHEN g % 50 = 0 THEN 'boom' END, 'worker-' || g % 16
FROM generate_series(1, 30000) g, LATERAL (SELECT now() - make_interval(secs => g * 0.12)) t(f)
"""
RECENT_ATTEMPTS = """
INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, started_at, finished_at, outcome, error)
SELECT id, 1, worker_id, started_at, finished_at,
       CASE WHEN status = 'DEAD' THEN 'failed' ELSE 'succeeded' END, last_error
FROM ledgerq.tasks WHERE id > %(rows)s
"""
WORKERS = """
INSERT INTO ledgerq.workers (worker_id, queues, task_types, concurrency)
SELECT 'worker-' || g, '{default,reports}', '{email.send,payment.capture,report.build}', 32
FROM generate_series(0, 19) g
"""


def build(dbname: str, rows: int) -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    migrations.migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        ledger_data.populate(conn, rows)
        conn.execute(RECENT)
        conn.execute(RECENT_ATTEMPTS, {"rows": rows})
        conn.execute(WORKERS)
        conn.execute("VACUUM (ANALYZE) ledgerq.tasks, ledgerq.attempts, ledgerq.workers")
    return url


def exists(dbname: str) -> bool:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
    return row is not None


def seq_scans_of_tasks(url: str) -> dict[str, bool]:
    """Whether each of the dashboard's tasks-table queries plans a Seq Scan on tasks."""
    checks: dict[str, tuple[str, Any]] = {
        "FINISHED_PER_MINUTE": (reads.FINISHED_PER_MINUTE, (60,)),
        "WORKERS_SEEN": (reads.WORKERS_SEEN, {"window_s": 300.0}),
        "TASK_BY_KEY": (reads.TASK_BY_KEY, ("key-3",)),
        "DEAD_COUNT": (reads.DEAD_COUNT, {"queue": None}),
    }
    found = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name, (text, params) in checks.items():
            plan = conn.execute(f"EXPLAIN (FORMAT JSON) {text}", params).fetchall()[0][0]
            nodes, stack = [], [plan[0]["Plan"]]
            while stack:
                node = stack.pop()
                nodes.append(node)
                stack.extend(node.get("Plans", []))
            found[name] = any(
                n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks" for n in nodes
            )
    return found


async def measure(url: str, loads: int) -> list[dict[str, Any]]:
    settings = config.Settings(database_url=url, redis_url=REDIS_URL, redis_prefix="uibench")
    ledger = await AsyncLedger.connect(url, max_size=4)
    dispatch = Dispatch.connect(REDIS_URL, "uibench")
    results = []
    try:
        app = create_app(settings, ledger=ledger, dispatch=dispatch)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            with psycopg.connect(url) as conn:
                dead = conn.execute(
                    "SELECT max(id) FROM ledgerq.tasks WHERE status = 'DEAD'"
                ).fetchone()
                keyed = conn.execute(
                    "SELECT idempotency_key FROM ledgerq.tasks WHERE idempotency_key IS NOT NULL "
                    "ORDER BY id LIMIT 1"
                ).fetchone()
            assert dead is not None and keyed is not None
            pages = {
                "queues": "/ui/",
                "tasks (newest)": "/ui/tasks",
                "tasks status=DEAD": "/ui/tasks?status=DEAD",
                "tasks queue=reports type=report.build": "/ui/tasks?queue=reports&type=report.build",
                "tasks search by key": f"/ui/tasks?q={keyed[0]}",
                "task": f"/ui/tasks/{dead[0]}",
                "dead": "/ui/dead",
                "workers": "/ui/workers",
                "schedules": "/ui/schedules",
            }
            for name, path in pages.items():
                first = await client.get(path)
                assert first.status_code == 200, (path, first.status_code)
                times = []
                for _ in range(loads):
                    started = time.perf_counter()
                    response = await client.get(path)
                    times.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200
                times.sort()
                results.append(
                    {
                        "page": name,
                        "path": path,
                        "p50_ms": round(statistics.median(times), 2),
                        "p99_ms": round(times[max(0, int(len(times) * 0.99) - 1)], 2),
                    }
                )
    finally:
        await ledger.close()
        await dispatch.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loads", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--keep", metavar="DBNAME", help="build (or reuse) this database and keep it"
    )
    args = parser.parse_args()
    dbname = args.keep or f"ledgerq_ui_bench_{uuid.uuid4().hex[:8]}"
    try:
        started = time.perf_counter()
        url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
        if not (args.keep and exists(dbname)):
            url = build(dbname, args.rows)
        setup_s = time.perf_counter() - started
        scans = seq_scans_of_tasks(url)
        results = asyncio.run(measure(url, args.loads))
    finally:
        if not args.keep:
            with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
                drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                admin.execute(drop.format(sql.Identifier(dbname)))
    if args.json:
        print(json.dumps({"rows": args.rows, "setup_s": setup_s, "seq_scans": scans,
                          "pages": results}))  # fmt: skip
        return
    print(f"{args.rows:,} tasks (+30,000 finished in the last hour); set up in {setup_s:.1f} s")
    print(f"{'page':<40} {'p50 ms':>8} {'p99 ms':>8}")
    for r in results:
        print(f"{r['page']:<40} {r['p50_ms']:>8} {r['p99_ms']:>8}")
    for name, scans_tasks in scans.items():
        print(f"plan of {name}: {'SEQ SCAN of tasks' if scans_tasks else 'no seq scan of tasks'}")


if __name__ == "__main__":
    main()
