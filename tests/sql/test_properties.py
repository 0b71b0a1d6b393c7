"""Hypothesis properties: backoff bounds, and the task life cycle's invariants.

The life-cycle property is a Hypothesis state machine: random sequences of SQL
API calls (enqueue, take_due, claim, heartbeat, complete ok/fail/non-retryable,
cancel, retry, release, reap with an advanced clock) against a fresh clone of
the ledger. Each call's answer is checked against the state it started from,
and after every call come invariants that no sequence may break.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager
from fractions import Fraction
from typing import Any

import psycopg
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .helpers import Conn, call_rows, call_value, named_call, task

# Small and fast: the whole suite should stay well under a minute.
FAST = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

attempts_st = st.integers(min_value=1, max_value=2**31 - 1)
# Subnormal seconds (< 2.2e-308) are left out: PostgreSQL reports their
# product with random() as an underflow error, and no caller means them.
bases_st = st.floats(min_value=0, max_value=3600, allow_subnormal=False)
maxes_st = st.floats(min_value=0, max_value=1e8, allow_subnormal=False)


def exact_ceiling(attempt: int, base: float, max_s: float) -> float:
    """min(max, base * 2^(attempt-1)) in exact arithmetic."""
    if base == 0:
        return 0.0
    if attempt - 1 > 1200:  # even the least double times 2^1200 dwarfs any max here
        return max_s
    return float(min(Fraction(max_s), Fraction(base) * 2 ** (attempt - 1)))


def backoffs_s(
    conn: Conn, attempts: list[int], base: float, max_s: float, jitter: bool
) -> list[float]:
    rows = conn.execute(
        """
        SELECT extract(epoch FROM ledgerq.compute_backoff(
            attempt => a, base_seconds => %s, max_seconds => %s, jitter => %s))
        FROM unnest(%s::integer[]) WITH ORDINALITY AS x(a, ord) ORDER BY ord
        """,
        (base, max_s, jitter, attempts),
    ).fetchall()
    return [float(row[0]) for row in rows]


@FAST
@given(attempt=attempts_st, base=bases_st, max_s=maxes_st)
def test_compute_backoff_with_jitter_stays_between_zero_and_the_capped_ceiling(
    db: Conn, attempt: int, base: float, max_s: float
) -> None:
    ceiling = exact_ceiling(attempt, base, max_s)
    for delay in backoffs_s(db, [attempt] * 20, base, max_s, jitter=True):
        assert 0 <= delay <= ceiling + 1e-6
        assert delay <= max_s + 1e-6


@FAST
@given(attempt=attempts_st, base=bases_st, max_s=maxes_st)
def test_compute_backoff_without_jitter_is_exactly_base_doubled_and_capped(
    db: Conn, attempt: int, base: float, max_s: float
) -> None:
    (delay,) = backoffs_s(db, [attempt], base, max_s, jitter=False)
    # Intervals hold microseconds.
    assert abs(delay - exact_ceiling(attempt, base, max_s)) <= 1e-6


@FAST
@given(attempts=st.lists(attempts_st, min_size=2, max_size=20), base=bases_st, max_s=maxes_st)
def test_compute_backoff_without_jitter_never_decreases_with_the_attempt(
    db: Conn, attempts: list[int], base: float, max_s: float
) -> None:
    ordered = sorted(attempts)
    delays = backoffs_s(db, ordered, base, max_s, jitter=False)
    assert delays == sorted(delays)


# -- the task life cycle ------------------------------------------------------

TASK_REF = st.integers(min_value=0, max_value=7)
OFFSET = st.sampled_from([0, 0, 0, -1, 1])  # attempt number relative to the task's latest
OUTCOME = st.sampled_from(["ok", "fail", "fail", "fatal"])


def completed_status(running: dict[str, Any], outcome: str) -> str:
    """The status complete_task must give a RUNNING task's current attempt."""
    if outcome == "ok":
        return "SUCCEEDED"
    if running["cancel_requested"]:
        return "CANCELLED"
    spent = running["attempts"] - running["budget_start"] >= running["max_attempts"]
    return "DEAD" if outcome == "fatal" or spent else "PENDING"


INVARIANTS = {
    "attempt rows are numbered 1..tasks.attempts": """
        SELECT t.id FROM ledgerq.tasks t LEFT JOIN ledgerq.attempts a ON a.task_id = t.id
        GROUP BY t.id, t.attempts
        HAVING count(a.attempt) <> t.attempts OR coalesce(max(a.attempt), 0) <> t.attempts
    """,
    "a task has an open attempt iff it is RUNNING, and it is its latest": """
        SELECT t.id FROM ledgerq.tasks t
        WHERE (t.status = 'RUNNING') <> EXISTS (
            SELECT 1 FROM ledgerq.attempts a
            WHERE a.task_id = t.id AND a.finished_at IS NULL
              AND a.attempt = t.attempts AND a.worker_id = t.worker_id)
    """,
    "at most one open attempt per task": """
        SELECT task_id FROM ledgerq.attempts WHERE finished_at IS NULL
        GROUP BY task_id HAVING count(*) > 1
    """,
    "final tasks have finished_at, others not": """
        SELECT id FROM ledgerq.tasks
        WHERE (finished_at IS NOT NULL) <> (status IN ('SUCCEEDED', 'DEAD', 'CANCELLED'))
    """,
    "no task ran more attempts than its budget": """
        SELECT id FROM ledgerq.tasks WHERE attempts - budget_start > max_attempts
    """,
    "a task SUCCEEDED iff its latest attempt, and no other, succeeded": """
        SELECT t.id FROM ledgerq.tasks t
        WHERE (t.status = 'SUCCEEDED') <> EXISTS (
                  SELECT 1 FROM ledgerq.attempts a
                  WHERE a.task_id = t.id AND a.attempt = t.attempts AND a.outcome = 'succeeded')
           OR (SELECT count(*) FROM ledgerq.attempts a
               WHERE a.task_id = t.id AND a.outcome = 'succeeded') > 1
    """,
    "finished attempts end after they start": """
        SELECT task_id FROM ledgerq.attempts WHERE finished_at < started_at
    """,
    "only RUNNING tasks hold a lease or a cancel request; only QUEUED ones a queue slot": """
        SELECT id FROM ledgerq.tasks
        WHERE (lease_expires_at IS NOT NULL) <> (status = 'RUNNING')
           OR (cancel_requested AND status <> 'RUNNING')
           OR ((queued_at IS NOT NULL) <> (status = 'QUEUED'))
    """,
    "constraints are all validated": """
        SELECT c.conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'ledgerq' AND NOT c.convalidated
    """,
}


# One round trip per step: (invariant, offending id or name) for every breach.
ALL_INVARIANTS = " UNION ALL ".join(
    f"SELECT %s::text, x::text FROM ({query}) AS broken(x)" for query in INVARIANTS.values()
)


class LedgerMachine(RuleBasedStateMachine):
    """Random SQL API calls on one fresh ledger; answers and invariants checked."""

    def __init__(self, database: AbstractContextManager[str]) -> None:
        super().__init__()
        self.resources = contextlib.ExitStack()
        url = self.resources.enter_context(database)
        self.conn: Conn = self.resources.enter_context(psycopg.connect(url, autocommit=True))
        self.ids: list[int] = []

    def teardown(self) -> None:
        self.resources.close()

    # -- helpers --

    def pick(self, ref: int, preferred: tuple[str, ...] = ()) -> int:
        """Mostly a task in a preferred state, so sequences go deep into the life
        cycle; one time in four any task, which must then be left alone."""
        candidates = self.ids
        if preferred and ref % 4 != 3:
            rows = self.conn.execute(
                "SELECT id FROM ledgerq.tasks WHERE status = ANY(%s) ORDER BY id",
                (list(preferred),),
            ).fetchall()
            candidates = [row[0] for row in rows] or self.ids
        return candidates[ref % len(candidates)]

    def ahead(self, seconds: int) -> dt.datetime:
        row = self.conn.execute("SELECT now() + make_interval(secs => %s)", (seconds,)).fetchone()
        assert row is not None
        return row[0]

    # -- rules --

    @rule(
        max_attempts=st.integers(1, 3),
        key=st.sampled_from([None, None, "k1", "k2"]),
        payload=st.integers(0, 1),
        future=st.sampled_from([False, False, True]),
    )
    def enqueue(self, max_attempts: int, key: str | None, payload: int, future: bool) -> None:
        holder = None
        if key is not None:
            holder = self.conn.execute(
                "SELECT id, payload FROM ledgerq.tasks WHERE idempotency_key = %s", (key,)
            ).fetchone()
        call, params = named_call(
            "enqueue_task",
            task_type="prop",
            payload={"n": payload},
            max_attempts=max_attempts,
            run_at=self.ahead(3600 if future else 0),
            idempotency_key=key,
        )
        try:
            rows = self.conn.execute(f"SELECT * FROM {call}", params).fetchall()
        except psycopg.Error as exc:
            assert exc.sqlstate == "LQ409"
            assert holder is not None and holder[1] != {"n": payload}
            event("enqueue -> LQ409")
            return
        ((task_id, created),) = rows
        if holder is None:
            assert created is True
            self.ids.append(task_id)
        else:
            assert (task_id, created) == (holder[0], False)
            event("enqueue -> replay")

    @rule(batch_size=st.integers(1, 3), ahead_s=st.sampled_from([0, 7200]))
    def take_due(self, batch_size: int, ahead_s: int) -> None:
        call_rows(self.conn, "task_take_due", batch_size=batch_size, as_of=self.ahead(ahead_s))

    @rule(ahead_s=st.sampled_from([0, 31, 3600]))
    def reap(self, ahead_s: int) -> None:
        if call_value(self.conn, "task_reap", as_of=self.ahead(ahead_s)):
            event("reaped")

    @precondition(lambda self: self.ids)
    @rule(ref=TASK_REF, lease_s=st.sampled_from([1, 30]))
    def claim(self, ref: int, lease_s: int) -> None:
        task_id = self.pick(ref, ("PENDING", "QUEUED"))
        before = task(self.conn, task_id)
        # One transaction, so both statements see the same now().
        with self.conn.transaction():
            row = self.conn.execute(
                "SELECT status = 'QUEUED' OR (status = 'PENDING' AND run_at <= now())"
                " FROM ledgerq.tasks WHERE id = %s",
                (task_id,),
            ).fetchone()
            assert row is not None
            rows = call_rows(
                self.conn, "claim_task", task_id=task_id, worker_id="w", lease_seconds=lease_s
            )
        if row[0]:
            assert [r["attempts"] for r in rows] == [before["attempts"] + 1]
            event("claimed")
        else:
            assert rows == []
            assert task(self.conn, task_id) == before

    @precondition(lambda self: self.ids)
    @rule(ref=TASK_REF, offset=OFFSET)
    def heartbeat(self, ref: int, offset: int) -> None:
        task_id = self.pick(ref, ("RUNNING",))
        before = task(self.conn, task_id)
        state = call_value(
            self.conn, "heartbeat", task_id=task_id, attempt=before["attempts"] + offset
        )
        if before["status"] == "RUNNING" and offset == 0:
            assert state == ("cancel" if before["cancel_requested"] else "ok")
        else:
            assert state == "lost"
            assert task(self.conn, task_id) == before

    @precondition(lambda self: self.ids)
    @rule(ref=TASK_REF, outcome=OUTCOME, offset=OFFSET)
    def complete(self, ref: int, outcome: str, offset: int) -> None:
        task_id = self.pick(ref, ("RUNNING",))
        before = task(self.conn, task_id)
        status = call_value(
            self.conn,
            "complete_task",
            task_id=task_id,
            attempt=before["attempts"] + offset,
            succeeded=outcome == "ok",
            error=None if outcome == "ok" else outcome,
            retryable=outcome != "fatal",
        )
        if before["status"] == "RUNNING" and offset == 0:
            expected = completed_status(before, outcome)
            assert status == expected
            assert task(self.conn, task_id)["status"] == expected
            event(f"complete -> {expected}")
        else:
            assert status is None
            assert task(self.conn, task_id) == before

    @precondition(lambda self: self.ids)
    @rule(ref=TASK_REF, outcome=OUTCOME, cancel_midway=st.booleans())
    def work(self, ref: int, outcome: str, cancel_midway: bool) -> None:
        """A worker's whole cycle in one step, so that few steps go deep: the
        dispatcher queues what is due within two hours (past any backoff here),
        a worker claims the task, maybe an operator cancels it meanwhile, and
        the worker completes its attempt."""
        task_id = self.pick(ref, ("PENDING", "QUEUED"))
        before = task(self.conn, task_id)
        call_rows(self.conn, "task_take_due", batch_size=100, as_of=self.ahead(7200))
        rows = call_rows(self.conn, "claim_task", task_id=task_id, worker_id="w2")
        if before["status"] not in ("PENDING", "QUEUED"):
            assert rows == []
            return
        (claimed,) = rows
        assert claimed["attempts"] == before["attempts"] + 1
        if cancel_midway:
            assert call_value(self.conn, "cancel_task", task_id=task_id) == "RUNNING"
            state = call_value(self.conn, "heartbeat", task_id=task_id, attempt=claimed["attempts"])
            assert state == "cancel"
            claimed = task(self.conn, task_id)
        status = call_value(
            self.conn,
            "complete_task",
            task_id=task_id,
            attempt=claimed["attempts"],
            succeeded=outcome == "ok",
            error=None if outcome == "ok" else outcome,
            retryable=outcome != "fatal",
        )
        expected = completed_status(claimed, outcome)
        assert status == expected
        event(f"work -> {expected}")

    @precondition(lambda self: self.ids)
    @rule(ref=TASK_REF)
    def cancel(self, ref: int) -> None:
        task_id = self.pick(ref, ("RUNNING",) if ref % 2 else ("PENDING", "QUEUED"))
        before = task(self.conn, task_id)
        status = call_value(self.conn, "cancel_task", task_id=task_id)
        expected = {"PENDING": "CANCELLED", "QUEUED": "CANCELLED"}.get(
            before["status"], before["status"]
        )
        assert status == expected
        assert task(self.conn, task_id)["cancel_requested"] is (before["status"] == "RUNNING")

    @precondition(lambda self: self.ids)
    @rule(ref=TASK_REF)
    def retry(self, ref: int) -> None:
        task_id = self.pick(ref, ("DEAD", "CANCELLED"))
        before = task(self.conn, task_id)
        try:
            status = call_value(self.conn, "retry_task", task_id=task_id)
        except psycopg.Error as exc:
            assert exc.sqlstate == "LQ409"
            assert before["status"] not in ("DEAD", "CANCELLED")
            assert task(self.conn, task_id) == before
        else:
            assert before["status"] in ("DEAD", "CANCELLED")
            assert status == "PENDING"
            assert task(self.conn, task_id)["budget_start"] == before["attempts"]
            event("retried")

    @precondition(lambda self: self.ids)
    @rule(ref=TASK_REF, offset=OFFSET)
    def release(self, ref: int, offset: int) -> None:
        task_id = self.pick(ref, ("RUNNING",))
        before = task(self.conn, task_id)
        (row,) = call_rows(
            self.conn,
            "task_release",
            task_ids=[task_id],
            attempts=[before["attempts"] + offset],
        )
        if before["status"] == "RUNNING" and offset == 0:
            assert row["status"] == ("CANCELLED" if before["cancel_requested"] else "PENDING")
        else:
            assert row["status"] is None
            assert task(self.conn, task_id) == before

    @invariant()
    def ledger_is_consistent(self) -> None:
        broken = self.conn.execute(ALL_INVARIANTS, list(INVARIANTS)).fetchall()
        assert broken == [], "\n".join(f"{name}: {ident}" for name, ident in broken)


def test_random_operation_sequences_never_break_ledger_invariants(
    database_factory: Callable[[], AbstractContextManager[str]],
) -> None:
    run_state_machine_as_test(
        lambda: LedgerMachine(database_factory()),
        settings=settings(max_examples=50, stateful_step_count=25, deadline=None),
    )
