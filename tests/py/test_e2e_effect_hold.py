"""End to end: a frozen attempt cannot hold an effect's lock for ever.

A worker stopped (SIGSTOP) inside ``once_in_transaction`` keeps its transaction
and the effect key's lock. Its lease expires and the task is retried, but the
retry needs the same key: the handler's transaction is bounded
(idle_in_transaction_session_timeout = the handler's timeout + the lease), so the
server ends the frozen one, its writes roll back, and the retry goes through.
"""

from __future__ import annotations

import signal
import time

import e2e_helpers as e2e
import pytest

pytestmark = pytest.mark.e2e

HANDLER_TIMEOUT_S = 3  # e2e.effect_tx_hold's timeout


def test_a_frozen_attempt_holding_an_effect_lock_is_ended_and_its_retry_succeeds(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    d.reaper()
    frozen = d.worker()
    task_id = d.enqueue("e2e.effect_tx_hold")
    d.wait_run(task_id, 1)
    d.wait_for(
        lambda: d.query_one(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND datname = current_database()"
        ),
        "attempt 1 to sit in its transaction",
    )
    frozen.send(signal.SIGSTOP)
    stopped_at = time.monotonic()
    d.worker()

    bound_s = HANDLER_TIMEOUT_S + e2e.LEASE_S
    d.wait_for(lambda: d.task(task_id)["status"] in ("SUCCEEDED", "DEAD"), "the task to finish", 30)
    took_s = time.monotonic() - stopped_at
    print(
        f"retry through a frozen holder finished {took_s:.1f} s after the freeze (bound {bound_s} s)"
    )
    task = d.task(task_id)
    assert task["status"] == "SUCCEEDED", d.attempts(task_id)
    # The frozen attempt's write rolled back with its transaction: one effect.
    assert d.effects_per_task() == {task_id: 1}
    assert task["result"]["effect"]["by_attempt"] == task["result"]["attempt"] > 1
    assert took_s < bound_s + 10
