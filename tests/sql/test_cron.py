"""The cron evaluator (sql/functions/cron.sql): parsing, next slots, time zones and DST.

Tables of expressions and instants with hand-checked answers, the DST gaps and
overlaps of Europe/Berlin and America/New_York in both seasons, and every parse
error naming its part. Properties against an independent model are in
test_cron_properties.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from zoneinfo import ZoneInfo

import psycopg
import pytest

from .helpers import Conn, raises_sqlstate


@pytest.fixture(scope="module")
def db(
    database_factory: Callable[..., contextlib.AbstractContextManager[str]],
) -> Iterator[Conn]:
    """One ledger for the module: the evaluator only reads, so its tests can share it."""
    with database_factory() as url, psycopg.connect(url, autocommit=True) as conn:
        yield conn


def at(text: str) -> dt.datetime:
    """An aware instant from ISO 8601 text (a trailing Z means UTC)."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def next_slot(conn: Conn, cron: str, after: dt.datetime, tz: str = "UTC") -> dt.datetime:
    row = conn.execute(
        "SELECT ledgerq.cron_next(spec => ledgerq.cron_parse(cron => %s), tz => %s, after => %s)",
        (cron, tz, after),
    ).fetchone()
    assert row is not None
    return row[0]


def slots(
    conn: Conn, cron: str, after: dt.datetime, until: dt.datetime, tz: str
) -> list[dt.datetime]:
    """Every slot in (after, until], by repeated cron_next."""
    found = []
    current = next_slot(conn, cron, after, tz)
    while current <= until:
        found.append(current)
        current = next_slot(conn, cron, current, tz)
    return found


def spec(conn: Conn, cron: str) -> tuple[int, int, int, int, int, int, bool]:
    row = conn.execute(
        "SELECT (s).every_seconds, (s).minutes, (s).hours, (s).days, (s).months, (s).weekdays,"
        " (s).days_or_weekdays FROM (SELECT ledgerq.cron_parse(cron => %s) AS s) p",
        (cron,),
    ).fetchone()
    assert row is not None
    return row


# --- next slot: a table of expressions and instants ------------------------------------------

NEXT_CASES = [
    # steps, lists, ranges
    ("*/15 * * * *", "UTC", "2026-01-01T10:07:00Z", "2026-01-01T10:15:00Z"),
    ("*/15 * * * *", "UTC", "2026-01-01T10:15:00Z", "2026-01-01T10:30:00Z"),  # strictly after
    ("*/15 * * * *", "UTC", "2026-01-01T10:14:59.999999Z", "2026-01-01T10:15:00Z"),
    ("*/15 * * * *", "UTC", "2026-01-01T23:50:00Z", "2026-01-02T00:00:00Z"),
    ("1-30/5 * * * *", "UTC", "2026-01-01T10:26:00Z", "2026-01-01T11:01:00Z"),
    ("1-30/5 * * * *", "UTC", "2026-01-01T10:02:00Z", "2026-01-01T10:06:00Z"),
    ("5/20 * * * *", "UTC", "2026-01-01T10:46:00Z", "2026-01-01T11:05:00Z"),  # 5, 25, 45
    ("5,10,40 8-9 * * *", "UTC", "2026-01-01T09:40:00Z", "2026-01-02T08:05:00Z"),
    ("0 */6 * * *", "UTC", "2026-01-01T13:00:00Z", "2026-01-01T18:00:00Z"),
    ("59 23 31 12 *", "UTC", "2026-12-31T23:59:00Z", "2027-12-31T23:59:00Z"),
    ("0 0 1 1 *", "UTC", "2026-12-31T23:59:59Z", "2027-01-01T00:00:00Z"),
    # month ends and the 31st in short months
    ("0 0 1 * *", "UTC", "2026-01-31T12:00:00Z", "2026-02-01T00:00:00Z"),
    ("0 0 31 * *", "UTC", "2026-01-31T00:00:00Z", "2026-03-31T00:00:00Z"),
    ("0 0 31 * *", "UTC", "2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"),
    ("0 0 30 * *", "UTC", "2026-01-30T00:00:00Z", "2026-03-30T00:00:00Z"),
    ("0 0 28-31 * *", "UTC", "2026-02-28T00:00:00Z", "2026-03-28T00:00:00Z"),
    ("0 0 31 4,6,7 *", "UTC", "2026-01-01T00:00:00Z", "2026-07-31T00:00:00Z"),
    # leap years: February 29th, and 2100 is not a leap year
    ("0 12 29 2 *", "UTC", "2026-01-01T00:00:00Z", "2028-02-29T12:00:00Z"),
    ("0 12 29 2 *", "UTC", "2028-02-29T12:00:00Z", "2032-02-29T12:00:00Z"),
    ("0 0 29 2 *", "UTC", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),
    ("0 0 * 2 *", "UTC", "2028-02-28T00:00:00Z", "2028-02-29T00:00:00Z"),
    ("0 0 * 2 *", "UTC", "2027-02-28T00:00:00Z", "2028-02-01T00:00:00Z"),
    # day of month OR day of week when both are restricted (Vixie cron)
    ("0 0 13 * FRI", "UTC", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),  # a Friday
    ("0 0 13 * FRI", "UTC", "2026-01-09T00:00:00Z", "2026-01-13T00:00:00Z"),  # a Tuesday
    ("0 0 1 * MON", "UTC", "2026-01-26T00:00:00Z", "2026-02-01T00:00:00Z"),  # a Sunday
    ("0 0 29 2 MON", "UTC", "2026-02-23T00:00:00Z", "2027-02-01T00:00:00Z"),
    # ... and AND when either starts with '*', even with a step
    ("0 0 */2 * MON", "UTC", "2026-01-01T00:00:00Z", "2026-01-05T00:00:00Z"),
    ("0 0 */2 * MON", "UTC", "2026-01-05T00:00:00Z", "2026-01-19T00:00:00Z"),
    ("0 0 13 * */7", "UTC", "2026-01-01T00:00:00Z", "2026-09-13T00:00:00Z"),  # 13th AND Sunday
    ("0 0 * * MON", "UTC", "2026-01-01T00:00:00Z", "2026-01-05T00:00:00Z"),
    # names, in any case, in lists and ranges; 7 is Sunday
    ("0 9 * JAN,jul mon-FRI", "UTC", "2026-01-30T09:00:00Z", "2026-07-01T09:00:00Z"),
    ("0 9 * Feb-Mar Sat", "UTC", "2026-01-01T00:00:00Z", "2026-02-07T09:00:00Z"),
    ("0 0 * * 7", "UTC", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
    ("0 0 * * 0", "UTC", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
    ("0 0 * * 6-7", "UTC", "2026-01-01T00:00:00Z", "2026-01-03T00:00:00Z"),
    # macros
    ("@hourly", "UTC", "2026-01-01T10:30:00Z", "2026-01-01T11:00:00Z"),
    ("@daily", "UTC", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
    ("@midnight", "UTC", "2026-01-01T05:00:00Z", "2026-01-02T00:00:00Z"),
    ("@weekly", "UTC", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
    ("@monthly", "UTC", "2026-01-15T00:00:00Z", "2026-02-01T00:00:00Z"),
    ("@yearly", "UTC", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("@annually", "UTC", "2026-06-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("@DAILY", "UTC", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
    # @every: multiples of the period since the Unix epoch, whatever the time zone
    ("@every 30 seconds", "UTC", "2026-01-01T10:07:10Z", "2026-01-01T10:07:30Z"),
    ("@every 30 seconds", "UTC", "2026-01-01T10:07:30Z", "2026-01-01T10:08:00Z"),
    ("@every 5 minutes", "UTC", "2026-01-01T10:07:00Z", "2026-01-01T10:10:00Z"),
    ("@every 90 seconds", "UTC", "2026-01-01T00:00:00Z", "2026-01-01T00:01:30Z"),
    ("@every 7 seconds", "UTC", "1970-01-01T00:00:00Z", "1970-01-01T00:00:07Z"),
    ("@every 1 hour", "Asia/Kolkata", "2026-01-01T10:07:00Z", "2026-01-01T11:00:00Z"),
    ("@EVERY 1 day", "America/New_York", "2026-01-01T10:07:00Z", "2026-01-02T00:00:00Z"),
    ("@every   2 hours 30 minutes", "UTC", "1970-01-01T02:00:00Z", "1970-01-01T02:30:00Z"),
    # wall-clock time in other zones
    ("0 9 * * *", "Asia/Tokyo", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
    ("0 9 * * *", "Asia/Kolkata", "2026-01-01T00:00:00Z", "2026-01-01T03:30:00Z"),
    ("0 9 * * MON-FRI", "Europe/Berlin", "2026-01-02T08:00:00Z", "2026-01-05T08:00:00Z"),
    ("0 9 * * MON-FRI", "Europe/Berlin", "2026-07-02T08:00:00Z", "2026-07-03T07:00:00Z"),
    ("0 0 1 * *", "America/New_York", "2026-01-31T12:00:00Z", "2026-02-01T05:00:00Z"),
]


@pytest.mark.parametrize(("cron", "tz", "after", "expected"), NEXT_CASES)
def test_cron_next_finds_the_first_slot_strictly_after_the_instant(
    db: Conn, cron: str, tz: str, after: str, expected: str
) -> None:
    assert next_slot(db, cron, at(after), tz) == at(expected)


def test_macros_parse_to_their_five_field_forms(db: Conn) -> None:
    pairs = [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
    ]
    for macro, fields in pairs:
        assert spec(db, macro) == spec(db, fields), macro


def test_parsed_form_holds_one_bit_per_allowed_value(db: Conn) -> None:
    every, minutes, hours, days, months, weekdays, either = spec(db, "0,30 9-17/4 */10 JAN * ")
    assert every == 0
    assert minutes == (1 << 0) | (1 << 30)
    assert hours == (1 << 9) | (1 << 13) | (1 << 17)
    assert days == (1 << 1) | (1 << 11) | (1 << 21) | (1 << 31)
    assert months == 1 << 1
    assert weekdays == 0b1111111
    assert either is False
    assert spec(db, "@every 90 seconds") == (90, 0, 0, 0, 0, 0, False)
    assert spec(db, "0 0 1 * 1-5")[-1] is True  # both day fields restricted: OR


# --- DST: gaps are skipped, repeated wall-clock times run once --------------------------------

# 2026: Berlin springs forward at 01:00Z on March 29 (02:00 CET -> 03:00 CEST) and falls
# back at 01:00Z on October 25 (03:00 CEST -> 02:00 CET); New York springs forward at
# 07:00Z on March 8 (02:00 EST -> 03:00 EDT) and falls back at 06:00Z on November 1
# (02:00 EDT -> 01:00 EST).
DST_CASES = [
    # a wall-clock time in the spring gap does not happen that day
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T01:30:00Z", "2026-03-30T00:30:00Z"),
    ("0 2 * * *", "Europe/Berlin", "2026-03-28T01:00:00Z", "2026-03-30T00:00:00Z"),
    ("30 2 * * *", "America/New_York", "2026-03-07T07:30:00Z", "2026-03-09T06:30:00Z"),
    ("* * * * *", "Europe/Berlin", "2026-03-29T00:59:00Z", "2026-03-29T01:00:00Z"),
    # a repeated wall-clock time runs at its first instant only
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z"),
    ("30 2 * * *", "Europe/Berlin", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"),
    ("30 1 * * *", "America/New_York", "2026-10-31T05:30:00Z", "2026-11-01T05:30:00Z"),
    ("30 1 * * *", "America/New_York", "2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"),
    # from inside the repeated hour (the wall clock reads 02:30 again), the next is 03:00
    ("*/15 * * * *", "Europe/Berlin", "2026-10-25T00:50:00Z", "2026-10-25T02:00:00Z"),
    ("*/15 * * * *", "Europe/Berlin", "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z"),
    ("* * * * *", "America/New_York", "2026-11-01T06:00:00Z", "2026-11-01T07:00:00Z"),
    # @every ignores the clocks
    ("@every 1 hour", "Europe/Berlin", "2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z"),
]


@pytest.mark.parametrize(("cron", "tz", "after", "expected"), DST_CASES)
def test_cron_next_skips_dst_gaps_and_fires_repeated_times_once(
    db: Conn, cron: str, tz: str, after: str, expected: str
) -> None:
    assert next_slot(db, cron, at(after), tz) == at(expected)


def local_hours(found: list[dt.datetime], tz: str) -> list[int]:
    return [slot.astimezone(ZoneInfo(tz)).hour for slot in found]


@pytest.mark.parametrize(
    ("tz", "day_start", "day_end", "missing_hour"),
    [
        ("Europe/Berlin", "2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z", 2),
        ("America/New_York", "2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z", 2),
    ],
)
def test_hourly_schedule_has_23_slots_on_the_spring_forward_day(
    db: Conn, tz: str, day_start: str, day_end: str, missing_hour: int
) -> None:
    # (day_start - 1 s, day_end - 1 s]: the local day, midnight to midnight.
    found = slots(
        db,
        "0 * * * *",
        at(day_start) - dt.timedelta(seconds=1),
        at(day_end) - dt.timedelta(seconds=1),
        tz,
    )
    assert local_hours(found, tz) == [h for h in range(24) if h != missing_hour]
    # In UTC the slots are consecutive hours: the wall clock skipped, time did not.
    assert [b - a for a, b in itertools.pairwise(found)] == [dt.timedelta(hours=1)] * 22


@pytest.mark.parametrize(
    ("tz", "day_start", "day_end", "repeat_utc"),
    [
        # Berlin's 02:00 happens at 00:00Z and again at 01:00Z; New York's 01:00 at 05:00Z and 06:00Z.
        ("Europe/Berlin", "2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z", "2026-10-25T01:00:00Z"),
        (
            "America/New_York",
            "2026-11-01T04:00:00Z",
            "2026-11-02T05:00:00Z",
            "2026-11-01T06:00:00Z",
        ),
    ],
)
def test_hourly_schedule_has_24_slots_on_the_fall_back_day_of_25_hours(
    db: Conn, tz: str, day_start: str, day_end: str, repeat_utc: str
) -> None:
    found = slots(
        db,
        "0 * * * *",
        at(day_start) - dt.timedelta(seconds=1),
        at(day_end) - dt.timedelta(seconds=1),
        tz,
    )
    assert local_hours(found, tz) == list(range(24))
    every_utc_hour = [at(day_start) + dt.timedelta(hours=h) for h in range(25)]
    assert found == [h for h in every_utc_hour if h != at(repeat_utc)]


def test_minutes_of_a_repeated_hour_fire_once_each_at_their_first_instant(db: Conn) -> None:
    found = slots(
        db, "*/15 2 * * *", at("2026-10-24T23:59:00Z"), at("2026-10-26T23:59:00Z"), "Europe/Berlin"
    )
    assert found == [
        at("2026-10-25T00:00:00Z"),  # 02:00 CEST
        at("2026-10-25T00:15:00Z"),
        at("2026-10-25T00:30:00Z"),
        at("2026-10-25T00:45:00Z"),  # and not again from 01:00Z (02:00 CET)
        at("2026-10-26T01:00:00Z"),  # 02:00 CET the next day
        at("2026-10-26T01:15:00Z"),
        at("2026-10-26T01:30:00Z"),
        at("2026-10-26T01:45:00Z"),
    ]


def test_every_schedule_fires_through_the_25_hour_day(db: Conn) -> None:
    found = slots(
        db, "@every 1 hour", at("2026-10-24T21:59:59Z"), at("2026-10-25T22:59:59Z"), "Europe/Berlin"
    )
    assert len(found) == 25


def test_session_time_zone_does_not_change_slots(db: Conn) -> None:
    db.execute("SET TimeZone = 'Pacific/Chatham'")
    try:
        found = [next_slot(db, cron, at(after), tz) for cron, tz, after, _ in DST_CASES]
    finally:
        db.execute("RESET TimeZone")
    assert found == [at(want) for _, _, _, want in DST_CASES]


# --- parse errors: LQ422 naming the part ------------------------------------------------------

BAD_EXPRESSIONS = [
    ("", "cron must be a non-empty expression"),
    ("   ", "cron must be a non-empty expression"),
    ("* * * *", "must have 5 fields (minute hour day-of-month month day-of-week), got 4"),
    ("* * * * * *", "got 6"),
    ("60 * * * *", "cron field 1 (minute): 60 is out of range 0-59"),
    ("0 25 * * *", "cron field 2 (hour): 25 is out of range 0-23"),
    ("0 0 0 * *", "cron field 3 (day-of-month): 0 is out of range 1-31"),
    ("0 0 32 * *", "cron field 3 (day-of-month): 32 is out of range 1-31"),
    ("0 0 * 13 *", "cron field 4 (month): 13 is out of range 1-12"),
    ("0 0 * 0 *", "cron field 4 (month): 0 is out of range 1-12"),
    ("0 0 * * 8", "cron field 5 (day-of-week): 8 is out of range 0-7"),
    ("x * * * *", "cron field 1 (minute): 'x' is not a number"),
    ("0 0 * FOO *", "cron field 4 (month): 'FOO' is not a number or a month name (JAN-DEC)"),
    (
        "0 0 * * FUNDAY",
        "cron field 5 (day-of-week): 'FUNDAY' is not a number or a day name (SUN-SAT)",
    ),
    ("0 MON * * *", "cron field 2 (hour): 'MON' is not a number"),
    ("*/0 * * * *", "cron field 1 (minute): step must be at least 1, got 0"),
    ("*/x * * * *", "cron field 1 (minute): step 'x' is not a positive number"),
    ("*/-1 * * * *", "cron field 1 (minute): step '-1' is not a positive number"),
    ("1/2/3 * * * *", "cron field 1 (minute): '1/2/3' has more than one step"),
    ("30-10 * * * *", "cron field 1 (minute): range '30-10' runs backwards"),
    ("1-2-3 * * * *", "cron field 1 (minute): '1-2-3' is not a range"),
    ("1,,2 * * * *", "cron field 1 (minute): empty item"),
    ("1, * * * *", "cron field 1 (minute): empty item"),
    ("0 *-5 * * *", "cron field 2 (hour): '*-5' is not a value or a range"),
    (
        "0 0 31 2 *",
        "cron field 3 (day-of-month): '31' never occurs in the months of field 4 (month)",
    ),
    ("0 0 30,31 FEB *", "never occurs"),
    ("@reboot", "cron: unknown macro '@reboot'"),
    ("@daily 5", "cron macro @daily takes no arguments"),
    ("@every", "cron @every needs an interval"),
    ("@every fortnight", "cron @every: 'fortnight' is not an interval"),
    ("@every 0 seconds", "cron @every: the interval must be at least 1 second"),
    ("@every -5 minutes", "cron @every: the interval must be at least 1 second"),
    ("@every 1.5 seconds", "cron @every: the interval must be a whole number of seconds"),
    ("@every 1 month", "cron @every: '1 month' has months"),
]


@pytest.mark.parametrize(("cron", "message"), BAD_EXPRESSIONS)
def test_bad_expression_raises_lq422_naming_the_part(db: Conn, cron: str, message: str) -> None:
    with raises_sqlstate("LQ422", message):
        db.execute("SELECT ledgerq.cron_parse(cron => %s)", (cron,))


def test_null_expression_raises_lq422(db: Conn) -> None:
    with raises_sqlstate("LQ422", "cron must be a non-empty expression"):
        db.execute("SELECT ledgerq.cron_parse(cron => NULL)")


@pytest.mark.parametrize(
    ("tz", "problem"),
    [
        ("UTC", None),
        ("Europe/Berlin", None),
        ("america/new_york", None),
        ("Etc/GMT+5", None),
        ("EST5EDT", None),
        ("Mars/Base", "unknown time zone 'Mars/Base'"),
        ("Mars+3", "unknown time zone 'Mars+3'"),
        ("", "timezone must be a time zone name"),
    ],
)
def test_time_zone_check_accepts_known_zones_and_names_unknown_ones(
    db: Conn, tz: str, problem: str | None
) -> None:
    row = db.execute("SELECT ledgerq.cron_timezone_problem(tz => %s)", (tz,)).fetchone()
    assert row is not None
    if problem is None:
        assert row[0] is None
    else:
        assert problem in row[0]
