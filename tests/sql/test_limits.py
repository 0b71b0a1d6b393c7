"""Flow control enforced in the ledger: limits at claim and at dispatch, parking
and waking, pause, rates, fairness between concurrency keys."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from .flow_helpers import (
    add_tasks,
    claim_report,
    configure,
    finish,
    max_overlap,
    statuses,
    take_due,
)
from .helpers import Conn, call_value, count, db_now, enqueue, expire_lease


def wake_due(conn: Conn) -> int:
    return int(call_value(conn, "flow_wake_due"))


# --- deferral and wake-up -------------------------------------------------------


def test_claim_refused_by_max_running_keeps_budget_and_runs_when_a_slot_frees(db: Conn) -> None:
    configure(db, "q", max_running=1)
    first, second = add_tasks(db, 2)
    (running,), deferred = claim_report(db, [first])
    assert deferred == []

    claimed, (refused,) = claim_report(db, [second])  # a duplicate or early delivery
    assert claimed == []
    assert refused["id"] == second
    assert refused["waiting_on"] == "max_running"
    assert statuses(db, [second])[second] == ("PENDING", "max_running", 0)
    assert take_due(db) == []  # parked: not handed out again

    db.execute("LISTEN ledgerq_tasks")
    assert finish(db, first, running["attempts"]) == "SUCCEEDED"
    # Woken by the completion, with a NOTIFY for the dispatcher: no reaper involved.
    assert statuses(db, [second])[second] == ("PENDING", None, 0)
    assert any(n.channel == "ledgerq_tasks" for n in db.notifies(timeout=1, stop_after=1))
    assert [r["id"] for r in take_due(db)] == [second]
    (started,), _ = claim_report(db, [second])
    assert started["attempts"] == 1


def test_per_key_limit_parks_only_that_key(db: Conn) -> None:
    configure(db, "q", per_key_max_running=1)
    a1, a2 = add_tasks(db, 2, key="a")
    (b1,) = add_tasks(db, 1, key="b")
    (unkeyed,) = add_tasks(db, 1)
    claimed, deferred = claim_report(db, [a1, a2, b1, unkeyed])
    assert sorted(r["id"] for r in claimed) == [a1, b1, unkeyed]
    assert [(r["id"], r["waiting_on"]) for r in deferred] == [(a2, "per_key_max_running")]
    # b finishing does not wake a's task; a finishing does.
    attempt = {r["id"]: r["attempts"] for r in claimed}
    finish(db, b1, attempt[b1])
    assert statuses(db, [a2])[a2][1] == "per_key_max_running"
    finish(db, a1, attempt[a1])
    assert statuses(db, [a2])[a2][1] is None


def test_dispatcher_hands_out_only_what_can_start(db: Conn) -> None:
    configure(db, "q", per_key_max_running=2)
    ids = add_tasks(db, 10, key="a")
    first = take_due(db)
    assert len(first) == 2
    assert sorted(r["id"] for r in first) == ids[:2]  # in line order
    parked = statuses(db, ids[2:])
    assert {v for v in parked.values()} == {("PENDING", "per_key_max_running", 0)}
    assert take_due(db) == []  # the two QUEUED count: nothing more to hand out

    claimed, _ = claim_report(db, [r["id"] for r in first])
    finish(db, claimed[0]["id"], claimed[0]["attempts"])
    # One slot freed: exactly one task woken and handed out.
    assert [r["id"] for r in take_due(db)] == [ids[2]]
    assert take_due(db) == []


def test_dispatcher_counts_the_tokens_its_queued_tasks_will_spend(db: Conn) -> None:
    configure(db, "q", rate_per_second=0.001, burst=5)  # 5 tokens, the next in 1,000 s
    ids = add_tasks(db, 8)
    assert [r["id"] for r in take_due(db, 3)] == ids[:3]  # 3 QUEUED: 2 tokens left for more
    assert [r["id"] for r in take_due(db, 5)] == ids[3:5]
    assert statuses(db, ids[5:]) == {i: ("PENDING", "rate_per_second", 0) for i in ids[5:]}


def test_dispatcher_counts_the_retry_tokens_its_queued_retries_will_spend(db: Conn) -> None:
    configure(db, "q", retry_rate_per_second=0.001, burst=5)
    ids = add_tasks(db, 8)
    db.execute("UPDATE ledgerq.tasks SET attempts = 1 WHERE id = ANY (%s)", (ids,))  # retries
    assert [r["id"] for r in take_due(db, 3)] == ids[:3]
    assert [r["id"] for r in take_due(db, 5)] == ids[3:5]
    assert statuses(db, ids[5:]) == {i: ("PENDING", "retry_rate_per_second", 1) for i in ids[5:]}


def test_cancelling_a_queued_task_frees_its_slot(db: Conn) -> None:
    configure(db, "q", max_running=1)
    first, second = add_tasks(db, 2)
    assert [r["id"] for r in take_due(db)] == [first]
    assert statuses(db, [second])[second][1] == "max_running"
    assert call_value(db, "cancel_task", task_id=first) == "CANCELLED"
    assert [r["id"] for r in take_due(db)] == [second]


def test_cancelling_a_parked_task_unparks_it(db: Conn) -> None:
    configure(db, "q", max_running=1)
    _first, second = add_tasks(db, 2)
    take_due(db)
    assert call_value(db, "cancel_task", task_id=second) == "CANCELLED"
    assert statuses(db, [second])[second] == ("CANCELLED", None, 0)


def test_expired_lease_frees_its_slot(db: Conn) -> None:
    configure(db, "q", max_running=1)
    first, second = add_tasks(db, 2)
    claim_report(db, [first])
    claim_report(db, [second])
    assert statuses(db, [second])[second][1] == "max_running"
    expire_lease(db, first)
    assert call_value(db, "reap_stuck") == 1
    assert statuses(db, [second])[second] == ("PENDING", None, 0)


def test_raising_or_removing_a_limit_wakes_parked_tasks(db: Conn) -> None:
    configure(db, "q", max_running=1)
    ids = add_tasks(db, 3)
    assert len(take_due(db)) == 1
    configure(db, "q", max_running=2)
    assert len(take_due(db)) == 1
    configure(db, "q", max_running=None)
    assert len(take_due(db)) == 1
    assert {s for s, _, _ in statuses(db, ids).values()} == {"QUEUED"}


def test_rescue_wakes_a_task_stranded_without_an_event(db: Conn) -> None:
    configure(db, "q", max_running=1)
    (task_id,) = add_tasks(db, 1)
    # As if an event had been missed: parked while the queue has a free slot.
    db.execute("UPDATE ledgerq.tasks SET waiting_on = 'max_running' WHERE id = %s", (task_id,))
    assert take_due(db) == []
    assert call_value(db, "flow_rescue") == 1
    assert [r["id"] for r in take_due(db)] == [task_id]
    assert call_value(db, "flow_rescue") == 0


def test_rescue_wakes_a_rate_parked_task_no_bucket_will_wake(db: Conn) -> None:
    configure(db, "q", rate_per_second=1)
    (task_id,) = add_tasks(db, 1)
    db.execute("UPDATE ledgerq.tasks SET waiting_on = 'rate_per_second' WHERE id = %s", (task_id,))
    assert call_value(db, "flow_rescue") == 1
    assert [r["id"] for r in take_due(db)] == [task_id]


# --- pause ------------------------------------------------------------------------


def test_pause_stops_new_starts_lets_running_finish_and_resume_restarts(db: Conn) -> None:
    running_id, queued_id, pending_id = add_tasks(db, 3)
    (running,), _ = claim_report(db, [running_id])
    take_due(db)  # queued_id and pending_id are QUEUED now
    assert call_value(db, "pause_queue", queue="q") is True
    # Handed to Redis before the pause: back in the ledger, parked.
    assert statuses(db, [queued_id, pending_id]) == {
        queued_id: ("PENDING", "paused", 0),
        pending_id: ("PENDING", "paused", 0),
    }
    claimed, deferred = claim_report(db, [queued_id])  # its id popped from Redis
    assert claimed == []
    assert [(r["id"], r["waiting_on"]) for r in deferred] == [(queued_id, "paused")]
    # Enqueues are accepted; nothing is handed out.
    new_id = enqueue(db, "t", queue="q")
    assert take_due(db) == []
    assert statuses(db, [new_id])[new_id] == ("PENDING", "paused", 0)
    # The running task finishes.
    assert finish(db, running_id, running["attempts"]) == "SUCCEEDED"

    db.execute("LISTEN ledgerq_tasks")
    assert call_value(db, "resume_queue", queue="q") is True
    assert any(n.channel == "ledgerq_tasks" for n in db.notifies(timeout=1, stop_after=1))
    assert sorted(r["id"] for r in take_due(db)) == sorted([queued_id, pending_id, new_id])
    claimed, _ = claim_report(db, [queued_id, pending_id, new_id])
    assert {r["attempts"] for r in claimed} == {1}


def test_pause_does_not_touch_other_queues(db: Conn) -> None:
    (other,) = add_tasks(db, 1, queue="other")
    add_tasks(db, 1, queue="q")
    call_value(db, "pause_queue", queue="q")
    assert [r["id"] for r in take_due(db)] == [other]


# --- exact under concurrency ------------------------------------------------------


def _race(
    url: str, task_ids: list[int], threads: int, hold_s: float, *, succeed: bool = True
) -> dict[str, int]:
    """``threads`` connections claim random handfuls of the not-yet-final tasks
    (duplicates included), hold each claimed task ``hold_s``, complete it, until
    every task is final. Some also act as dispatchers (task_take_due). Returns the
    refusals counted by reason."""
    refusals: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def racer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    open_ids = [
                        int(r[0])
                        for r in conn.execute(
                            "SELECT id FROM ledgerq.tasks WHERE id = ANY(%s)"
                            " AND status IN ('PENDING', 'QUEUED', 'RUNNING')",
                            (task_ids,),
                        )
                    ]
                    if not open_ids:
                        return
                    if seed % 2:
                        take_due(conn, 5)
                    claimed, deferred = claim_report(
                        conn, rng.sample(open_ids, min(4, len(open_ids))), f"w{seed}"
                    )
                    with lock:
                        for r in deferred:
                            refusals[r["waiting_on"]] = refusals.get(r["waiting_on"], 0) + 1
                    for r in claimed:
                        time.sleep(hold_s)
                        finish(conn, r["id"], r["attempts"], succeed)
                    if not claimed:
                        time.sleep(0.001)
                raise AssertionError("the race did not finish within 60 s")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=racer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return refusals


def test_per_key_max_running_holds_exactly_under_racing_claims(db: Conn, db_url: str) -> None:
    configure(db, "q", per_key_max_running=2)
    ids = [i for k in range(5) for i in add_tasks(db, 40, key=f"k{k}")]
    refusals = _race(db_url, ids, threads=8, hold_s=0.003)
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'SUCCEEDED'") == 200
    overlaps = max_overlap(db, "key")
    assert set(overlaps) == {f"k{k}" for k in range(5)}
    assert max(overlaps.values()) == 2, overlaps  # the limit held, and was reached
    assert refusals.get("per_key_max_running", 0) > 0
    # Every task ran exactly once: refusals spent no attempt.
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 200


def test_max_running_holds_exactly_under_racing_claims(db: Conn, db_url: str) -> None:
    configure(db, "q", max_running=3)
    ids = add_tasks(db, 120)
    refusals = _race(db_url, ids, threads=8, hold_s=0.003)
    assert max_overlap(db, "queue") == {"q": 3}
    assert refusals.get("max_running", 0) > 0
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 120


def test_pause_under_racing_claims_no_start_after_it_returns(db: Conn, db_url: str) -> None:
    ids = add_tasks(db, 400)
    configure(db, "q", max_running=1000)  # the queue has a row: claims take its lock
    racing = threading.Thread(target=_race, args=(db_url, ids, 6, 0.002))
    racing.start()
    try:
        deadline = time.monotonic() + 10
        while count(db, "SELECT count(*) FROM ledgerq.attempts") < 20:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert call_value(db, "pause_queue", queue="q") is True
        paused_at = db_now(db)
        time.sleep(0.3)  # the racers keep trying
        late = count(db, "SELECT count(*) FROM ledgerq.attempts WHERE started_at > %s", paused_at)
        assert late == 0
        assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'RUNNING'") == 0
    finally:
        call_value(db, "resume_queue", queue="q")
        racing.join()
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'SUCCEEDED'") == 400


def _wait_until_blocked(db: Conn, pid: int) -> None:
    """Until backend ``pid`` waits for a lock (poll with a deadline)."""
    deadline = time.monotonic() + 10
    while not count(
        db, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", pid
    ):
        assert time.monotonic() < deadline, "the session never waited for a lock"
        time.sleep(0.005)


def _behind(
    db: Conn,
    holder: Conn,
    waiter: Conn,
    call: Callable[[], Any],
    meanwhile: Callable[[], object] | None = None,
) -> Any:
    """call() on another thread, which must wait (on waiter's session) for a lock
    held in holder's open transaction; then meanwhile(), then holder commits.
    call's result, once it has returned."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    _wait_until_blocked(db, int(waiter.info.backend_pid))
    assert thread.is_alive()
    if meanwhile is not None:
        meanwhile()
    holder.commit()
    thread.join(10)
    assert not thread.is_alive()
    return result[0]


def test_first_pause_refuses_a_claim_that_read_no_queue_row_before_it(
    db: Conn, db_url: str
) -> None:
    """A queue never configured: a claim that checked ledgerq.queues (no row)
    before pause_queue committed must not start the task after pause_queue
    returns. The claim is held between its check and its start by a row lock."""
    (task_id,) = add_tasks(db, 1)  # PENDING and due: the pause does not touch it
    with (
        psycopg.connect(db_url) as holder,
        psycopg.connect(db_url, autocommit=True) as claimer,
    ):
        holder.execute("SELECT 1 FROM ledgerq.tasks WHERE id = %s FOR NO KEY UPDATE", (task_id,))
        paused: list[bool] = []
        claimed, deferred = _behind(
            db, holder, claimer, lambda: claim_report(claimer, [task_id]),
            meanwhile=lambda: paused.append(call_value(db, "pause_queue", queue="q")),
        )  # fmt: skip
    assert paused == [True]  # the pause gave the queue its first row
    assert claimed == []
    assert [(r["id"], r["waiting_on"]) for r in deferred] == [(task_id, "paused")]
    assert statuses(db, [task_id])[task_id] == ("PENDING", "paused", 0)
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 0


def test_first_pause_waits_for_a_claim_in_flight(db: Conn, db_url: str) -> None:
    """A claim of a never-configured queue that started the task but has not
    committed: pause_queue returns only after it commits, so the start comes
    before the pause."""
    (task_id,) = add_tasks(db, 1)
    with (
        psycopg.connect(db_url) as claimer,
        psycopg.connect(db_url, autocommit=True) as pauser,
    ):
        (running,), _ = claim_report(claimer, [task_id])  # transaction left open
        assert running["id"] == task_id
        _behind(db, claimer, pauser, lambda: call_value(pauser, "pause_queue", queue="q"))
    assert statuses(db, [task_id])[task_id][0] == "RUNNING"
    assert count(db, "SELECT count(*) FROM ledgerq.queues WHERE queue = 'q' AND paused") == 1


# --- who waits for whom ------------------------------------------------------------
# A claim decides under the locks of the scopes it may spend (flow_lock_claims): the
# queue's claim lock when it has a queue-wide limit, else one lock per concurrency key.
# Releases and the dispatcher do not wait for claims. Each test holds one side in an
# open transaction; the other side runs with a lock_timeout, so a wait that should not
# happen fails the test instead of hanging it.


def _quick(url: str) -> Conn:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET lock_timeout = '3s'")
    return conn


def test_claims_of_other_keys_do_not_wait_under_per_key_limits_only(db: Conn, db_url: str) -> None:
    configure(db, "q", per_key_max_running=1)
    (first,) = add_tasks(db, 1, key="k1")
    (other_key,) = add_tasks(db, 1, key="k2")
    (same_key,) = add_tasks(db, 1, key="k1")
    (unkeyed,) = add_tasks(db, 1)
    with (
        psycopg.connect(db_url) as holder,
        _quick(db_url) as other,
        psycopg.connect(db_url, autocommit=True) as waiter,
    ):
        (running,), _ = claim_report(holder, [first])  # k1's lock, transaction left open
        assert running["id"] == first
        claimed, _ = claim_report(other, [other_key, unkeyed])  # no wait: lock_timeout
        assert sorted(r["id"] for r in claimed) == sorted([other_key, unkeyed])
        # The same key waits for the open claim and then sees its start.
        claimed, deferred = _behind(db, holder, waiter, lambda: claim_report(waiter, [same_key]))
    assert claimed == []
    assert [(r["id"], r["waiting_on"]) for r in deferred] == [(same_key, "per_key_max_running")]


def test_claims_of_a_queue_with_a_queue_wide_limit_decide_one_at_a_time(
    db: Conn, db_url: str
) -> None:
    configure(db, "q", max_running=1, per_key_max_running=5)
    (first,) = add_tasks(db, 1, key="k1")
    (second,) = add_tasks(db, 1, key="k2")
    with (
        psycopg.connect(db_url) as holder,
        psycopg.connect(db_url, autocommit=True) as waiter,
    ):
        (running,), _ = claim_report(holder, [first])
        assert running["id"] == first
        claimed, deferred = _behind(db, holder, waiter, lambda: claim_report(waiter, [second]))
    assert claimed == []
    assert [(r["id"], r["waiting_on"]) for r in deferred] == [(second, "max_running")]


# Far from its queue-wide limits, a queue's claims decide in claim lanes, side by side:
# each leaves room for what the other lanes may be starting, and spends rate tokens on
# its lane's row. Near a limit a claim takes every lane and decides alone (limits.sql).


def test_claims_of_a_queue_far_from_its_queue_wide_limits_do_not_wait_for_each_other(
    db: Conn, db_url: str
) -> None:
    configure(db, "q", max_running=10_000, rate_per_second=100_000, retry_rate_per_second=1_000)
    first, second = add_tasks(db, 2)
    with psycopg.connect(db_url) as holder, _quick(db_url) as other:
        (running,), _ = claim_report(holder, [first])  # a lane, transaction left open
        assert running["id"] == first
        claimed, deferred = claim_report(other, [second])  # no wait: lock_timeout
        assert ([r["id"] for r in claimed], deferred) == ([second], [])
        holder.commit()
    assert statuses(db, [first, second]) == {
        first: ("RUNNING", None, 1),
        second: ("RUNNING", None, 1),
    }


def test_claims_in_lanes_and_alone_start_exactly_max_running(db: Conn, db_url: str) -> None:
    configure(db, "q", max_running=300)  # lanes until 192 slots short of it, then alone
    ids = add_tasks(db, 400)
    errors: list[BaseException] = []

    def claimer(n: int) -> None:
        try:
            mine = ids[n::4]
            with psycopg.connect(db_url, autocommit=True) as conn:
                for i in range(0, len(mine), 10):
                    claim_report(conn, mine[i : i + 10], f"w{n}")
        except BaseException as exc:
            errors.append(exc)

    claimers = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for c in claimers:
        c.start()
    for c in claimers:
        c.join()
    assert errors == []
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'RUNNING'") == 300
    parked = "SELECT count(*) FROM ledgerq.tasks WHERE waiting_on = 'max_running'"
    assert count(db, parked) == 100
    assert max_overlap(db, "queue") == {"q": 300}


def test_per_key_limits_hold_in_a_claim_lane(db: Conn) -> None:
    # max_running far away: the claims decide in lanes, and the key's limits
    # are decided there too.
    configure(db, "q", max_running=10_000, per_key_max_running=1)
    first, second, third = add_tasks(db, 3, key="A")
    (other,) = add_tasks(db, 1, key="B")
    claimed, deferred = claim_report(db, [first, second, other])
    assert sorted(r["id"] for r in claimed) == [first, other]
    assert [(r["id"], r["waiting_on"]) for r in deferred] == [(second, "per_key_max_running")]
    claimed, deferred = claim_report(db, [third])  # a claim of its own
    assert claimed == []
    assert [(r["id"], r["waiting_on"]) for r in deferred] == [(third, "per_key_max_running")]


def _claim_in_tens(conn: Conn, task_ids: list[int]) -> int:
    """Claim in batches of 10, one after another; how many started."""
    return sum(
        len(claim_report(conn, task_ids[i : i + 10])[0]) for i in range(0, len(task_ids), 10)
    )


def test_tokens_spent_in_claim_lanes_count_when_a_claim_decides_alone(db: Conn) -> None:
    configure(db, "q", rate_per_second=0.001, burst=400)  # next token in 1,000 s
    ids = add_tasks(db, 450)
    assert _claim_in_tens(db, ids) == 400
    parked = "SELECT count(*) FROM ledgerq.tasks WHERE waiting_on = 'rate_per_second'"
    assert count(db, parked) == 50


def test_retry_tokens_spent_in_claim_lanes_count_when_a_claim_decides_alone(db: Conn) -> None:
    configure(db, "q", retry_rate_per_second=0.001, burst=400)
    ids = add_tasks(db, 450)
    # Each a retry: an attempt already spent of its budget.
    db.execute("UPDATE ledgerq.tasks SET attempts = 1 WHERE id = ANY (%s)", (ids,))
    assert _claim_in_tens(db, ids) == 400
    parked = "SELECT count(*) FROM ledgerq.tasks WHERE waiting_on = 'retry_rate_per_second'"
    assert count(db, parked) == 50


def test_a_new_burst_keeps_what_claim_lanes_spent(db: Conn) -> None:
    configure(db, "q", rate_per_second=0.001, burst=400)
    ids = add_tasks(db, 400)
    assert _claim_in_tens(db, ids[:100]) == 100  # in lanes: 300 tokens left
    configure(db, "q", burst=250)  # holds 250 of them
    assert _claim_in_tens(db, ids[100:]) == 250


def test_a_claim_counts_running_tasks_without_reading_the_backlog_handed_to_redis(
    db: Conn,
) -> None:
    # Far from max_running, a queue may hand thousands of ids to Redis at once
    # (QUEUED). A claim counts only the RUNNING ones: what it reads of the tasks
    # table stays small, however long the backlog.
    configure(db, "q", max_running=1_000_000)
    ids = add_tasks(db, 5_000)
    assert len(take_due(db, 5_000)) == 5_000
    before = _task_rows_read(db)
    claimed, deferred = claim_report(db, ids[:10])
    read = _task_rows_read(db) - before
    assert (len(claimed), deferred) == (10, [])
    # Its lookups by id (a few per task) are all it reads: not the 5,000 QUEUED.
    assert read < 500, f"a claim of 10 read {read} entries of the tasks table"


def _task_rows_read(conn: Conn) -> int:
    """Index entries and heap rows read from ledgerq.tasks by this session so far,
    per the statistics (flushed first: they are reported when a session idles)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return count(
        conn,
        """
        SELECT (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
                WHERE relid = 'ledgerq.tasks'::regclass)
             + (SELECT seq_tup_read FROM pg_stat_user_tables
                WHERE relid = 'ledgerq.tasks'::regclass)
        """,
    )


def test_a_release_and_the_dispatcher_do_not_wait_for_a_claim_deciding(
    db: Conn, db_url: str
) -> None:
    configure(db, "q", max_running=10, rate_per_second=1000)
    done, claiming, due = add_tasks(db, 3)
    ((running,), _) = claim_report(db, [done])
    with psycopg.connect(db_url) as holder, _quick(db_url) as other:
        claimed, _ = claim_report(holder, [claiming])  # the claim lock, left open
        assert [r["id"] for r in claimed] == [claiming]
        assert finish(other, done, running["attempts"]) == "SUCCEEDED"
        assert [r["id"] for r in take_due(other)] == [due]
        holder.commit()


def test_a_release_waits_for_a_claim_parking_on_the_slot_and_wakes_its_task(
    db: Conn, db_url: str
) -> None:
    """The claim counted the slot busy and parks a task; the release of that slot,
    made while the claim is open, must see the parked task and wake it."""
    configure(db, "q", max_running=1)
    holding, refused = add_tasks(db, 2)
    ((running,), _) = claim_report(db, [holding])
    with (
        psycopg.connect(db_url) as parker,
        psycopg.connect(db_url, autocommit=True) as releaser,
    ):
        claimed, (parked,) = claim_report(parker, [refused])  # parks, left open
        assert claimed == [] and parked["waiting_on"] == "max_running"
        released = _behind(
            db, parker, releaser, lambda: finish(releaser, holding, running["attempts"])
        )
    assert released == "SUCCEEDED"
    assert statuses(db, [refused])[refused] == ("PENDING", None, 0)
    assert [r["id"] for r in take_due(db)] == [refused]


def test_per_key_limit_of_one_holds_over_many_keys_under_racing_claims(
    db: Conn, db_url: str
) -> None:
    configure(db, "q", per_key_max_running=1)
    ids = [i for k in range(20) for i in add_tasks(db, 8, key=f"k{k}")] + add_tasks(db, 20)
    _race(db_url, ids, threads=8, hold_s=0.002)
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'SUCCEEDED'") == 180
    overlaps = max_overlap(db, "key")
    assert {k: v for k, v in overlaps.items() if k is not None} == {f"k{k}": 1 for k in range(20)}
    assert count(db, "SELECT count(*) FROM ledgerq.attempts") == 180


# --- rates ---------------------------------------------------------------------------


def _drain_for(url: str, seconds: float, step: Callable[[Conn], None]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            step(conn)
            time.sleep(0.005)


def _claim_all_due(conn: Conn, succeed: bool = True) -> None:
    wake_due(conn)
    due = take_due(conn, 50)
    if due:
        claimed, _ = claim_report(conn, [r["id"] for r in due])
        for r in claimed:
            finish(conn, r["id"], r["attempts"], succeed)


def _starts(conn: Conn, where: str = "true") -> list[float]:
    rows = conn.execute(
        f"SELECT extract(epoch FROM started_at)::float8 FROM ledgerq.attempts WHERE {where}"
        " ORDER BY started_at"
    ).fetchall()
    return [float(r[0]) for r in rows]


def _most_in_window(starts: list[float], window: float) -> int:
    most, lo = 0, 0
    for hi, at in enumerate(starts):
        while at - starts[lo] >= window:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


def test_rate_per_second_is_a_token_bucket(db: Conn, db_url: str) -> None:
    configure(db, "q", rate_per_second=20, burst=5)
    add_tasks(db, 200)
    started = time.monotonic()
    # Two dispatcher-workers at once, as several processes would.
    racers = [
        threading.Thread(target=_drain_for, args=(db_url, 1.5, _claim_all_due)) for _ in range(2)
    ]
    for r in racers:
        r.start()
    for r in racers:
        r.join()
    elapsed = time.monotonic() - started
    starts = _starts(db)
    # At most burst + rate * window in any window; the bucket is not starved either.
    assert _most_in_window(starts, 0.5) <= 5 + 20 * 0.5
    assert _most_in_window(starts, 1.0) <= 5 + 20 * 1.0
    assert len(starts) <= 5 + 20 * elapsed + 1
    assert len(starts) >= 12  # well past the burst: the bucket refills


def test_per_key_rate_limits_each_key_alone(db: Conn, db_url: str) -> None:
    configure(db, "q", per_key_rate_per_second=10)  # burst: max(1, ceil(10)) = 10
    add_tasks(db, 100, key="a")
    add_tasks(db, 100, key="b")
    _drain_for(db_url, 1.0, _claim_all_due)
    for key in ("a", "b"):
        starts = _starts(
            db, f"task_id IN (SELECT id FROM ledgerq.tasks WHERE concurrency_key = '{key}')"
        )
        assert 10 <= len(starts) <= 10 + 10 * 1.2, (key, len(starts))
        assert _most_in_window(starts, 0.5) <= 10 + 10 * 0.5


def test_retry_rate_limits_only_retried_attempts(db: Conn, db_url: str) -> None:
    configure(db, "q", retry_rate_per_second=5, burst=1)
    ids = add_tasks(db, 30)

    def step(conn: Conn) -> None:
        _claim_all_due(conn, succeed=False)

    # Retries due at once, so only the bucket decides when they start.
    with _Immediate(db):
        _drain_for(db_url, 1.2, step)
    first_attempts = _starts(db, "attempt = 1")
    retries = _starts(db, "attempt > 1")
    assert len(first_attempts) == 30  # first attempts are not limited
    assert 1 <= len(retries) <= 1 + 5 * 1.3, len(retries)
    assert _most_in_window(retries, 0.4) <= 1 + 5 * 0.4
    assert all(s[2] >= 1 for s in statuses(db, ids).values())


class _Immediate:
    """Make compute_backoff return zero for the test's database, then restore it."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        row = conn.execute(
            "SELECT pg_get_functiondef('ledgerq.compute_backoff(integer, double precision,"
            " double precision, boolean)'::regprocedure)"
        ).fetchone()
        assert row is not None
        self.original = str(row[0])

    def __enter__(self) -> None:
        self.conn.execute(
            "CREATE OR REPLACE FUNCTION ledgerq.compute_backoff(attempt integer,"
            " base_seconds double precision DEFAULT 1, max_seconds double precision DEFAULT 3600,"
            " jitter boolean DEFAULT true) RETURNS interval LANGUAGE sql AS $$ SELECT interval '0' $$"
        )

    def __exit__(self, *exc: Any) -> None:
        self.conn.execute(self.original)  # type: ignore[arg-type]


def test_rate_parked_tasks_wake_when_the_bucket_refills(db: Conn) -> None:
    configure(db, "q", rate_per_second=10, burst=1)
    first, second = add_tasks(db, 2)
    before = db_now(db)
    assert [r["id"] for r in take_due(db)] == [first]
    after = db_now(db)
    claim_report(db, [first])
    assert statuses(db, [second])[second][1] == "rate_per_second"
    wake_at = call_value(db, "task_next_run_at")
    assert wake_at is not None
    # One token (0.1 s at 10/s) after the dispatch that parked it.
    assert (wake_at - before).total_seconds() >= 0.1
    assert (wake_at - after).total_seconds() <= 0.1
    # The claim spent the token after the wake-up was set: the bucket wakes the
    # task once a whole token is there again, not before.
    deadline = time.monotonic() + 1
    while wake_due(db) == 0:
        assert time.monotonic() < deadline
        next_wake = call_value(db, "task_next_run_at")
        time.sleep(max(0.0, (next_wake - db_now(db)).total_seconds()) + 0.005)
    assert statuses(db, [second])[second][1] is None
    (row,) = take_due(db)
    assert row["id"] == second
    (claimed,), _ = claim_report(db, [second])
    assert claimed["attempts"] == 1


# --- fairness --------------------------------------------------------------------------


def test_a_small_key_is_not_held_behind_a_large_backlog(db: Conn) -> None:
    add_tasks(db, 10_000, key="A")
    small = add_tasks(db, 5, key="B")
    first = [r["id"] for r in take_due(db, 20)]
    assert set(small) <= set(first), first
    # The turns come back with each task, for Redis to keep the order.
    rows = take_due(db, 5)
    assert all(r["turn"] > 0 and r["run_at"] is not None for r in rows)


def test_unkeyed_tasks_keep_priority_run_at_and_creation_order(db: Conn) -> None:
    low = add_tasks(db, 3, priority=0)
    high = add_tasks(db, 2, priority=5)
    assert [r["id"] for r in take_due(db, 10)] == [*high, *low]
    assert {r[0] for r in db.execute("SELECT turn FROM ledgerq.tasks")} == {0}


def test_a_key_at_its_limit_does_not_block_another_key(db: Conn) -> None:
    configure(db, "q", per_key_max_running=1)
    add_tasks(db, 1_000, key="A")
    small = add_tasks(db, 3, key="B")
    handed: list[int] = []
    for _ in range(3):
        for r in take_due(db, 10):
            handed.append(r["id"])
            claimed, _ = claim_report(db, [r["id"]])
            for c in claimed:
                finish(db, c["id"], c["attempts"])
    assert set(small) <= set(handed), handed
    # A's backlog stays parked, not handed out and refused over and over.
    assert count(db, "SELECT count(*) FROM ledgerq.tasks WHERE status = 'QUEUED'") <= 1


def test_a_retried_task_joins_the_line_after_its_key_backlog(db: Conn) -> None:
    first, *rest = add_tasks(db, 3, key="A")
    (claimed,), _ = claim_report(db, [first])
    assert finish(db, first, claimed["attempts"], succeeded=False) == "PENDING"
    turns = dict(db.execute("SELECT id, turn FROM ledgerq.tasks").fetchall())
    assert turns[first] == max(turns[r] for r in rest) + 1


def test_a_newcomer_joins_at_the_head_of_what_waits_in_redis(db: Conn) -> None:
    # A queue without max_running: the dispatcher hands A's whole backlog to
    # Redis, where it waits QUEUED in turn order.
    backlog = add_tasks(db, 100, key="A")
    assert len(take_due(db, 100)) == 100
    # A worker has started the first 40 of them.
    for task_id in backlog[:40]:
        (_claimed,), _ = claim_report(db, [task_id])
    (late,) = add_tasks(db, 1, key="B")
    (unkeyed,) = add_tasks(db, 1)
    (more_a,) = add_tasks(db, 1, key="A")
    single = enqueue(db, "t", queue="q")  # enqueue_task reads the head itself
    turns = dict(db.execute("SELECT id, turn FROM ledgerq.tasks").fetchall())
    head = min(turns[i] for i in backlog[40:])
    assert head == 41  # keyed turns start at 1
    assert call_value(db, "flow_turn", queue="q", concurrency_key=None) == head
    assert turns[late] == turns[unkeyed] == turns[single] == head
    # A's next task goes after A's last one waiting in Redis, not to the head.
    assert turns[more_a] == max(turns.values()) == 101
    # Handed out, B's task sorts right behind the head of Redis's line (the
    # order Redis pops in: priority, turn, run_at, id), ahead of A's other 59.
    handed = take_due(db, 10)
    assert {r["id"] for r in handed} == {late, unkeyed, single, more_a}
    line = db.execute(
        "SELECT id FROM ledgerq.tasks WHERE status = 'QUEUED' ORDER BY priority DESC, turn, run_at, id"
    ).fetchall()
    assert [r[0] for r in line].index(late) <= 3


def test_with_nothing_waiting_in_redis_a_newcomer_joins_at_the_frontier(db: Conn) -> None:
    backlog = add_tasks(db, 100, key="A")
    take_due(db, 50)
    for task_id in backlog[:50]:
        (claimed,), _ = claim_report(db, [task_id])
        finish(db, task_id, claimed["attempts"])
    (late,) = add_tasks(db, 1, key="B")
    turns = dict(db.execute("SELECT id, turn FROM ledgerq.tasks").fetchall())
    # The highest turn handed out (A's 50th task); A's other 50 wait after it.
    assert turns[late] == turns[backlog[49]] == 50
    assert take_due(db, 1)[0]["id"] == late


@pytest.mark.slow
def test_hot_query_at_a_million_tasks_over_ten_thousand_keys(db: Conn) -> None:
    db.execute(
        """
        INSERT INTO ledgerq.tasks (task_type, queue, concurrency_key, status, attempts, turn,
                                   run_at, finished_at, waiting_on)
        SELECT 't', CASE WHEN g % 4 = 0 THEN 'reports' ELSE 'default' END,
               'key-' || (g % 10000),
               s.status, CASE WHEN s.status = 'SUCCEEDED' THEN 1 ELSE 0 END,
               g / 10000,
               CASE WHEN g % 100 = 29 THEN now() + interval '1 hour' ELSE now() - interval '1 minute' END,
               CASE WHEN s.status = 'SUCCEEDED' THEN now() END,
               CASE WHEN g % 100 = 19 THEN 'per_key_max_running' END
        FROM generate_series(1, 1000000) g
        CROSS JOIN LATERAL (SELECT CASE WHEN g % 10 < 9 THEN 'SUCCEEDED' ELSE 'PENDING' END AS status) s
        """
    )
    db.execute("VACUUM (ANALYZE) ledgerq.tasks")
    db.execute("SET plan_cache_mode = force_generic_plan")
    db.execute(
        """
        PREPARE hot(integer, timestamptz) AS
        SELECT t.id, t.queue FROM ledgerq.tasks t
        WHERE t.status = 'PENDING' AND t.waiting_on IS NULL AND t.run_at <= coalesce($2, now())
        ORDER BY t.priority DESC, t.turn, t.run_at, t.id
        LIMIT $1
        FOR NO KEY UPDATE SKIP LOCKED
        """
    )
    with db.transaction(force_rollback=True):
        plan = "\n".join(
            r[0] for r in db.execute("EXPLAIN (ANALYZE, BUFFERS) EXECUTE hot(100, NULL)")
        )
    assert "tasks_dispatch_idx" in plan, plan
    assert "Sort" not in plan and "Seq Scan" not in plan, plan
    started = time.perf_counter()
    with db.transaction(force_rollback=True):
        taken = take_due(db, 100)
    assert len(taken) == 100
    assert time.perf_counter() - started < 0.5
    # Keys take turns: a hundred tasks from a hundred keys.
    assert len({r["id"] % 10000 for r in taken}) == 100


def test_enqueue_gives_keys_their_turns(db: Conn) -> None:
    from psycopg.types.json import Jsonb

    backlog = [{"task_type": "t", "queue": "q", "concurrency_key": "A"} for _ in range(10_000)]
    db.execute("SELECT count(*) FROM ledgerq.enqueue_tasks(%s)", (Jsonb(backlog),))
    late = [enqueue(db, "t", queue="q", concurrency_key="B") for _ in range(4)]
    (row,) = db.execute(
        "SELECT id FROM ledgerq.enqueue_tasks(%s)",
        (Jsonb([{"task_type": "t", "queue": "q", "concurrency_key": "B"}]),),
    ).fetchall()
    late.append(int(row[0]))
    turns = dict(db.execute("SELECT id, turn FROM ledgerq.tasks").fetchall())
    assert sorted(turns[i] for i in late) == [1, 2, 3, 4, 5]
    first = [r["id"] for r in take_due(db, 12)]
    assert set(late) <= set(first), first


def test_enqueue_of_a_key_reads_its_last_turn_not_its_whole_backlog(db: Conn) -> None:
    from psycopg.types.json import Jsonb

    add_tasks(db, 5_000, key="A")
    queued = add_tasks(db, 5_000, key="A")
    db.execute(
        "UPDATE ledgerq.tasks SET status = 'QUEUED', queued_at = now() WHERE id = ANY(%s)",
        (queued,),
    )
    db.execute("INSERT INTO ledgerq.flow_turns (queue, frontier) VALUES ('q', 10000)")
    # The first scan past the QUEUED tasks' old PENDING index entries marks
    # them dead in the index (vacuum would remove them); then each enqueue of
    # A reads a few index entries, not A's 5,000 waiting tasks. Counted in
    # this transaction, over every index of the table (no statistics yet, as
    # on a freshly loaded table).
    enqueue(db, "t", queue="q", concurrency_key="A")
    read = """
        SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid))::bigint
        FROM pg_index i WHERE i.indrelid = 'ledgerq.tasks'::regclass
    """
    with db.transaction():
        before = count(db, read)
        enqueue(db, "t", queue="q", concurrency_key="A")
        single = count(db, read) - before
        batch = [{"task_type": "t", "queue": "q", "concurrency_key": "A"}] * 500
        before = count(db, read)
        db.execute("SELECT count(*) FROM ledgerq.enqueue_tasks(%s)", (Jsonb(batch),))
        batched = count(db, read) - before
    assert single < 20, single
    assert batched < 20, batched


def test_a_batch_without_keys_joins_each_queue_at_its_head(db: Conn) -> None:
    from psycopg.types.json import Jsonb

    db.execute("INSERT INTO ledgerq.flow_turns (queue, frontier) VALUES ('q', 40), ('r', 7)")
    heads = {q: call_value(db, "flow_turn", queue=q, concurrency_key=None) for q in ("q", "r")}
    assert heads == {"q": 40, "r": 7}

    def turns(batch: list[dict[str, Any]]) -> list[int]:
        ids = [
            r[0] for r in db.execute("SELECT id FROM ledgerq.enqueue_tasks(%s)", (Jsonb(batch),))
        ]
        rows = dict(db.execute("SELECT id, turn FROM ledgerq.tasks WHERE id = ANY(%s)", (ids,)))
        return [rows[i] for i in ids]

    assert turns([{"task_type": "t", "queue": "q"}] * 3) == [40, 40, 40]  # one queue
    assert turns([{"task_type": "t", "queue": q} for q in ("q", "r", "q")]) == [40, 7, 40]
    # With a key in the batch, the key's tasks take consecutive turns from the head.
    mixed = [
        {"task_type": "t", "queue": "q"},
        {"task_type": "t", "queue": "q", "concurrency_key": "A"},
    ]
    assert turns(mixed + mixed[1:]) == [40, 40, 41]


def test_a_newcomer_joins_ahead_of_a_backlog_parked_on_max_running(db: Conn) -> None:
    configure(db, "q", max_running=1)
    backlog = add_tasks(db, 50, key="A")
    assert [r["id"] for r in take_due(db, 100)] == backlog[:1]  # the rest parked
    claim_report(db, backlog[:1])  # running now: nothing waits in Redis
    # The dispatcher once handed out a task far down the line (one it had not
    # parked yet, when a slot was free): the frontier is past the parked tasks.
    db.execute("UPDATE ledgerq.flow_turns SET frontier = 40 WHERE queue = 'q'")
    (newcomer,) = add_tasks(db, 1, key="B")
    single = enqueue(db, "t", queue="q")
    turns = dict(db.execute("SELECT id, turn FROM ledgerq.tasks").fetchall())
    lowest_parked = min(turns[i] for i in backlog[1:])
    assert turns[newcomer] == turns[single] == lowest_parked == 2
