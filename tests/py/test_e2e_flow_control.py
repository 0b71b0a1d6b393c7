"""End to end: flow control holds with real processes (a dispatcher and a worker
with room for many tasks at once), set through the Python client.

- ``per_key_max_running=1``: six ~100 ms tasks of one concurrency key run one
  after another (their attempts never overlap in the ledger's history), each
  in exactly one attempt, none DEAD; a task of another key is not held back.
- A paused queue starts nothing while an idle worker waits, however long; once
  resumed, its task runs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import datetime

import e2e_helpers as e2e
import pytest

from ledgerq import Client, config

pytestmark = pytest.mark.e2e

QUEUE = "tenants"
KEYED_TASKS = 6
TASK_S = 0.1
#: How long a paused queue must start nothing while a worker is idle.
PAUSE_WATCH_S = 1.0


@pytest.fixture
def client(settings: config.Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def attempt_spans(d: e2e.Deployment, task_ids: list[int]) -> list[tuple[datetime, datetime]]:
    """(started_at, finished_at) of every attempt of task_ids, by start."""
    rows = d.query(
        "SELECT started_at, finished_at FROM ledgerq.attempts WHERE task_id = ANY(%s) "
        "ORDER BY started_at",
        (task_ids,),
    )
    assert all(finished is not None for _, finished in rows), rows
    return [(started, finished) for started, finished in rows]


def test_per_key_max_running_runs_one_task_of_a_key_at_a_time(
    deployment: e2e.Deployment, client: Client
) -> None:
    d = deployment
    assert client.configure_queue(QUEUE, per_key_max_running=1) == {"per_key_max_running": 1}
    d.dispatcher()
    d.worker("--queues", QUEUE, concurrency=8).wait_log("worker.started")
    keyed = [
        d.enqueue("e2e.record", {"n": n, "sleep_s": TASK_S}, queue=QUEUE, concurrency_key="acme")
        for n in range(KEYED_TASKS)
    ]
    other = d.enqueue("e2e.record", {"sleep_s": TASK_S}, queue=QUEUE, concurrency_key="globex")
    d.wait_statuses({"SUCCEEDED": KEYED_TASKS + 1}, timeout_s=30)

    spans = attempt_spans(d, keyed)
    assert len(spans) == KEYED_TASKS, "one attempt per task"
    for (_, finished), (started, _) in itertools.pairwise(spans):
        assert started >= finished, f"attempts of one key overlap: {spans}\n{d.diagnostics()}"
    for task_id in [*keyed, other]:
        assert d.task(task_id)["attempts"] == 1
        assert d.attempts(task_id) == [(1, "succeeded", None)]
    assert d.runs_per_task() == dict.fromkeys([*keyed, other], 1)
    # The other key waited for none of acme's backlog: it started before acme's last task.
    (other_started,) = d.query_one(
        "SELECT started_at FROM ledgerq.attempts WHERE task_id = %s", (other,)
    ) or (None,)
    assert other_started < spans[-1][0], (other_started, spans)
    d.check_alive()
    d.assert_logs_clean()


def test_a_paused_queue_starts_nothing_until_it_is_resumed(
    deployment: e2e.Deployment, client: Client
) -> None:
    d = deployment
    d.dispatcher()
    d.worker("--queues", QUEUE).wait_log("worker.started")
    warm = d.enqueue("e2e.record", {"n": 0}, queue=QUEUE)
    d.wait_for(lambda: d.task(warm)["status"] == "SUCCEEDED", "the warm-up task")

    assert client.pause_queue(QUEUE) is True
    held = d.enqueue("e2e.record", {"n": 1}, queue=QUEUE)
    time.sleep(PAUSE_WATCH_S)  # the subject: nothing may start in this second
    assert d.task(held)["status"] in ("PENDING", "QUEUED"), d.task(held)
    assert d.task(held)["attempts"] == 0
    assert held not in d.runs_per_task()

    resumed_at = time.monotonic()
    assert client.resume_queue(QUEUE) is True
    d.wait_for(lambda: d.task(held)["status"] == "SUCCEEDED", "the held task after resume")
    print(f"ran {time.monotonic() - resumed_at:.3f} s after resume_queue")
    assert d.attempts(held) == [(1, "succeeded", None)]
    d.check_alive()
    d.assert_logs_clean()
