"""Hypothesis properties of the cron evaluator, against an independent Python model.

Random expressions (lists, ranges, steps, names, both day rules) in zones with odd
offsets and DST changes, at instants drawn near those changes: the next slot is
after the instant, is a slot (its wall-clock time matches and is seen for the first
time), equals the model's next slot, and no slot lies strictly between (checked
minute by minute where the gap is at most three days). The parse itself is checked
bit by bit against the values each field allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Iterator
from zoneinfo import ZoneInfo

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import Conn

UTC = dt.UTC


@pytest.fixture(scope="module")
def db(
    database_factory: Callable[..., contextlib.AbstractContextManager[str]],
) -> Iterator[Conn]:
    """One ledger for the module: the evaluator only reads, so its tests can share it."""
    with database_factory() as url, psycopg.connect(url, autocommit=True) as conn:
        yield conn


def next_slot(conn: Conn, cron: str, after: dt.datetime, tz: str = "UTC") -> dt.datetime:
    row = conn.execute(
        "SELECT ledgerq.cron_next(spec => ledgerq.cron_parse(cron => %s), tz => %s, after => %s)",
        (cron, tz, after),
    ).fetchone()
    assert row is not None
    return row[0]


def spec(conn: Conn, cron: str) -> tuple[int, int, int, int, int, int, bool]:
    row = conn.execute(
        "SELECT (s).every_seconds, (s).minutes, (s).hours, (s).days, (s).months, (s).weekdays,"
        " (s).days_or_weekdays FROM (SELECT ledgerq.cron_parse(cron => %s) AS s) p",
        (cron,),
    ).fetchone()
    assert row is not None
    return row


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
