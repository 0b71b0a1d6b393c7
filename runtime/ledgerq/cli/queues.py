"""``ledgerq queues``: list the queues with their counts, pause and settings, and
``pause``, ``resume`` or ``set`` one.

Every change is a call of the ledger's own function (``pause_queue``,
``resume_queue``, ``configure_queue``), which holds for every worker at once
and survives restarts. ``set`` takes ``KEY=VALUE`` pairs: a value that looks
like a JSON number is sent as that number, ``null`` removes the setting, and
anything else is sent as text (``retention=3 days``). The ledger checks every
key and value; a refusal names the key and exits 2 with one line (``common``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import click

from ledgerq import errors, types
from ledgerq.cli import common, render

# A JSON number, whole: "5", "-1", "0.5", "2e3" (not "5x", "0x10", "1_000" or "nan").
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def parse_setting(item: str) -> tuple[str, types.JsonValue]:
    """``KEY=VALUE`` as (key, value): a JSON number as a number, ``null`` as None
    (remove the setting), anything else as text. InvalidInput naming the item."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise errors.InvalidInput(f"{item!r}: settings are given as KEY=VALUE (e.g. max_running=5)")
    text = text.strip()
    if text == "null":
        return key, None
    if _NUMBER.fullmatch(text):
        number = json.loads(text)
        if isinstance(number, float) and not math.isfinite(number):
            raise errors.InvalidInput(f"{key}: {text} is too large")
        return key, number
    return key, text


def parse_settings(items: tuple[str, ...]) -> types.JsonObject:
    """Every ``KEY=VALUE`` item; a key given twice is refused (which one was meant?)."""
    settings: types.JsonObject = {}
    for item in items:
        key, value = parse_setting(item)
        if key in settings:
            raise errors.InvalidInput(f"{key}: given twice")
        settings[key] = value
    return settings


@click.group(invoke_without_command=True)
@common.json_option
@common.connection_options
@click.pass_context
def queues(ctx: click.Context, /, as_json: bool, **options: Any) -> None:
    """List the queues: tasks by status, paused or not, settings (or pause, resume
    or set one)."""
    if ctx.invoked_subcommand is not None:
        return
    ledger = common.open_ledger(common.settings_from(options))
    try:
        summary = ledger.queue_summary()
    finally:
        ledger.close()
    if as_json:
        render.echo_json({"queues": [q.to_json() for q in summary]})
    else:
        click.echo(render.queues(summary))


@queues.command("pause")
@click.argument("queue")
@common.json_option
@common.connection_options
def pause(queue: str, as_json: bool, **options: Any) -> None:
    """Pause QUEUE: no task of it starts until it is resumed (running ones finish;
    enqueues are still accepted)."""
    ledger = common.open_ledger(common.settings_from(options))
    try:
        done = ledger.pause_queue(queue)
    finally:
        ledger.close()
    _say(as_json, done)


@queues.command("resume")
@click.argument("queue")
@common.json_option
@common.connection_options
def resume(queue: str, as_json: bool, **options: Any) -> None:
    """Resume QUEUE: its tasks start again, as its settings allow."""
    ledger = common.open_ledger(common.settings_from(options))
    try:
        done = ledger.resume_queue(queue)
    finally:
        ledger.close()
    _say(as_json, done)


@queues.command("set")
@click.argument("queue")
@click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
@common.json_option
@common.connection_options
def set_settings(queue: str, settings: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Change QUEUE's settings: KEY=VALUE for each (KEY=null removes one; the others
    stay). Keys: max_running, per_key_max_running, rate_per_second,
    per_key_rate_per_second, retry_rate_per_second, burst, retention."""
    changes = parse_settings(settings)  # before connecting: a typo costs no round trip
    ledger = common.open_ledger(common.settings_from(options))
    try:
        merged = ledger.configure_queue(queue, changes)
    finally:
        ledger.close()
    if as_json:
        render.echo_json(merged)
    else:
        click.echo(render.queue_configured(queue, merged))


def _say(as_json: bool, done: types.QueuePaused) -> None:
    render.echo_json(done.to_json()) if as_json else click.echo(render.queue_paused(done))
