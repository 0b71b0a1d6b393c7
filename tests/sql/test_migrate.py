"""ledgerq.migrations.migrate: idempotent, and safe when several run at once."""

from __future__ import annotations

import subprocess
import sys
import threading

import psycopg

from ledgerq import migrations

from .helpers import call_value, enqueue, schema_snapshot

ALL_MIGRATIONS = [path.stem for path in migrations.migration_files()]


def test_migrate_creates_the_ledger_in_an_empty_database(empty_db_url: str) -> None:
    assert migrations.migrate(empty_db_url) == ALL_MIGRATIONS

    snapshot = schema_snapshot(empty_db_url)
    tables = {row[0] for row in snapshot["columns"]}
    assert {"tasks", "attempts", "effects", "queue_stats"} <= tables
    function_names = {row[0] for row in snapshot["functions"]}
    assert {"enqueue_task", "claim_task", "complete_task", "reap_stuck"} <= function_names
    assert snapshot["applied"] == [(m,) for m in ALL_MIGRATIONS]


def test_migrate_twice_changes_nothing_and_keeps_data(empty_db_url: str) -> None:
    migrations.migrate(empty_db_url)
    before = schema_snapshot(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        task_id = enqueue(conn, idempotency_key="survives")

    assert migrations.migrate(empty_db_url) == []

    assert schema_snapshot(empty_db_url) == before
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert call_value(conn, "cancel_task", task_id=task_id) == "CANCELLED"


def test_migrate_of_the_template_clone_applies_nothing(db_url: str) -> None:
    assert migrations.migrate(db_url) == []


def test_concurrent_migrations_of_an_empty_database_apply_each_migration_once(
    empty_db_url: str,
) -> None:
    runners = 6
    barrier = threading.Barrier(runners)
    applied: list[list[str]] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            applied.append(migrations.migrate(empty_db_url))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(runners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert failures == []
    assert sorted(applied, key=len) == [[]] * (runners - 1) + [ALL_MIGRATIONS]
    assert schema_snapshot(empty_db_url)["applied"] == [(m,) for m in ALL_MIGRATIONS]


def test_concurrent_migrate_processes_on_an_empty_database_both_succeed(
    empty_db_url: str,
) -> None:
    code = "import sys; from ledgerq import migrations; print(len(migrations.migrate(sys.argv[1])))"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, empty_db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    assert sorted(int(out.strip()) for out, _ in outputs) == [0, len(ALL_MIGRATIONS)]
    assert schema_snapshot(empty_db_url)["applied"] == [(m,) for m in ALL_MIGRATIONS]
