"""reap_stuck, prune_tasks and run_schedules scheduled by pg_cron, as the README shows,
on a private server.

The server (tests/sql/cron_server.py) is started when collection ends, with
three stuck tasks, three tasks finished ten days ago, a schedule, and the three
jobs already scheduled; see tests/sql/conftest.py.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from .cron_server import (
    FAST_SCHEDULE,
    JOB_COMMAND,
    JOB_NAME,
    PRUNE_COMMAND,
    PRUNE_JOB,
    SCHEDULE_NAME,
    SCHEDULES_COMMAND,
    SCHEDULES_JOB,
    SPEC_SCHEDULE,
    CronServer,
)

pytestmark = pytest.mark.slow

# After the minute (or second) the job is due, how long its run may take.
RUN_SLACK_S = 20.0


def time_until_first_run(conn: psycopg.Connection[Any], schedule: str) -> float:
    """Seconds until pg_cron starts the job: the next second, or minute."""
    if schedule == FAST_SCHEDULE:
        return 1.0
    row = conn.execute(
        "SELECT extract(epoch FROM date_trunc('minute', now()) + interval '1 minute' - now())"
    ).fetchone()
    assert row is not None
    return float(row[0])


def finished_runs(conn: psycopg.Connection[Any], jobid: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT status, return_message, command FROM cron.job_run_details"
            " WHERE jobid = %s AND status IN ('succeeded', 'failed') ORDER BY runid",
            (jobid,),
        ).fetchall()


def reaped(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT count(*) = 0 FROM ledgerq.tasks WHERE status IN ('RUNNING', 'QUEUED')"
    ).fetchone()
    assert row is not None
    return bool(row[0])


def test_pg_cron_job_runs_reap_stuck_and_recovers_stuck_tasks(cron_server: CronServer) -> None:
    with cron_server.connect() as conn:
        job = conn.execute(
            "SELECT jobid, schedule, command FROM cron.job WHERE jobname = %s", (JOB_NAME,)
        ).fetchone()
        assert job is not None
        jobid, schedule, command = job
        assert schedule in (FAST_SCHEDULE, SPEC_SCHEDULE)
        assert command == JOB_COMMAND

        # reap_stuck NOTIFYs the dispatcher when it moves something: await
        # that, listening before looking, so a run in between is not missed.
        conn.execute("LISTEN ledgerq_tasks")
        if not reaped(conn):
            wait_s = time_until_first_run(conn, schedule) + RUN_SLACK_S
            notified = list(conn.notifies(timeout=wait_s, stop_after=1))
            assert notified, f"no reaper run within {wait_s:.0f} s\n{cron_server.log_tail()}"
        assert reaped(conn)

        # pg_cron records the run's outcome just after the job's commit.
        deadline = time.monotonic() + RUN_SLACK_S
        while not (runs := finished_runs(conn, jobid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runs, f"no finished run recorded\n{cron_server.log_tail()}"
        # A background worker's run reports the command tag: one SELECT row.
        assert runs[0] == {
            "status": "succeeded",
            "return_message": "SELECT 1",
            "command": JOB_COMMAND,
        }

        ids = cron_server.task_ids
        with conn.cursor(row_factory=dict_row) as cur:
            tasks = {
                row["id"]: row
                for row in cur.execute("SELECT * FROM ledgerq.tasks ORDER BY id").fetchall()
            }
        outcomes = dict(
            conn.execute(
                "SELECT task_id, outcome FROM ledgerq.attempts WHERE worker_id = 'crashed-worker'"
            ).fetchall()
        )
        retry = tasks[ids["retry"]]
        assert (retry["status"], retry["lease_expires_at"]) == ("PENDING", None)
        assert "crashed-worker" in retry["last_error"]
        assert retry["run_at"] <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
        assert tasks[ids["last-attempt"]]["status"] == "DEAD"
        assert tasks[ids["last-attempt"]]["finished_at"] is not None
        assert (tasks[ids["lost-delivery"]]["status"], tasks[ids["lost-delivery"]]["attempts"]) == (
            "PENDING",
            0,
        )
        assert outcomes == {ids["retry"]: "lost", ids["last-attempt"]: "lost"}


def job_runs(cron_server: CronServer, name: str, command: str) -> list[dict[str, Any]]:
    """The job's finished runs, once there is one (waiting for its first, with a deadline)."""
    with cron_server.connect() as conn:
        job = conn.execute(
            "SELECT jobid, schedule, command FROM cron.job WHERE jobname = %s", (name,)
        ).fetchone()
        assert job is not None
        jobid, schedule, stored = job
        assert stored == command
        deadline = time.monotonic() + time_until_first_run(conn, schedule) + RUN_SLACK_S
        while not (runs := finished_runs(conn, jobid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runs, f"no run of {name} within the deadline\n{cron_server.log_tail()}"
        return runs


def test_pg_cron_job_runs_prune_tasks_and_deletes_old_finished_tasks(
    cron_server: CronServer,
) -> None:
    runs = job_runs(cron_server, PRUNE_JOB, PRUNE_COMMAND)
    assert runs[0]["status"] == "succeeded", runs[0]
    ids = cron_server.task_ids
    with cron_server.connect() as conn:
        left = {
            r[0]
            for r in conn.execute(
                "SELECT id FROM ledgerq.tasks WHERE id = ANY(%s)",
                ([ids["old-1"], ids["old-2"], ids["old-dead"]],),
            ).fetchall()
        }
        attempts = conn.execute(
            "SELECT count(*) FROM ledgerq.attempts WHERE worker_id = 'old-worker'"
        ).fetchone()
    assert left == {ids["old-dead"]}
    assert attempts == (1,)


def test_pg_cron_job_runs_run_schedules_and_fires_a_slot_once(cron_server: CronServer) -> None:
    runs = job_runs(cron_server, SCHEDULES_JOB, SCHEDULES_COMMAND)
    assert runs[0]["status"] == "succeeded", runs[0]
    with cron_server.connect() as conn:
        keys = [
            r[0]
            for r in conn.execute(
                "SELECT idempotency_key FROM ledgerq.tasks WHERE task_type = 'report.build'"
                " ORDER BY idempotency_key"
            ).fetchall()
        ]
    assert keys, "run_schedules enqueued nothing"
    assert all(k.startswith(f"schedule:{SCHEDULE_NAME}:") for k in keys), keys
    assert len(set(keys)) == len(keys)
