"""The deployment files: every command compose.yaml runs is one ledgerq accepts.

No image registry is reachable where these tests run, so the compose file is
not started here (docs/deployment.md says what was checked by hand). What can
be checked without one is checked: each service's command parses with the real
click commands (an unknown command or option fails), the worker's ``--app``
names a real Registry, and the Dockerfile's stages, user and entrypoint are
what docs/deployment.md promises.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import click
import helpers
import psycopg
import pytest
import yaml

from ledgerq import Registry, config
from ledgerq.cli import main
from ledgerq.dispatcher import Dispatcher
from ledgerq.worker import Worker

Conn = psycopg.Connection[Any]

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def ledgerq_services() -> dict[str, list[str]]:
    """The services that run the ledgerq image, with their command lines."""
    return {
        name: [str(part) for part in service["command"]]
        for name, service in compose()["services"].items()
        if service.get("image", "").startswith("ledgerq:")
    }


def parse(args: list[str]) -> tuple[click.Command, click.Context]:
    """The command args name and its parsed context: click raises UsageError on an
    unknown command, an unknown option or a bad value, as `ledgerq` itself would."""
    group_ctx = click.Context(main, info_name="ledgerq")
    command = main.get_command(group_ctx, args[0])
    if command is None:
        raise click.UsageError(f"no such command {args[0]!r}")
    return command, command.make_context(args[0], list(args[1:]), parent=group_ctx)


def test_compose_runs_every_component_of_the_system() -> None:
    commands = {args[0] for args in ledgerq_services().values()}
    assert commands == {"migrate", "api", "dispatcher", "reaper", "worker"}
    services = compose()["services"]
    assert {"postgres", "redis"} <= services.keys()
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, f"{name} has no health check"


@pytest.mark.parametrize("service", sorted(ledgerq_services()))
def test_compose_command_is_one_ledgerq_accepts(service: str) -> None:
    args = ledgerq_services()[service]
    command, _ = parse(args)
    assert command.name == args[0]


def test_parse_refuses_what_ledgerq_would_refuse() -> None:
    # The check above is only as good as parse(): it must fail where ledgerq would.
    with pytest.raises(click.UsageError):
        parse(["worker", "--app", "m:r", "--no-such-option"])
    with pytest.raises(click.UsageError):
        parse(["dispatch"])


def test_compose_worker_serves_a_real_registry() -> None:
    _, ctx = parse(ledgerq_services()["worker"])
    module_name, _, attribute = ctx.params["app"].partition(":")
    registry = getattr(importlib.import_module(module_name), attribute)
    assert isinstance(registry, Registry)
    assert len(registry) > 0


def test_compose_api_is_published_on_loopback_only() -> None:
    ports = compose()["services"]["api"]["ports"]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)


def test_postgres_service_preloads_pg_cron() -> None:
    dockerfile = (ROOT / "docker" / "postgres" / "Dockerfile").read_text()
    assert "postgresql-15-cron" in dockerfile
    assert "shared_preload_libraries=pg_cron" in dockerfile


def test_dockerfile_is_two_stages_non_root_with_ledgerq_as_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    assert re.search(r"^USER ledgerq$", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["ledgerq"\]$', text, re.MULTILINE)
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        assert (ROOT / source).exists(), f"COPY {source}: no such file"


async def test_demo_app_runs_on_a_database_the_demo_did_not_prepare(
    settings: config.Settings, db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # compose.yaml's worker serves the demo app on a plain migrated database: the
    # app must create its execution logs itself, once, however many workers race.
    from ledgerq.cli.demo import app as demo_app

    monkeypatch.setenv("LEDGERQ_DATABASE_URL", settings.database_url)
    monkeypatch.setattr(demo_app, "_schema_ready", False)
    async with helpers.running(settings, demo_app.tasks, worker=False, dispatcher=False) as s:
        worker = Worker(demo_app.tasks, s.ledger, s.dispatch, worker_id="compose", concurrency=8)
        dispatcher = Dispatcher(s.ledger, s.dispatch, database_url=settings.database_url)
        ids = [await s.enqueue("operation.run", {"name": f"op-{n}"}) for n in range(4)]
        ids.append(await s.enqueue("payment.charge", {"account": "a", "amount_cents": 5}))
        assert await dispatcher.run_once() == 5
        assert await worker.run_once() == 5
        statuses = {t: (await s.ledger.get(t)).status.value for t in ids}
    assert statuses == dict.fromkeys(ids, "SUCCEEDED")
    assert db.execute("SELECT count(*) FROM demo.operation_logs").fetchone() == (4,)
    assert db.execute("SELECT count(*) FROM demo.payment_logs").fetchone() == (1,)
