"""The cron evaluator (sql/functions/cron.sql): parsing, next slots, time zones and DST.

Tables of expressions and instants with hand-checked answers, the DST gaps and
overlaps of Europe/Berlin and America/New_York in both seasons, every parse error
naming its part, and Hypothesis properties against an independent Python model:
the next slot is after the instant, is a slot, and no slot lies strictly between
(checked minute by minute where the gap is bounded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
from collections.abc import Callable, Iterator
from zoneinfo import ZoneInfo

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import Conn, raises_sqlstate

UTC = dt.UTC


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


# --- Hypothesis: next slots against an independent model --------------------------------------

FIELD_LIMITS = {
    "minute": (0, 59),
    "hour": (0, 23),
    "day": (1, 31),
    "month": (1, 12),
    "weekday": (0, 7),
}
MONTH_NAMES = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAY_NAMES = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",  # +05:30
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "America/Sao_Paulo",  # DST until 2019, with the clock jumping over midnight
]


@dataclasses.dataclass(frozen=True)
class Field:
    """One generated field: its text and the values it allows."""

    text: str
    values: frozenset[int]
    starred: bool  # begins with '*': Vixie cron's "unrestricted" for the day rule


@dataclasses.dataclass(frozen=True)
class Expression:
    minute: Field
    hour: Field
    day: Field
    month: Field
    weekday: Field

    @property
    def text(self) -> str:
        fields = (self.minute, self.hour, self.day, self.month, self.weekday)
        return " ".join(f.text for f in fields)

    def day_matches(self, day: dt.date) -> bool:
        if day.month not in self.month.values:
            return False
        in_days = day.day in self.day.values
        in_weekdays = (day.isoweekday() % 7) in self.weekday.values
        if not self.day.starred and not self.weekday.starred:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def matches(self, local: dt.datetime) -> bool:
        return (
            self.day_matches(local.date())
            and local.hour in self.hour.values
            and local.minute in self.minute.values
        )


def render(value: int, kind: str, draw: st.DrawFn) -> str:
    if kind == "month" and draw(st.booleans()):
        name = MONTH_NAMES[value - 1]
    elif kind == "weekday" and value < 7 and draw(st.booleans()):
        name = DAY_NAMES[value]
    else:
        return str(value)
    return draw(st.sampled_from([name, name.lower(), name.title()]))


@st.composite
def field_items(draw: st.DrawFn, kind: str) -> Field:
    lo, hi = FIELD_LIMITS[kind]
    star_hi = 6 if kind == "weekday" else hi
    texts: list[str] = []
    values: set[int] = set()
    for position in range(draw(st.integers(1, 3))):
        shape = draw(
            st.sampled_from(["star", "star_step", "value", "range", "range_step", "from_step"])
        )
        if shape in ("star", "star_step") and position > 0:
            shape = "value"
        if shape == "star":
            texts.append("*")
            values.update(range(lo, star_hi + 1))
        elif shape == "star_step":
            step = draw(st.integers(1, max(1, hi - lo)))
            texts.append(f"*/{step}")
            values.update(range(lo, star_hi + 1, step))
        elif shape == "value":
            v = draw(st.integers(lo, hi))
            texts.append(render(v, kind, draw))
            values.add(v)
        else:
            a = draw(st.integers(lo, hi))
            b = hi if shape == "from_step" else draw(st.integers(a, hi))
            step = draw(st.integers(1, max(1, hi - lo))) if shape != "range" else 1
            base = (
                render(a, kind, draw)
                if shape == "from_step"
                else f"{render(a, kind, draw)}-{render(b, kind, draw)}"
            )
            texts.append(base if shape == "range" else f"{base}/{step}")
            values.update(range(a, b + 1, step))
    if kind == "weekday" and 7 in values:
        values = (values - {7}) | {0}
    return Field(",".join(texts), frozenset(values), texts[0].startswith("*"))


def possible(expr: Expression) -> bool:
    """Whether the day rule can ever match (cron_parse refuses the ones that cannot)."""
    if not expr.day.starred and not expr.weekday.starred:
        return True
    longest = {2: 29, 4: 30, 6: 30, 9: 30, 11: 30}
    return any(d <= longest.get(m, 31) for m in expr.month.values for d in expr.day.values)


expressions = st.builds(
    Expression,
    minute=field_items("minute"),
    hour=field_items("hour"),
    day=field_items("day"),
    month=field_items("month"),
    weekday=field_items("weekday"),
).filter(possible)


@functools.cache
def transitions(tz: str) -> tuple[dt.datetime, ...]:
    """The instants (to the minute) where the zone's UTC offset changed, 2014-2030."""
    zone = ZoneInfo(tz)
    found = []
    day = dt.datetime(2014, 1, 1, tzinfo=UTC)
    while day.year < 2031:
        nxt = day + dt.timedelta(days=1)
        if day.astimezone(zone).utcoffset() != nxt.astimezone(zone).utcoffset():
            lo, hi = day, nxt
            while hi - lo > dt.timedelta(minutes=1):
                mid = lo + (hi - lo) / 2
                if mid.astimezone(zone).utcoffset() == lo.astimezone(zone).utcoffset():
                    lo = mid
                else:
                    hi = mid
            found.append(hi)
        day = nxt
    return tuple(found)


@st.composite
def instants(draw: st.DrawFn, tz: str) -> dt.datetime:
    """An instant from 2015-2029, often within hours of a DST change of tz."""
    changes = transitions(tz)
    if changes and draw(st.booleans()):
        base = draw(st.sampled_from(changes))
        offset_s = draw(st.integers(-6 * 3600, 6 * 3600))
    else:
        base = dt.datetime(2015, 1, 1, tzinfo=UTC)
        offset_s = draw(st.integers(0, 15 * 365 * 86400))
    micro = draw(st.sampled_from([0, 0, 0, draw(st.integers(0, 999_999))]))
    return base + dt.timedelta(seconds=offset_s, microseconds=micro)


def first_instant(local: dt.datetime, zone: ZoneInfo) -> dt.datetime | None:
    """When a wall-clock time first happens in zone, or None if it never does."""
    instant = local.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) != local:
        return None
    return instant


def model_next(expr: Expression, tz: str, after: dt.datetime) -> dt.datetime:
    """The next slot by brute iteration over local days, hours and minutes."""
    zone = ZoneInfo(tz)
    earliest = after.astimezone(zone).replace(tzinfo=None) - dt.timedelta(hours=4)
    day = earliest.date()
    for _ in range(366 * 40):
        if expr.day_matches(day):
            for hour in sorted(expr.hour.values):
                for minute in sorted(expr.minute.values):
                    local = dt.datetime.combine(day, dt.time(hour, minute))
                    if local < earliest:
                        continue
                    instant = first_instant(local, zone)
                    if instant is not None and instant > after:
                        return instant
        day += dt.timedelta(days=1)
    raise AssertionError(f"model found no slot for {expr.text!r} after {after}")


def is_slot(expr: Expression, zone: ZoneInfo, instant: dt.datetime) -> bool:
    """A whole UTC minute is a slot if its wall-clock time matches, seen for the first time."""
    local = instant.astimezone(zone)
    return instant.second == 0 and local.fold == 0 and expr.matches(local.replace(tzinfo=None))


def minutes_between(after: dt.datetime, before: dt.datetime) -> Iterator[dt.datetime]:
    """Whole UTC minutes strictly between two instants."""
    minute = after.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    while minute < before:
        yield minute
        minute += dt.timedelta(minutes=1)


PROPERTIES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BRUTE_FORCE_LIMIT = dt.timedelta(days=3)


@PROPERTIES
@given(data=st.data())
def test_next_slot_is_after_the_instant_is_a_slot_and_nothing_lies_between(
    db: Conn, data: st.DataObject
) -> None:
    expr = data.draw(expressions, label="expression")
    tz = data.draw(st.sampled_from(ZONES), label="tz")
    afters = data.draw(st.lists(instants(tz), min_size=1, max_size=6), label="afters")
    zone = ZoneInfo(tz)

    rows = db.execute(
        "SELECT ledgerq.cron_next(spec => p.spec, tz => %s, after => a.after)"
        " FROM (SELECT ledgerq.cron_parse(cron => %s) AS spec) p,"
        " unnest(%s::timestamptz[]) WITH ORDINALITY AS a(after, ord) ORDER BY a.ord",
        (tz, expr.text, afters),
    ).fetchall()

    for after, (found,) in zip(afters, rows, strict=True):
        assert found > after
        assert is_slot(expr, zone, found), f"{found} is no slot of {expr.text!r} in {tz}"
        assert found == model_next(expr, tz, after), f"{expr.text!r} in {tz} after {after}"
        if found - after <= BRUTE_FORCE_LIMIT:
            between = [m for m in minutes_between(after, found) if is_slot(expr, zone, m)]
            assert between == [], f"slots of {expr.text!r} in {tz} skipped: {between[:3]}"


@PROPERTIES
@given(expr=expressions)
def test_parsed_bitmasks_equal_the_values_each_field_allows(db: Conn, expr: Expression) -> None:
    def mask(values: frozenset[int]) -> int:
        return sum(1 << v for v in values)

    assert spec(db, expr.text) == (
        0,
        mask(expr.minute.values),
        mask(expr.hour.values),
        mask(expr.day.values),
        mask(expr.month.values),
        mask(expr.weekday.values),
        not expr.day.starred and not expr.weekday.starred,
    )


@PROPERTIES
@given(
    period_s=st.integers(1, 3 * 86400),
    after=st.datetimes(
        min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
def test_every_slots_are_the_next_multiple_of_the_period_since_the_epoch(
    db: Conn, period_s: int, after: dt.datetime
) -> None:
    found = next_slot(db, f"@every {period_s} seconds", after, "Europe/Berlin")
    epoch = dt.datetime(1970, 1, 1, tzinfo=UTC)
    elapsed = found - epoch
    assert elapsed.microseconds == 0 and int(elapsed.total_seconds()) % period_s == 0
    assert after < found <= after + dt.timedelta(seconds=period_s)
