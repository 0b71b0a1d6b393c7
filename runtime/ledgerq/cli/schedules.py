"""``ledgerq schedules``: list the schedules, and ``pause``, ``resume`` or
``delete`` one by name.

Schedules are created by the workers whose registries declare them
(``@tasks.periodic``); operators look at them and stop or start them here,
through the ledger's functions (``pause_schedule``, ``resume_schedule``,
``unschedule_task``). An unknown name exits 1 with one line (``common``).
Deleting a schedule keeps its tasks; a worker that still declares it creates
it again when it next starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ledgerq.cli import common, render
from ledgerq.ledger import Ledger


@click.group(invoke_without_command=True)
@common.json_option
@common.connection_options
@click.pass_context
def schedules(ctx: click.Context, /, as_json: bool, **options: Any) -> None:
    """List the schedules (or pause, resume or delete one by NAME)."""
    if ctx.invoked_subcommand is not None:
        return
    ledger = common.open_ledger(common.settings_from(options))
    try:
        found = ledger.list_schedules()
    finally:
        ledger.close()
    if as_json:
        render.echo_json({"schedules": [s.to_json() for s in found]})
    else:
        click.echo(render.schedules(found))


def _change(name: str, options: dict[str, Any], call: Callable[[Ledger, str], None]) -> None:
    ledger = common.open_ledger(common.settings_from(options))
    try:
        call(ledger, name)
    finally:
        ledger.close()


@schedules.command("pause")
@click.argument("name")
@common.json_option
@common.connection_options
def pause(name: str, as_json: bool, **options: Any) -> None:
    """Pause schedule NAME: no slot fires until it is resumed."""
    _change(name, options, Ledger.pause_schedule)
    _say(as_json, {"name": name, "paused": True}, f"schedule {name!r} paused")


@schedules.command("resume")
@click.argument("name")
@common.json_option
@common.connection_options
def resume(name: str, as_json: bool, **options: Any) -> None:
    """Resume schedule NAME from its first slot after now (paused slots are skipped)."""
    _change(name, options, Ledger.resume_schedule)
    _say(as_json, {"name": name, "paused": False}, f"schedule {name!r} resumed")


@schedules.command("delete")
@click.argument("name")
@common.json_option
@common.connection_options
def delete(name: str, as_json: bool, **options: Any) -> None:
    """Delete schedule NAME; the tasks it enqueued stay."""
    _change(name, options, Ledger.unschedule_task)
    _say(as_json, {"name": name, "deleted": True}, f"schedule {name!r} deleted")


def _say(as_json: bool, value: dict[str, Any], text: str) -> None:
    render.echo_json(value) if as_json else click.echo(text)
