"""Migration 0010 at a realistic size: GET /queues, the listings by queue and by type,
pruning and reap_stuck read indexes, not the whole table; heartbeats are HOT updates."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ledgerq import queries

from .helpers import Conn, call_value, claimed, enqueue

ROWS = 300_000


@pytest.fixture
def big_ledger(db: Conn) -> Conn:
    """300,000 tasks in 8 queues and 20 types over a day, and a queue and a type that
    hold 0.1% each: 1% PENDING, 1% DEAD, 1% CANCELLED, the rest SUCCEEDED (with an
    attempt each); vacuumed and analyzed, as autovacuum keeps it."""
    db.execute(
        """
        INSERT INTO ledgerq.tasks (task_type, queue, status, attempts, started_at, finished_at,
                                   run_at, created_at)
        SELECT CASE WHEN g %% 1000 = 7 THEN 'type.rare' ELSE 'type.' || (g %% 20) END,
               CASE WHEN g %% 1000 = 5 THEN 'rare' ELSE 'q' || (g %% 8) END, s,
               CASE WHEN s = 'PENDING' THEN 0 ELSE 1 END,
               CASE WHEN s = 'PENDING' THEN NULL ELSE at END,
               CASE WHEN s = 'PENDING' THEN NULL ELSE at + interval '1 second' END, at, at
        FROM generate_series(1, %s) g,
             LATERAL (SELECT now() - interval '1 day' + g * interval '250 ms',
                             CASE g %% 100 WHEN 0 THEN 'PENDING' WHEN 1 THEN 'DEAD'
                                          WHEN 2 THEN 'CANCELLED' ELSE 'SUCCEEDED' END) AS x(at, s)
        """,
        (ROWS,),
    )
    db.execute(
        "INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, started_at, finished_at, outcome) "
        "SELECT id, 1, 'w', started_at, finished_at, 'succeeded' FROM ledgerq.tasks "
        "WHERE status = 'SUCCEEDED'"
    )
    db.execute("VACUUM ANALYZE ledgerq.tasks")
    db.execute("VACUUM ANALYZE ledgerq.attempts")
    return db


def tasks_access(db: Conn, text: str, params: Any = None) -> set[tuple[str, str | None]]:
    """(node type, index) of every plan node that reads ledgerq.tasks ("Index Scan
    Backward" for an index read from its end)."""
    (row,) = db.execute(f"EXPLAIN (FORMAT JSON) {text}", params).fetchall()
    plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    found, stack = set(), [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if node.get("Relation Name") == "tasks":
            kind = node["Node Type"]
            if node.get("Scan Direction") == "Backward":
                kind += " Backward"
            found.add((kind, node.get("Index Name")))
        stack.extend(node.get("Plans", []))
    return found


def test_queue_summary_counts_through_partial_indexes_not_a_table_scan(big_ledger: Conn) -> None:
    access = tasks_access(big_ledger, queries.QUEUE_SUMMARY)
    assert ("Index Only Scan", "tasks_queue_status_idx") in access
    assert all(kind != "Seq Scan" for kind, _ in access), access
    # The live statuses through partial indexes (which ones, and whether as a
    # bitmap scan, is the planner's choice: flow control's tasks_in_flight_idx
    # serves QUEUED and RUNNING too); the last minute's finishes index-only.
    assert ("Index Only Scan", "tasks_finished_idx") in access
    # And it still counts right.
    rows = {r[0]: r[1:7] for r in big_ledger.execute(queries.QUEUE_SUMMARY).fetchall()}
    expected = big_ledger.execute(
        "SELECT queue, count(*) FILTER (WHERE status = 'PENDING'), 0, 0, "
        "count(*) FILTER (WHERE status = 'SUCCEEDED'), count(*) FILTER (WHERE status = 'DEAD'), "
        "count(*) FILTER (WHERE status = 'CANCELLED') FROM ledgerq.tasks GROUP BY queue"
    ).fetchall()
    assert rows == {r[0]: r[1:] for r in expected}


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({"queue": "rare"}, "tasks_queue_id_idx"),
        ({"task_type": "type.rare"}, "tasks_type_id_idx"),
        ({"queue": "rare", "before_id": ROWS // 2}, "tasks_queue_id_idx"),
        ({"task_type": "type.rare", "before_id": ROWS // 2}, "tasks_type_id_idx"),
    ],
)
def test_listing_by_queue_or_type_reads_newest_first_from_an_index(
    big_ledger: Conn, filters: dict[str, Any], index: str
) -> None:
    params = {"status": None, "queue": None, "task_type": None, "before_id": None, "limit": 51}
    params.update(filters)
    # The plan the server uses for this statement's parameters (psycopg sends
    # them bound, so the planner sees the values, as it does for the API). A
    # queue or type with many tasks is as well served walking the primary key
    # backwards; a rare one needs its index, or a page walks the whole table.
    assert tasks_access(big_ledger, queries.LIST_TASKS, params) == {("Index Scan Backward", index)}


def scans_by(db: Conn, statement: str) -> dict[str, int]:
    """How many scans of each of ledgerq.tasks' indexes (and 'seq') statement made."""

    def counts() -> dict[str, int]:
        db.execute("SELECT pg_stat_clear_snapshot()")
        rows = db.execute(
            "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes "
            "WHERE schemaname = 'ledgerq' AND relname = 'tasks' UNION ALL "
            "SELECT 'seq', seq_scan FROM pg_stat_user_tables "
            "WHERE schemaname = 'ledgerq' AND relname = 'tasks'"
        ).fetchall()
        return {name: int(n) for name, n in rows}

    db.execute("SELECT pg_stat_force_next_flush()")
    before = counts()
    db.execute(statement)
    db.execute("SELECT pg_stat_force_next_flush()")
    after = counts()
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def test_pruning_reads_the_finished_indexes_not_the_table(big_ledger: Conn) -> None:
    used = scans_by(big_ledger, "SELECT ledgerq.prune_tasks_batch(older_than => '12 hours')")
    assert "seq" not in used, used
    assert used.get("tasks_finished_idx", 0) >= 1, used

    big_ledger.execute(
        "INSERT INTO ledgerq.queues (queue, settings) VALUES ('q3', '{\"retention\": \"23 hours\"}')"
    )
    used = scans_by(big_ledger, "SELECT ledgerq.prune_tasks_batch(older_than => '12 hours')")
    assert "seq" not in used, used
    assert used.keys() & {"tasks_finished_idx", "tasks_queue_status_idx"}, used


def test_reap_stuck_finds_expired_leases_through_the_running_index(big_ledger: Conn) -> None:
    access = tasks_access(
        big_ledger,
        "SELECT id FROM ledgerq.tasks WHERE status = 'RUNNING' AND lease_expires_at < now()",
    )
    # Either partial index that holds only RUNNING (and QUEUED) tasks; which one
    # is the planner's choice (flow control's tasks_in_flight_idx serves it too).
    indexes = {index for _, index in access}
    assert indexes and indexes <= {"tasks_running_idx", "tasks_in_flight_idx"}, access
    used = scans_by(big_ledger, "SELECT ledgerq.reap_stuck()")
    assert "seq" not in used, used


def hot_and_all_updates(db: Conn, statement: str, params: Any) -> tuple[int, int]:
    """(HOT updates, updates) statement made to ledgerq.tasks: the difference it makes
    to this backend's counts not yet reported (earlier transactions' included)."""

    def counts() -> tuple[int, int]:
        row = db.execute(
            "SELECT n_tup_hot_upd, n_tup_upd FROM pg_stat_xact_user_tables "
            "WHERE relid = 'ledgerq.tasks'::regclass"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    with db.transaction():
        hot, all_ = counts()
        db.execute(statement, params)
        hot_after, all_after = counts()
    return hot_after - hot, all_after - all_


def test_a_heartbeat_is_a_hot_update_and_a_status_change_is_not(db: Conn) -> None:
    task_id = enqueue(db)
    attempt = claimed(db, task_id)
    beat = "SELECT ledgerq.heartbeat(task_id => %s, attempt => %s, lease_seconds => 60)"
    assert hot_and_all_updates(db, beat, (task_id, attempt)) == (1, 1)
    assert hot_and_all_updates(db, beat, (task_id, attempt)) == (1, 1)
    finish = "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => true)"
    assert hot_and_all_updates(db, finish, (task_id, attempt)) == (0, 1)
    assert call_value(db, "prune_tasks", older_than="0 seconds") == 1
