"""Migration 0005: every transition into a final status announces the task's
id on ledgerq_final when it commits, and no other transition does."""

from __future__ import annotations

import psycopg

from .helpers import Conn, call_value, claimed, complete, enqueue


def announced(listener: Conn) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=0.2)]


def test_final_transitions_announce_the_task_id_and_others_do_not(db: Conn, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN ledgerq_final")
        succeeded, retried, dead, cancelled = (enqueue(db, max_attempts=n) for n in (5, 5, 1, 5))

        complete(db, succeeded, claimed(db, succeeded), True)
        complete(db, retried, claimed(db, retried), False)  # back to PENDING: not final
        complete(db, dead, claimed(db, dead), False)
        call_value(db, "cancel_task", task_id=cancelled)
        call_value(db, "cancel_task", task_id=cancelled)  # already final: no second notice

        assert announced(listener) == [str(succeeded), str(dead), str(cancelled)]


def test_a_final_transition_rolled_back_announces_nothing(db: Conn, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN ledgerq_final")
        task_id = enqueue(db)
        with db.transaction(force_rollback=True):
            call_value(db, "cancel_task", task_id=task_id)
        assert announced(listener) == []
