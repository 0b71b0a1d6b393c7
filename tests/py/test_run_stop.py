"""`ledgerq run` stopping: the first Ctrl-C says what it waits for and that a
second one forces; running tasks get --grace-seconds (short by default), then
are handed back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import cli_support
import httpx
import psycopg
import pytest

from ledgerq import config

Conn = psycopg.Connection[Any]

APP = """
import asyncio
from ledgerq import Registry

tasks = Registry()


@tasks.task("slow", timeout=None)
async def slow(ctx, payload):
    await asyncio.sleep(600)
"""


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def status_of(db: Conn, task_id: int) -> str:
    row = db.execute("SELECT status FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    return str(row[0]) if row else "missing"


@pytest.mark.e2e
def test_run_says_what_ctrl_c_waits_for_and_hands_back_running_tasks_after_the_grace(
    settings: config.Settings, db: Conn, tmp_path: Path
) -> None:
    (tmp_path / "slow_app.py").write_text(APP)
    port = cli_support.free_port()
    run = cli_support.ledgerq_process(
        ["run", "--app", "slow_app:tasks", "--port", str(port),
         "--grace-seconds", "1", "--log-level", "WARNING"],
        cli_support.env_for(settings), cwd=tmp_path,
    )  # fmt: skip
    try:
        (task_id,) = db.execute(
            "SELECT id FROM ledgerq.enqueue_task(task_type => 'slow')"
        ).fetchone()  # type: ignore[misc]
        cli_support.poll(lambda: status_of(db, task_id) == "RUNNING", what="the task to run")
        cli_support.poll(lambda: _ready(port), what="the API")  # its signal handlers are set

        os.kill(run.pid, signal.SIGINT)
        stopped_at = time.monotonic()
        code = run.wait(timeout=30)
        took_s = time.monotonic() - stopped_at
        _, err = run.communicate()
    finally:
        cli_support.stop_process(run)
    assert code == 0, err
    assert "ledgerq run: stopping: running tasks may finish for up to 1 s" in err, err
    assert "press Ctrl-C again to stop at once" in err
    assert "Traceback" not in err
    assert took_s < 8, f"stopping took {took_s:.1f} s"
    assert status_of(db, task_id) == "PENDING"


def test_run_grace_seconds_defaults_to_a_short_development_grace() -> None:
    result = cli_support.invoke(["run", "--help"])
    assert "--grace-seconds" in result.stdout
    assert "[default: 5.0;" in " ".join(result.stdout.split())
