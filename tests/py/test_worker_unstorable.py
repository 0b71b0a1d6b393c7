"""Outcomes the ledger refuses: the worker records them one by one, so one
refused outcome fails its own task as non-retryable and every other is kept.

The worker checks results before sending them (storable.py); these tests turn
that check off to prove the ledger-side safety net on its own, with the real
PostgreSQL refusing the value.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import helpers
import pytest

from ledgerq import Context, Registry, config, storable, worker
from ledgerq.types import JsonValue, Outcome, TaskId


def _lenient(value: Any) -> JsonValue:
    loaded: JsonValue = json.loads(json.dumps(value))  # lets NaN and NUL through
    return loaded


async def test_an_outcome_the_ledger_refuses_fails_alone_and_the_batch_is_recorded(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storable, "result", _lenient)
    tasks = Registry()
    gate = asyncio.Event()

    @tasks.task("poison", max_attempts=5)
    async def poison(ctx: Context, payload: dict[str, Any]) -> Any:
        await gate.wait()
        return {"x": float("nan")} if payload["kind"] == "nan" else {"s": "a\x00b"}

    @tasks.task("fine")
    async def fine(ctx: Context, payload: dict[str, Any]) -> Any:
        await gate.wait()
        return {"n": payload["n"]}

    async with helpers.running(settings, tasks, concurrency=12) as s:
        bad = [await s.enqueue("poison", {"kind": kind}) for kind in ("nan", "nul")]
        good = [await s.enqueue("fine", {"n": n}) for n in range(10)]
        worker_ = s.worker
        assert worker_ is not None

        async def all_running() -> bool:
            return len(worker_._running) == 12

        await helpers.eventually(all_running, what="12 handlers running")
        gate.set()  # every outcome lands in one batch
        done = [await helpers.wait_for_status(s.ledger, t, "SUCCEEDED") for t in good]
        dead = [await helpers.wait_for_status(s.ledger, t, "DEAD") for t in bad]
    assert [t.result for t in done] == [{"n": n} for n in range(10)]
    for task in dead:
        assert task.attempts == 1
        assert task.last_error is not None
        assert task.last_error.startswith("the ledger cannot store this attempt's result: ")
    assert "json" in (dead[0].last_error or "").lower()
    assert "Unicode escape" in (dead[1].last_error or "")


def test_a_refused_outcome_is_replaced_by_a_bounded_non_retryable_failure() -> None:
    outcome = Outcome(TaskId(7), 2, succeeded=True, result={"x": 1})
    refused = worker._refused(outcome, "bad\x00" + "y" * 20_000)
    assert (refused.task_id, refused.attempt, refused.succeeded) == (7, 2, False)
    assert refused.retryable is False
    assert refused.error is not None and "\x00" not in refused.error
    assert len(refused.error) <= storable.ERROR_TEXT_MAX + 5
