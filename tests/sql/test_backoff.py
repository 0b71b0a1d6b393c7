"""compute_backoff: exponential, capped, with full jitter when asked (examples).

Properties over many inputs live in test_properties.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from .helpers import Conn, call_value, raises_sqlstate


def backoff(conn: Conn, **arguments: Any) -> dt.timedelta:
    value = call_value(conn, "compute_backoff", **arguments)
    assert isinstance(value, dt.timedelta)
    return value


@pytest.mark.parametrize(
    ("attempt", "seconds"), [(1, 1), (2, 2), (3, 4), (4, 8), (10, 512), (12, 2048), (13, 3600)]
)
def test_compute_backoff_without_jitter_doubles_from_one_second_up_to_an_hour(
    db: Conn, attempt: int, seconds: int
) -> None:
    assert backoff(db, attempt=attempt, jitter=False) == dt.timedelta(seconds=seconds)


def test_compute_backoff_scales_with_base_and_caps_at_max(db: Conn) -> None:
    assert backoff(db, attempt=3, base_seconds=0.5, jitter=False) == dt.timedelta(seconds=2)
    assert backoff(db, attempt=5, base_seconds=10, max_seconds=60, jitter=False) == dt.timedelta(
        seconds=60
    )
    assert backoff(db, attempt=1, base_seconds=0, jitter=False) == dt.timedelta(0)
    assert backoff(db, attempt=4, max_seconds=0, jitter=False) == dt.timedelta(0)


def test_compute_backoff_of_huge_attempt_number_is_the_cap(db: Conn) -> None:
    assert backoff(db, attempt=2_147_483_647, jitter=False) == dt.timedelta(hours=1)
    assert dt.timedelta(0) <= backoff(db, attempt=2_147_483_647) <= dt.timedelta(hours=1)


def test_compute_backoff_jitter_is_on_by_default_and_spreads_delays(db: Conn) -> None:
    delays = {backoff(db, attempt=10) for _ in range(20)}
    # 20 uniform draws from [0, 512] s: all equal would mean no jitter.
    assert len(delays) > 1
    assert all(dt.timedelta(0) <= d <= dt.timedelta(seconds=512) for d in delays)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"attempt": 0}, "attempt"),
        ({"attempt": -3}, "attempt"),
        ({"attempt": None}, "attempt"),
        ({"attempt": 1, "base_seconds": -1.0}, "base_seconds"),
        ({"attempt": 1, "base_seconds": None}, "base_seconds"),
        ({"attempt": 1, "max_seconds": -0.5}, "max_seconds"),
        ({"attempt": 1, "max_seconds": None}, "max_seconds"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_compute_backoff_rejects_bad_argument_with_lq422_naming_it(
    db: Conn, arguments: dict[str, Any], field: str
) -> None:
    with raises_sqlstate("LQ422", field):
        backoff(db, **arguments)


@pytest.mark.parametrize("max_seconds", [1e20, float("inf")], ids=["1e20", "infinity"])
def test_compute_backoff_with_a_cap_beyond_intervals_never_goes_negative(
    db: Conn, max_seconds: float
) -> None:
    # A huge cap (or 'Infinity', meaning none) used to overflow make_interval
    # into a negative delay, i.e. a retry due at once.
    delay = backoff(db, attempt=80, max_seconds=max_seconds, jitter=False)
    assert delay >= dt.timedelta(days=365 * 99)
    assert dt.timedelta(0) <= backoff(db, attempt=80, max_seconds=max_seconds)
    assert backoff(db, attempt=3, max_seconds=max_seconds, jitter=False) == dt.timedelta(seconds=4)


def test_compute_backoff_with_a_large_base_is_the_cap_not_an_overflow(db: Conn) -> None:
    assert backoff(db, attempt=2000, base_seconds=1e9, jitter=False) == dt.timedelta(hours=1)
    assert backoff(
        db, attempt=2000, base_seconds=1e300, max_seconds=60, jitter=False
    ) == dt.timedelta(minutes=1)
