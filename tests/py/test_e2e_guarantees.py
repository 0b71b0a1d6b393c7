"""End to end: the README's guarantees, with real ``ledgerq worker|dispatcher|reaper`` processes.

Each test starts the processes it needs (see e2e_helpers), enqueues through plain
SQL, acts on the processes (kill -9, SIGSTOP, SIGTERM) and waits on the ledger.
Restarts of Redis and PostgreSQL are in test_e2e_restarts.py.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import e2e_helpers as e2e
import psycopg
import pytest

pytestmark = pytest.mark.e2e

# Attempt 1's backoff is compute_backoff(1): at most 1 s.
FIRST_BACKOFF_MAX_S = 1.0
# Process scheduling, the dispatcher's poll, a pop and a claim on a busy 2-core machine.
RECOVERY_SLACK_S = 1.5


@pytest.fixture
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, db_url: str, redis_url: str, redis_prefix: str
) -> Iterator[e2e.Deployment]:
    failed_before = request.session.testsfailed
    with e2e.Deployment(tmp_path, db_url, redis_url, redis_prefix) as d:
        d.create_tables()
        yield d
        if request.session.testsfailed > failed_before:
            print(d.diagnostics())  # every process's log tail, beside the failure


def test_kill_9_worker_mid_task_another_worker_finishes_it_within_lease_and_reap_interval(
    deployment: e2e.Deployment, record_property: Callable[[str, object], None]
) -> None:
    d = deployment
    d.dispatcher()
    d.reaper()
    workers = [d.worker(), d.worker()]
    task_id = d.enqueue("e2e.block", {"block_attempts": [1]})
    _, _, pid, _ = d.wait_run(task_id, 1)
    (victim,) = [w for w in workers if w.pid == pid]
    (survivor,) = [w for w in workers if w is not victim]

    victim.send(signal.SIGKILL)
    killed_at = d.query("SELECT clock_timestamp()")[0][0]
    assert victim.wait_exit(5) == -signal.SIGKILL

    _, _, rerun_pid, rerun_at = d.wait_run(task_id, 2, timeout_s=30)
    d.wait_for(lambda: d.task(task_id)["status"] == "SUCCEEDED", "attempt 2 to succeed")
    recovery_s = (rerun_at - killed_at).total_seconds()
    print(f"kill -9 recovery: attempt 2 started {recovery_s:.2f} s after the kill")
    record_property("kill9_recovery_s", round(recovery_s, 3))

    task = d.task(task_id)
    assert (task["attempts"], task["result"]) == (2, {"attempt": 2})
    attempts = d.attempts(task_id)
    assert [(n, outcome) for n, outcome, _ in attempts] == [(1, "lost"), (2, "succeeded")]
    assert "lease expired" in (attempts[0][2] or "")
    assert rerun_pid == survivor.pid
    bound_s = e2e.LEASE_S + e2e.REAPER_INTERVAL_S + FIRST_BACKOFF_MAX_S + RECOVERY_SLACK_S
    assert recovery_s <= bound_s, (
        f"recovery took {recovery_s:.2f} s, over {bound_s:g} s\n{d.diagnostics()}"
    )
    assert survivor.alive(), d.diagnostics()
    d.assert_logs_clean()


def test_stopped_worker_past_its_lease_cannot_overwrite_the_attempt_that_replaced_it(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    d.reaper()
    # One slot: while its task runs the worker is not blocked in a Redis pop,
    # which, frozen, would swallow the redelivery until the dispatcher's sweep.
    stalled = d.worker(concurrency=1)
    task_id = d.enqueue("e2e.stale")
    # Attempt 1 did its effect through ctx.once (recorded, so its lock is
    # released), then waits for release-<task_id>.
    d.wait_for(
        lambda: d.query_one(
            "SELECT 1 FROM ledgerq.effects WHERE effect_key = %s", (f"effect-{task_id}",)
        ),
        "attempt 1 to record its effect",
    )
    stalled.send(signal.SIGSTOP)
    try:
        replacement = d.worker()
        d.wait_for(
            lambda: d.task(task_id)["status"] == "SUCCEEDED",
            "the reaper and a second worker to run attempt 2",
        )
        d.release(task_id)  # attempt 1 returns {"attempt": 1} as soon as it runs again
    finally:
        stalled.send(signal.SIGCONT)
    # SIGTERM drains: once the stale worker exits, whatever it would write is written.
    stalled.send(signal.SIGTERM)
    assert stalled.wait_exit(15) == 0, d.diagnostics()

    task = d.task(task_id)
    assert task["status"] == "SUCCEEDED"
    assert task["attempts"] == 2
    assert task["result"] == {"attempt": 2, "effect": {"by_attempt": 1}}
    assert [(n, outcome) for n, outcome, _ in d.attempts(task_id)] == [
        (1, "lost"),
        (2, "succeeded"),
    ]
    assert d.runs_per_task() == {task_id: 2}
    assert d.effects_per_task() == {task_id: 1}
    assert replacement.alive(), d.diagnostics()
    d.assert_logs_clean()


def test_sigterm_lets_the_running_task_finish_takes_no_new_task_and_exits_0(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    worker = d.worker(concurrency=2, grace_s=20)
    running = d.enqueue("e2e.block", {"block_attempts": [1]})
    d.wait_run(running, 1)

    worker.send(signal.SIGTERM)
    worker.wait_log("worker.stopping")
    late = d.enqueue("e2e.record")
    d.wait_for(lambda: d.task(late)["status"] == "QUEUED", "the late task to be dispatched")
    d.release(running)
    assert worker.wait_exit(15) == 0, d.diagnostics()

    task = d.task(running)
    assert (task["status"], task["attempts"], task["result"]) == ("SUCCEEDED", 1, {"attempt": 1})
    assert (d.task(late)["status"], d.task(late)["attempts"]) == ("QUEUED", 0)
    assert d.runs_per_task() == {running: 1}
    # Not lost either: the next worker runs it.
    d.worker()
    d.wait_for(lambda: d.task(late)["status"] == "SUCCEEDED", "a new worker to run the late task")
    d.assert_logs_clean()


def test_sigterm_hands_back_a_task_longer_than_the_grace_period_and_exits_0(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    dispatcher = d.dispatcher()
    worker = d.worker(grace_s=0.5)
    task_id = d.enqueue("e2e.block", {"block_attempts": [1]})
    d.wait_run(task_id, 1)
    # No dispatcher while the task is handed back, so PENDING is observable.
    dispatcher.send(signal.SIGTERM)
    assert dispatcher.wait_exit(10) == 0, d.diagnostics()

    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0, d.diagnostics()

    task = d.task(task_id)
    assert (task["status"], task["attempts"]) == ("PENDING", 1)
    ((number, outcome, error),) = d.attempts(task_id)
    assert (number, outcome) == (1, "lost")
    assert "shut down" in (error or "")

    d.dispatcher()
    d.worker()
    d.wait_for(lambda: d.task(task_id)["status"] == "SUCCEEDED", "another worker to run it")
    assert d.task(task_id)["result"] == {"attempt": 2}
    assert [(n, o) for n, o, _ in d.attempts(task_id)] == [(1, "lost"), (2, "succeeded")]
    d.assert_logs_clean()


def test_dispatcher_killed_mid_dispatch_and_plain_sql_enqueue_all_tasks_succeed(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    first = d.dispatcher("--batch-size", "5")
    d.reaper()
    workers = [d.worker(), d.worker()]
    for proc in [first, *workers]:
        proc.wait_log(".started")
    count = 40
    # Plain SQL inside the application's own transaction, due over the next 4 s,
    # so the dispatcher is still handing tasks out when it is killed.
    with psycopg.connect(d.database_url) as app_conn:
        with app_conn.transaction():
            for n in range(count):
                app_conn.execute(
                    "SELECT * FROM ledgerq.enqueue_task(task_type => 'e2e.record', "
                    "payload => jsonb_build_object('n', %s::int), "
                    "run_at => now() + make_interval(secs => %s))",
                    (n, n * 0.1),
                )
            assert d.status_counts() == {}, "tasks visible before the transaction committed"
        with app_conn.transaction(force_rollback=True):
            app_conn.execute(
                "SELECT * FROM ledgerq.enqueue_task(task_type => 'e2e.record', "
                "payload => '{\"n\": -1}')"
            )
    # A non-Python client: psql, in a transaction.
    psql = subprocess.run(
        ["psql", d.database_url, "-v", "ON_ERROR_STOP=1", "-c",
         "BEGIN; SELECT * FROM ledgerq.enqueue_task(task_type => 'e2e.record', "
         "payload => '{\"n\": 100}'); COMMIT;"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert psql.returncode == 0, psql.stderr

    d.wait_for(lambda: d.status_counts().get("SUCCEEDED", 0) >= 8, "the first tasks to succeed")
    first.send(signal.SIGKILL)
    assert first.wait_exit(5) == -signal.SIGKILL
    assert d.status_counts().get("PENDING", 0) > 0, "killed too late: nothing left to dispatch"

    d.dispatcher()
    d.wait_statuses({"SUCCEEDED": count + 1}, timeout_s=30)
    ids = d.task_ids()
    assert d.runs_per_task() == dict.fromkeys(ids, 1)
    results = sorted(d.task(i)["result"]["n"] for i in ids)
    assert results == [*range(count), 100]  # and never the rolled-back n = -1
    assert all(w.alive() for w in workers), d.diagnostics()
    d.assert_logs_clean()


def test_one_idempotency_key_enqueued_concurrently_creates_one_task_that_runs_once(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    d.worker()
    callers = 8
    barrier = threading.Barrier(callers)
    answers: list[tuple[int, bool]] = []

    def enqueue() -> None:
        with psycopg.connect(d.database_url, autocommit=True) as conn:
            barrier.wait(timeout=10)
            row = conn.execute(
                "SELECT id, created FROM ledgerq.enqueue_task(task_type => 'e2e.record', "
                "payload => '{\"n\": 1}', idempotency_key => 'order-42')"
            ).fetchone()
            assert row is not None
            answers.append((int(row[0]), bool(row[1])))

    threads = [threading.Thread(target=enqueue) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(answers) == callers
    assert len({task_id for task_id, _ in answers}) == 1
    assert sorted(created for _, created in answers) == [False] * (callers - 1) + [True]
    d.wait_statuses({"SUCCEEDED": 1})
    assert d.runs_per_task() == {answers[0][0]: 1}
    d.assert_logs_clean()


def test_bad_input_ends_dead_after_one_attempt_while_good_tasks_keep_flowing(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    worker = d.worker()
    bad = {
        "e2e.no_such_type": ({}, "NonRetryable: unknown task type 'e2e.no_such_type'"),
        "e2e.typed": ({"n": "many"}, "InvalidPayload: payload does not match Item: n: "),
        "e2e.non_retryable": ({}, "NonRetryable: refusing to charge a closed account"),
        "e2e.non_json": ({}, "NonRetryable: handler returned a value that is not JSON"),
    }
    batch: list[dict[str, object]] = []
    for n in range(12):
        batch.append({"task_type": "e2e.record", "payload": {"n": n}})
        if n % 3 == 0:
            task_type = list(bad)[n // 3]
            batch.append({"task_type": task_type, "payload": bad[task_type][0], "max_attempts": 5})
    batch.append({"task_type": "e2e.typed", "payload": {"n": 7}})
    ids = d.enqueue_many(batch)
    # Bad arguments are refused at enqueue, with the field named, and create nothing.
    with pytest.raises(psycopg.Error, match="payload must be a JSON object") as refused:
        d.query("SELECT * FROM ledgerq.enqueue_task(task_type => 'e2e.record', payload => '[]')")
    assert refused.value.sqlstate == "LQ422"

    d.wait_statuses({"SUCCEEDED": 13, "DEAD": 4})
    for task_id, spec in zip(ids, batch, strict=True):
        task = d.task(task_id)
        task_type = str(spec["task_type"])
        if task_type in bad and spec["payload"] == bad[task_type][0]:
            assert (task["status"], task["attempts"]) == ("DEAD", 1), task
            assert task["last_error"].splitlines()[0].startswith(bad[task_type][1]), task
            assert [outcome for _, outcome, _ in d.attempts(task_id)] == ["failed"]
        else:
            assert (task["status"], task["attempts"]) == ("SUCCEEDED", 1), task
    assert worker.alive(), d.diagnostics()
    d.assert_logs_clean()


def test_worker_processes_2_share_the_work_and_sigterm_stops_both_with_exit_0(
    deployment: e2e.Deployment,
) -> None:
    d = deployment
    d.dispatcher()
    parent = d.worker("--processes", "2", concurrency=1)
    ids = d.enqueue_many(
        [{"task_type": "e2e.record", "payload": {"n": n, "sleep_s": 0.15}} for n in range(12)]
    )
    d.wait_statuses({"SUCCEEDED": len(ids)})
    pids = {int(pid) for (pid,) in d.query("SELECT DISTINCT pid FROM e2e_runs")}
    assert len(pids) == 2 and parent.pid not in pids, pids

    parent.send(signal.SIGTERM)
    assert parent.wait_exit(15) == 0, d.diagnostics()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker process {pid} outlived its parent"
    d.assert_logs_clean()
