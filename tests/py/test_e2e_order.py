"""End to end: due tasks run in the contract's order (README, SQL API): a higher
priority first; among equals the earlier ``run_at``, then the older task.

Real ``ledgerq dispatcher`` (in small batches) and ``ledgerq worker`` processes
with one slot, so the handlers' start order is the order Redis handed the
tasks out in.
"""

from __future__ import annotations

import datetime as dt

import e2e_helpers as e2e
import pytest

pytestmark = pytest.mark.e2e


def _now(d: e2e.Deployment) -> dt.datetime:
    row = d.query_one("SELECT now()")
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _run_order(d: e2e.Deployment) -> list[int]:
    rows = d.query("SELECT task_id FROM e2e_runs ORDER BY started_at, task_id")
    return [int(task_id) for (task_id,) in rows]


def _serve_one_at_a_time(d: e2e.Deployment, count: int) -> list[int]:
    """Once every task waits in Redis, let a one-slot worker run them; their start order."""
    d.wait_statuses({"QUEUED": count}, timeout_s=10)
    d.worker(concurrency=1)
    d.wait_statuses({"SUCCEEDED": count}, timeout_s=20)
    return _run_order(d)


def test_nine_due_tasks_run_by_priority_then_run_at_then_creation(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    base = _now(d)
    # (name, priority, run_at in minutes from now), created in this order.
    spec = [
        ("a", 0, -3), ("b", 0, -9), ("c", 0, -5), ("d", -1, -10), ("e", 0, -9),
        ("f", 0, -1), ("g", 5, -2), ("h", 5, -4), ("i", 0, -7),
    ]  # fmt: skip
    ids = {
        name: d.enqueue(
            "e2e.record",
            {"n": name},
            priority=priority,
            run_at=base + dt.timedelta(minutes=minutes),
        )
        for name, priority, minutes in spec
    }
    d.dispatcher("--batch-size", "2")

    order = _serve_one_at_a_time(d, len(spec))

    names = {task_id: name for name, task_id in ids.items()}
    assert "".join(names[task_id] for task_id in order) == "hgbeicafd"


def test_a_retried_task_does_not_jump_ahead_of_tasks_with_an_older_run_at(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    retried = d.enqueue("e2e.record", {"n": "retried"})
    first_run_at = d.task(retried)["run_at"]
    # Its first attempt fails through the ledger's own calls: PENDING again, due
    # after its backoff, with the oldest id of all.
    claimed = d.query("SELECT id FROM ledgerq.claim_task(%s, 'test', 30)", (retried,))
    assert claimed == [(retried,)]
    status = d.query_one("SELECT ledgerq.complete_task(%s, 1, false, NULL, 'boom')", (retried,))
    assert status == ("PENDING",)
    retry_at = d.task(retried)["run_at"]
    assert retry_at > first_run_at
    # Created after it, due before its retry.
    between = d.enqueue(
        "e2e.record", {"n": "between"}, run_at=first_run_at + (retry_at - first_run_at) / 2
    )
    just_before = d.enqueue(
        "e2e.record", {"n": "just_before"}, run_at=retry_at - dt.timedelta(microseconds=1)
    )
    later = d.enqueue("e2e.record", {"n": "later"}, run_at=retry_at + dt.timedelta(seconds=0.01))
    d.dispatcher("--batch-size", "1")
    d.wait_for(lambda: _now(d) > d.task(later)["run_at"] or None, "every task to be due")

    order = _serve_one_at_a_time(d, 4)

    assert order == [between, just_before, retried, later]
