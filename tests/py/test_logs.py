"""Operable logs: one line per task outcome with id, type, queue, attempt and
duration; handler lines that carry the task id and attempt; text or JSON;
levels in any case, from the option or LEDGERQ_LOG_LEVEL."""

from __future__ import annotations

import json
import logging
from typing import Any

import e2e_helpers as e2e
import helpers
import pytest

from ledgerq import Context, Registry, config, errors, logs


def lines(caplog: pytest.LogCaptureFixture, prefix: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(prefix)]


async def test_each_outcome_is_one_line_with_id_type_queue_attempt_and_duration(
    settings: config.Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tasks = Registry()

    @tasks.task("ok", queue="q1")
    async def ok(ctx: Context, payload: dict[str, Any]) -> None:
        ctx.logger.info("charging %s", payload["who"])

    @tasks.task("flaky", queue="q1", max_attempts=2)
    async def flaky(ctx: Context, payload: dict[str, Any]) -> None:
        raise ValueError(f"bad attempt {ctx.attempt}")

    async with helpers.running(settings, tasks, queues=["q1"]) as s:
        good = await s.enqueue("ok", {"who": "ada"})
        bad = await s.enqueue("flaky")
        await helpers.wait_for_status(s.ledger, good, "SUCCEEDED")
        await helpers.wait_for_status(s.ledger, bad, "DEAD", deadline_s=15)

    (succeeded,) = lines(caplog, f"task.succeeded id={good} ")
    assert succeeded.getMessage().startswith(
        f"task.succeeded id={good} type=ok queue=q1 attempt=1 duration="
    )
    assert (succeeded.levelno, succeeded.task_id, succeeded.queue) == (logging.INFO, good, "q1")  # type: ignore[attr-defined]
    (retried,) = lines(caplog, f"task.retried id={bad} ")
    assert (
        "attempt=1" in retried.getMessage()
        and "error=ValueError: bad attempt 1" in retried.getMessage()
    )
    assert retried.levelno == logging.WARNING
    (dead,) = lines(caplog, f"task.dead id={bad} ")
    assert (
        "attempt=2" in dead.getMessage() and "error=ValueError: bad attempt 2" in dead.getMessage()
    )
    assert dead.levelno == logging.ERROR
    assert not [r for r in caplog.records if "retryable=True" in r.getMessage()]
    (handler_line,) = [r for r in caplog.records if r.name == "ledgerq.task.ok"]
    assert handler_line.getMessage() == f"id={good} attempt=1 charging ada"
    assert (handler_line.task_id, handler_line.attempt) == (good, 1)  # type: ignore[attr-defined]


def test_levels_are_case_insensitive_and_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert logs.level_name("debug") == "DEBUG"
    monkeypatch.setenv("LEDGERQ_LOG_LEVEL", "warn")
    assert logs.level_name() == "WARNING"
    assert logs.level_name("Error") == "ERROR"
    with pytest.raises(errors.ConfigError, match="log level must be one of"):
        logs.level_name("loud")
    monkeypatch.setenv("LEDGERQ_LOG_FORMAT", "JSON")
    assert logs.format_name() == "json"
    with pytest.raises(errors.ConfigError, match="text or json"):
        logs.format_name("xml")


def test_json_lines_carry_the_fields_of_the_record() -> None:
    record = logging.LogRecord(
        "ledgerq.worker", logging.INFO, __file__, 1, "task.succeeded %s", ("x",), None
    )
    record.task_id = 7
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "task.succeeded x"
    assert (line["level"], line["logger"], line["task_id"]) == ("INFO", "ledgerq.worker", 7)
    assert line["time"].endswith("+00:00")


@pytest.mark.e2e
def test_worker_process_logs_json_at_a_lower_case_level(deployment: e2e.Deployment) -> None:
    d = deployment
    d.dispatcher()
    worker = d.worker("--log-format", "json", "--log-level", "debug")
    task_id = d.enqueue("e2e.record", {"n": 1})
    d.wait_for(lambda: d.task(task_id)["status"] == "SUCCEEDED", "the task to succeed")
    worker.wait_log("task.succeeded")
    parsed = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    (done,) = [p for p in parsed if p["message"].startswith("task.succeeded")]
    assert (done["task_id"], done["task_type"], done["queue"], done["attempt"]) == (
        task_id, "e2e.record", "default", 1,
    )  # fmt: skip
    assert done["duration_s"] >= 0
    assert any(p["level"] == "DEBUG" for p in parsed)


@pytest.mark.e2e
def test_worker_process_takes_its_level_from_ledgerq_log_level(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.extra_env["LEDGERQ_LOG_LEVEL"] = "warning"
    d.dispatcher()
    worker = d.worker()
    task_id = d.enqueue("e2e.record", {"n": 1})
    d.wait_for(lambda: d.task(task_id)["status"] == "SUCCEEDED", "the task to succeed")
    worker.send(e2e.signal.SIGTERM)
    assert worker.wait_exit(15) == 0
    assert "INFO" not in worker.log(), worker.log()
