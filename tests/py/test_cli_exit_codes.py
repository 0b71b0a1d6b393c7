"""One rule from an error to an exit status, for every command ``ledgerq --help`` lists.

Every command and subcommand is walked twice: with each kind of invalid value
it takes (exit 2), and against an unreachable PostgreSQL, and an unreachable
Redis where it uses one (exit 1). Each time stderr is exactly one line with no
traceback. A new command fails ``test_every_command_is_covered`` until it is
given a line in COMMANDS below.
"""

from __future__ import annotations

from pathlib import Path

import cli_support
import click
import pytest

from ledgerq import config
from ledgerq.cli import main

Command = tuple[str, ...]

#: Each command, with the arguments it needs to get as far as its options and
#: connections, and what it reaches: "pg", "pg+redis", or nothing (offline).
COMMANDS: dict[Command, tuple[list[str], str]] = {
    ("migrate",): ([], "pg"),
    ("migrate", "show"): (["1"], ""),
    ("worker",): (["--app", "quickstart:tasks"], "pg+redis"),
    ("dispatcher",): ([], "pg+redis"),
    ("reaper",): ([], "pg"),
    ("api",): ([], "pg"),  # serves without Redis: /readyz reports it
    ("run",): (["--app", "quickstart:tasks"], "pg+redis"),
    ("enqueue",): (["t"], "pg"),
    ("show",): (["1"], "pg"),
    ("stats",): ([], "pg"),  # prints the ledger's counts without Redis
    ("types",): ([], "pg"),
    ("dead",): ([], "pg"),
    ("cancel",): (["1"], "pg"),
    ("queues",): ([], "pg"),
    ("queues", "pause"): (["q"], "pg"),
    ("queues", "resume"): (["q"], "pg"),
    ("queues", "set"): (["q", "max_running=1"], "pg"),
    ("schedules",): ([], "pg"),
    ("schedules", "pause"): (["s"], "pg"),
    ("schedules", "resume"): (["s"], "pg"),
    ("schedules", "delete"): (["s"], "pg"),
    ("demo",): ([], "pg+redis"),
    ("bench",): ([], "pg"),
}
EXAMPLES = cli_support.REPO / "examples"
_NUMBER_TYPES = {"integer", "float", "integer range", "float range"}


def walk(group: click.Group, path: Command = ()) -> list[Command]:
    """Every command below group, as name paths."""
    found: list[Command] = []
    for name, command in group.commands.items():
        found.append((*path, name))
        if isinstance(command, click.Group):
            found += walk(command, (*path, name))
    return found


def command_at(path: Command) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def invalid_cases(path: Command) -> list[tuple[list[str], str]]:
    """(arguments after the command, what the one line must say) for each kind of
    bad input the command takes."""
    cases = [(["--no-such-option"], "No such option '--no-such-option'")]
    options = {
        name: param
        for param in command_at(path).params
        if isinstance(param, click.Option)
        for name in param.opts
    }
    for name, option in options.items():
        if option.type.name in _NUMBER_TYPES:
            cases.append(([name, "nope"], f"Invalid value for '{name}'"))
    if "--database-url" in options:
        cases.append((["--database-url", "mysql://x"], "database URL must start with postgresql"))
    if "--redis-url" in options:
        cases.append((["--redis-url", "http://x"], "Redis URL must start with redis://"))
    if "--redis-prefix" in options:
        cases.append((["--redis-prefix", "a b"], "Redis prefix must be"))
    if "--app" in options:
        cases.append((["--app", "nope"], "--app must look like MODULE:REGISTRY"))
        cases.append((["--app", "no_such_module:tasks"], "cannot import 'no_such_module'"))
        cases.append((["--app", "quickstart:nothing"], "is not a ledgerq Registry"))
    if "--queues" in options:
        cases.append((["--queues", " , "], "--queues must name at least one queue"))
    needed = COMMANDS[path][0]
    cases = [([*needed, *args], needle) for args, needle in cases]
    if path == ("migrate", "show"):
        cases.append((["9999"], "no migration '9999'"))
    if path == ("enqueue",):
        cases.append((["t", "[1]"], "PAYLOAD_JSON must be a JSON object"))
    if path == ("queues", "set"):
        cases.append((["q", "max_running"], "'max_running': settings are given as KEY=VALUE"))
        cases.append((["q", "max_running=0"], "max_running"))  # the ledger's LQ422
        cases.append((["q", "burst=2", "burst=3"], "burst: given twice"))
    return cases


def test_every_command_is_covered() -> None:
    listed = cli_support.invoke(["--help"]).stdout.split("Commands:")[1].split()
    top = {line for line in listed if line in main.commands}
    assert top == set(main.commands) == {path[0] for path in COMMANDS}
    assert sorted(walk(main)) == sorted(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_invalid_input_exits_2_with_one_line(
    path: Command, settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(EXAMPLES)  # where --app quickstart:tasks is found
    for args, needle in invalid_cases(path):
        result = cli_support.invoke([*path, *args], settings)
        line = cli_support.assert_one_line_failure(result, 2, needle)
        assert result.stdout == "", (path, args, result.stdout)
        assert line.startswith("ledgerq"), line


def _unreachable(env: dict[str, str], kind: str) -> list[tuple[Command, int, str, str]]:
    """Every command reaching kind, run at once as the real script, with env."""
    paths = [p for p, (_, reaches) in sorted(COMMANDS.items()) if kind in reaches]
    processes = [
        cli_support.ledgerq_process([*p, *COMMANDS[p][0]], env, cwd=EXAMPLES) for p in paths
    ]
    try:
        return [
            (p, proc.wait(timeout=60), *proc.communicate())
            for p, proc in zip(paths, processes, strict=True)
        ]
    finally:
        for proc in processes:
            cli_support.stop_process(proc)


def test_an_unreachable_postgresql_exits_1_with_one_line(settings: config.Settings) -> None:
    down = f"postgresql://postgres@127.0.0.1:{cli_support.closed_port()}/postgres"
    env = {**cli_support.env_for(settings), "LEDGERQ_DATABASE_URL": down}
    results = _unreachable(env, "pg")
    assert len(results) == len([p for p, (_, r) in COMMANDS.items() if "pg" in r])
    for path, code, out, err in results:
        assert (code, out) == (1, ""), (path, code, out, err)
        line = cli_support.one_line(err)
        assert line.startswith("ledgerq: "), (path, line)
        assert "PostgreSQL" in line and "Connection refused" in line, (path, line)


def test_an_unreachable_redis_exits_1_with_one_line(settings: config.Settings) -> None:
    down = f"redis://127.0.0.1:{cli_support.closed_port()}/0"
    env = {**cli_support.env_for(settings), "LEDGERQ_REDIS_URL": down}
    results = _unreachable(env, "redis")
    assert {path for path, *_ in results} == {("worker",), ("dispatcher",), ("run",), ("demo",)}
    for path, code, out, err in results:
        assert (code, out) == (1, ""), (path, code, out, err)
        line = cli_support.one_line(err)
        assert line.startswith("ledgerq: Redis is unavailable: "), (path, line)


def test_the_supervised_child_entry_point_runs_a_command() -> None:
    """``python -m ledgerq.cli`` is how run and demo start their children."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "ledgerq.cli", "migrate", "show", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE" in done.stdout
