"""Schedules (sql/functions/schedule.sql): the SQL API, firing, replace, pause, resume.

The contract's signatures and view; a due slot becoming one task with its key and
run_at; replace, pause, resume and unschedule with the slots each one fires or
skips; keys held by other tasks; the view's next run; bad input. Overlap, catch_up
and DST are in test_schedule_firing.py, many callers at once in
test_schedule_concurrency.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from .helpers import (
    Conn,
    call_rows,
    call_value,
    count,
    db_now,
    raises_sqlstate,
    task,
)
from .schedule_helpers import (
    DAY,
    HOUR,
    MINUTE,
    UTC,
    fire,
    key,
    keys,
    midnight_after,
    next_run_at,
    run,
    schedule,
    schedule_row,
    task_by_key,
    view,
)

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


# --- replace, pause, resume, unschedule --------------------------------------------------------


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
