"""End to end: a schedule fired by real ``ledgerq dispatcher`` processes, one of
them killed with SIGKILL and started again, and then two at once. Every slot of
the window has exactly one task: none lost to the kill, none doubled by the
restart or by the second dispatcher."""

from __future__ import annotations

import itertools
import signal
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import e2e_helpers as e2e
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

SCHEDULE = "tick"


def slots_fired(d: e2e.Deployment) -> list[tuple[datetime, str]]:
    """(run_at, idempotency key) of every task, in run_at order."""
    return [
        (run_at, key)
        for run_at, key in d.query(
            "SELECT run_at, idempotency_key FROM ledgerq.tasks ORDER BY run_at, id"
        )
    ]


def fired_count(d: e2e.Deployment) -> int:
    row = d.query_one("SELECT count(*) FROM ledgerq.tasks")
    assert row is not None
    return int(row[0])


def enqueued_metric(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0  # not serving yet
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ledgerq_schedule_slots_total" and sample.labels == {
                "schedule": SCHEDULE,
                "outcome": "enqueued",
            }:
                return sample.value
    return 0.0


def test_a_dispatcher_killed_and_restarted_neither_loses_nor_doubles_a_slot(
    tmp_path: Path, db_url: str, redis_url: str, redis_prefix: str
) -> None:
    with e2e.Deployment(tmp_path, db_url, redis_url, redis_prefix) as d:
        d.create_tables()
        # catch_up covers the downtime: the slots missed while no dispatcher ran
        # are fired late, each once, when one is back.
        d.query(
            "SELECT ledgerq.schedule_task(name => %s, cron => '@every 1 seconds',"
            " task_type => 'e2e.record', catch_up => '1 minute')",
            (SCHEDULE,),
        )
        first = d.dispatcher()
        d.wait_for(lambda: fired_count(d) >= 3, "three slots fired")
        first.send(signal.SIGKILL)
        first.wait_exit(10)
        killed_at = fired_count(d)
        # Down long enough for slots to be missed: three or more due, unfired.
        d.wait_for(
            lambda: (
                d.query_one(
                    "SELECT now() - next_slot > interval '2.5 seconds' FROM ledgerq.task_schedules"
                )
                == (True,)
            ),
            "three slots due with no dispatcher running",
        )

        port = e2e.free_port()
        d.dispatcher("--metrics-port", str(port))
        d.wait_for(lambda: fired_count(d) >= killed_at + 3, "three more slots fired")
        # The restarted dispatcher counted the slots it enqueued.
        d.wait_for(lambda: enqueued_metric(port) >= 3, "the slots in its metrics")
        d.dispatcher()  # a second one at the same time
        d.wait_for(lambda: fired_count(d) >= killed_at + 6, "three more slots, two dispatchers")
        for proc in d.procs:
            if proc.alive():
                proc.send(signal.SIGKILL)
                proc.wait_exit(10)

        fired = slots_fired(d)
        run_ats = [run_at for run_at, _ in fired]
        keys = [key for _, key in fired]
        assert len(set(keys)) == len(keys), d.diagnostics()
        assert all(key.startswith(f"schedule:{SCHEDULE}:") for key in keys)
        # One task per second from the first slot to the last: no gap, no double.
        steps = {b - a for a, b in itertools.pairwise(run_ats)}
        assert steps == {timedelta(seconds=1)}, (run_ats, d.diagnostics())
        last = d.query_one("SELECT last_slot FROM ledgerq.schedules WHERE name = %s", (SCHEDULE,))
        assert last == (run_ats[-1],)
        d.assert_logs_clean()
