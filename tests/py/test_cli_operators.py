"""The operator commands: enqueue, show, stats, dead, cancel (cli/operators.py).

They run in-process through click's runner against a fresh database and Redis
prefix, and are checked against what the ledger then holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from typing import Any

import cli_support
import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledgerq import config
from ledgerq.cli import operators
from ledgerq.dispatch import Dispatch
from ledgerq.types import DueTask, TaskId

Conn = psycopg.Connection[Any]


# --- making tasks in the states a test needs (through the SQL functions) ------------


def enqueue(db: Conn, task_type: str = "t", **fields: Any) -> int:
    payload = fields.pop("payload", {})
    row = db.execute(
        "SELECT id FROM ledgerq.enqueue_task(task_type => %s, payload => %s, queue => %s, "
        "max_attempts => %s)",
        (task_type, Jsonb(payload), fields.get("queue", "default"), fields.get("max_attempts", 5)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def claim(db: Conn, task_id: int, worker: str = "w1") -> int:
    row = db.execute(
        "SELECT attempts FROM ledgerq.claim_task(%s, %s, 30)", (task_id, worker)
    ).fetchone()
    assert row is not None, f"task {task_id} not claimable"
    return int(row[0])


def complete(
    db: Conn, task_id: int, attempt: int, *, error: str | None = None, retryable: bool = True
) -> str:
    row = db.execute(
        "SELECT ledgerq.complete_task(task_id => %s, attempt => %s, succeeded => %s, "
        "result => %s, error => %s, retryable => %s)",
        (
            task_id,
            attempt,
            error is None,
            Jsonb({"ok": True}) if error is None else None,
            error,
            retryable,
        ),
    ).fetchone()
    assert row is not None
    return str(row[0])


def make_dead(
    db: Conn, queue: str = "default", error: str = "ValueError: boom\n  at line 1"
) -> int:
    task_id = enqueue(db, "report.build", queue=queue)
    assert complete(db, task_id, claim(db, task_id), error=error, retryable=False) == "DEAD"
    return task_id


def status_of(db: Conn, task_id: int) -> str:
    row = db.execute("SELECT status FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0])


# --- enqueue ---------------------------------------------------------------------------------


def test_enqueue_prints_the_new_task_and_a_replayed_key_returns_it(
    settings: config.Settings, db: Conn
) -> None:
    first = cli_support.invoke(
        ["enqueue", "email.send", '{"to": "a@b.c"}', "--idempotency-key", "welcome-1"], settings
    )
    assert first.exit_code == 0, first.output
    # Due at once: the client handed it off to Redis.
    assert first.stdout.startswith("task 1 created: email.send on queue default, QUEUED")

    again = cli_support.invoke(
        ["enqueue", "email.send", '{"to": "a@b.c"}', "--idempotency-key", "welcome-1", "--json"],
        settings,
    )
    assert again.exit_code == 0, again.output
    body = json.loads(again.stdout)
    assert (body["id"], body["created"], body["status"]) == (1, False, "QUEUED")
    assert body["payload"] == {"to": "a@b.c"}
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (1,)


def test_enqueue_options_reach_the_ledger(settings: config.Settings, db: Conn) -> None:
    result = cli_support.invoke(
        ["enqueue", "report.build", "--queue", "reports", "--priority", "7", "--delay", "60",
         "--max-attempts", "2", "--json"],
        settings,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["queue"], body["priority"], body["max_attempts"], body["created"]) == (
        "reports", 7, 2, True,
    )  # fmt: skip
    row = db.execute(
        "SELECT payload, extract(epoch FROM run_at - created_at) FROM ledgerq.tasks WHERE id = %s",
        (body["id"],),
    ).fetchone()
    assert row is not None and row[0] == {}
    assert 55 < float(row[1]) < 65


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ("{bad", "PAYLOAD_JSON is not valid JSON"),
        ("[1, 2]", "PAYLOAD_JSON must be a JSON object, got array"),
        ('"text"', "PAYLOAD_JSON must be a JSON object, got str"),
        ("null", "PAYLOAD_JSON must be a JSON object, got null"),
    ],
)
def test_enqueue_bad_payload_is_one_line_and_exit_2(
    settings: config.Settings, db: Conn, payload: str, needle: str
) -> None:
    cli_support.assert_one_line_failure(
        cli_support.invoke(["enqueue", "t", payload], settings), 2, needle
    )
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (0,)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["enqueue", "t", "--priority", "high"], "Invalid value for '--priority'"),
        (["enqueue", "t", "--max-attempts", "0"], "Invalid value for '--max-attempts'"),
        (["enqueue", "t", "--delay", "-1"], "Invalid value for '--delay'"),
        (["enqueue"], "Missing argument 'TYPE'"),
        (["show", "abc"], "Invalid value for 'ID'"),
        (["dead", "--retry", "1", "--retry-all"], "give --retry ID or --retry-all, not both"),
        (["run"], "Missing option '--app'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_invalid_input_is_one_line_and_exit_2(
    settings: config.Settings, args: list[str], needle: str
) -> None:
    cli_support.assert_one_line_failure(cli_support.invoke(args, settings), 2, needle)


def test_enqueue_ledger_rejection_is_one_line(settings: config.Settings) -> None:
    cli_support.assert_one_line_failure(
        cli_support.invoke(["enqueue", " "], settings), 2, "task_type must be a non-empty string"
    )


def test_enqueue_key_reused_with_other_payload_is_a_conflict(
    settings: config.Settings, db: Conn
) -> None:
    assert (
        cli_support.invoke(
            ["enqueue", "t", '{"n": 1}', "--idempotency-key", "k"], settings
        ).exit_code
        == 0
    )
    result = cli_support.invoke(["enqueue", "t", '{"n": 2}', "--idempotency-key", "k"], settings)
    cli_support.assert_one_line_failure(result, 1, "idempotency_key 'k' is already used by task 1")
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (1,)


# --- show ----------------------------------------------------------------------------------


def test_show_prints_the_task_and_its_attempt_history(settings: config.Settings, db: Conn) -> None:
    task_id = enqueue(db, "email.send", payload={"to": "a@b.c"})
    assert (
        complete(db, task_id, claim(db, task_id, "host:1:aa"), error="OSError: reset\nframe 1")
        == "PENDING"
    )
    db.execute(
        "UPDATE ledgerq.tasks SET run_at = now() WHERE id = %s", (task_id,)
    )  # skip the backoff
    assert complete(db, task_id, claim(db, task_id, "host:2:bb")) == "SUCCEEDED"

    text = cli_support.invoke(["show", str(task_id)], settings)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0] == f"task {task_id}"
    assert "  status           SUCCEEDED" in lines
    assert '  result           {"ok": true}' in lines
    assert '  payload          {"to": "a@b.c"}' in lines
    attempt_rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [(r[0], r[1], r[-1]) for r in attempt_rows[:1]] == [("1", "host:1:aa", "reset")]
    assert "failed" in attempt_rows[0] and "succeeded" in attempt_rows[1]
    assert "frame 1" not in text.stdout  # only an error's first line

    body = json.loads(cli_support.invoke(["show", str(task_id), "--json"], settings).stdout)
    assert [(a["attempt"], a["worker_id"], a["outcome"]) for a in body["attempt_history"]] == [
        (1, "host:1:aa", "failed"),
        (2, "host:2:bb", "succeeded"),
    ]
    assert body["attempt_history"][0]["error"] == "OSError: reset\nframe 1"
    assert (body["status"], body["attempts"], body["result"]) == ("SUCCEEDED", 2, {"ok": True})


def test_show_unknown_task_is_one_line_and_exit_1(settings: config.Settings) -> None:
    cli_support.assert_one_line_failure(
        cli_support.invoke(["show", "12345"], settings), 1, "task 12345 does not exist"
    )


# --- stats -----------------------------------------------------------------------------------


def test_stats_counts_tasks_by_queue_and_status_with_redis_waiting(
    settings: config.Settings, db: Conn
) -> None:
    pending = [enqueue(db) for _ in range(3)]
    done = enqueue(db)
    complete(db, done, claim(db, done))
    make_dead(db, queue="reports")
    cancelled = enqueue(db, queue="reports")
    db.execute("SELECT ledgerq.cancel_task(%s)", (cancelled,))
    running = enqueue(db, queue="reports")
    claim(db, running)

    async def push() -> None:
        dispatch = Dispatch.connect(settings.redis_url, settings.redis_prefix)
        try:
            await dispatch.push([DueTask(TaskId(i), "default", 0) for i in pending[:2]])
        finally:
            await dispatch.close()

    asyncio.run(push())
    result = cli_support.invoke(["stats", "--json"], settings)
    assert result.exit_code == 0, result.output
    queues = {q["queue"]: q for q in json.loads(result.stdout)["queues"]}
    assert queues["default"]["counts"] == {
        "PENDING": 3, "QUEUED": 0, "RUNNING": 0, "SUCCEEDED": 1, "DEAD": 0, "CANCELLED": 0,
    }  # fmt: skip
    assert queues["reports"]["counts"] == {
        "PENDING": 0, "QUEUED": 0, "RUNNING": 1, "SUCCEEDED": 0, "DEAD": 1, "CANCELLED": 1,
    }  # fmt: skip
    assert queues["default"]["waiting_in_redis"] == 2
    assert queues["reports"]["waiting_in_redis"] == 0
    assert queues["default"]["oldest_pending_age_seconds"] >= 0
    assert queues["reports"]["oldest_pending_age_seconds"] is None
    assert (
        queues["default"]["finished_last_minute"],
        queues["reports"]["finished_last_minute"],
    ) == (1, 2)

    text = cli_support.invoke(["stats"], settings).stdout.splitlines()
    assert text[0].split() == [
        "queue", "PENDING", "QUEUED", "RUNNING", "SUCCEEDED", "DEAD", "CANCELLED",
        "in", "Redis", "oldest", "pending", "done/min",
    ]  # fmt: skip
    assert text[1].split()[:8] == ["default", "3", "0", "0", "1", "0", "0", "2"]
    assert text[2].split() == ["reports", "0", "0", "1", "0", "1", "1", "0", "-", "2"]


def test_stats_on_an_empty_ledger_says_so(settings: config.Settings) -> None:
    result = cli_support.invoke(["stats"], settings)
    assert (result.exit_code, result.stdout) == (0, "no tasks in the ledger yet\n")


# --- dead ------------------------------------------------------------------------------------


def test_dead_lists_dead_tasks_newest_first_with_their_errors_first_line(
    settings: config.Settings, db: Conn
) -> None:
    first = make_dead(db, error="ValueError: bad amount\nTraceback (most recent call last): ...")
    second = make_dead(db, queue="reports", error="KeyError: 'to'")
    enqueue(db)  # not DEAD

    lines = cli_support.invoke(["dead"], settings).stdout.splitlines()
    assert lines[0].split() == ["id", "type", "queue", "attempts", "died", "last", "error"]
    assert [line.split()[0] for line in lines[1:]] == [str(second), str(first)]
    assert lines[1].endswith("KeyError: 'to'") and lines[2].endswith("ValueError: bad amount")

    only_reports = json.loads(
        cli_support.invoke(["dead", "--queue", "reports", "--json"], settings).stdout
    )
    assert [t["id"] for t in only_reports["tasks"]] == [second]
    limited = json.loads(cli_support.invoke(["dead", "--limit", "1", "--json"], settings).stdout)
    assert [t["id"] for t in limited["tasks"]] == [second]
    assert cli_support.invoke(["dead", "--queue", "nothing"], settings).stdout == "no DEAD tasks\n"


def test_dead_retry_moves_one_task_back_to_pending(settings: config.Settings, db: Conn) -> None:
    task_id = make_dead(db)
    result = cli_support.invoke(["dead", "--retry", str(task_id), "--json"], settings)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"id": task_id, "status": "PENDING"}
    assert status_of(db, task_id) == "PENDING"
    again = cli_support.invoke(["dead", "--retry", str(task_id)], settings)
    cli_support.assert_one_line_failure(
        again, 1, f"task {task_id} is PENDING; only DEAD or CANCELLED"
    )


def test_dead_retry_all_retries_every_dead_task_of_the_queue_page_by_page(
    settings: config.Settings, db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operators, "PAGE_SIZE", 3)  # several pages from a few tasks
    in_default = [make_dead(db) for _ in range(7)]
    in_reports = [make_dead(db, queue="reports") for _ in range(2)]

    result = cli_support.invoke(["dead", "--retry-all", "--queue", "default"], settings)
    assert result.exit_code == 0, result.output
    assert result.stdout == "retried 7 DEAD task(s)\n"
    assert {status_of(db, t) for t in in_default} == {"PENDING"}
    assert {status_of(db, t) for t in in_reports} == {"DEAD"}

    rest = cli_support.invoke(["dead", "--retry-all", "--json"], settings)
    body = json.loads(rest.stdout)
    assert (body["retried"], body["skipped"], sorted(body["ids"])) == (2, 0, sorted(in_reports))
    assert (
        cli_support.invoke(["dead", "--retry-all"], settings).stdout == "retried 0 DEAD task(s)\n"
    )


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_pending_running_and_finished_tasks(settings: config.Settings, db: Conn) -> None:
    pending = enqueue(db)
    running = enqueue(db)
    claim(db, running)
    done = enqueue(db)
    complete(db, done, claim(db, done))

    assert (
        cli_support.invoke(["cancel", str(pending)], settings).stdout
        == f"task {pending}: CANCELLED\n"
    )
    assert status_of(db, pending) == "CANCELLED"

    requested = cli_support.invoke(["cancel", str(running), "--json"], settings)
    assert (requested.exit_code, json.loads(requested.stdout)) == (
        0,
        {"id": running, "status": "RUNNING"},
    )
    row = db.execute(
        "SELECT cancel_requested FROM ledgerq.tasks WHERE id = %s", (running,)
    ).fetchone()
    assert row == (True,)

    finished = cli_support.invoke(["cancel", str(done)], settings)
    assert finished.exit_code == 1
    assert finished.stdout == f"task {done} is already SUCCEEDED: nothing to cancel\n"
    cli_support.assert_one_line_failure(
        cli_support.invoke(["cancel", "999"], settings), 1, "task 999 does not exist"
    )


def test_missing_schema_says_to_migrate(settings: config.Settings, empty_db_url: str) -> None:
    result = cli_support.invoke(["stats", "--database-url", empty_db_url], settings)
    cli_support.assert_one_line_failure(result, 1, "run `ledgerq migrate`")


# --- text from the ledger is escaped -------------------------------------------------------

EVIL_TYPE = "\x1b]0;TITLE\x07report"
EVIL_QUEUE = "q\x1b[2J\u202e"
EVIL_ERROR = "\x1b]52;c;ZXZpbA==\x07boom\rFORGED"
EVIL_WORKER = "w\x1b[1A"


def test_show_dead_stats_and_enqueue_escape_control_characters_even_when_piped(
    settings: config.Settings, db: Conn
) -> None:
    task_id = enqueue(db, EVIL_TYPE, queue=EVIL_QUEUE)
    assert (
        complete(db, task_id, claim(db, task_id, EVIL_WORKER), error=EVIL_ERROR, retryable=False)
        == "DEAD"
    )
    env = {**os.environ, **cli_support.env_for(settings)}

    def run(*args: str) -> str:
        done = subprocess.run(
            [cli_support.LEDGERQ, *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    outputs = {
        "show": run("show", str(task_id)),
        "dead": run("dead"),
        "stats": run("stats"),
        "enqueue": run(
            "enqueue", EVIL_TYPE, "--queue", EVIL_QUEUE, "--idempotency-key", "k\x1b[31m"
        ),
    }
    for command, text in outputs.items():
        for char in ("\x1b", "\x07", "\r", "\u202e"):
            assert char not in text, (command, text)
    assert "\\x1b]0;TITLE\\x07report" in outputs["show"]
    assert "\\x1b]52;c;ZXZpbA==\\x07boom\\rFORGED" in outputs["show"]
    assert "w\\x1b[1A" in outputs["show"]
    assert "\\x1b]52;c;ZXZpbA==\\x07boom\\rFORGED" in outputs["dead"]
    assert "q\\x1b[2J\\u202e" in outputs["stats"]
    assert "\\x1b]0;TITLE\\x07report on queue q\\x1b[2J\\u202e" in outputs["enqueue"]


def test_an_error_line_escapes_control_characters(settings: config.Settings) -> None:
    key = "k\x1b]0;TITLE\x07"
    assert cli_support.invoke(["enqueue", "t", "--idempotency-key", key], settings).exit_code == 0
    result = cli_support.invoke(["enqueue", "t", '{"a": 1}', "--idempotency-key", key], settings)
    line = cli_support.assert_one_line_failure(result, 1, "k\\x1b]0;TITLE\\x07", "already used")
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr, line
