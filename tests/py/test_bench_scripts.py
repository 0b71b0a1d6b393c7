"""The benchmark scripts under bench/ load against the runtime as it is now: a
benchmark that no longer imports is a number nobody can measure again. Each is
loaded in a process of its own (its module-level code runs, its main does not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))

LOAD = """
import runpy, sys
sys.path.insert(0, sys.argv[2])
runpy.run_path(sys.argv[1], run_name="bench_script_loaded")
"""


def test_there_are_benchmark_scripts() -> None:
    assert {"api_bench.py", "flow_bench.py", "runtime_bench.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_script_loads(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(script), str(BENCH)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
