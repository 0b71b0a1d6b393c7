"""Schedules (sql/functions/schedule.sql): exactly one task per slot, whoever fires it.

run_schedules from eight connections at once over a simulated day; overlap and
catch_up; replace, pause, resume and unschedule; DST nights through the whole
path; keys held by other tasks; the view; bad input. Time is simulated with
run_schedules' ``as_of``: a schedule created now fires slots after now, so each
test walks a clock that starts in the near future.
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
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .helpers import (
    Conn,
    Row,
    call_rows,
    call_value,
    claimed,
    complete,
    count,
    db_now,
    raises_sqlstate,
    task,
)

UTC = dt.UTC
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

# SPEC.md's schedule functions as pg_get_function_arguments / pg_get_function_result
# print them: names, defaults and types are the contract (callers use named notation).
SPEC_FUNCTIONS = {
    "schedule_task": (
        "name text, cron text, task_type text, payload jsonb DEFAULT '{}'::jsonb, "
        "queue text DEFAULT 'default'::text, priority integer DEFAULT 0, "
        "max_attempts integer DEFAULT 5, timezone text DEFAULT 'UTC'::text, "
        "overlap boolean DEFAULT true, catch_up interval DEFAULT '00:00:00'::interval",
        "void",
    ),
    "unschedule_task": ("name text", "boolean"),
    "pause_schedule": ("name text", "boolean"),
    "resume_schedule": ("name text", "boolean"),
    "run_schedules": ("as_of timestamp with time zone DEFAULT now()", "integer"),
}


def schedule(
    conn: Conn, name: str, cron: str, task_type: str = "report.build", **arguments: Any
) -> None:
    call_value(conn, "schedule_task", name=name, cron=cron, task_type=task_type, **arguments)


def run(conn: Conn, as_of: dt.datetime) -> int:
    return int(call_value(conn, "run_schedules", as_of=as_of))


def fire(conn: Conn, as_of: dt.datetime) -> dict[str, Row]:
    """schedule_fire's report, by schedule name."""
    return {row["name"]: row for row in call_rows(conn, "schedule_fire", as_of=as_of)}


def view(conn: Conn, name: str) -> Row | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM ledgerq.schedules WHERE name = %s", (name,)).fetchone()


def next_run_at(conn: Conn, name: str) -> dt.datetime:
    row = view(conn, name)
    assert row is not None and row["next_run_at"] is not None
    return row["next_run_at"]


def key(name: str, slot: dt.datetime) -> str:
    return f"schedule:{name}:{slot.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def keys(conn: Conn, name: str) -> list[str]:
    rows = conn.execute(
        "SELECT idempotency_key FROM ledgerq.tasks WHERE idempotency_key LIKE %s"
        " ORDER BY idempotency_key",
        (f"schedule:{name}:%",),
    ).fetchall()
    return [r[0] for r in rows]


def keys_since(conn: Conn, name: str, since: dt.datetime) -> list[str]:
    rows = conn.execute(
        "SELECT idempotency_key FROM ledgerq.tasks WHERE idempotency_key LIKE %s AND run_at >= %s"
        " ORDER BY run_at",
        (f"schedule:{name}:%", since),
    ).fetchall()
    return [r[0] for r in rows]


def task_by_key(conn: Conn, idempotency_key: str) -> Row:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT * FROM ledgerq.tasks WHERE idempotency_key = %s", (idempotency_key,)
        ).fetchone()
    assert row is not None, f"no task with key {idempotency_key}"
    return row


def every(start: dt.datetime, end: dt.datetime, step: dt.timedelta) -> list[dt.datetime]:
    """start, start + step, ... up to end inclusive."""
    found = []
    while start <= end:
        found.append(start)
        start += step
    return found


def midnight_after(conn: Conn, days: int = 2) -> dt.datetime:
    """A UTC midnight `days` ahead: a simulated day that starts after every schedule's creation."""
    today = db_now(conn).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + days * DAY


# --- the contract's shape ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPEC_FUNCTIONS))
def test_spec_function_exists_with_exact_parameters_defaults_and_return_type(
    db: Conn, name: str
) -> None:
    rows = db.execute(
        "SELECT pg_get_function_arguments(p.oid), pg_get_function_result(p.oid)"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'ledgerq' AND p.proname = %s",
        (name,),
    ).fetchall()
    assert rows == [SPEC_FUNCTIONS[name]]  # one overload: named calls stay unambiguous


def test_schedules_view_has_spec_columns(db: Conn) -> None:
    rows = db.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'ledgerq.schedules'::regclass"
        " AND attnum > 0 ORDER BY attnum"
    ).fetchall()
    assert [r[0] for r in rows] == [
        "name",
        "cron",
        "timezone",
        "task_type",
        "queue",
        "paused",
        "next_run_at",
        "last_slot",
        "last_task_id",
    ]


# --- creating and firing -----------------------------------------------------------------------


def test_new_schedule_is_listed_with_its_first_slot_after_creation(db: Conn) -> None:
    before = db_now(db)
    schedule(db, "sync", "*/5 * * * *", "crm.sync", queue="sync", timezone="Europe/Berlin")

    row = view(db, "sync")
    assert row is not None
    first = row.pop("next_run_at")
    assert row == {
        "name": "sync",
        "cron": "*/5 * * * *",
        "timezone": "Europe/Berlin",
        "task_type": "crm.sync",
        "queue": "sync",
        "paused": False,
        "last_slot": None,
        "last_task_id": None,
    }
    assert before < first <= before + 5 * MINUTE
    assert first.minute % 5 == 0 and first.second == 0
    assert run(db, db_now(db)) == 0  # nothing is due at creation


def test_due_slot_becomes_one_task_with_the_slot_key_run_at_and_schedule_fields(db: Conn) -> None:
    schedule(
        db,
        "nightly",
        "0 2 * * *",
        "report.build",
        payload={"kind": "daily"},
        queue="reports",
        priority=7,
        max_attempts=2,
    )
    slot = next_run_at(db, "nightly").astimezone(UTC)
    assert (slot.hour, slot.minute) == (2, 0)

    assert run(db, slot + 30 * MINUTE) == 1

    created = task_by_key(db, f"schedule:nightly:{slot:%Y-%m-%d}T02:00:00Z")
    fields = ("task_type", "payload", "queue", "priority", "max_attempts", "run_at", "status")
    assert {k: created[k] for k in fields} == {
        "task_type": "report.build",
        "payload": {"kind": "daily"},
        "queue": "reports",
        "priority": 7,
        "max_attempts": 2,
        "run_at": slot,
        "status": "PENDING",
    }
    row = view(db, "nightly")
    assert row is not None
    assert (row["last_slot"], row["last_task_id"]) == (slot, created["id"])
    assert row["next_run_at"] == slot + DAY


def test_firing_the_same_slot_again_enqueues_nothing(db: Conn) -> None:
    schedule(db, "tick", "* * * * *")
    slot = next_run_at(db, "tick")
    assert run(db, slot) == 1
    assert run(db, slot) == 0
    assert run(db, slot + 59 * dt.timedelta(seconds=1)) == 0
    assert keys(db, "tick") == [key("tick", slot)]


def test_key_is_utc_whatever_the_session_and_schedule_time_zones(db: Conn) -> None:
    db.execute("SET TimeZone = 'Asia/Kolkata'")
    schedule(db, "tokyo", "30 9 * * *", timezone="Asia/Tokyo")
    slot = next_run_at(db, "tokyo")
    assert run(db, slot) == 1
    assert keys(db, "tokyo") == [f"schedule:tokyo:{slot.astimezone(UTC):%Y-%m-%d}T00:30:00Z"]


def test_run_schedules_defaults_to_now(db: Conn) -> None:
    schedule(db, "tick", "* * * * *")
    assert db.execute("SELECT ledgerq.run_schedules()").fetchone() == (0,)


def test_schedule_fire_reports_each_schedule_it_handled(db: Conn) -> None:
    schedule(db, "a", "*/5 * * * *", queue="qa")
    schedule(db, "b", "0 * * * *", "b.type", overlap=False)
    schedule(db, "paused", "* * * * *")
    call_value(db, "pause_schedule", name="paused")
    start = midnight_after(db)
    run(db, start)

    report = fire(db, start + HOUR)

    assert set(report) == {"a", "b"}  # "paused" is not due
    assert report["a"] == {
        "name": "a",
        "task_type": "report.build",
        "queue": "qa",
        "enqueued": 1,
        "already_enqueued": 0,
        "skipped_overlap": 0,
        "last_slot": start + HOUR,
        "next_slot": start + HOUR + 5 * MINUTE,
    }
    # b's task of the start slot is still PENDING: its next slot is skipped.
    assert (report["b"]["enqueued"], report["b"]["skipped_overlap"]) == (0, 1)
    assert (report["b"]["last_slot"], report["b"]["next_slot"]) == (start, start + 2 * HOUR)


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


# --- overlap -----------------------------------------------------------------------------------


def make_due(conn: Conn, task_id: int) -> None:
    """A slot's task has run_at = its slot, ahead of the real clock: let it be claimed now."""
    conn.execute("UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,))


def finish_cancelled(conn: Conn, task_id: int) -> None:
    assert call_value(conn, "cancel_task", task_id=task_id) == "CANCELLED"


def finish_succeeded(conn: Conn, task_id: int) -> None:
    make_due(conn, task_id)
    assert complete(conn, task_id, claimed(conn, task_id), True) == "SUCCEEDED"


def finish_dead(conn: Conn, task_id: int) -> None:
    make_due(conn, task_id)
    assert complete(conn, task_id, claimed(conn, task_id), False, retryable=False) == "DEAD"


def finish_pruned(conn: Conn, task_id: int) -> None:
    finish_succeeded(conn, task_id)
    conn.execute("DELETE FROM ledgerq.tasks WHERE id = %s", (task_id,))


@pytest.mark.parametrize(
    "finish",
    [finish_cancelled, finish_succeeded, finish_dead, finish_pruned],
    ids=["cancelled", "succeeded", "dead", "pruned"],
)
def test_overlap_false_skips_slots_until_the_previous_task_is_final(
    db: Conn, finish: Callable[[Conn, int], None]
) -> None:
    schedule(db, "exclusive", "* * * * *", overlap=False)
    first = next_run_at(db, "exclusive")
    assert run(db, first) == 1
    first_task = task_by_key(db, key("exclusive", first))

    assert fire(db, first + MINUTE)["exclusive"]["skipped_overlap"] == 1  # PENDING
    assert fire(db, first + 2 * MINUTE)["exclusive"]["skipped_overlap"] == 1
    finish(db, first_task["id"])

    assert run(db, first + 3 * MINUTE) == 1
    assert keys(db, "exclusive") == sorted(
        [key("exclusive", first + 3 * MINUTE)]
        + ([] if finish is finish_pruned else [key("exclusive", first)])
    )
    row = view(db, "exclusive")
    assert row is not None
    assert row["last_slot"] == first + 3 * MINUTE


def test_overlap_false_skips_slots_while_the_previous_task_runs(db: Conn) -> None:
    schedule(db, "exclusive", "* * * * *", overlap=False)
    first = next_run_at(db, "exclusive")
    run(db, first)
    first_id = task_by_key(db, key("exclusive", first))["id"]
    make_due(db, first_id)
    attempt = claimed(db, first_id)

    assert run(db, first + MINUTE) == 0
    assert complete(db, first_id, attempt, False) == "PENDING"  # a retry is not final either
    assert run(db, first + 2 * MINUTE) == 0
    assert keys(db, "exclusive") == [key("exclusive", first)]


def test_overlap_true_fires_while_the_previous_task_runs(db: Conn) -> None:
    schedule(db, "parallel", "* * * * *")
    first = next_run_at(db, "parallel")
    run(db, first)
    first_id = task_by_key(db, key("parallel", first))["id"]
    make_due(db, first_id)
    claimed(db, first_id)
    assert run(db, first + MINUTE) == 1


def test_overlap_false_after_downtime_fires_the_first_caught_up_slot_and_skips_the_rest(
    db: Conn,
) -> None:
    schedule(db, "exclusive", "*/10 * * * *", overlap=False)
    start = midnight_after(db)
    run(db, start)
    finish_succeeded(db, task_by_key(db, key("exclusive", start))["id"])
    schedule(db, "exclusive", "*/10 * * * *", overlap=False, catch_up="1 hour")  # same cursor

    report = fire(db, start + 2 * HOUR)["exclusive"]

    assert (report["enqueued"], report["skipped_overlap"]) == (1, 6)
    assert keys(db, "exclusive") == [key("exclusive", start), key("exclusive", start + HOUR)]


# --- catch_up ----------------------------------------------------------------------------------


def test_default_catch_up_enqueues_only_the_latest_missed_slot(db: Conn) -> None:
    schedule(db, "five", "*/5 * * * *")
    start = midnight_after(db)
    assert run(db, start) == 1
    assert run(db, start + HOUR + 2 * MINUTE) == 1
    assert keys(db, "five") == [key("five", start), key("five", start + HOUR)]
    assert next_run_at(db, "five") == start + HOUR + 5 * MINUTE


def test_catch_up_enqueues_each_missed_slot_in_its_window_once(db: Conn) -> None:
    schedule(db, "five", "*/5 * * * *", catch_up="30 minutes")
    start = midnight_after(db)
    assert run(db, start) == 7  # start-30 ... start: the slots missed since creation

    assert run(db, start + HOUR) == 7  # start+30 ... start+60; start+5 ... start+25 skipped
    assert run(db, start + HOUR) == 0
    assert keys(db, "five") == [
        key("five", s)
        for s in every(start - 30 * MINUTE, start, 5 * MINUTE)
        + every(start + 30 * MINUTE, start + HOUR, 5 * MINUTE)
    ]


def test_latest_due_slot_fires_even_when_older_than_catch_up(db: Conn) -> None:
    schedule(db, "hourly", "0 * * * *", catch_up="10 minutes")
    start = midnight_after(db)
    run(db, start)
    assert run(db, start + 2 * HOUR + 30 * MINUTE) == 1
    assert keys(db, "hourly") == [key("hourly", start), key("hourly", start + 2 * HOUR)]


def test_catch_up_never_reaches_before_the_schedule_was_created(db: Conn) -> None:
    created_at = db_now(db)
    schedule(db, "tick", "* * * * *", catch_up="1 day")
    first = next_run_at(db, "tick")
    assert first - created_at <= MINUTE
    assert run(db, first + MINUTE) == 2  # first and first + 1 min; nothing from the day before


def test_catch_up_fires_at_most_a_thousand_slots_per_call_and_the_next_call_goes_on(
    db: Conn,
) -> None:
    schedule(db, "tick", "* * * * *", catch_up="2 days")
    first = next_run_at(db, "tick")
    as_of = first + DAY  # 1,441 missed slots
    assert run(db, as_of) == 1000
    assert run(db, as_of) == 441
    assert run(db, as_of) == 0
    assert keys(db, "tick") == sorted(key("tick", s) for s in every(first, as_of, MINUTE))


def test_catch_up_over_a_long_downtime_stays_cheap_with_the_default(db: Conn) -> None:
    # Half a year of missed minutes: the latest slot is found by bisection, not by walking.
    schedule(db, "tick", "* * * * *")
    first = next_run_at(db, "tick")
    as_of = first + 180 * DAY + 30 * dt.timedelta(seconds=1)
    assert run(db, as_of) == 1
    assert keys(db, "tick") == [key("tick", first + 180 * DAY)]


# --- replace, pause, resume, unschedule --------------------------------------------------------


def schedule_row(conn: Conn, name: str) -> Row:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT * FROM ledgerq.task_schedules WHERE name = %s", (name,)
        ).fetchone()
    assert row is not None
    return row


def test_upserting_an_unchanged_schedule_writes_nothing_and_loses_no_due_slot(db: Conn) -> None:
    schedule(db, "tick", "*/5 * * * *", payload={"a": 1})
    before = schedule_row(db, "tick")
    first = next_run_at(db, "tick")

    schedule(db, "tick", "*/5 * * * *", payload={"a": 1})  # a worker starting again

    after = schedule_row(db, "tick")
    assert after == before  # same cursor, same updated_at: no write at all
    assert run(db, first) == 1


def test_replacing_what_is_enqueued_keeps_the_cursor(db: Conn) -> None:
    schedule(db, "tick", "*/5 * * * *", payload={"v": 1})
    first = next_run_at(db, "tick")
    run(db, first)

    schedule(
        db,
        "tick",
        "*/5 * * * *",
        "other.type",
        payload={"v": 2},
        queue="q2",
        priority=3,
        max_attempts=9,
    )

    assert next_run_at(db, "tick") == first + 5 * MINUTE
    assert run(db, first + 5 * MINUTE) == 1
    latest = task_by_key(db, key("tick", first + 5 * MINUTE))
    fields = ("task_type", "payload", "queue", "priority", "max_attempts")
    assert [latest[f] for f in fields] == ["other.type", {"v": 2}, "q2", 3, 9]


def test_a_due_slot_not_yet_fired_survives_a_replacement_with_the_same_slots(db: Conn) -> None:
    schedule(db, "tick", "* * * * *", payload={"v": 1})
    # As if created earlier, with the slot of a minute ago not fired yet (no caller since).
    row = db.execute(
        "UPDATE ledgerq.task_schedules SET next_slot = date_trunc('minute', now()) - interval '1 minute'"
        " RETURNING next_slot"
    ).fetchone()
    assert row is not None
    due = row[0]

    schedule(db, "tick", "* * * * *", payload={"v": 2})  # e.g. a deploy with a new payload

    assert run(db, due) == 1
    assert task_by_key(db, key("tick", due))["payload"] == {"v": 2}


def test_same_slots_spelled_differently_keep_the_cursor(db: Conn) -> None:
    schedule(db, "hourly", "0 * * * *")
    before = schedule_row(db, "hourly")["next_slot"]
    schedule(db, "hourly", "@hourly")
    row = schedule_row(db, "hourly")
    assert (row["cron"], row["next_slot"]) == ("@hourly", before)


def test_replacing_the_expression_starts_at_the_first_new_slot_after_the_last_one(
    db: Conn,
) -> None:
    schedule(db, "job", "*/5 * * * *")
    start = midnight_after(db)
    run(db, start)  # last_slot = start, ahead of the real clock

    schedule(db, "job", "*/7 * * * *")

    # */7 fires at 0, 7, ..., 56 past each hour; the first after start is start + 7 min.
    assert next_run_at(db, "job") == start + 7 * MINUTE
    assert run(db, start) == 0
    assert run(db, start + 7 * MINUTE) == 1
    assert keys(db, "job") == [key("job", start), key("job", start + 7 * MINUTE)]


def test_replacing_the_time_zone_re_anchors_and_slots_before_the_replacement_never_fire(
    db: Conn,
) -> None:
    schedule(db, "tz", "0 * * * *")
    first = next_run_at(db, "tz")
    schedule(db, "tz", "0 * * * *", timezone="Asia/Kolkata")  # hours at :30 in UTC
    now = db_now(db)
    replaced_first = next_run_at(db, "tz")
    assert replaced_first.minute == 30 and now < replaced_first <= now + HOUR
    assert replaced_first != first


def test_replace_keeps_pause_and_history(db: Conn) -> None:
    schedule(db, "job", "*/5 * * * *")
    first = next_run_at(db, "job")
    run(db, first)
    assert call_value(db, "pause_schedule", name="job") is True

    schedule(db, "job", "*/15 * * * *", payload={"new": True})

    row = view(db, "job")
    assert row is not None
    assert row["paused"] is True and row["last_slot"] == first
    assert row["last_task_id"] == task_by_key(db, key("job", first))["id"]


def test_paused_schedule_fires_nothing_and_shows_no_next_run(db: Conn) -> None:
    schedule(db, "job", "* * * * *")
    assert call_value(db, "pause_schedule", name="job") is True
    assert call_value(db, "pause_schedule", name="job") is True  # already paused: still known
    assert run(db, db_now(db) + 30 * DAY) == 0
    row = view(db, "job")
    assert row is not None and row["paused"] is True and row["next_run_at"] is None


def test_resume_skips_the_slots_the_pause_covered(db: Conn) -> None:
    schedule(db, "job", "* * * * *", catch_up="1 day")
    # As if the schedule had been paused for the last hour (the clock cannot be moved back).
    db.execute(
        "UPDATE ledgerq.task_schedules SET paused = true, next_slot = date_trunc('minute', now()) - interval '1 hour'"
    )
    assert call_value(db, "resume_schedule", name="job") is True
    assert call_value(db, "resume_schedule", name="job") is True  # already active: still known

    now = db_now(db)
    first = next_run_at(db, "job")
    assert now < first <= now + MINUTE
    assert run(db, now) == 0  # none of the paused hour's 60 slots
    assert run(db, first) == 1


def test_unknown_names_answer_false(db: Conn) -> None:
    for function in ("unschedule_task", "pause_schedule", "resume_schedule"):
        assert call_value(db, function, name="nope") is False, function


def test_unschedule_deletes_the_schedule_and_keeps_its_tasks(db: Conn) -> None:
    schedule(db, "job", "* * * * *")
    first = next_run_at(db, "job")
    run(db, first)

    assert call_value(db, "unschedule_task", name="job") is True

    assert view(db, "job") is None
    assert run(db, first + DAY) == 0
    assert keys(db, "job") == [key("job", first)]
    assert call_value(db, "unschedule_task", name="job") is False


def test_slot_at_or_before_last_slot_never_fires_again_once_its_task_is_pruned(db: Conn) -> None:
    schedule(db, "job", "* * * * *")
    first = next_run_at(db, "job")
    run(db, first)
    db.execute("DELETE FROM ledgerq.tasks")  # pruned: the key is free again

    assert run(db, first) == 0
    assert keys(db, "job") == []
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE ledgerq.task_schedules SET next_slot = last_slot")


def test_slot_whose_key_another_task_holds_is_not_enqueued_and_fails_nothing_else(
    db: Conn,
) -> None:
    with db.transaction():  # one now(): both have the same first slot
        schedule(db, "held", "* * * * *")
        schedule(db, "free", "* * * * *")
    slot = next_run_at(db, "held")
    (holder,) = call_rows(
        db,
        "enqueue_task",
        task_type="manual",
        payload={"other": "content"},
        idempotency_key=key("held", slot),
    )

    report = fire(db, slot)

    assert (report["held"]["enqueued"], report["held"]["already_enqueued"]) == (0, 1)
    assert report["free"]["enqueued"] == 1
    row = view(db, "held")
    assert row is not None and (row["last_slot"], row["last_task_id"]) == (slot, holder["id"])
    assert task(db, holder["id"])["task_type"] == "manual"


def test_schedule_created_again_after_unschedule_does_not_repeat_its_old_slots(db: Conn) -> None:
    schedule(db, "job", "* * * * *")
    first = next_run_at(db, "job")
    run(db, first + MINUTE)  # fires first + 1 min, ahead of the clock
    call_value(db, "unschedule_task", name="job")
    schedule(db, "job", "* * * * *")  # a new cursor from now: first + 1 min is due again

    report = fire(db, first + MINUTE)["job"]

    assert (report["enqueued"], report["already_enqueued"]) == (0, 1)
    assert keys(db, "job") == [key("job", first + MINUTE)]


def test_view_shows_an_overdue_slot_as_the_next_run(db: Conn) -> None:
    schedule(db, "job", "0 * * * *")
    db.execute(
        "UPDATE ledgerq.task_schedules SET next_slot = date_trunc('hour', now()) - interval '5 hours'"
    )
    with db.transaction():  # the view and this test read the same now()
        row = db.execute("SELECT now()").fetchone()
        assert row is not None
        now = row[0]
        # Nothing called run_schedules for five hours: the next call fires the latest due slot.
        assert next_run_at(db, "job") == now.replace(minute=0, second=0, microsecond=0)
    assert call_value(db, "schedule_next_slot", name="job", after=now) == (
        now.replace(minute=0, second=0, microsecond=0) + HOUR
    )
    assert call_value(db, "schedule_next_slot", name="nope") is None


# --- DST through run_schedules -----------------------------------------------------------------


def next_transition(after: dt.datetime, tz: str, fall_back: bool) -> dt.datetime:
    """The next instant after `after` where tz's clocks fall back (or spring forward)."""
    zone = ZoneInfo(tz)
    day = after
    for _ in range(800):
        nxt = day + DAY
        before, later = day.astimezone(zone).utcoffset(), nxt.astimezone(zone).utcoffset()
        assert before is not None and later is not None
        if (later < before) if fall_back else (later > before):
            lo, hi = day, nxt
            while hi - lo > MINUTE:
                mid = lo + (hi - lo) / 2
                if mid.astimezone(zone).utcoffset() == before:
                    lo = mid
                else:
                    hi = mid
            return hi.replace(second=0, microsecond=0)
        day = nxt
    raise AssertionError(f"no DST change in {tz} within 800 days")


def wall_clock_slots(
    tz: str, start: dt.datetime, end: dt.datetime, minutes: set[int], hours: set[int] | None = None
) -> list[dt.datetime]:
    """UTC minutes in [start, end] whose wall-clock time matches, counted the first time only."""
    zone = ZoneInfo(tz)
    found = []
    for minute in every(start, end, MINUTE):
        local = minute.astimezone(zone)
        if local.fold == 0 and local.minute in minutes and (hours is None or local.hour in hours):
            found.append(minute)
    return found


@pytest.mark.parametrize(
    ("tz", "fall_back"),
    [
        ("Europe/Berlin", True),
        ("Europe/Berlin", False),
        ("America/New_York", True),
        ("America/New_York", False),
    ],
)
def test_dst_night_fires_missing_times_never_and_repeated_times_once(
    db: Conn, tz: str, fall_back: bool
) -> None:
    change = next_transition(db_now(db) + DAY, tz, fall_back)
    start, end = change - 4 * HOUR, change + 4 * HOUR
    local_hour = (change - MINUTE).astimezone(ZoneInfo(tz)).hour  # the hour before the change
    changed_hour = local_hour if fall_back else local_hour + 1  # repeated, or skipped
    schedule(db, "hourly", "0 * * * *", timezone=tz)
    schedule(db, "half", "*/30 * * * *", timezone=tz)
    schedule(db, "at", f"15 {changed_hour} * * *", timezone=tz)

    for as_of in every(start, end, MINUTE):
        run(db, as_of)

    expected = {
        "hourly": wall_clock_slots(tz, start, end, {0}),
        "half": wall_clock_slots(tz, start, end, {0, 30}),
        "at": wall_clock_slots(tz, start, end, {15}, {changed_hour}),
    }
    for name, slots in expected.items():
        assert keys_since(db, name, start) == [key(name, s) for s in slots], name
    # The model agrees with the rule: nine real hours hold nine hourly slots when the
    # clocks skip an hour, eight when they repeat one; the changed hour's 15 minutes
    # past ran once in the autumn and not at all in the spring.
    zone = ZoneInfo(tz)
    hours = [s.astimezone(zone).hour for s in expected["hourly"]]
    if fall_back:
        assert len(hours) == 8 and hours.count(changed_hour) == 1
        assert len(expected["at"]) == 1
    else:
        assert len(hours) == 9 and changed_hour not in hours
        assert expected["at"] == []


# --- bad input ---------------------------------------------------------------------------------

BAD_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({"name": ""}, "name must be a non-empty string"),
    ({"name": "   "}, "name must be a non-empty string"),
    ({"name": None}, "name must be a non-empty string"),
    ({"name": "x" * 201}, "name must be at most 200 characters"),
    ({"cron": "* * *"}, "cron expression must have 5 fields"),
    ({"cron": "0 25 * * *"}, "cron field 2 (hour): 25 is out of range 0-23"),
    ({"cron": None}, "cron must be a non-empty expression"),
    ({"task_type": ""}, "task_type must be a non-empty string"),
    ({"payload": Jsonb([1, 2])}, "payload must be a JSON object, got array"),
    ({"queue": " "}, "queue must be a non-empty string"),
    ({"priority": 40000}, "priority must be an integer between -32768 and 32767"),
    ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
    ({"timezone": "Mars/Base"}, "unknown time zone 'Mars/Base'"),
    ({"timezone": None}, "timezone must be a time zone name"),
    ({"overlap": None}, "overlap must be true or false"),
    ({"catch_up": "-1 minute"}, "catch_up must be an interval of zero or more"),
    ({"catch_up": "200 years"}, "catch_up must be at most 100 years"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_argument_raises_lq422_naming_it_and_stores_nothing(
    db: Conn, arguments: dict[str, Any], message: str
) -> None:
    call = {"name": "job", "cron": "* * * * *", "task_type": "t", **arguments}
    with raises_sqlstate("LQ422", message):
        call_value(db, "schedule_task", **call)
    assert count(db, "SELECT count(*) FROM ledgerq.task_schedules") == 0


def test_bad_replacement_leaves_the_schedule_as_it_was(db: Conn) -> None:
    schedule(db, "job", "* * * * *")
    before = schedule_row(db, "job")
    with raises_sqlstate("LQ422", "cron field 1 (minute)"):
        schedule(db, "job", "61 * * * *")
    assert schedule_row(db, "job") == before


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
