"""The public surface: what `from ledgerq import ...` offers, and the example app."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import helpers
import psycopg

import ledgerq
from ledgerq import Registry, config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_all_is_short_sorted_and_importable() -> None:
    assert ledgerq.__all__ == sorted(ledgerq.__all__)
    assert set(ledgerq.__all__) == {
        "AsyncClient", "Client", "Context", "InvalidPayload", "NonRetryable", "Registry",
        "Retryable", "Task", "TaskStatus", "__version__",
    }  # fmt: skip
    for name in ledgerq.__all__:
        assert getattr(ledgerq, name) is not None


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_quickstart_example_runs_end_to_end(
    settings: config.Settings, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    quickstart = load_example("quickstart")
    registry = quickstart.tasks
    assert isinstance(registry, Registry)
    assert registry.names() == ["email.send", "noop", "report.build", "sleep"]
    async with helpers.running(settings, registry) as s:
        email = await s.enqueue("email.send", {"to": "ada@example.com"})
        report = await s.enqueue("report.build", {"fail": True})
        bad = await s.enqueue("email.send", {"subject": "no recipient"})
        sent = await helpers.wait_for_status(s.ledger, email, "SUCCEEDED")
        failed = await helpers.wait_for_status(s.ledger, report, "DEAD")
        invalid = await helpers.wait_for_status(s.ledger, bad, "DEAD")
    assert sent.result == {"to": "ada@example.com", "message_id": f"msg-{email}"}
    assert failed.attempts == 1
    assert (failed.last_error or "").startswith("NonRetryable: the report definition is invalid")
    assert invalid.attempts == 1
    assert (invalid.last_error or "").startswith("InvalidPayload: payload does not match Email")
    # ctx.once recorded the send as an effect of the email task, once.
    rows = db.execute(
        "SELECT effect_key, task_id, result FROM ledgerq.effects ORDER BY effect_key"
    ).fetchall()
    assert rows == [(f"email:{email}", email, f"msg-{email}")]
