"""Benchmarks for the SQL ledger: the numbers the dispatcher, workers and reaper live by.

Run from the repository root (PostgreSQL must be up; Redis is not used)::

    .venv/bin/python bench/sql_bench.py                      # everything
    .venv/bin/python bench/sql_bench.py hot_query reap --rows 1000000
    .venv/bin/python bench/sql_bench.py enqueue_single --seconds 10 --keep

Benchmarks (default: all, in this order):

* ``hot_query`` - the dispatcher's SELECT inside ``task_take_due`` (due PENDING tasks by
  priority DESC, run_at, id, LIMIT 100, FOR UPDATE SKIP LOCKED) over ``--rows`` tasks, most
  of them finished. Prints EXPLAIN (ANALYZE, BUFFERS) and fails (exit 1) unless the plan is an
  index scan with no Sort and no Seq Scan - both for the statement prepared as the function
  plans it (generic parameters) and for the function's own plan, caught with auto_explain.
* ``reap`` - one ``reap_stuck()`` sweep over the same table (1% of it expired leases, 0.1%
  stale deliveries), then an idle sweep.
* ``enqueue_batch`` - ``enqueue_tasks`` with 1,000 tasks per call and per transaction.
* ``enqueue_single`` - ``enqueue_task``, one call per transaction, from 1 and 8 connections.
* ``claim_complete`` - ``claim_tasks`` + ``complete_tasks`` in batches of 100, and single
  ``claim_task`` + ``complete_task`` round trips, on tasks made QUEUED by ``task_take_due``.

Every call runs in autocommit mode, as the runtime's pool does, so each one is a durable
commit. Each throughput benchmark also times a bare SQL equivalent on the same harness, so a
number can be read against what the machine does without ledgerq's functions. JSON bodies
for batches are serialised before the clock starts: these are benchmarks of the ledger, not
of the json module. The benchmark database (``ledgerq_bench`` by default) is created afresh,
migrated with ``ledgerq.migrations.migrate`` and dropped at the end unless ``--keep``.
``--strict`` also exits 1 when a throughput or latency target is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

import ledger_data
from ledgerq import migrations

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_NAMES = ("hot_query", "reap", "enqueue_batch", "enqueue_single", "claim_complete")
WORKER = "bench-worker"

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclasses.dataclass
class Result:
    bench: str
    metric: str
    value: float | str
    unit: str
    target: str = ""
    ok: bool | None = None


@dataclasses.dataclass
class Run:
    url: str
    rows: int
    seconds: float
    claim_tasks: int
    results: list[Result] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    big_table: bool = False

    def add(self, bench: str, metric: str, value: float | str, unit: str = "") -> None:
        self.results.append(Result(bench, metric, value, unit))

    def at_least(self, bench: str, metric: str, value: float, unit: str, floor: float) -> None:
        self.results.append(Result(bench, metric, value, unit, f">= {floor:,.0f}", value >= floor))

    def at_most(self, bench: str, metric: str, value: float, unit: str, ceiling: float) -> None:
        self.results.append(Result(bench, metric, value, unit, f"< {ceiling:g}", value < ceiling))


def connect(url: str) -> Conn:
    return psycopg.connect(url, autocommit=True)


def scalar(conn: Conn, query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def ensure_big_table(run: Run, conn: Conn) -> None:
    if run.big_table:
        return
    started = time.perf_counter()
    ledger_data.populate(conn, run.rows)
    run.add("setup", f"generate {run.rows:,} tasks + attempts", time.perf_counter() - started, "s")
    run.big_table = True


# --- hot_query -----------------------------------------------------------------------------

# A copy of the SELECT in task_take_due (sql/functions/dispatch.sql), with the function's
# parameters as $1 (batch_size) and $2 (as_of). A SQL function plans its statements without
# knowing its parameters' values, so the copy is prepared with a forced generic plan to be
# planned the same way. Should the copy drift from the function, the auto_explain check of
# the function's own statement still catches a regression.
HOT_SELECT = """
    SELECT t.id FROM ledgerq.tasks t
    WHERE t.status = 'PENDING' AND t.run_at <= coalesce($2::timestamptz, now())
    ORDER BY t.priority DESC, t.run_at, t.id
    LIMIT $1::integer
    FOR NO KEY UPDATE SKIP LOCKED
"""


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def plan_problems(plan: dict[str, Any]) -> list[str]:
    """Why a hot-query plan is not an index scan without Sort or Seq Scan (empty if it is)."""
    nodes = list(plan_nodes(plan))
    problems = [
        f"{n['Node Type']} on {n.get('Relation Name', '?')}"
        for n in nodes
        if n["Node Type"] in ("Sort", "Incremental Sort", "Seq Scan")
    ]
    if not any(n.get("Index Name") == "tasks_dispatch_idx" for n in nodes):
        problems.append("no scan of tasks_dispatch_idx")
    return problems


def explain_hot(conn: Conn, options: str) -> Any:
    with conn.transaction(force_rollback=True):
        cur = conn.execute(f"EXPLAIN ({options}) EXECUTE lq_hot(100, NULL)")
        rows = cur.fetchall()
    return rows[0][0] if "JSON" in options else "\n".join(r[0] for r in rows)


def function_plan(url: str, fmt: str) -> str:
    """task_take_due(100)'s plan of its own statement, through auto_explain, as text or json."""
    notices: list[str] = []
    with connect(url) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_buffers", "on"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_format", fmt),
            ("auto_explain.log_level", "notice"),
        ):
            conn.execute("SELECT set_config(%s, %s, false)", (setting, value))
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT * FROM ledgerq.task_take_due(100)").fetchall()
    for notice in notices:  # the nested statement's plan, not the outer Function Scan
        if "ledgerq.tasks" in notice and "task_take_due" not in notice.split("plan:", 1)[1]:
            return notice.split("plan:", 1)[1].strip()
    raise RuntimeError("auto_explain reported no plan for task_take_due's statement")


def bench_hot_query(run: Run, conn: Conn) -> None:
    ensure_big_table(run, conn)
    # psycopg answers a ROLLBACK with DEALLOCATE ALL once it has prepared statements of its
    # own; with its automatic preparation off, the PREPAREd lq_hot survives the rollbacks.
    with psycopg.connect(run.url, autocommit=True, prepare_threshold=None) as plans:
        plans.execute("SET plan_cache_mode = force_generic_plan")
        plans.execute(f"PREPARE lq_hot(integer, timestamptz) AS {HOT_SELECT}")
        explain_hot(plans, "ANALYZE, BUFFERS")  # warm the cache before the plan that is shown
        text_plan = explain_hot(plans, "ANALYZE, BUFFERS")
        print("\nhot_query: EXPLAIN (ANALYZE, BUFFERS) of task_take_due's SELECT (generic plan)")
        print(indent(text_plan), flush=True)
        print("\nhot_query: task_take_due(100)'s own statement (auto_explain, ANALYZE, BUFFERS)")
        print(indent(function_plan(run.url, "text")), flush=True)
        checks = [
            ("prepared SELECT", explain_hot(plans, "ANALYZE, BUFFERS, FORMAT JSON")[0]["Plan"]),
            (
                "task_take_due (auto_explain)",
                json.loads(function_plan(run.url, "json"))["Plan"],
            ),
        ]
        times = []
        for _ in range(300):
            doc = explain_hot(plans, "ANALYZE, TIMING OFF, FORMAT JSON")
            times.append(doc[0]["Execution Time"])

        # The whole call as the dispatcher makes it (it also marks 100 rows QUEUED), rolled back.
        calls = []
        for _ in range(50):
            with plans.transaction(force_rollback=True):
                started = time.perf_counter()
                plans.execute(
                    "SELECT id, queue, priority, run_at FROM ledgerq.task_take_due(100)"
                ).fetchall()
                calls.append((time.perf_counter() - started) * 1000)

    for label, plan in checks:
        problems = plan_problems(plan)
        verdict = "index scan, no Sort/Seq Scan" if not problems else "; ".join(problems)
        run.results.append(
            Result("hot_query", f"plan: {label}", verdict, "", "required", not problems)
        )
        if problems:
            run.failures.append(f"hot query plan regressed ({label}): {verdict}")
    run.at_most("hot_query", "SELECT execution, median of 300", statistics.median(times), "ms", 0.2)
    run.add("hot_query", "SELECT execution, p95", quantile(times, 0.95), "ms")
    run.add("hot_query", "task_take_due(100) call, median", statistics.median(calls), "ms")


def indent(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- reap ----------------------------------------------------------------------------------


def bench_reap(run: Run, conn: Conn) -> None:
    ensure_big_table(run, conn)
    # Leases and deliveries the generator meant to be live are made live again, however long
    # the benchmarks before this one took.
    conn.execute(
        "UPDATE ledgerq.tasks SET lease_expires_at = now() + interval '1 hour'"
        " WHERE status = 'RUNNING' AND id % 1000 BETWEEN 990 AND 994"
    )
    conn.execute(
        "UPDATE ledgerq.tasks SET queued_at = now() WHERE status = 'QUEUED' AND id % 1000 <> 999"
    )
    conn.execute("VACUUM (ANALYZE) ledgerq.tasks")
    conn.execute("CHECKPOINT")
    expected = scalar(
        conn,
        "SELECT count(*) FROM ledgerq.tasks WHERE (status = 'RUNNING' AND lease_expires_at < now())"
        " OR (status = 'QUEUED' AND queued_at < now() - interval '30 seconds')",
    )
    started = time.perf_counter()
    moved = scalar(conn, "SELECT ledgerq.reap_stuck()")
    elapsed = time.perf_counter() - started
    label = f"sweep over {run.rows:,} tasks: {moved:,} moved (expected {expected:,})"
    run.add("reap", label, elapsed * 1000, "ms")
    if moved != expected:
        run.failures.append(f"reap_stuck moved {moved} tasks, expected {expected}")
    started = time.perf_counter()
    scalar(conn, "SELECT ledgerq.reap_stuck()")
    run.add("reap", "idle sweep (nothing to reap)", (time.perf_counter() - started) * 1000, "ms")
    run.big_table = False  # the table no longer holds what ensure_big_table promises


# --- enqueue -------------------------------------------------------------------------------


BARE_BATCH = """
    INSERT INTO ledgerq.tasks (task_type, payload, queue, priority, max_attempts, idempotency_key)
    SELECT x.task_type, x.payload, x.queue, x.priority, x.max_attempts, x.idempotency_key
    FROM jsonb_to_recordset(%s::jsonb)
         AS x(task_type text, payload jsonb, queue text, priority integer, max_attempts integer,
              idempotency_key text)
    RETURNING id
"""


def timed_batches(conn: Conn, query: str, bodies: Iterator[str], seconds: float) -> float:
    """Tasks per second of query run on successive bodies for about `seconds` (or until the
    bodies run out)."""
    for _ in range(6):  # past the 5 executions after which psycopg prepares the statement
        conn.execute(query, (next(bodies),)).fetchall()
    done = 0
    started = time.perf_counter()
    for body in bodies:
        done += len(conn.execute(query, (body,)).fetchall())
        if time.perf_counter() - started >= seconds:
            break
    return done / (time.perf_counter() - started)


def bench_enqueue_batch(run: Run, conn: Conn) -> None:
    enqueue = "SELECT id, created FROM ledgerq.enqueue_tasks(%s::jsonb)"
    cases = [
        ("enqueue_tasks x1000", enqueue, False, 100_000.0),
        ("enqueue_tasks x1000, every task keyed", enqueue, True, None),
        ("bare INSERT ... jsonb_to_recordset x1000", BARE_BATCH, False, None),
    ]
    for label, query, keyed, floor in cases:
        ledger_data.reset(conn)
        # Bodies are built ahead, outside the clock. Without keys a few can be sent again and
        # again; keyed ones must be new each time (a replay takes another path), so there are
        # enough for 200k tasks/s, and a faster run ends early.
        if keyed:
            bodies = iter(ledger_data.batch_bodies(int(run.seconds * 200) + 20, 1000, keyed))
        else:
            bodies = itertools.cycle(ledger_data.batch_bodies(50, 1000, keyed))
        rate = timed_batches(conn, query, bodies, run.seconds)
        if floor is None:
            run.add("enqueue_batch", label, rate, "tasks/s")
        else:
            run.at_least("enqueue_batch", label, rate, "tasks/s", floor)


ENQUEUE_ONE = """
    SELECT id, created FROM ledgerq.enqueue_task(
        task_type => %s, payload => %s, queue => %s, priority => %s, max_attempts => %s,
        idempotency_key => %s)
"""
BARE_ONE = """
    INSERT INTO ledgerq.tasks (task_type, payload, queue, priority, max_attempts, idempotency_key)
    VALUES (%s, %s, %s, %s, %s, %s) RETURNING id
"""
# The same with the NOTIFY that enqueue_task sends for a due task. PostgreSQL serialises the
# commits of all transactions that NOTIFY (a cluster-wide lock held through the WAL flush),
# so this is the ceiling for enqueue_task from many connections.
BARE_ONE_NOTIFY = f"""
    WITH inserted AS ({BARE_ONE})
    SELECT id, pg_notify('ledgerq_tasks', '') FROM inserted
"""


def single_calls(url: str, query: str, connections: int, seconds: float) -> float:
    """Calls per second, one per transaction, from `connections` threads for about `seconds`."""
    counts = [0] * connections
    barrier = threading.Barrier(connections + 1)
    stop = threading.Event()
    failures: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            with connect(url) as conn:
                n = slot * 10_000_000
                for _ in range(10):
                    n += 1
                    conn.execute(query, ledger_data.one_task(n)).fetchall()
                barrier.wait()
                while not stop.is_set():
                    n += 1
                    conn.execute(query, ledger_data.one_task(n)).fetchall()
                    counts[slot] += 1
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise failures[0]
    return sum(counts) / elapsed


def bench_enqueue_single(run: Run, conn: Conn) -> None:
    for connections, floor in ((1, 4_000.0), (8, 12_000.0)):
        ledger_data.reset(conn)
        rate = single_calls(run.url, ENQUEUE_ONE, connections, run.seconds)
        run.at_least("enqueue_single", f"enqueue_task, {connections} conn", rate, "tasks/s", floor)
        for label, query in (("", BARE_ONE), (" + NOTIFY", BARE_ONE_NOTIFY)):
            ledger_data.reset(conn)
            rate = single_calls(run.url, query, connections, run.seconds)
            metric = f"bare INSERT{label} + COMMIT, {connections} conn"
            run.add("enqueue_single", metric, rate, "tasks/s")


# --- claim + complete ----------------------------------------------------------------------


CLAIM = "SELECT id, attempts FROM ledgerq.claim_tasks(%s, %s, %s)"
COMPLETE = "SELECT task_id, attempt, status FROM ledgerq.complete_tasks(%s, %s, %s, %s, %s, %s)"
BARE_CLAIM = """
    UPDATE ledgerq.tasks SET status = 'RUNNING', attempts = attempts + 1, worker_id = %s,
        lease_expires_at = now() + interval '30 seconds', queued_at = NULL, started_at = now()
    WHERE id = ANY (%s) AND status = 'QUEUED' RETURNING id, attempts
"""
# lease_expires_at IS NOT NULL is RUNNING, in the form complete_tasks uses (see complete.sql).
BARE_COMPLETE = """
    UPDATE ledgerq.tasks SET status = 'SUCCEEDED', result = %s, finished_at = now(),
        lease_expires_at = NULL
    WHERE id = ANY (%s) AND lease_expires_at IS NOT NULL RETURNING id
"""


def claim_complete_batches(conn: Conn, ids: list[int], bare: bool) -> float:
    started = time.perf_counter()
    done = 0
    for i in range(0, len(ids), 100):
        batch = ids[i : i + 100]
        if bare:
            claimed = conn.execute(BARE_CLAIM, (WORKER, batch)).fetchall()
            conn.execute(BARE_COMPLETE, (Jsonb({"ok": True}), [r[0] for r in claimed])).fetchall()
        else:
            claimed = conn.execute(CLAIM, (batch, WORKER, 30)).fetchall()
            n = len(claimed)
            conn.execute(
                COMPLETE,
                (
                    [r[0] for r in claimed],
                    [r[1] for r in claimed],
                    [True] * n,
                    [Jsonb({"ok": True})] * n,
                    [None] * n,
                    [True] * n,
                ),
            ).fetchall()
        done += len(claimed)
    if done != len(ids):
        raise RuntimeError(f"claimed {done} of {len(ids)} queued tasks")
    return done / (time.perf_counter() - started)


def claim_complete_single(conn: Conn, ids: list[int]) -> float:
    started = time.perf_counter()
    for task_id in ids:
        row = conn.execute(
            "SELECT attempts FROM ledgerq.claim_task(task_id => %s, worker_id => %s)",
            (task_id, WORKER),
        ).fetchone()
        if row is None:
            raise RuntimeError(f"task {task_id} could not be claimed")
        conn.execute(
            "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => true,"
            " result => %s)",
            (task_id, row[0], Jsonb({"ok": True})),
        ).fetchone()
    return len(ids) / (time.perf_counter() - started)


def bench_claim_complete(run: Run, conn: Conn) -> None:
    count = run.claim_tasks
    rate = claim_complete_batches(conn, ledger_data.queued_ids(conn, count), bare=False)
    run.add("claim_complete", "claim_tasks + complete_tasks x100", rate, "tasks/s")
    rate = claim_complete_batches(conn, ledger_data.queued_ids(conn, count), bare=True)
    run.add("claim_complete", "bare UPDATEs x100 (no attempt rows)", rate, "tasks/s")
    rate = claim_complete_single(conn, ledger_data.queued_ids(conn, max(1000, count // 10)))
    run.add("claim_complete", "claim_task + complete_task, single", rate, "tasks/s")


# --- driver --------------------------------------------------------------------------------

BENCHES: dict[str, Callable[[Run, Conn], None]] = {
    "hot_query": bench_hot_query,
    "reap": bench_reap,
    "enqueue_batch": bench_enqueue_batch,
    "enqueue_single": bench_enqueue_single,
    "claim_complete": bench_claim_complete,
}


def bench_url(admin_url: str, dbname: str) -> str:
    return urlsplit(admin_url)._replace(path="/" + dbname).geturl()


def git_commit() -> str:
    """The commit of the SQL being measured, marked +dirty when sql/ differs from it."""
    sql_dir = str(migrations.sql_dir())

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", sql_dir, *args], capture_output=True, text=True)

    commit = git("rev-parse", "--short", "HEAD").stdout.strip()
    if not commit:
        return "unknown"
    return commit + ("+dirty" if git("diff", "--quiet", "HEAD", "--", ".").returncode else "")


def record(path: str, commit: str, pg: str, load: float, run: Run, note: str) -> None:
    entry = {
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "note": note,
        "postgresql": pg,
        "cpus": os.cpu_count(),
        "load": round(load, 2),
        "rows": run.rows,
        "results": [dataclasses.asdict(r) for r in run.results],
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")


def print_table(results: list[Result]) -> None:
    header = ("benchmark", "metric", "value", "unit", "target", "")
    rows = [header]
    for r in results:
        value = f"{r.value:,.3f}" if isinstance(r.value, float) and r.value < 100 else r.value
        if isinstance(value, float):
            value = f"{value:,.0f}"
        verdict = "" if r.ok is None else ("ok" if r.ok else "MISS")
        rows.append((r.bench, r.metric, str(value), r.unit, r.target, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i == 2 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(BENCH_NAMES)}",
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="tasks in the large table")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="duration of each throughput run"
    )
    parser.add_argument(
        "--claim-tasks", type=int, default=50_000, help="tasks per claim_complete run"
    )
    parser.add_argument(
        "--database-url", default=os.environ.get("LEDGERQ_DATABASE_URL", DEFAULT_URL)
    )
    parser.add_argument("--dbname", default="ledgerq_bench", help="the benchmark's own database")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--record",
        metavar="PATH",
        help="append the results, with the commit they were measured at, to this JSON-lines file",
    )
    parser.add_argument("--note", default="", help="a remark to record with the results")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.benchmarks) - set(BENCH_NAMES))
    if unknown:
        parser.error(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCH_NAMES)}"
        )
    names = [n for n in BENCH_NAMES if n in (args.benchmarks or BENCH_NAMES)]

    url = bench_url(args.database_url, args.dbname)
    with connect(args.database_url) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(args.dbname))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(args.dbname)))
        version = admin.execute("SHOW server_version").fetchone()
    run = Run(url=url, rows=args.rows, seconds=args.seconds, claim_tasks=args.claim_tasks)
    try:
        migrations.migrate(url)
        with connect(url) as conn:
            for name in names:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                BENCHES[name](run, conn)
    finally:
        if not args.keep:
            with connect(args.database_url) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(args.dbname)
                    )
                )

    commit = git_commit()
    load = os.getloadavg()[0]
    pg = version[0] if version else "?"
    print(f"\ncommit {commit}, PostgreSQL {pg}, {os.cpu_count()} CPUs, load average {load:.2f}")
    print_table(run.results)
    if args.record:
        record(args.record, commit, pg, load, run, args.note)
    missed = [f"{r.bench}: {r.metric}" for r in run.results if r.ok is False]
    for failure in run.failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if run.failures or (args.strict and missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
