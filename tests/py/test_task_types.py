"""Task types known to the ledger, from the runtime's side: a worker registers
its types when it starts and deregisters when it stops, refuses to start with
an empty registry, and hands back a type it has no handler for while another
live worker serves it (a rolling deploy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cli_support
import e2e_helpers as e2e
import helpers
import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledgerq import Context, Registry, config, errors
from ledgerq.types import AttemptOutcome, TaskStatus
from ledgerq.worker import Worker

Conn = psycopg.Connection[Any]


def alive(db: Conn) -> dict[str, tuple[str, int, int]]:
    rows = db.execute(
        "SELECT task_type, queue, max_attempts, workers_alive FROM ledgerq.task_types"
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def register_other_worker(db: Conn, worker_id: str, task_type: str) -> None:
    types = [{"task_type": task_type, "queue": "default", "max_attempts": 5, "timeout_seconds": 30}]
    db.execute(
        "SELECT ledgerq.worker_register(%s, %s, %s, 1)", (worker_id, ["default"], Jsonb(types))
    )


async def test_worker_registers_its_types_while_running_and_deregisters_when_it_stops(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("orders.pack", queue="orders", max_attempts=2)
    async def pack(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    async with helpers.running(settings, tasks, dispatcher=False, queues=["orders"]) as s:
        await helpers.eventually(
            lambda: _async(alive(db).get("orders.pack") == ("orders", 2, 1)),
            what="the worker's registration",
        )
        assert s.worker is not None
        await s.stop_worker()
        assert alive(db) == {"orders.pack": ("orders", 2, 0)}


async def _async(value: Any) -> Any:
    return value


async def test_worker_with_an_empty_registry_refuses_to_start(settings: config.Settings) -> None:
    async with helpers.running(settings, Registry(), worker=False, dispatcher=False) as s:
        with pytest.raises(errors.ConfigError, match="no task types"):
            Worker(Registry(), s.ledger, s.dispatch)


def test_worker_command_with_an_empty_registry_exits_2_with_one_line(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty_app.py").write_text("from ledgerq import Registry\ntasks = Registry()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli_support.invoke(["worker", "--app", "empty_app:tasks"], settings)
    cli_support.assert_one_line_failure(result, 2, "empty_app:tasks has no task types")
    sys.modules.pop("empty_app", None)


async def test_a_type_another_live_worker_serves_is_handed_back_without_spending_an_attempt(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()

    @tasks.task("new.type")
    async def new(ctx: Context, payload: dict[str, Any]) -> None:
        return None

    register_other_worker(db, "old-version", "old.type")
    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("old.type", max_attempts=1)

        async def handed_back() -> bool:
            task = await s.ledger.get(task_id)
            return any(a.outcome == AttemptOutcome.LOST for a in task.attempt_history)

        await helpers.eventually(handed_back, what="the task to be handed back")
        task = await s.ledger.get(task_id)
        assert task.status in (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING)
        error = task.attempt_history[0].error or ""
        assert "no handler" in error and "another live worker serves it" in error

        # The old version is gone: nobody serves the type, so it goes DEAD.
        db.execute("SELECT ledgerq.worker_stop('old-version')")
        dead = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert dead.last_error is not None and "unknown task type 'old.type'" in dead.last_error
    outcomes = [a.outcome for a in dead.attempt_history]
    assert outcomes[-1] == AttemptOutcome.FAILED
    assert set(outcomes[:-1]) == {AttemptOutcome.LOST}


def test_types_command_lists_registered_types_with_live_workers(
    settings: config.Settings, db: Conn
) -> None:
    assert cli_support.invoke(["types"], settings).stdout.startswith("no task types registered")
    register_other_worker(db, "w1", "email.send")
    register_other_worker(db, "w2", "email.send")
    register_other_worker(db, "w3", "report.build")
    db.execute("SELECT ledgerq.worker_stop('w3')")

    result = cli_support.invoke(["types", "--json"], settings)

    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)["task_types"]
    assert [
        (t["task_type"], t["queue"], t["max_attempts"], t["workers_alive"]) for t in listed
    ] == [
        ("email.send", "default", 5, 2),
        ("report.build", "default", 5, 0),
    ]
    assert listed[0]["timeout_seconds"] == 30 and listed[0]["last_seen_at"] is not None
    text = cli_support.invoke(["types"], settings).stdout.splitlines()
    assert text[0].split() == ["type", "queue", "max", "attempts", "timeout", "workers", "alive",
                               "last", "seen"]  # fmt: skip
    assert text[1].split()[:5] == ["email.send", "default", "5", "30s", "2"]


@pytest.mark.e2e
def test_worker_warns_when_queues_names_a_queue_no_task_type_declares(
    tmp_path: Path, db_url: str, redis_url: str, redis_prefix: str
) -> None:
    with e2e.Deployment(tmp_path, db_url, redis_url, redis_prefix) as d:
        typo = d.worker("--queues", "default,ordrs")
        typo.wait_log("worker.started")
        assert (
            "warning: --queues names ordrs, which no task type of e2e_app:tasks declares"
            in typo.log()
        )
        fine = d.worker("--queues", "default")
        fine.wait_log("worker.started")
        assert "warning" not in fine.log()


NEW_APP = """
from ledgerq import Registry

tasks = Registry()


@tasks.task("e2e.newer")
async def newer(ctx, payload):
    return None
"""


@pytest.mark.e2e
def test_rolling_deploy_a_new_worker_hands_back_what_only_the_old_one_serves(
    tmp_path: Path, db_url: str, redis_url: str, redis_prefix: str
) -> None:
    with e2e.Deployment(tmp_path, db_url, redis_url, redis_prefix) as d:
        d.create_tables()
        (d.app_dir / "new_app.py").write_text(NEW_APP)
        d.dispatcher()
        old = d.worker(concurrency=1)
        new = d.start("worker", "--app", "new_app:tasks", "--concurrency", "4")
        for proc in (old, new):
            proc.wait_log("worker.started")
        d.wait_for(
            lambda: (
                d.query_one(
                    "SELECT workers_alive FROM ledgerq.task_types WHERE task_type = 'e2e.record'"
                )
                == (1,)
            ),
            "the old worker's registration",
        )
        ids = [
            d.enqueue("e2e.record", {"n": n, "sleep_s": 0.05}, max_attempts=1) for n in range(12)
        ]
        d.wait_statuses({"SUCCEEDED": 12})

        handed_back = d.query(
            "SELECT count(*) FROM ledgerq.attempts WHERE task_id = ANY(%s) AND outcome = 'lost'",
            (ids,),
        )[0][0]
        print(f"{handed_back} hand-back(s) by the new worker")
        assert handed_back > 0, new.log()  # the new worker did receive some
        assert "task.handed_back" in new.log()
        assert set(d.runs_per_task().values()) == {1}  # each ran once, on the old worker

        # The old version stops: nobody serves e2e.record any more.
        old.send(e2e.signal.SIGTERM)
        assert old.wait_exit(15) == 0
        assert d.query_one(
            "SELECT workers_alive FROM ledgerq.task_types WHERE task_type = 'e2e.record'"
        ) == (0,)
        late = d.enqueue("e2e.record", {"n": 99})
        d.wait_for(lambda: d.task(late)["status"] == "DEAD", "the unserved task to go DEAD")
        assert "unknown task type 'e2e.record'" in (d.task(late)["last_error"] or "")
