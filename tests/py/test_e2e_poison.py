"""End to end: a handler's value the ledger cannot store fails its own task, no other.

A real ``ledgerq worker`` process records outcomes in batches; one outcome
PostgreSQL refuses (NaN, a NUL character, an oversized result) must not stop
the worker recording everything else.
"""

from __future__ import annotations

import time

import e2e_helpers as e2e
import pytest

pytestmark = pytest.mark.e2e

HEALTHY = 20


def test_poison_outcomes_go_dead_with_a_reason_and_every_healthy_task_succeeds(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    d.worker(concurrency=8)
    poison = {
        kind: d.enqueue("e2e.poison", {"kind": kind})
        for kind in ("nan", "nul", "raise_nul", "huge")
    }
    healthy = d.enqueue_many(
        [{"task_type": "e2e.record", "payload": {"n": n}} for n in range(HEALTHY)]
    )
    started = time.monotonic()

    d.wait_for(
        lambda: all(d.task(t)["status"] == "SUCCEEDED" for t in healthy),
        f"all {HEALTHY} healthy tasks to succeed",
        timeout_s=10,
    )
    print(f"{HEALTHY} healthy tasks succeeded in {time.monotonic() - started:.2f} s")
    # The ValueError is retried (with backoff) until its attempts run out.
    d.wait_statuses({"SUCCEEDED": HEALTHY, "DEAD": len(poison)}, timeout_s=20)

    for task_id in healthy:
        assert d.task(task_id)["status"] == "SUCCEEDED"
    reasons = {kind: d.task(task_id)["last_error"] for kind, task_id in poison.items()}
    assert reasons["nan"] == (
        "NonRetryable: handler returned a value that is not JSON: it holds NaN or Infinity"
    )
    assert "NUL character" in reasons["nul"], reasons
    # An error text is for people: it is kept, with the NUL made visible.
    assert reasons["raise_nul"].startswith("ValueError: bad\\x00byte"), reasons
    assert d.task(poison["raise_nul"])["attempts"] > 1  # a ValueError is retried
    assert "1000000" in reasons["huge"], reasons
    for kind in ("nan", "nul", "huge"):
        assert d.task(poison[kind])["attempts"] == 1, kind  # the same value every time
    d.assert_logs_clean()
