"""Benchmark of run_schedules: time per call over thousands of schedules.

Run from the repository root (PostgreSQL must be up; Redis is not used)::

    .venv/bin/python bench/schedule_bench.py                   # 10,000 schedules, 20 calls per case
    .venv/bin/python bench/schedule_bench.py --schedules 2000 --calls 50

It creates a database of its own (``ledgerq_schedule_bench``), migrates it, stores
``--schedules`` schedules with mixed expressions (steps, hours, weekdays, days of month,
@every, macros) in four time zones, some with catch_up and overlap = false, and times
``run_schedules(as_of)`` calls, each its own transaction as the dispatcher makes them:

* ``nothing due``: as_of before every schedule's next slot (the dispatcher's every second);
* ``all due, one slot each``: every schedule exactly at a slot, so each call enqueues one
  task per schedule (the minute when every hourly job fires);
* ``all due after downtime``: every schedule's last call was 30 days ago; catch_up decides
  what fires (mostly the latest slot alone, found by bisection).

After the "one slot each" case, ``enqueue_tasks`` alone is timed with the same tasks (the
JSON sent as a parameter): the floor under run_schedules, so its own share can be read as
a ratio on a machine whose absolute times are noisy.

Before each timed call of the "all due" cases the cursors are put back and the tasks
removed, untimed, so every call does the same work. The expressions are varied by the
schedule's number, so the schedules fall into hundreds of distinct (expression, zone,
cursor) groups: the evaluator runs once per group, and this is not the best case where
every schedule shares one expression. The database is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from ledgerq import migrations

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

Conn = psycopg.Connection[tuple[Any, ...]]

# Ten kinds of schedule, varied by g (the schedule's number): (cron, timezone, catch_up, overlap).
MIXED_SCHEDULES = """
SELECT ledgerq.schedule_task(
    name => 'bench-' || g,
    cron => CASE g %% 10
        WHEN 0 THEN '*/' || (5 + g %% 11) || ' * * * *'
        WHEN 1 THEN (g %% 60) || ' * * * *'
        WHEN 2 THEN '@every ' || (30 + (g %% 20) * 15) || ' seconds'
        WHEN 3 THEN (g %% 60) || ' ' || (g %% 24) || ' * * *'
        WHEN 4 THEN (g %% 60) || ' 9-17 * * MON-FRI'
        WHEN 5 THEN '0 ' || (g %% 24) || ' * * ' || (g %% 7)
        WHEN 6 THEN (g %% 60) || ' ' || (g %% 24) || ' ' || (1 + g %% 28) || ' * *'
        WHEN 7 THEN '@daily'
        WHEN 8 THEN '@hourly'
        ELSE '*/15 * * * *'
    END,
    task_type => 'report.build',
    payload => jsonb_build_object('schedule', g),
    queue => CASE WHEN g %% 4 = 0 THEN 'reports' ELSE 'default' END,
    timezone => (ARRAY['UTC', 'Europe/Berlin', 'America/New_York', 'Asia/Tokyo'])[1 + g %% 4],
    catch_up => CASE WHEN g %% 10 = 9 THEN interval '1 hour' ELSE interval '0' END,
    overlap => g %% 10 <> 9)
FROM generate_series(1, %s) AS g
"""

# Two cursors per schedule, computed once: its latest slot at or before the target instant
# (due with exactly one slot), and its first slot after 30 days before it (a last call then).
CURSORS = """
CREATE TABLE ledgerq_bench_cursors AS
SELECT s.name,
       (ledgerq.schedule_plan(s.spec, s.timezone, interval '0', s.next_slot, %(at)s)).slots[1] AS one_slot,
       ledgerq.cron_next(s.spec, s.timezone, %(at)s - interval '30 days') AS downtime
FROM ledgerq.task_schedules s
"""
RESET = """
UPDATE ledgerq.task_schedules s SET next_slot = b.{}, last_slot = NULL, last_task_id = NULL
FROM ledgerq_bench_cursors b WHERE b.name = s.name
"""


def connect(url: str) -> Conn:
    return psycopg.connect(url, autocommit=True)


def scalar(conn: Conn, query: str, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def reset(conn: Conn, cursor: str) -> None:
    """Cursors back to one of the precomputed ones, no tasks: the same work for every call."""
    conn.execute("TRUNCATE ledgerq.effects, ledgerq.attempts, ledgerq.tasks")
    conn.execute(sql.SQL(RESET).format(sql.Identifier(cursor)))
    conn.execute("VACUUM ANALYZE ledgerq.task_schedules")


def timed_calls(
    conn: Conn, as_of: dt.datetime, calls: int, cursor: str | None
) -> tuple[list[float], list[int]]:
    times: list[float] = []
    created: list[int] = []
    for _ in range(calls):
        if cursor is not None:
            reset(conn, cursor)
        started = time.perf_counter()
        created.append(scalar(conn, "SELECT ledgerq.run_schedules(as_of => %s)", as_of))
        times.append((time.perf_counter() - started) * 1000)
    return times, created


def groups(conn: Conn) -> int:
    """Distinct (expression, zone, catch_up, cursor): how many times the evaluator runs."""
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM (SELECT DISTINCT spec, timezone, catch_up, next_slot"
            " FROM ledgerq.task_schedules) g",
        )
    )


def bench(url: str, schedules: int, calls: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    with connect(url) as conn:
        started = time.perf_counter()
        conn.execute(MIXED_SCHEDULES, (schedules,))
        created_s = time.perf_counter() - started
        print(
            f"stored {schedules:,} schedules in {created_s:.2f} s"
            f" ({created_s / schedules * 1e6:.0f} us per schedule_task)",
            file=sys.stderr,
        )
        earliest = scalar(conn, "SELECT min(next_slot) FROM ledgerq.task_schedules")
        # Far enough ahead that every schedule (the monthly ones too) has a slot before it.
        target = scalar(conn, "SELECT date_trunc('hour', now()) + interval '40 days 7 minutes'")
        conn.execute(CURSORS, {"at": target})
        conn.execute("VACUUM ANALYZE ledgerq.task_schedules")

        cases: list[tuple[str, dt.datetime, str | None]] = [
            ("nothing due", earliest - dt.timedelta(minutes=1), None),
            ("all due, one slot each", target, "one_slot"),
            ("all due after downtime", target, "downtime"),
        ]
        for label, as_of, cursor in cases:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            timed_calls(conn, as_of, 2, cursor)  # warm the caches and the plans
            distinct = 0
            if cursor is not None:
                reset(conn, cursor)
                distinct = groups(conn)
            times, created = timed_calls(conn, as_of, calls, cursor)
            per_call = statistics.median(created)
            rows.append(
                (
                    label,
                    f"{schedules:,}",
                    f"{distinct:,}" if cursor else "-",
                    f"{calls}",
                    f"{statistics.median(times):,.2f}",
                    f"{quantile(times, 0.95):,.2f}",
                    f"{per_call:,.0f}",
                    f"{per_call / statistics.median(times) * 1000:,.0f}" if per_call else "-",
                )
            )
            if cursor == "one_slot":
                rows.append(bare_enqueue(conn, calls))
    return rows


def bare_enqueue(conn: Conn, calls: int) -> tuple[str, ...]:
    """enqueue_tasks alone with the tasks the last call created: what the rest costs on top."""
    batch = scalar(
        conn,
        "SELECT jsonb_agg(jsonb_build_object('task_type', task_type, 'payload', payload,"
        " 'queue', queue, 'priority', priority, 'run_at', run_at, 'max_attempts', max_attempts,"
        " 'idempotency_key', idempotency_key) ORDER BY id)::text FROM ledgerq.tasks",
    )
    times: list[float] = []
    for _ in range(calls):
        conn.execute("TRUNCATE ledgerq.effects, ledgerq.attempts, ledgerq.tasks")
        started = time.perf_counter()
        created = scalar(
            conn, "SELECT count(*) FROM ledgerq.enqueue_tasks(tasks => %s::jsonb)", batch
        )
        times.append((time.perf_counter() - started) * 1000)
    return (
        "  (enqueue_tasks alone, same tasks)",
        "-",
        "-",
        f"{calls}",
        f"{statistics.median(times):,.2f}",
        f"{quantile(times, 0.95):,.2f}",
        f"{created:,}",
        f"{created / statistics.median(times) * 1000:,.0f}",
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = (
        "case",
        "schedules",
        "groups",
        "calls",
        "median ms",
        "p95 ms",
        "tasks/call",
        "tasks/s",
    )
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for n, row in enumerate(table):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def git_commit() -> str:
    sql_dir = str(migrations.sql_dir())
    done = subprocess.run(
        ["git", "-C", sql_dir, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    commit = done.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", sql_dir, "diff", "--quiet", "HEAD", "--", "."]).returncode
    return commit + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--schedules", type=int, default=10_000, help="schedules to store")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per case")
    parser.add_argument(
        "--database-url", default=os.environ.get("LEDGERQ_DATABASE_URL", DEFAULT_URL)
    )
    parser.add_argument(
        "--dbname", default="ledgerq_schedule_bench", help="the benchmark's own database"
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args(argv)

    url = urlsplit(args.database_url)._replace(path="/" + args.dbname).geturl()
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(args.dbname))
    with connect(args.database_url) as admin:
        admin.execute(drop)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(args.dbname)))
        version = scalar(admin, "SHOW server_version")
    try:
        migrations.migrate(url)
        rows = bench(url, args.schedules, args.calls)
    finally:
        if not args.keep:
            with connect(args.database_url) as admin:
                admin.execute(drop)

    load = os.getloadavg()[0]
    print(
        f"\ncommit {git_commit()}, PostgreSQL {version}, {os.cpu_count()} CPUs,"
        f" load average {load:.2f}"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
