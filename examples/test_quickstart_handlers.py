"""Unit tests of quickstart.py's handlers with ledgerq.testing: no worker, no Redis.

Each test runs a handler in this process against a real ledger (give your test
suite a PostgreSQL database with `ledgerq migrate` applied, and a
`database_url` fixture naming it). ledgerq's own suite runs these tests.
"""

from __future__ import annotations

import pytest
from quickstart import tasks  # the Registry under test

from ledgerq import NonRetryable, testing
from ledgerq.config import Settings


async def test_send_email_records_its_effect_once(database_url: str) -> None:
    async with testing.ledger(database_url) as ledger:
        task = await testing.run_task(tasks, "email.send", {"to": "ada@example.com"}, ledger=ledger)
    assert task.status == "SUCCEEDED"
    assert task.result == {"to": "ada@example.com", "message_id": f"msg-{task.id}"}


async def test_a_bad_report_fails_for_good(database_url: str) -> None:
    async with testing.ledger(database_url) as ledger:
        with pytest.raises(NonRetryable, match="invalid"):
            await testing.run_task(tasks, "report.build", {"fail": True}, ledger=ledger)


async def test_code_that_enqueues_runs_its_tasks_inline_in_eager_mode(database_url: str) -> None:
    settings = Settings.from_env(database_url=database_url)
    async with testing.EagerClient(tasks, settings) as client:
        task = await client.enqueue("report.build", {})  # ran before enqueue returned
    assert (task.status, task.result) == ("SUCCEEDED", {"rows": 3})
