"""``ledgerq queues``: the list (plain and --json) with counts, pause and settings,
and ``pause``, ``resume`` and ``set`` through the ledger's own functions."""

from __future__ import annotations

import json
from typing import Any

import cli_support
import psycopg
import pytest
from ui_support import enqueue

from ledgerq import config
from ledgerq.cli import queues

Conn = psycopg.Connection[Any]


def view(db: Conn) -> dict[str, tuple[bool, dict[str, Any]]]:
    rows = db.execute("SELECT queue, paused, settings FROM ledgerq.queue_settings").fetchall()
    return {queue: (paused, settings) for queue, paused, settings in rows}


@pytest.mark.parametrize(
    ("item", "parsed"),
    [
        ("max_running=5", ("max_running", 5)),
        ("rate_per_second=0.5", ("rate_per_second", 0.5)),
        ("rate_per_second=2e3", ("rate_per_second", 2000.0)),
        ("burst=-1", ("burst", -1)),
        ("retention=3 days", ("retention", "3 days")),
        ("max_running=null", ("max_running", None)),
        ("max_running=5x", ("max_running", "5x")),
        ("max_running=0x10", ("max_running", "0x10")),
        ("max_running=NaN", ("max_running", "NaN")),
        (" burst = 7 ", ("burst", 7)),
    ],
)
def test_values_that_look_like_json_numbers_are_numbers(item: str, parsed: tuple[str, Any]) -> None:
    assert queues.parse_setting(item) == parsed


def test_queues_lists_counts_pause_and_settings(settings: config.Settings, db: Conn) -> None:
    empty = cli_support.invoke(["queues"], settings)
    assert empty.exit_code == 0
    assert empty.stdout.startswith("no queues yet")
    enqueue(db, queue="mail")
    enqueue(db, queue="mail")
    db.execute("SELECT ledgerq.configure_queue('billing', '{\"max_running\": 3, \"burst\": 4}')")
    db.execute("SELECT ledgerq.pause_queue('reports')")

    result = cli_support.invoke(["queues"], settings)
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == [
        "queue", "PENDING", "QUEUED", "RUNNING", "SUCCEEDED", "DEAD", "CANCELLED", "state",
        "settings",
    ]  # fmt: skip
    assert lines[1:] == [
        ["billing", "0", "0", "0", "0", "0", "0", "active", "max_running=3", "burst=4"],
        ["mail", "2", "0", "0", "0", "0", "0", "active", "-"],
        ["reports", "0", "0", "0", "0", "0", "0", "paused", "-"],
    ]

    as_json = cli_support.invoke(["queues", "--json"], settings)
    assert as_json.exit_code == 0
    listed = {q["queue"]: q for q in json.loads(as_json.stdout)["queues"]}
    assert (listed["billing"]["paused"], listed["billing"]["settings"]) == (
        False, {"max_running": 3, "burst": 4},
    )  # fmt: skip
    assert listed["reports"]["paused"] is True
    assert listed["mail"]["counts"]["PENDING"] == 2


def test_pause_and_resume(settings: config.Settings, db: Conn) -> None:
    result = cli_support.invoke(["queues", "pause", "mail"], settings)
    assert (result.exit_code, result.stdout) == (0, "queue 'mail' paused\n")
    again = cli_support.invoke(["queues", "pause", "mail"], settings)
    assert (again.exit_code, again.stdout) == (
        0, "queue 'mail' was already paused: nothing changed\n",
    )  # fmt: skip
    assert view(db) == {"mail": (True, {})}
    result = cli_support.invoke(["queues", "resume", "mail", "--json"], settings)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"queue": "mail", "paused": False, "changed": True}
    again = cli_support.invoke(["queues", "resume", "mail"], settings)
    assert again.stdout == "queue 'mail' was already active: nothing changed\n"
    assert view(db) == {"mail": (False, {})}


def test_set_merges_settings_and_null_removes_one(settings: config.Settings, db: Conn) -> None:
    result = cli_support.invoke(
        ["queues", "set", "mail", "max_running=5", "rate_per_second=0.5", "retention=3 days"],
        settings,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "queue 'mail': max_running=5 rate_per_second=0.5 retention=3 days\n"
    result = cli_support.invoke(["queues", "set", "mail", "max_running=null", "--json"], settings)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"rate_per_second": 0.5, "retention": "3 days"}
    assert view(db) == {"mail": (False, {"rate_per_second": 0.5, "retention": "3 days"})}


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["max_running=0"], "max_running"),
        (["max_running=five"], "max_running"),
        (["per_key_max_running=1.5"], "per_key_max_running"),
        (["max_runing=3"], "max_runing"),
        (["max_running"], "'max_running': settings are given as KEY=VALUE"),
        (["=3"], "'=3': settings are given as KEY=VALUE"),
        (["rate_per_second=1e999"], "rate_per_second: 1e999 is too large"),
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_it(
    settings: config.Settings, db: Conn, items: list[str], needle: str
) -> None:
    cli_support.invoke(["queues", "set", "mail", "max_running=4"], settings)
    result = cli_support.invoke(["queues", "set", "mail", *items], settings)
    line = cli_support.assert_one_line_failure(result, 2, needle)
    assert line.startswith("ledgerq: ")
    assert result.stdout == ""
    assert view(db) == {"mail": (False, {"max_running": 4})}


def test_untrusted_names_and_values_are_escaped(settings: config.Settings, db: Conn) -> None:
    evil = "mail\x1b]52;c;aGk=\x07\u202e"
    db.execute("SELECT ledgerq.pause_queue(%s)", (evil,))
    listed = cli_support.invoke(["queues"], settings).stdout
    assert "\x1b" not in listed and "\u202e" not in listed and "\x07" not in listed
    assert "mail\\x1b]52;c;aGk=\\x07\\u202e" in listed
    paused = cli_support.invoke(["queues", "resume", evil], settings).stdout
    assert "\x1b" not in paused and "\u202e" not in paused
    assert view(db)[evil] == (False, {})
