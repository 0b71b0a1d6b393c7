"""Times the ledger accepts are times every reader can decode: run_at (and a
schedule's as_of) within years 1 to 9999 in UTC, finite, whatever the
session's TimeZone."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from .helpers import Conn, call_rows, call_value, count, raises_sqlstate

FIRST = "0001-01-01 00:00:00+00"
LAST = "9999-12-31 23:59:59.999999+00"
OUTSIDE = [
    "infinity",
    "-infinity",
    "4713-01-01 00:00:00+00 BC",
    "0001-12-31 23:59:59.999999+00 BC",
    "10000-01-01 00:00:00+00",
    "294276-01-01 00:00:00+00",
    "9999-12-31 23:59:59-14",  # year 10000 in UTC
    "0001-01-01 00:00:00+14",  # 1 BC in UTC
]
# Far east, far west, and a zone whose offset in year 1 is local mean time.
ZONES = ["UTC", "Pacific/Kiritimati", "Etc/GMT+12", "Asia/Kathmandu"]


def enqueue_at(conn: Conn, function: str, run_at: str) -> int:
    if function == "enqueue_task":
        (row,) = call_rows(conn, function, task_type="t", run_at=run_at)
    else:
        (row,) = call_rows(conn, function, tasks=Jsonb([{"task_type": "t", "run_at": run_at}]))
    return int(row["id"])


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("function", ["enqueue_task", "enqueue_tasks"])
@pytest.mark.parametrize("run_at", OUTSIDE)
def test_run_at_outside_years_1_to_9999_utc_is_refused_naming_run_at(
    db: Conn, function: str, run_at: str, zone: str
) -> None:
    db.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    with raises_sqlstate("LQ422", "run_at", "years 1 to 9999"):
        enqueue_at(db, function, run_at)
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("function", ["enqueue_task", "enqueue_tasks"])
def test_the_first_and_last_utc_instants_are_stored_and_read_back_in_utc(
    db: Conn, function: str, zone: str
) -> None:
    db.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    ids = [enqueue_at(db, function, FIRST), enqueue_at(db, function, LAST)]
    db.execute("SET TimeZone = 'UTC'")  # what every runtime connection reads in
    rows = db.execute(
        "SELECT run_at FROM ledgerq.tasks WHERE id = ANY(%s) ORDER BY id", (ids,)
    ).fetchall()
    assert [r[0] for r in rows] == [
        dt.datetime(1, 1, 1, tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
    ]


@pytest.mark.parametrize("as_of", ["infinity", "-infinity", "10000-01-01 00:00:00+00"])
def test_run_schedules_refuses_an_as_of_no_task_could_have(db: Conn, as_of: Any) -> None:
    call_rows(db, "schedule_task", name="s", cron="* * * * *", task_type="t")
    with raises_sqlstate("LQ422", "as_of", "years 1 to 9999"):
        call_rows(db, "schedule_fire", as_of=as_of)
    assert count(db, "SELECT count(*) FROM ledgerq.tasks") == 0


@pytest.mark.parametrize("after", ["infinity", "-infinity", "10000-01-01 00:00:00+00"])
def test_schedule_next_slot_refuses_an_after_outside_the_ledgers_years(
    db: Conn, after: Any
) -> None:
    call_rows(db, "schedule_task", name="s", cron="* * * * *", task_type="t")
    with raises_sqlstate("LQ422", "after", "years 1 to 9999"):
        call_value(db, "schedule_next_slot", name="s", after=after)


def test_a_schedule_fired_at_the_end_of_year_9999_has_no_next_slot_and_reads_back(
    db: Conn,
) -> None:
    """The slot after the last minute of year 9999 would be in year 10000, which
    no reader can decode: the ledger says there is none (NULL) instead."""
    call_rows(db, "schedule_task", name="s", cron="* * * * *", task_type="t")
    last_minute = "9999-12-31 23:59:00+00"
    assert call_value(db, "schedule_next_slot", name="s", after=last_minute) is None
    assert call_value(db, "run_schedules", as_of=last_minute) == 1
    (row,) = db.execute(
        "SELECT name, next_run_at, last_slot FROM ledgerq.schedules"
    ).fetchall()  # decodes: nothing outside years 1 to 9999
    assert row == ("s", None, dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.UTC))
