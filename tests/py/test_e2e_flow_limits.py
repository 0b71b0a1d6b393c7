"""End to end: flow control with several real worker processes, duplicate
deliveries, a SIGKILLed worker and restarts.

- ``max_running=2`` and ``per_key_max_running=1`` hold across two worker
  processes (concurrency 4 each) while every open task id is pushed to Redis
  again and again (duplicate deliveries) and one worker is SIGKILLed mid-task:
  the attempt history never shows more than 2 attempts of the queue, or 1 of a
  key, at once (a killed attempt's interval ends when the reaper records it
  lost), and every task ends SUCCEEDED.
- A pause survives a restart of every process.
- Fairness: a key that arrives behind another key's backlog of 2,000 tasks
  (the issue's 20,000 would take minutes on this machine; the turns do not
  depend on the backlog's size) is served within a few rounds of turns,
  both where the backlog waits in the ledger (``max_running``) and where the
  dispatcher hands all of it to Redis at once (a queue without settings).
- ``retry_rate_per_second`` holds while every attempt fails: the starts of
  attempts after the first never outrun the retry bucket over any window, while
  first attempts are not held by it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import e2e_helpers as e2e
import psycopg
import pytest

from ledgerq import Client, config, dispatch, types

pytestmark = pytest.mark.e2e

QUEUE = "tenants"


@pytest.fixture
def client(settings: config.Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def max_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at once; at equal times an end counts first."""
    events = sorted(
        [(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans], key=lambda e: (e[0], e[1])
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def spans_by(d: e2e.Deployment, column: str) -> dict[Any, list[tuple[datetime, datetime]]]:
    rows = d.query(
        f"SELECT t.{column}, a.started_at, a.finished_at FROM ledgerq.attempts a "
        "JOIN ledgerq.tasks t ON t.id = a.task_id"
    )
    assert all(finished is not None for _, _, finished in rows), rows
    spans: dict[Any, list[tuple[datetime, datetime]]] = {}
    for scope, started, finished in rows:
        spans.setdefault(scope, []).append((started, finished))
    return spans


class Redeliverer:
    """Pushes every open task id of QUEUE to Redis again every 50 ms, as a
    dispatcher's sweep does for ids it cannot find there: duplicate deliveries."""

    def __init__(self, d: e2e.Deployment) -> None:
        self.d = d
        self.pushed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Redeliverer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        asyncio.run(self._push_until_stopped())

    async def _push_until_stopped(self) -> None:
        async with dispatch.connected(self.d.redis_url, self.d.redis_prefix) as redis_dispatch:
            with psycopg.connect(self.d.database_url, autocommit=True) as conn:
                while not self._stop.is_set():
                    ids = [
                        int(r[0])
                        for r in conn.execute(
                            "SELECT id FROM ledgerq.tasks WHERE status IN ('PENDING', 'QUEUED', 'RUNNING')"
                        )
                    ]
                    tasks = [types.DueTask(types.TaskId(i), QUEUE, 0) for i in ids]
                    if tasks:
                        self.pushed += await redis_dispatch.push(tasks)
                    await asyncio.sleep(0.05)


def test_limits_hold_across_two_workers_duplicate_deliveries_and_a_killed_worker(
    deployment: e2e.Deployment, client: Client
) -> None:
    d = deployment
    client.configure_queue(QUEUE, max_running=2, per_key_max_running=1)
    d.dispatcher()
    d.reaper()
    first = d.worker("--queues", QUEUE, concurrency=4, lease_s=3)
    second = d.worker("--queues", QUEUE, concurrency=4, lease_s=3)
    first.wait_log("worker.started")
    second.wait_log("worker.started")
    ids = d.enqueue_many(
        [
            {"task_type": "e2e.record", "payload": {"n": n, "sleep_s": 0.2}, "queue": QUEUE,
             "concurrency_key": f"k{n % 3}"}
            for n in range(24)
        ]
    )  # fmt: skip
    with Redeliverer(d) as redeliverer:
        # Kill the first worker while one of its attempts runs.
        d.wait_for(
            lambda: d.query_one(
                "SELECT 1 FROM e2e_runs r JOIN ledgerq.tasks t ON t.id = r.task_id "
                "WHERE r.pid = %s AND t.status = 'RUNNING' AND t.attempts = r.attempt",
                (first.pid,),
            ),
            "an attempt running in the first worker",
        )
        first.send(signal.SIGKILL)
        d.wait_statuses({"SUCCEEDED": len(ids)}, timeout_s=60)
    assert redeliverer.pushed > 0, "no duplicate delivery was made"

    lost = d.query("SELECT count(*) FROM ledgerq.attempts WHERE outcome = 'lost'")
    assert lost[0][0] >= 1, d.diagnostics()
    by_queue = spans_by(d, "queue")
    assert max_overlap(by_queue[QUEUE]) == 2, by_queue  # held, and reached
    by_key = spans_by(d, "concurrency_key")
    assert set(by_key) == {"k0", "k1", "k2"}
    assert {key: max_overlap(spans) for key, spans in by_key.items()} == dict.fromkeys(by_key, 1)
    # Refusals spent no attempt: only the killed attempts were run twice.
    assert d.query("SELECT count(*) FROM ledgerq.attempts") == [(len(ids) + lost[0][0],)]
    d.check_alive()


def test_a_pause_survives_a_restart_of_every_process(
    deployment: e2e.Deployment, client: Client
) -> None:
    d = deployment
    procs = [d.dispatcher(), d.reaper(), d.worker("--queues", QUEUE)]
    procs[-1].wait_log("worker.started")
    assert client.pause_queue(QUEUE) is True
    for proc in procs:
        proc.send(signal.SIGTERM)
    for proc in procs:
        proc.wait_exit(15)

    d.dispatcher()
    d.reaper()
    d.worker("--queues", QUEUE).wait_log("worker.started")
    held = d.enqueue_many(
        [{"task_type": "e2e.record", "payload": {"n": n}, "queue": QUEUE} for n in range(3)]
    )
    time.sleep(1.0)  # the subject: nothing may start in this second
    assert d.query("SELECT count(*) FROM ledgerq.attempts") == [(0,)]
    assert d.runs_per_task() == {}
    assert client.resume_queue(QUEUE) is True
    d.wait_statuses({"SUCCEEDED": len(held)}, timeout_s=20)
    assert d.runs_per_task() == dict.fromkeys(held, 1)
    d.check_alive()
    d.assert_logs_clean()


BACKLOG = 2000
NEWCOMERS = 10


@pytest.mark.parametrize(
    "queue_settings",
    [
        pytest.param({"max_running": 4}, id="backlog-in-the-ledger"),
        pytest.param({}, id="backlog-in-redis"),
    ],
)
def test_a_key_behind_a_long_backlog_is_served_within_a_few_rounds(
    deployment: e2e.Deployment, client: Client, queue_settings: dict[str, int]
) -> None:
    d = deployment
    if queue_settings:
        client.configure_queue(QUEUE, **queue_settings)
    d.dispatcher()
    d.worker("--queues", QUEUE, concurrency=4).wait_log("worker.started")
    backlog = d.enqueue_many(
        [
            {
                "task_type": "e2e.record",
                "payload": {"n": n, "sleep_s": 0.01},
                "queue": QUEUE,
                "concurrency_key": "A",
            }
            for n in range(BACKLOG)
        ]
    )
    # Enqueued once the backlog is already being served.
    d.wait_for(
        lambda: d.query_one("SELECT 1 FROM ledgerq.attempts LIMIT 1"), "the backlog to start"
    )
    if not queue_settings:
        # The whole backlog is in Redis before the newcomers arrive.
        d.wait_for(
            lambda: d.query_one(
                "SELECT 1 FROM ledgerq.tasks WHERE status = 'PENDING' HAVING count(*) = 0"
            ),
            "the dispatcher to hand out the backlog",
        )
    newcomers = d.enqueue_many(
        [
            {"task_type": "e2e.record", "payload": {"n": n}, "queue": QUEUE, "concurrency_key": "B"}
            for n in range(NEWCOMERS)
        ]
    )
    d.wait_for(
        lambda: d.query_one(
            "SELECT 1 FROM ledgerq.tasks WHERE id = ANY(%s) HAVING bool_and(status = 'SUCCEEDED')",
            (newcomers,),
        ),
        "the newcomers to finish",
        timeout_s=60,
    )
    # Backlog tasks that started between the newcomers' arrival and the last
    # newcomer's finish: about one per round while the newcomers take theirs,
    # plus what the worker's slots already held. Without turns: the rest of
    # the backlog.
    row = d.query_one(
        "SELECT count(*) FROM ledgerq.attempts WHERE task_id = ANY(%(backlog)s)"
        " AND started_at >= (SELECT min(created_at) FROM ledgerq.tasks WHERE id = ANY(%(new)s))"
        " AND started_at <= (SELECT max(finished_at) FROM ledgerq.attempts WHERE task_id = ANY(%(new)s))",
        {"backlog": backlog, "new": newcomers},
    )
    assert row is not None
    overtaken_by = int(row[0])
    print(f"{overtaken_by} backlog tasks started while the {NEWCOMERS} newcomers waited")
    assert overtaken_by < 5 * NEWCOMERS
    d.wait_statuses({"SUCCEEDED": BACKLOG + NEWCOMERS}, timeout_s=120)
    d.check_alive()
    d.assert_logs_clean()


RETRY_RATE = 5.0  # burst: ceil(rate) = 5
FAILING = 20
FAILING_ATTEMPTS = 3


def test_retry_rate_holds_while_every_attempt_fails(
    deployment: e2e.Deployment, client: Client
) -> None:
    d = deployment
    client.configure_queue(QUEUE, retry_rate_per_second=RETRY_RATE)
    d.dispatcher()
    d.reaper()
    d.worker("--queues", QUEUE, concurrency=8).wait_log("worker.started")
    ids = d.enqueue_many(
        [
            {"task_type": "e2e.fail", "payload": {"n": n}, "queue": QUEUE,
             "max_attempts": FAILING_ATTEMPTS}
            for n in range(FAILING)
        ]
    )  # fmt: skip
    d.wait_statuses({"DEAD": FAILING}, timeout_s=60)
    assert d.runs_per_task() == dict.fromkeys(ids, FAILING_ATTEMPTS)

    retries = [
        started
        for (started,) in d.query(
            "SELECT started_at FROM ledgerq.attempts WHERE attempt > 1 ORDER BY started_at"
        )
    ]
    assert len(retries) == FAILING * (FAILING_ATTEMPTS - 1)
    burst = 5
    worst = 0.0
    for i, first in enumerate(retries):
        for j in range(i, len(retries)):
            window_s = (retries[j] - first).total_seconds()
            worst = max(worst, (j - i + 1) - (burst + RETRY_RATE * window_s))
    # Starts in any window never exceed the bucket: burst + rate * window (+ clock slack).
    assert worst <= 0.05, worst
    spread_s = (retries[-1] - retries[0]).total_seconds()
    print(f"{len(retries)} retries over {spread_s:.2f} s")
    # The first attempts were not held by the retry bucket.
    (first_spread,) = d.query_one(
        "SELECT extract(epoch FROM max(started_at) - min(started_at)) FROM ledgerq.attempts "
        "WHERE attempt = 1"
    ) or (None,)
    assert float(first_spread) < (FAILING - burst) / RETRY_RATE, first_spread
    d.check_alive()
