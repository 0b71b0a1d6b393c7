"""The demo's flow-control part judges limits from attempt intervals: the most
that overlap at one instant, a slot freed and taken at once counted as one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ledgerq.cli.demo import flow

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def spans(*pairs: tuple[float, float]) -> list[tuple[datetime, datetime]]:
    return [(T0 + timedelta(seconds=a), T0 + timedelta(seconds=b)) for a, b in pairs]


def test_most_at_once_counts_overlapping_intervals() -> None:
    assert flow.most_at_once([]) == 0
    assert flow.most_at_once(spans((0, 1))) == 1
    assert flow.most_at_once(spans((0, 2), (1, 3), (1.5, 4))) == 3
    assert flow.most_at_once(spans((0, 1), (2, 3), (4, 5))) == 1
    assert flow.most_at_once(spans((0, 10), (1, 2), (3, 4), (5, 6))) == 2


def test_an_attempt_starting_as_another_ends_is_not_an_overlap() -> None:
    assert flow.most_at_once(spans((0, 1), (1, 2), (2, 3))) == 1
    assert flow.most_at_once(spans((0, 1), (0.999, 2))) == 2
