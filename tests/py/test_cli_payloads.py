"""Large and non-ASCII payloads on the command line: `-` and `@FILE` for
PAYLOAD_JSON, `show` cutting a huge payload (saying so), `--json` whole and
readable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cli_support
import psycopg
from click.testing import CliRunner

from ledgerq import config
from ledgerq.cli import main, render

Conn = psycopg.Connection[Any]
BIG = {"rows": ["x" * 100] * 9000}  # about 900 KB of JSON


def payload_of(db: Conn, task_id: int) -> Any:
    row = db.execute("SELECT payload FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    return row[0] if row else None


def test_enqueue_reads_the_payload_from_stdin_or_a_file(
    settings: config.Settings, db: Conn, tmp_path: Path
) -> None:
    runner = CliRunner()
    env = cli_support.env_for(settings)
    piped = runner.invoke(main, ["enqueue", "big", "-", "--json"], input=json.dumps(BIG), env=env)
    assert piped.exit_code == 0, piped.output
    assert payload_of(db, json.loads(piped.stdout)["id"]) == BIG

    (tmp_path / "payload.json").write_text(json.dumps({"name": "Zoë"}), encoding="utf-8")
    filed = cli_support.invoke(
        ["enqueue", "named", f"@{tmp_path / 'payload.json'}", "--json"], settings
    )
    assert filed.exit_code == 0, filed.output
    assert payload_of(db, json.loads(filed.stdout)["id"]) == {"name": "Zoë"}

    missing = cli_support.invoke(["enqueue", "named", f"@{tmp_path / 'nope.json'}"], settings)
    cli_support.assert_one_line_failure(missing, 2, "cannot read", "nope.json")


def test_show_cuts_a_huge_payload_saying_so_and_json_prints_it_whole_and_readable(
    settings: config.Settings, db: Conn
) -> None:
    (row,) = db.execute(
        "SELECT id FROM ledgerq.enqueue_task(task_type => 'big', payload => %s)",
        (json.dumps({**BIG, "who": "café"}),),
    ).fetchall()
    task_id = row[0]

    shown = cli_support.invoke(["show", str(task_id)], settings)
    assert shown.exit_code == 0, shown.output
    assert len(shown.stdout) < 5000
    assert "characters in all; `ledgerq show ID --json` prints everything" in shown.stdout

    whole = cli_support.invoke(["show", str(task_id), "--json"], settings)
    assert json.loads(whole.stdout)["payload"] == {**BIG, "who": "café"}
    assert '"who": "café"' in whole.stdout  # not \\u00e9
    assert render.shown_json({"who": "café"}) == '{"who": "café"}'


def test_stats_reports_the_ledger_without_redis_and_says_what_it_lacks(
    settings: config.Settings, db: Conn
) -> None:
    db.execute("SELECT ledgerq.enqueue_task(task_type => 't')")
    down = {"LEDGERQ_REDIS_URL": f"redis://127.0.0.1:{cli_support.closed_port()}/0"}
    runner = CliRunner()
    env = {**cli_support.env_for(settings), **down}

    text = runner.invoke(main, ["stats"], env=env)
    as_json = runner.invoke(main, ["stats", "--json"], env=env)

    assert text.exit_code == 0, text.output
    row = text.stdout.splitlines()[1].split()
    assert row[:2] == ["default", "1"] and row[7] == "?"
    assert text.stderr.startswith("ledgerq: Redis is unavailable")
    body = json.loads(as_json.stdout)
    assert body["queues"][0]["counts"]["PENDING"] == 1
    assert body["queues"][0]["waiting_in_redis"] is None
    assert body["redis_error"].startswith("Redis is unavailable")
