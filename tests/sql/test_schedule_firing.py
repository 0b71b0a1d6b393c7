"""Which slots a schedule fires: overlap, catch_up, and DST nights through run_schedules."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from zoneinfo import ZoneInfo

import pytest

from .helpers import (
    Conn,
    call_value,
    claimed,
    complete,
    db_now,
)
from .schedule_helpers import (
    DAY,
    HOUR,
    MINUTE,
    every,
    fire,
    key,
    keys,
    keys_since,
    make_due,
    midnight_after,
    next_run_at,
    run,
    schedule,
    task_by_key,
    view,
)

# --- overlap -----------------------------------------------------------------------------------


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
