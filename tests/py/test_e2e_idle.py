"""End to end: an idle worker is quiet, and picks up the next task at once.

A blocking pop that times out with nothing to take is the normal state of an
idle worker, not a Redis outage: it must log nothing and must not slow the
next pickup with a failure backoff.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import e2e_helpers as e2e
import pytest

pytestmark = pytest.mark.e2e

# Longer than two blocking pops (5 s each) and the 5 s socket timeout redis-py
# applied by default: every idle-time failure shows up within it.
# The figure used 30 s: LEDGERQ_TEST_IDLE_S=30 measures that.
IDLE_S = float(os.environ.get("LEDGERQ_TEST_IDLE_S", "12"))
# NOTIFY → dispatcher → Redis → pop → claim on a busy 2-core machine; the
# failure backoff this guards against added 0.4 to 1.6 s.
PICKUP_MAX_S = 0.35


def test_idle_worker_logs_no_warning_and_picks_up_the_next_task_in_milliseconds(
    deployment: e2e.Deployment, record_property: Callable[[str, object], None]
) -> None:
    d = deployment
    d.dispatcher()
    worker = d.worker()
    worker.wait_log("worker.started")
    warm = d.enqueue("e2e.record", {"n": 0})
    d.wait_for(lambda: d.task(warm)["status"] == "SUCCEEDED", "the warm-up task")

    time.sleep(IDLE_S)  # the idle spell is the subject of the test: nothing to await
    task_id = d.enqueue("e2e.record", {"n": 1})
    d.wait_for(lambda: d.task(task_id)["status"] == "SUCCEEDED", "the task after the idle spell")

    (pickup_s,) = d.query_one(
        "SELECT extract(epoch FROM a.started_at - t.created_at)::float8"
        " FROM ledgerq.tasks t JOIN ledgerq.attempts a ON a.task_id = t.id"
        " WHERE t.id = %s AND a.attempt = 1",
        (task_id,),
    ) or (None,)
    print(f"pickup after {IDLE_S:g} s idle: {pickup_s * 1000:.1f} ms")
    record_property("idle_pickup_s", round(pickup_s, 4))
    log = worker.log()
    assert "WARNING" not in log, log
    assert "unavailable" not in log, log
    assert pickup_s < PICKUP_MAX_S, f"pickup took {pickup_s:.3f} s\n{d.diagnostics()}"
    d.check_alive()
