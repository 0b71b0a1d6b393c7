"""A short soak in CI: a few hundred tasks through real processes while a worker
is killed (-9) and Redis is flushed; nothing is lost, duplicated or stale.
The long version is bench/soak.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import e2e_servers
import pytest
import soak_support

pytestmark = pytest.mark.e2e


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[e2e_servers.PrivateRedis]:
    with e2e_servers.PrivateRedis(tmp_path / "redis") as server:
        yield server


def test_short_soak_with_a_worker_kill_and_a_redis_flush_loses_and_duplicates_nothing(
    tmp_path: Path,
    db_url: str,
    private_redis: e2e_servers.PrivateRedis,
    record_property: pytest.RecordProperty,
) -> None:
    report = soak_support.run_soak(
        tmp_path / "soak", db_url, private_redis, tasks=300, waves=6, kills=2, flushes=2
    )
    print(report.line())
    record_property("soak", report.line())
    assert (report.tasks, report.worker_kills, report.redis_flushes) == (300, 2, 2)
    assert (report.lost, report.duplicated, report.stale) == (0, 0, 0), report.line()
    assert report.succeeded == 300
