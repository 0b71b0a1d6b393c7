"""Flow control's cost in the ledger: claim throughput with and without queue settings.

Run from the repository root (PostgreSQL must be up; Redis is not used)::

    .venv/bin/python bench/flow_bench.py                    # every case below
    .venv/bin/python bench/flow_bench.py unconfigured --tasks 20000
    # The same case on another tree's SQL (its ledgerq package first on the path):
    PYTHONPATH=/path/to/other/runtime .venv/bin/python bench/flow_bench.py unconfigured

Each case drains ``--tasks`` due tasks the way the runtime does, from ``--threads``
connections at once, each in autocommit: ``task_take_due(100)`` (the dispatcher), then
the ids in claims of ``--claim-batch`` (``task_claim`` where it exists, else
``claim_tasks``), each claimed task completed at once (``complete_tasks``). It prints
tasks per second. With ``--repeat N`` (default 3) the drain cases run N times, taking
turns, and the best of each is printed last with its ratio to ``unconfigured``: the
machine's noise only ever slows a run, so the best runs are the ones to compare. Cases:

* ``unconfigured`` - the queue has no settings row: the common path.
* ``limits_unreached`` - the queue has every limit, none of them ever reached.
* ``per_key_1`` - ``per_key_max_running = 1`` over 1,000 keys; also prints the most
  attempts of one key that ever overlapped (from the attempt history: must be 1).
* ``hot_query`` - the dispatcher's query over ``--rows`` tasks (default 1,000,000) spread
  over 10,000 keys, 90% finished, 1% parked, 1% not yet due: prints its plan (EXPLAIN
  ANALYZE, generic plan) and the median time of ``task_take_due(100)``; fails unless
  the plan is an index scan of ``tasks_dispatch_idx`` with no Sort and no Seq Scan.

The database (``ledgerq_flow_bench``) is created afresh for each case and dropped at the end.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ledgerq import migrations

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_NAME = "ledgerq_flow_bench"
CASES = ("unconfigured", "limits_unreached", "per_key_1", "hot_query")
EVERY_LIMIT_UNREACHED = {
    "max_running": 1_000_000,
    "per_key_max_running": 1_000_000,
    "rate_per_second": 1_000_000,
    "per_key_rate_per_second": 1_000_000,
    "retry_rate_per_second": 1_000_000,
}

Conn = psycopg.Connection[tuple[Any, ...]]


def fresh_database(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
    url = admin_url.rsplit("/", 1)[0] + "/" + DB_NAME
    migrations.migrate(url)
    return url


def drop_database(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME))
        )


def has_column(conn: Conn, column: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_schema = 'ledgerq' AND table_name = 'tasks' AND column_name = %s",
        (column,),
    ).fetchone()
    return bool(row and row[0])


def populate(conn: Conn, tasks: int, keys: int | None) -> None:
    key = "'key-' || (g %% %(keys)s)" if keys else "NULL"
    columns = "task_type, queue, payload, run_at" + (", concurrency_key" if keys else "")
    values = "'t', 'default', '{}', now() - interval '1 second'" + (f", {key}" if keys else "")
    conn.execute(
        f"INSERT INTO ledgerq.tasks ({columns}) SELECT {values} FROM generate_series(1, %(n)s) g",  # type: ignore[arg-type]
        {"n": tasks, "keys": keys},
    )
    if keys and has_column(conn, "turn"):
        # The turns enqueue would have given: each key's tasks in a row of turns.
        conn.execute(
            "UPDATE ledgerq.tasks SET turn = (id - 1) / %s WHERE concurrency_key IS NOT NULL",
            (keys,),
        )
    conn.execute("VACUUM (ANALYZE) ledgerq.tasks")


def drain(url: str, threads: int, claim_batch: int, claim_fn: str) -> float:
    """Drain every task from ``threads`` connections; seconds taken."""
    errors: list[BaseException] = []
    claim = f"SELECT id, attempts, status FROM ledgerq.{claim_fn}(%s, %s, 30)"

    def run(n: int) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                idle = 0
                while idle < 50:
                    ids = [r[0] for r in conn.execute("SELECT id FROM ledgerq.task_take_due(100)")]
                    if not ids:
                        left = conn.execute(
                            "SELECT count(*) FROM ledgerq.tasks WHERE finished_at IS NULL"
                        ).fetchone()
                        if left and left[0] == 0:
                            return
                        idle += 1
                        time.sleep(0.002)
                        continue
                    idle = 0
                    for i in range(0, len(ids), claim_batch):
                        rows = conn.execute(claim, (ids[i : i + claim_batch], f"w{n}")).fetchall()
                        done = [(r[0], r[1]) for r in rows if r[2] == "RUNNING"]
                        if done:
                            conn.execute(
                                "SELECT count(*) FROM ledgerq.complete_tasks(%s, %s, %s)",
                                (
                                    [d[0] for d in done],
                                    [d[1] for d in done],
                                    [True] * len(done),
                                ),
                            ).fetchone()
        except BaseException as exc:
            errors.append(exc)

    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def most_overlap_per_key(conn: Conn) -> int:
    row = conn.execute(
        """
        WITH events AS (
            SELECT t.concurrency_key AS k, a.started_at AS at, 1 AS delta
            FROM ledgerq.attempts a JOIN ledgerq.tasks t ON t.id = a.task_id
            UNION ALL
            SELECT t.concurrency_key, a.finished_at, -1
            FROM ledgerq.attempts a JOIN ledgerq.tasks t ON t.id = a.task_id
        )
        SELECT max(n) FROM (
            SELECT sum(delta) OVER (PARTITION BY k ORDER BY at, delta
                                    ROWS UNBOUNDED PRECEDING) AS n FROM events) e
        """
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


HOT_ROWS = """
INSERT INTO ledgerq.tasks (task_type, queue, concurrency_key, status, attempts, turn,
                           run_at, finished_at, waiting_on)
SELECT 't', CASE WHEN g %% 4 = 0 THEN 'reports' ELSE 'default' END, 'key-' || (g %% 10000),
       s.status, CASE WHEN s.status = 'SUCCEEDED' THEN 1 ELSE 0 END, g / 10000,
       CASE WHEN g %% 100 = 29 THEN now() + interval '1 hour' ELSE now() - interval '1 minute' END,
       CASE WHEN s.status = 'SUCCEEDED' THEN now() END,
       CASE WHEN g %% 100 = 19 THEN 'per_key_max_running' END
FROM generate_series(1, %s) g
CROSS JOIN LATERAL (SELECT CASE WHEN g %% 10 < 9 THEN 'SUCCEEDED' ELSE 'PENDING' END AS status) s
"""
HOT_SELECT = """
    SELECT t.id FROM ledgerq.tasks t
    WHERE t.status = 'PENDING' AND t.waiting_on IS NULL AND t.run_at <= coalesce($2, now())
    ORDER BY t.priority DESC, t.turn, t.run_at, t.id
    LIMIT $1
    FOR NO KEY UPDATE SKIP LOCKED
"""


def hot_query(url: str, rows: int) -> None:
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        started = time.perf_counter()
        conn.execute(HOT_ROWS, (rows,))  # type: ignore[arg-type]
        conn.execute("VACUUM (ANALYZE) ledgerq.tasks")
        print(
            f"hot_query: {rows:,} tasks over 10,000 keys built in {time.perf_counter() - started:.1f} s"
        )
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE hot(integer, timestamptz) AS {HOT_SELECT}")  # type: ignore[arg-type]
        with conn.transaction(force_rollback=True):
            plan = "\n".join(
                r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) EXECUTE hot(100, NULL)")
            )
        print(plan)
        times = []
        for _ in range(30):
            with conn.transaction(force_rollback=True):
                t0 = time.perf_counter()
                taken = conn.execute("SELECT id FROM ledgerq.task_take_due(100)").fetchall()
                times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        print(
            f"hot_query: task_take_due(100) took {len(taken)} tasks, median {times[len(times) // 2]:.2f} ms"
        )
        problems = [w for w in ("Sort", "Seq Scan") if w in plan]
        if "tasks_dispatch_idx" not in plan or problems:
            raise SystemExit(f"hot_query: not an index scan without sort: {problems}")


def run_case(case: str, args: argparse.Namespace) -> float | None:
    """Run one case; the drain cases' tasks per second."""
    url = fresh_database(args.database_url)
    if case == "hot_query":
        hot_query(url, args.rows)
        return None
    with psycopg.connect(url, autocommit=True) as conn:
        flow = has_column(conn, "waiting_on")
        if case != "unconfigured" and not flow:
            print(f"{case}: skipped (this tree has no flow control)")
            return None
        populate(conn, args.tasks, 1000 if case == "per_key_1" else None)
        if case == "limits_unreached":
            conn.execute(
                "SELECT ledgerq.configure_queue('default', %s)", (Jsonb(EVERY_LIMIT_UNREACHED),)
            )
        elif case == "per_key_1":
            conn.execute(
                "SELECT ledgerq.configure_queue('default', %s)",
                (Jsonb({"per_key_max_running": 1}),),
            )
        claim_fn = "task_claim" if flow else "claim_tasks"
        seconds = drain(url, args.threads, args.claim_batch, claim_fn)
        finished = conn.execute(
            "SELECT count(*) FROM ledgerq.tasks WHERE status = 'SUCCEEDED'"
        ).fetchone()
        assert finished and finished[0] == args.tasks, finished
        line = (
            f"{case}: {args.tasks} tasks in {seconds:.2f} s = {args.tasks / seconds:,.0f} tasks/s"
        )
        if case == "per_key_1":
            line += f"; most attempts of one key overlapping: {most_overlap_per_key(conn)}"
        print(line, flush=True)
        return args.tasks / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: all)")
    parser.add_argument("--database-url", default=DEFAULT_URL, help="an admin connection")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--claim-batch", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1_000_000, help="tasks for hot_query")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each drain case, taking turns"
    )
    args = parser.parse_args()
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    cases = args.cases or CASES
    best: dict[str, float] = {}
    try:
        for round_ in range(max(1, args.repeat)):
            for case in cases:
                if case == "hot_query" and round_ > 0:
                    continue
                rate = run_case(case, args)
                if rate is not None:
                    best[case] = max(best.get(case, 0.0), rate)
    finally:
        drop_database(args.database_url)
    if args.repeat > 1 and best:
        print(f"best of {args.repeat}:")
        base = best.get("unconfigured")
        for case, rate in best.items():
            ratio = f" ({rate / base:.2f}x unconfigured)" if base and case != "unconfigured" else ""
            print(f"  {case}: {rate:,.0f} tasks/s{ratio}")


if __name__ == "__main__":
    main()
