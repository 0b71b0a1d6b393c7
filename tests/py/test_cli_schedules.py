"""``ledgerq schedules``: the list (plain and --json), and pause, resume and
delete by name, with one line and exit 1 for an unknown name."""

from __future__ import annotations

import json
from typing import Any

import cli_support
import psycopg
import pytest

from ledgerq import config

Conn = psycopg.Connection[Any]


def add_schedule(db: Conn, name: str, cron: str, timezone: str = "UTC") -> None:
    db.execute(
        "SELECT ledgerq.schedule_task(name => %s, cron => %s, task_type => 'job', timezone => %s)",
        (name, cron, timezone),
    )


def paused(db: Conn) -> dict[str, bool]:
    return dict(db.execute("SELECT name, paused FROM ledgerq.task_schedules").fetchall())


def test_schedules_lists_every_schedule(settings: config.Settings, db: Conn) -> None:
    empty = cli_support.invoke(["schedules"], settings)
    assert (empty.exit_code, empty.stdout) == (0, "no schedules\n")
    add_schedule(db, "nightly", "0 3 * * *", "Europe/Berlin")
    add_schedule(db, "beat", "@every 5 seconds")

    result = cli_support.invoke(["schedules"], settings)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["name", "cron", "timezone", "type", "queue"]
    assert lines[1].split()[:5] == ["beat", "@every", "5", "seconds", "UTC"]
    assert lines[2].split()[:8] == ["nightly", "0", "3", "*", "*", "*", "Europe/Berlin", "job"]
    assert len(lines) == 3

    as_json = cli_support.invoke(["schedules", "--json"], settings)
    assert as_json.exit_code == 0
    listed = json.loads(as_json.stdout)["schedules"]
    assert [(s["name"], s["cron"], s["paused"]) for s in listed] == [
        ("beat", "@every 5 seconds", False),
        ("nightly", "0 3 * * *", False),
    ]


def test_pause_resume_and_delete_by_name(settings: config.Settings, db: Conn) -> None:
    add_schedule(db, "beat", "@every 5 seconds")
    result = cli_support.invoke(["schedules", "pause", "beat"], settings)
    assert (result.exit_code, result.stdout) == (0, "schedule 'beat' paused\n")
    assert paused(db) == {"beat": True}
    listed = cli_support.invoke(["schedules"], settings).stdout
    assert "paused" in listed.splitlines()[1]

    result = cli_support.invoke(["schedules", "resume", "beat", "--json"], settings)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"name": "beat", "paused": False}
    assert paused(db) == {"beat": False}

    result = cli_support.invoke(["schedules", "delete", "beat"], settings)
    assert (result.exit_code, result.stdout) == (0, "schedule 'beat' deleted\n")
    assert paused(db) == {}


@pytest.mark.parametrize("action", ["pause", "resume", "delete"])
def test_an_unknown_name_exits_1_with_one_line(
    settings: config.Settings, db: Conn, action: str
) -> None:
    add_schedule(db, "beat", "@every 5 seconds")
    result = cli_support.invoke(["schedules", action, "missing"], settings)
    line = cli_support.assert_one_line_failure(result, 1, "schedule 'missing' does not exist")
    assert line == "ledgerq: schedule 'missing' does not exist"
    assert result.stdout == ""
    assert paused(db) == {"beat": False}
