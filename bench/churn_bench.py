"""Churn: a steady load through real `ledgerq` processes while the reaper prunes, and
what it does to the ledger's tables (dead tuples, size, HOT updates).

    .venv/bin/python bench/churn_bench.py                    # 60 s at 2,000 tasks/s
    .venv/bin/python bench/churn_bench.py --seconds 600      # the full run
    .venv/bin/python bench/churn_bench.py --before-0010      # the schema before migration 0010

A thread enqueues --rate tasks/s (batches of enqueue_tasks every 0.1 s) into
a database of its own; a dispatcher, --processes workers and a reaper
(`--prune-interval`, `--retention`) drain and prune it. A --long-share of the
tasks sleep --long-seconds under a 3 s lease, so they heartbeat about once a
second (the update migration 0010 makes HOT). Every --sample-every seconds it
prints, for ledgerq.tasks and ledgerq.attempts: live and dead tuples
(pg_stat_user_tables), table and index size, and the share of HOT updates so
far (n_tup_hot_upd / n_tup_upd); at the end, the peak and final numbers.

--before-0010 undoes migration 0010's storage settings and indexes after
migrating (and puts tasks_lease_idx back), so the same code runs on the old
table layout for a before/after comparison. autovacuum_naptime is the
server's (printed), as are all other settings.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from runtime_bench import drop_database, fresh_database, stack

UNDO_0010 = """
ALTER TABLE ledgerq.tasks RESET (fillfactor, autovacuum_vacuum_threshold,
    autovacuum_vacuum_scale_factor, autovacuum_vacuum_insert_threshold,
    autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_threshold,
    autovacuum_analyze_scale_factor, autovacuum_vacuum_cost_delay);
ALTER TABLE ledgerq.attempts RESET (fillfactor, autovacuum_vacuum_threshold,
    autovacuum_vacuum_scale_factor, autovacuum_vacuum_insert_threshold,
    autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_threshold,
    autovacuum_analyze_scale_factor, autovacuum_vacuum_cost_delay);
DROP INDEX ledgerq.tasks_running_idx;
CREATE INDEX tasks_lease_idx ON ledgerq.tasks (lease_expires_at) WHERE status = 'RUNNING';
DROP INDEX ledgerq.tasks_queue_id_idx;
DROP INDEX ledgerq.tasks_type_id_idx;
DROP INDEX ledgerq.tasks_queue_status_idx;
DROP INDEX ledgerq.effects_recorded_idx;
"""

SAMPLE = """
SELECT relname, n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, autovacuum_count + vacuum_count,
       pg_relation_size(relid), pg_indexes_size(relid)
FROM pg_stat_user_tables WHERE schemaname = 'ledgerq' AND relname IN ('tasks', 'attempts')
"""


@dataclass
class Sample:
    at: float
    live: int
    dead: int
    upd: int
    hot: int
    vacuums: int
    heap: int
    indexes: int

    @property
    def hot_ratio(self) -> float:
        return self.hot / self.upd if self.upd else 0.0


def mb(n: int) -> str:
    return f"{n / 1_048_576:.1f} MB"


class Enqueuer(threading.Thread):
    def __init__(self, url: str, rate: float, long_share: float, long_seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.rate = url, rate
        self.long_share, self.long_seconds = long_share, long_seconds
        self.stopping = threading.Event()
        self.enqueued = 0

    def run(self) -> None:
        tick = 0.1
        with psycopg.connect(self.url, autocommit=True) as conn:
            start = time.monotonic()
            while not self.stopping.is_set():
                due = int(self.rate * (time.monotonic() - start)) - self.enqueued
                if due > 0:
                    items = [
                        {"task_type": "bench.sleep", "payload": {"seconds": self.long_seconds},
                         "queue": "bench"}
                        if random.random() < self.long_share
                        else {"task_type": "bench.noop", "payload": {}, "queue": "bench"}
                        for _ in range(due)
                    ]  # fmt: skip
                    conn.execute("SELECT count(*) FROM ledgerq.enqueue_tasks(%s)", (Jsonb(items),))
                    self.enqueued += due
                self.stopping.wait(tick)


def sample(conn: psycopg.Connection, at: float) -> dict[str, Sample]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {r[0]: Sample(at, *r[1:]) for r in conn.execute(SAMPLE).fetchall()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=2000, help="tasks enqueued per second")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--retention", default="30 seconds")
    parser.add_argument("--prune-interval", type=float, default=5)
    parser.add_argument("--no-prune", action="store_true")
    parser.add_argument(
        "--vacuum-dead-rows", type=int, default=50_000,
        help="the reaper's --vacuum-dead-rows (0: leave vacuum to autovacuum)",
    )  # fmt: skip
    parser.add_argument("--long-share", type=float, default=0.01)
    parser.add_argument("--long-seconds", type=float, default=3.5)
    parser.add_argument("--sample-every", type=float, default=5)
    parser.add_argument("--before-0010", action="store_true")
    args = parser.parse_args()

    name = f"ledgerq_churn_{uuid.uuid4().hex[:8]}"
    url = fresh_database(name)
    try:
        with psycopg.connect(url, autocommit=True) as conn, stack(url) as s:
            if args.before_0010:
                conn.execute(UNDO_0010)
            naptime = conn.execute("SHOW autovacuum_naptime").fetchone()
            print(
                f"schema: {'before' if args.before_0010 else 'after'} 0010; rate {args.rate:g}/s "
                f"for {args.seconds:g} s; retention {args.retention}, prune every "
                f"{args.prune_interval:g} s{' (off)' if args.no_prune else ''}; reaper vacuum over "
                f"{args.vacuum_dead_rows} dead rows; "
                f"{args.processes} worker(s) x {args.concurrency}; autovacuum_naptime "
                f"{naptime[0] if naptime else '?'}"
            )
            s.start("dispatcher", "--poll-interval", "0.05")
            reaper = ["reaper", "--interval", "1", "--retention", args.retention,
                      "--prune-interval", str(args.prune_interval),
                      "--vacuum-dead-rows", str(args.vacuum_dead_rows)]  # fmt: skip
            s.start(*reaper, *(["--no-prune"] if args.no_prune else []))
            for _ in range(args.processes):
                s.start("worker", "--app", "bench_app:tasks", "--queues", "bench",
                        "--concurrency", str(args.concurrency), "--lease-seconds", "3")  # fmt: skip
            time.sleep(2)  # the workers' start-up is not the load
            enqueuer = Enqueuer(url, args.rate, args.long_share, args.long_seconds)
            start = time.monotonic()
            enqueuer.start()
            samples: list[dict[str, Sample]] = []
            header = (
                f"{'t':>5} {'table':>8} {'live':>9} {'dead':>9} {'heap':>10} {'indexes':>10} "
                f"{'hot%':>6} {'vac':>4} {'done/s':>7}"
            )
            print(header)
            while time.monotonic() - start < args.seconds:
                time.sleep(args.sample_every)
                at = time.monotonic() - start
                row = conn.execute(
                    "SELECT count(*) FROM ledgerq.tasks WHERE finished_at >= now() - "
                    "make_interval(secs => %s)",
                    (args.sample_every,),
                ).fetchone()
                done_rate = (row[0] if row else 0) / args.sample_every
                current = sample(conn, at)
                samples.append(current)
                for table in ("tasks", "attempts"):
                    x = current.get(table)
                    if x is None:
                        continue
                    print(
                        f"{at:5.0f} {table:>8} {x.live:9d} {x.dead:9d} {mb(x.heap):>10} "
                        f"{mb(x.indexes):>10} {100 * x.hot_ratio:6.1f} {x.vacuums:4d} "
                        f"{done_rate if table == 'tasks' else 0:7.0f}"
                    )
            enqueuer.stopping.set()
            enqueuer.join()
            elapsed = time.monotonic() - start
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status <> 'SUCCEEDED' AND finished_at IS NULL) "
                "FROM ledgerq.tasks"
            ).fetchone()
            backlog = row[0] if row else 0
            print(f"enqueued {enqueuer.enqueued} in {elapsed:.0f} s "
                  f"({enqueuer.enqueued / elapsed:.0f}/s); unfinished at the end: {backlog}")  # fmt: skip
            for table in ("tasks", "attempts"):
                series = [x[table] for x in samples if table in x]
                if not series:
                    continue
                final = series[-1]
                print(
                    f"{table}: peak dead {max(x.dead for x in series)}, final dead {final.dead}; "
                    f"peak heap {mb(max(x.heap for x in series))}, final {mb(final.heap)}; "
                    f"peak indexes {mb(max(x.indexes for x in series))}, final "
                    f"{mb(final.indexes)}; HOT updates {final.hot}/{final.upd} "
                    f"({100 * final.hot_ratio:.1f}%); autovacuums {final.vacuums}"
                )
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
