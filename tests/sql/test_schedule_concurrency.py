"""Exactly once under concurrency, and the index scans behind run_schedules.

Eight connections step a simulated day minute by minute, all calling with the same
as_of at once; eight more on drifting clocks call with catch_up covering what they
miss. Every slot must become exactly one task, and the key guard must never be
needed: the row locks alone keep callers apart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from .helpers import (
    Conn,
    Row,
    call_rows,
    count,
)
from .schedule_helpers import (
    DAY,
    HOUR,
    MINUTE,
    UTC,
    every,
    key,
    keys,
    midnight_after,
    next_run_at,
    run,
    schedule,
)

# --- exactly once under concurrency --------------------------------------------------------------

DAY_SCHEDULES: list[dict[str, Any]] = [
    {"name": "five", "cron": "*/5 * * * *"},
    {"name": "hourly", "cron": "0 * * * *", "queue": "hourly"},
    {"name": "every90", "cron": "@every 90 seconds"},
    {"name": "berlin", "cron": "30 2 * * *", "timezone": "Europe/Berlin"},
    {"name": "single", "cron": "*/10 * * * *", "overlap": False},
]


def expected_day_slots(start: dt.datetime, end: dt.datetime) -> dict[str, list[dt.datetime]]:
    """The slots a day of calls at start, start + 1 min, ..., end fires, with catch_up 0:
    the latest slot at or before start, then every slot up to end."""
    berlin = ZoneInfo("Europe/Berlin")
    nightly = []
    for days in range(-3, 3):
        local = dt.datetime.combine((start + days * DAY).date(), dt.time(2, 30))
        instant = local.replace(tzinfo=berlin).astimezone(UTC)
        if instant.astimezone(berlin).replace(tzinfo=None) == local:  # not in a DST gap
            nightly.append(instant)
    latest_before = max(s for s in nightly if s <= start)
    return {
        "five": every(start, end, 5 * MINUTE),
        "hourly": every(start, end, HOUR),
        "every90": every(start, end, dt.timedelta(seconds=90)),  # midnight is a multiple of 90 s
        "berlin": [latest_before] + [s for s in nightly if start < s <= end],
        "single": [start],  # its first task stays PENDING, so every later slot is skipped
    }


def run_threads(count_: int, target: Callable[[int], None]) -> None:
    failures: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count_)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert failures == []
    assert not any(thread.is_alive() for thread in threads)


def test_eight_connections_firing_every_minute_of_a_day_enqueue_each_slot_exactly_once(
    db: Conn, db_url: str
) -> None:
    for definition in DAY_SCHEDULES:
        schedule(db, **definition)
    start = midnight_after(db)
    steps = [start + n * MINUTE for n in range(24 * 60 + 1)]
    connections = 8
    barrier = threading.Barrier(connections, timeout=60)
    created = [0] * connections

    def caller(index: int) -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            for as_of in steps:
                barrier.wait()  # all eight call with the same as_of at once
                created[index] += run(conn, as_of)

    run_threads(connections, caller)

    expected = expected_day_slots(start, steps[-1])
    for name, slots in expected.items():
        assert keys(db, name) == [key(name, s) for s in slots], name
    total = sum(len(s) for s in expected.values())
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == total
    assert sum(created) == total  # no call counted a task another created
    # Every task's run_at is its slot, and it landed on its schedule's queue.
    assert (
        count(
            db,
            "SELECT count(*) FROM ledgerq.tasks WHERE idempotency_key"
            " <> 'schedule:' || split_part(idempotency_key, ':', 2) || ':'"
            "    || to_char(run_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
        )
        == 0
    )
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE queue = 'hourly'") == 25


def test_callers_at_different_clocks_with_catch_up_still_fire_each_slot_once(
    db: Conn, db_url: str
) -> None:
    schedule(db, "five", "*/5 * * * *", catch_up="1 day")
    schedule(db, "every90", "@every 90 seconds", catch_up="1 day")
    start = midnight_after(db)
    before_threads = run(db, start)  # from here on, every caller's window covers every missed slot
    end = start + 6 * HOUR
    connections = 8
    reports: list[list[Row]] = [[] for _ in range(connections)]

    def caller(index: int) -> None:
        # No barrier: callers drift apart, and a late one calls with an old as_of.
        with psycopg.connect(db_url, autocommit=True) as conn:
            for n in range(index, 6 * 60 + 1, 1 + index % 3):
                reports[index].extend(call_rows(conn, "schedule_fire", as_of=start + n * MINUTE))
            reports[index].extend(call_rows(conn, "schedule_fire", as_of=end))

    run_threads(connections, caller)

    assert keys(db, "five") == [key("five", s) for s in every(start - DAY, end, 5 * MINUTE)]
    assert keys(db, "every90") == [
        key("every90", s) for s in every(start - DAY, end, dt.timedelta(seconds=90))
    ]
    rows = [row for per_caller in reports for row in per_caller]
    # The row locks alone kept callers apart: the key guard never had to step in.
    assert sum(r["already_enqueued"] for r in rows) == 0
    assert before_threads + sum(r["enqueued"] for r in rows) == count(
        db, "SELECT count(*) FROM ledgerq.tasks"
    )


# --- plans ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def nested_plans(conn: Conn) -> Iterator[list[str]]:
    """Plans of the statements inside functions, as auto_explain reports them (JSON)."""
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting, value in (
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_nested_statements", "on"),
        ("auto_explain.log_format", "json"),
        ("auto_explain.log_level", "notice"),
    ):
        conn.execute("SELECT set_config(%s, %s, false)", (setting, value))
    yield notices


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def task_schedules_scans(notices: list[str]) -> set[tuple[str, str | None]]:
    """(node type, index) of every scan of task_schedules in the plans reported."""
    plans = [json.loads(n.split("plan:", 1)[1]) for n in notices if "task_schedules" in n]
    return {
        (node["Node Type"], node.get("Index Name"))
        for plan in plans
        for node in plan_nodes(plan["Plan"])
        if node.get("Relation Name") == "task_schedules"
    }


def test_due_schedules_among_thousands_are_found_through_the_partial_index(db: Conn) -> None:
    db.execute(
        "SELECT ledgerq.schedule_task(name => 's' || g, cron => (ARRAY['0 3 * * *', '@hourly',"
        " '*/5 * * * *'])[1 + g % 3], task_type => 't') FROM generate_series(1, 3000) g"
    )
    db.execute("UPDATE ledgerq.task_schedules SET next_slot = next_slot + interval '1 year'")
    schedule(db, "soon", "* * * * *")
    db.execute("ANALYZE ledgerq.task_schedules")
    first = next_run_at(db, "soon")

    with nested_plans(db) as notices:
        for _ in range(8):  # past PL/pgSQL's five custom plans
            notices.clear()
            assert run(db, first - HOUR) == 0  # nothing due
        nothing_due = task_schedules_scans(notices)
        for n in range(8):
            notices.clear()
            assert run(db, first + n * MINUTE) == 1  # one due among 3,001
        one_due = task_schedules_scans(notices)

    due_index = {
        ("Index Only Scan", "task_schedules_due_idx"),
        ("Index Scan", "task_schedules_due_idx"),
    }
    assert nothing_due and nothing_due <= due_index, nothing_due
    # Finding the due row goes through the index too; moving its cursor goes by name.
    assert one_due & due_index and one_due <= due_index | {
        ("Index Scan", "task_schedules_pkey"),
        ("ModifyTable", None),
    }, one_due
