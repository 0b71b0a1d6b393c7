"""``ledgerq bench``: run the benchmark scripts under ``bench/`` and print one table.

The benchmarks live in the source tree (``bench/sql_bench.py``,
``bench/api_bench.py``, ``bench/runtime_bench.py``), not in the wheel: this
command runs whichever of them exist, each as a subprocess with this Python,
with small sizes unless ``--full`` is given, and gathers the table each prints
last into one. Each script's whole output is kept in a file named at the end.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ledgerq import config, errors

#: name -> (script, arguments for a quick run, arguments for a full run)
SUITES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "sql": (
        "sql_bench.py",
        (
            "--rows",
            "100000",
            "--seconds",
            "2",
            "--claim-tasks",
            "10000",
            "--dbname",
            "ledgerq_bench_cli",
        ),
        ("--dbname", "ledgerq_bench_cli"),
    ),
    "runtime": ("runtime_bench.py", ("--quick",), ()),
    "api": ("api_bench.py", ("--seconds", "3", "--throughput-seconds", "3"), ()),
}

#: Where the scripts are: the source tree's bench/ (absent from an installed wheel).
BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"

_NAME_COLUMNS = {"benchmark", "metric", "measure", "name"}
_RESULT_COLUMNS = {"value", "result", "unit"}
_SEPARATOR = re.compile(r"^[- ]*-{3,}[- ]*$")


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One measured number, as a benchmark script printed it."""

    suite: str
    measure: str
    result: str
    target: str = ""
    ok: str = ""


@dataclasses.dataclass(slots=True)
class SuiteRun:
    """One script's run."""

    suite: str
    script: str
    returncode: int
    seconds: float
    rows: list[Row]
    output_file: Path


def bench_dir(explicit: Path | None = None) -> Path:
    """The source tree's bench/; ConfigError when this ledgerq has none (a wheel)."""
    folder = explicit or BENCH_DIR
    if not folder.is_dir():
        raise errors.ConfigError(
            f"no benchmarks at {folder}: `ledgerq bench` runs the bench/ scripts of a source "
            "checkout (they are not installed with the package)"
        )
    return folder


def available(folder: Path, wanted: Sequence[str]) -> list[str]:
    """The suites asked for (all by default) whose script exists in folder."""
    unknown = sorted(set(wanted) - SUITES.keys())
    if unknown:
        raise errors.InvalidInput(
            f"unknown benchmark suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}"
        )
    names = [n for n in SUITES if not wanted or n in wanted]
    found = [n for n in names if (folder / SUITES[n][0]).is_file()]
    if not found:
        raise errors.ConfigError(f"none of {', '.join(SUITES[n][0] for n in names)} is in {folder}")
    return found


def bench_env(settings: config.Settings, base: Mapping[str, str]) -> dict[str, str]:
    """The environment the scripts read their servers from."""
    return {
        **base,
        "LEDGERQ_DATABASE_URL": settings.database_url,
        "LEDGERQ_BENCH_ADMIN_URL": settings.database_url,
        "LEDGERQ_REDIS_URL": settings.redis_url,
        "LEDGERQ_BENCH_REDIS_URL": settings.redis_url,
    }


def run_suite(
    folder: Path, suite: str, *, full: bool, env: Mapping[str, str], out_dir: Path
) -> SuiteRun:
    """Run one script; its stderr (progress) passes through, its stdout is parsed."""
    script, quick_args, full_args = SUITES[suite]
    output_file = out_dir / f"{suite}.txt"
    started = time.monotonic()
    with output_file.open("wb") as out:
        done = subprocess.run(
            [sys.executable, str(folder / script), *(full_args if full else quick_args)],
            cwd=folder.parent,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            check=False,
        )
    text = output_file.read_text(errors="replace")
    rows = parse_table(suite, text)
    return SuiteRun(suite, script, done.returncode, time.monotonic() - started, rows, output_file)


def parse_table(suite: str, text: str) -> list[Row]:
    """The rows of the last table in a script's output.

    A table is a header line followed by a dashed separator (whose runs of
    dashes give the columns), or a header line starting with ``measure`` whose
    columns are separated by two or more spaces."""
    lines = text.rstrip().splitlines()
    header_at = None
    spans: list[tuple[int, int]] | None = None
    for i in range(len(lines) - 1, 0, -1):
        if _SEPARATOR.match(lines[i]) and lines[i - 1].strip():
            header_at = i - 1
            spans = [m.span() for m in re.finditer(r"-+", lines[i])]
            break
    if header_at is None:
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].split()[:1] == ["measure"]:
                header_at = i
                break
    if header_at is None:
        return []
    headers = _cells(lines[header_at], spans)
    body = lines[header_at + (2 if spans else 1) :]
    rows = []
    for line in body:
        if not line.strip():
            break
        rows.append(_row(suite, headers, _cells(line, spans)))
    return rows


def _cells(line: str, spans: list[tuple[int, int]] | None) -> list[str]:
    if spans is None:
        return [c for c in re.split(r"\s{2,}", line.strip())]
    cells = []
    for n, (start, end) in enumerate(spans):
        stop = spans[n + 1][0] if n + 1 < len(spans) else len(line)
        cells.append(line[start : max(end, stop)].strip())
    return cells


def _row(suite: str, headers: list[str], cells: list[str]) -> Row:
    names = [h.lower() for h in headers]
    if names and not names[-1]:
        names[-1] = "ok"  # a pass/fail mark under no heading of its own
    named = dict(zip(names, cells, strict=False))
    extra = cells[len(headers) :]
    measure = " / ".join(v for k, v in named.items() if k in _NAME_COLUMNS and v)
    result = " ".join(v for k, v in named.items() if k in _RESULT_COLUMNS and v)
    unnamed = [
        v
        for k, v in named.items()
        if v and k not in _NAME_COLUMNS | _RESULT_COLUMNS | {"target", "ok"}
    ]
    result = " ".join([result, *unnamed, *extra]).strip()
    if not measure:
        measure, result = (cells[0] if cells else ""), " ".join(cells[1:])
    return Row(suite, measure, result, named.get("target", ""), named.get("ok", ""))


def run_all(
    settings: config.Settings,
    suites: Sequence[str],
    *,
    full: bool,
    folder: Path | None = None,
    base_env: Mapping[str, str],
    announce: object = None,
) -> list[SuiteRun]:
    """Run the suites one after another (they would compete for the cores)."""
    where = bench_dir(folder)
    names = available(where, suites)
    out_dir = Path(tempfile.mkdtemp(prefix="ledgerq-bench-"))
    env = bench_env(settings, base_env)
    runs = []
    for name in names:
        if callable(announce):
            announce(name, SUITES[name][0])
        runs.append(run_suite(where, name, full=full, env=env, out_dir=out_dir))
    return runs
