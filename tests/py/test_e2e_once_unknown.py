"""End to end: ctx.once's crash window is visible. A worker killed after an
effect ran but before it was recorded leaves the effect's start mark; the next
attempt sees it and applies ``on_unknown`` ("run", "skip" or "fail")."""

from __future__ import annotations

import re
import signal

import e2e_helpers as e2e
import pytest

pytestmark = pytest.mark.e2e


def test_an_effect_started_by_a_killed_attempt_meets_the_on_unknown_policy(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    d.reaper()
    victim = d.worker()
    ids = {
        policy: d.enqueue("e2e.once_unknown", {"policy": policy})
        for policy in ("run", "skip", "fail")
    }
    d.wait_for(lambda: len(d.effects_per_task()) == 3, "three effects to happen in attempt 1")

    victim.send(signal.SIGKILL)
    assert victim.wait_exit(5) == -signal.SIGKILL
    survivor = d.worker()
    d.wait_statuses({"SUCCEEDED": 2, "DEAD": 1}, timeout_s=30)

    ran_again = d.task(ids["run"])
    assert (ran_again["attempts"], ran_again["result"]) == (
        2, {"attempt": 2, "effect": {"by_attempt": 2}},
    )  # fmt: skip
    skipped = d.task(ids["skip"])
    assert (skipped["attempts"], skipped["result"]) == (2, {"attempt": 2, "effect": None})
    failed = d.task(ids["fail"])
    assert failed["attempts"] == 2
    assert re.fullmatch(
        rf"NonRetryable: ctx.once\('unknown-{ids['fail']}'\): attempt 1 of task {ids['fail']} "
        r"at \S+ started this effect and was lost before recording it, so it may or may not "
        r"have happened \(on_unknown='fail'\)",
        failed["last_error"].splitlines()[0],
    ), failed["last_error"]
    assert d.effects_per_task() == {ids["run"]: 2, ids["skip"]: 1, ids["fail"]: 1}
    log = survivor.log()
    for policy in ("run", "skip", "fail"):
        assert f"effect.unknown key='unknown-{ids[policy]}'" in log
        assert f"(on_unknown={policy})" in log
    d.assert_logs_clean()
