"""The development commands: run and bench (cli/dev.py, cli/bench.py).

``run`` runs as the real ``ledgerq`` script, because what it promises (one
process group, exit codes, no orphan processes) is about processes.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import cli_support
import httpx
import psycopg
import pytest

from ledgerq import config
from ledgerq.cli import bench as bench_runner
from ledgerq.cli import supervise

Conn = psycopg.Connection[Any]


def status_of(db: Conn, task_id: int) -> str:
    row = db.execute("SELECT status FROM ledgerq.tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row[0])


# --- run ---------------------------------------------------------------------------------------


def test_run_serves_every_component_and_one_sigint_stops_them_all_with_exit_0(
    settings: config.Settings, db: Conn
) -> None:
    port = cli_support.free_port()
    run = cli_support.ledgerq_process(
        ["run", "--app", "quickstart:tasks", "--processes", "2", "--port", str(port),
         "--reaper-interval", "0.2", "--log-level", "WARNING"],
        cli_support.env_for(settings), cwd=cli_support.REPO / "examples",
    )  # fmt: skip
    try:
        # api, dispatcher, reaper and two workers: five children, all in one
        # group. A child just forked is in the supervisor's group until it
        # joins its own, so the groups are read once all five have started.
        children = cli_support.poll(
            lambda: (d := cli_support.descendants(run.pid)) and len(d) >= 5 and d, what="5 children"
        )
        assert len(children) == 5, children
        groups = cli_support.poll(
            lambda: (g := {os.getpgid(pid) for pid in children}) != {os.getpgid(run.pid)} and g,
            what="the children's group",
        )
        assert len(groups) == 1 and os.getpgid(run.pid) not in groups, groups
        cli_support.poll(lambda: _ready(port), what="the API")

        reply = httpx.post(
            f"http://127.0.0.1:{port}/tasks",
            json={"type": "email.send", "payload": {"to": "a@b.c"}},
        )
        assert reply.status_code == 201, reply.text
        task_id = reply.json()["id"]
        cli_support.poll(lambda: status_of(db, task_id) == "SUCCEEDED", what="the task to succeed")

        os.kill(run.pid, signal.SIGINT)
        assert run.wait(timeout=30) == 0, run.communicate()
        _, err = run.communicate()
        assert "Traceback" not in err
        assert [pid for pid in children if cli_support.alive(pid)] == []
    finally:
        cli_support.stop_process(run)


def test_run_stops_everything_and_exits_1_when_a_component_fails(
    settings: config.Settings,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = cli_support.ledgerq_process(
            ["run", "--app", "quickstart:tasks", "--port", str(port), "--log-level", "WARNING"],
            cli_support.env_for(settings), cwd=cli_support.REPO / "examples",
        )  # fmt: skip
        try:
            children = cli_support.poll(
                lambda: (d := cli_support.descendants(run.pid)) and len(d) >= 4 and d,
                what="children",
            )
            assert run.wait(timeout=40) == 1
            _, err = run.communicate()
            # uvicorn exits 3 when it cannot bind
            assert "ledgerq run: api exited with status 3; stopping the rest" in err
            assert [pid for pid in children if cli_support.alive(pid)] == []
        finally:
            cli_support.stop_process(run)


@pytest.mark.parametrize("service", ["api", "dispatcher", "reaper"])
def test_a_child_stopped_while_it_is_still_starting_stops_gracefully(
    settings: config.Settings, service: str
) -> None:
    args = [service, "--port", str(cli_support.free_port())] if service == "api" else [service]
    group = supervise.ProcessGroup(settings)
    child = group.start(service, args)
    # At once: the child's interpreter is still starting. SIGTERM's default
    # action would kill it (-15); held until the service handles it, it is a
    # graceful stop.
    group.terminate()
    assert group.stop(timeout_s=30) == {service: 0}
    assert not cli_support.alive(child.pid)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# --- bench -------------------------------------------------------------------------------------


def test_bench_without_a_bench_folder_is_one_line(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_runner, "BENCH_DIR", tmp_path / "bench")
    cli_support.assert_one_line_failure(
        cli_support.invoke(["bench"], settings), 2, "no benchmarks at", "source checkout"
    )


SQL_OUTPUT = """\
running hot_query ...
benchmark       metric                                   value  unit     target
--------------  ----------------------------------  ----------  -------  ----------  ----
hot_query       SELECT execution, median of 300          0.045  ms       < 0.2       ok
enqueue_batch   enqueue_tasks x1000                     53,300  tasks/s  >= 100,000  MISS
"""
RUNTIME_OUTPUT = """\
('drain 2000 no-op tasks, 1 process(es)', '9,000 tasks/s (0.22 s)')

benchmark                              result
-------------------------------------  ----------------------------------------
drain 2000 no-op tasks, 1 process(es)  9,000 tasks/s (0.22 s)
pickup latency at 200 tasks/s          p50 1.10 ms, p99 2.00 ms
"""
API_OUTPUT = """\
ledgerq API ingress @ abc123 (2 cores shared by client, API and PostgreSQL)
measure                                                    result       target  ok
POST /tasks latency @ 200/s, mean                         1.20 ms
POST /tasks/batch, 1,000 per batch                 61,000 tasks/s   >= 50,000  yes
"""


def test_bench_parses_the_table_each_script_prints_last() -> None:
    assert bench_runner.parse_table("sql", SQL_OUTPUT) == [
        bench_runner.Row(
            "sql", "hot_query / SELECT execution, median of 300", "0.045 ms", "< 0.2", "ok"
        ),
        bench_runner.Row(
            "sql", "enqueue_batch / enqueue_tasks x1000", "53,300 tasks/s", ">= 100,000", "MISS"
        ),
    ]
    assert bench_runner.parse_table("runtime", RUNTIME_OUTPUT) == [
        bench_runner.Row(
            "runtime", "drain 2000 no-op tasks, 1 process(es)", "9,000 tasks/s (0.22 s)"
        ),
        bench_runner.Row("runtime", "pickup latency at 200 tasks/s", "p50 1.10 ms, p99 2.00 ms"),
    ]
    assert bench_runner.parse_table("api", API_OUTPUT) == [
        bench_runner.Row("api", "POST /tasks latency @ 200/s, mean", "1.20 ms"),
        bench_runner.Row(
            "api", "POST /tasks/batch, 1,000 per batch", "61,000 tasks/s", ">= 50,000", "yes"
        ),
    ]
    assert bench_runner.parse_table("api", "no table at all\n") == []


def test_bench_runs_the_scripts_that_exist_and_prints_one_table(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "bench"
    folder.mkdir()
    for name, output, code in (("sql_bench.py", SQL_OUTPUT, 0), ("api_bench.py", API_OUTPUT, 3)):
        script = f"import sys\nprint(sys.argv[1:])\nprint({output!r})\nsys.exit({code})\n"
        (folder / name).write_text(script)
    monkeypatch.setattr(bench_runner, "BENCH_DIR", folder)

    result = cli_support.invoke(["bench"], settings)
    assert result.exit_code == 1, result.output  # api_bench.py failed
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["suite", "measure", "result", "target", "ok"]
    assert lines[1].split()[:2] == ["sql", "hot_query"]
    assert any(line.startswith("api ") and "61,000 tasks/s" in line for line in lines)
    assert any("api_bench.py FAILED (exit 3)" in line for line in lines)
    assert "running bench/sql_bench.py (quick) ..." in result.stderr
    assert "running bench/runtime_bench.py" not in result.stderr  # it does not exist here
    first_output = (Path(lines[-1].split(": ", 1)[1].split(", ")[0])).read_text()
    assert first_output.splitlines()[0] == str(list(bench_runner.SUITES["sql"][1]))

    cli_support.assert_one_line_failure(
        cli_support.invoke(["bench", "gpu"], settings), 2, "unknown benchmark suite(s) gpu"
    )
