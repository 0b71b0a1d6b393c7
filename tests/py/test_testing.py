"""ledgerq.testing: handlers run in-process against the real ledger, the eager
clients, and the README's example test (examples/test_quickstart_handlers.py)."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import psycopg
import pytest
from test_public_surface import EXAMPLES, load_example

from ledgerq import Context, Registry, Retryable, config, testing
from ledgerq.types import TaskStatus

Conn = psycopg.Connection[Any]

tasks = Registry()


@tasks.task("pay")
async def pay(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    charged = await ctx.once(f"charge:{payload['order']}", lambda: {"charged": payload["amount"]})

    async def write(conn: Any) -> int:
        await conn.execute(
            "INSERT INTO paid (order_id, attempt) VALUES (%s, %s)", (payload["order"], ctx.attempt)
        )
        return 1

    await ctx.once_in_transaction(f"paid:{payload['order']}", write)
    return {"order": payload["order"], **charged}


@tasks.task("pay.sync")
def pay_sync(ctx: Context, payload: dict[str, Any]) -> int:
    ctx.once_in_transaction(
        f"paid:{payload['order']}",
        lambda conn: (
            conn.execute("INSERT INTO paid (order_id, attempt) VALUES (%s, 1)", (payload["order"],))
            and 1
        ),
    )
    return 1


@tasks.task("flaky", max_attempts=3)
async def flaky(ctx: Context, payload: dict[str, Any]) -> None:
    raise Retryable("try later")


@tasks.task("enqueuer")
async def enqueuer(ctx: Context, payload: dict[str, Any]) -> None:
    return None


@pytest.fixture
def paid(db: Conn) -> Conn:
    db.execute("CREATE TABLE paid (order_id int, attempt int)")
    return db


async def test_run_task_runs_the_handler_with_working_effects_and_records_the_outcome(
    db_url: str, paid: Conn
) -> None:
    async with testing.ledger(db_url) as ledger:
        task = await testing.run_task(tasks, "pay", {"order": 7, "amount": 12}, ledger=ledger)
        again = await testing.run_task(tasks, "pay", {"order": 7, "amount": 99}, ledger=ledger)
        sync = await testing.run_task(tasks, "pay.sync", {"order": 8}, ledger=ledger)
    assert (task.status, task.result, task.attempts) == (
        "SUCCEEDED",
        {"order": 7, "charged": 12},
        1,
    )
    assert again.result == {"order": 7, "charged": 12}  # the recorded effect, not a second charge
    assert sync.status == TaskStatus.SUCCEEDED
    assert paid.execute("SELECT order_id, attempt FROM paid ORDER BY order_id").fetchall() == [
        (7, 1),
        (8, 1),
    ]
    effects = paid.execute(
        "SELECT effect_key, task_id FROM ledgerq.effects ORDER BY effect_key"
    ).fetchall()
    assert effects == [("charge:7", task.id), ("paid:7", task.id), ("paid:8", sync.id)]


async def test_a_failure_is_recorded_as_a_worker_would_and_raised(db_url: str) -> None:
    async with testing.ledger(db_url) as ledger:
        with pytest.raises(Retryable, match="try later"):
            await testing.run_task(tasks, "flaky", ledger=ledger)
        task = await testing.run_task(tasks, "flaky", ledger=ledger, raise_errors=False)
    assert (task.status, task.attempts, task.last_error) == ("PENDING", 1, "Retryable: try later")


async def test_eager_client_runs_what_it_enqueues_before_returning(
    settings: config.Settings,
) -> None:
    async with testing.EagerClient(tasks, settings) as client:
        done = await client.enqueue("enqueuer")
        later = await client.enqueue("enqueuer", delay=60)
        many = await client.enqueue_many([{"task_type": "enqueuer"}, {"task_type": "enqueuer"}])
    assert done.status == TaskStatus.SUCCEEDED
    assert later.status == TaskStatus.PENDING  # not due: left for a worker, as a worker would
    assert [t.status for t in many] == [TaskStatus.SUCCEEDED] * 2


def test_sync_eager_client_runs_what_it_enqueues_before_returning(
    settings: config.Settings,
) -> None:
    with testing.SyncEagerClient(tasks, settings) as client:
        task = client.enqueue("enqueuer")
    assert task.status == TaskStatus.SUCCEEDED


@pytest.mark.parametrize("name", ["test_send_email_records_its_effect_once",
                                  "test_a_bad_report_fails_for_good",
                                  "test_code_that_enqueues_runs_its_tasks_inline_in_eager_mode"])  # fmt: skip
async def test_the_readme_example_test_passes(name: str, db_url: str) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        example = load_example("test_quickstart_handlers")
    finally:
        sys.path.remove(str(EXAMPLES))
    test = getattr(example, name)
    assert inspect.iscoroutinefunction(test)
    await test(database_url=db_url)
