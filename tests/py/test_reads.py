"""The dashboard's ledger calls (reads.py): every named query is sent by a plan
the runtime calls, each one plans on the migrated schema, and the reads of the
tasks table are served by an index at scale, not by a scan."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledgerq import errors, reads

Conn = psycopg.Connection[Any]

SOURCE = Path(reads.__file__).read_text()
RUNTIME = Path(reads.__file__).parent


def named_queries() -> list[str]:
    return [
        node.target.id
        for node in ast.parse(SOURCE).body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(node.annotation, ast.Name)
        and node.annotation.id == "LiteralString"
    ]


def plans() -> dict[str, set[str]]:
    """Each plan of reads.py and the names its body mentions."""
    return {
        node.name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        for node in ast.parse(SOURCE).body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
    }


def runtime_references() -> set[str]:
    found: set[str] = set()
    for path in RUNTIME.rglob("*.py"):
        if path == Path(reads.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "reads"
            ):
                found.add(node.attr)
    return found


@pytest.mark.parametrize("name", named_queries())
def test_every_named_query_is_sent_by_a_plan_the_runtime_calls(name: str) -> None:
    using = {plan for plan, names in plans().items() if name in names}
    assert using, f"reads.{name} is used by no plan"
    assert using & runtime_references(), f"reads.{name}: its plans {using} are never called"


def explain_errors(db: Conn, names: list[str]) -> dict[str, str]:
    failed = {}
    for name in names:
        text = getattr(reads, name)
        named = sorted(set(re.findall(r"%\((\w+)\)s", text)))
        params: Any = dict.fromkeys(named) if named else [None] * text.count("%s")
        try:
            db.execute(f"EXPLAIN {text}", params or None).fetchall()
        except psycopg.Error as exc:
            failed[name] = errors.first_line(exc)
    return failed


def test_every_query_plans_on_the_migrated_schema(db: Conn) -> None:
    assert explain_errors(db, named_queries()) == {}


def test_a_migrated_ledger_has_the_optional_objects(db: Conn) -> None:
    (row,) = db.execute(reads.FEATURES).fetchall()
    assert row == (True,)


def plan_nodes(db: Conn, text: str, params: Any) -> list[dict[str, Any]]:
    """Every node of text's plan."""
    rows = db.execute(f"EXPLAIN (FORMAT JSON) {text}", params).fetchall()
    found: list[dict[str, Any]] = []
    stack = [rows[0][0][0]["Plan"]]
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.get("Plans", []))
    return found


def tasks_access(nodes: list[dict[str, Any]]) -> set[tuple[str, str | None]]:
    """(node type, index) of every node that reads ledgerq.tasks."""
    return {
        (n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "tasks"
    }


@pytest.fixture
def big_ledger(db: Conn) -> Conn:
    """200,000 finished tasks over 10 days and a few live ones, analyzed."""
    db.execute(
        """
        INSERT INTO ledgerq.tasks (task_type, queue, status, attempts, created_at, finished_at,
                                   run_at, idempotency_key)
        SELECT 't', 'q' || (i % 5), 'SUCCEEDED', 1, f, f, f, 'k' || i
        FROM generate_series(1, 200000) AS i,
             LATERAL (SELECT now() - make_interval(secs => i * 4.32)) AS g(f)
        """
    )
    db.execute("ANALYZE ledgerq.tasks")
    return db


def test_reads_of_the_tasks_table_use_indexes_not_a_scan(big_ledger: Conn) -> None:
    finished = tasks_access(plan_nodes(big_ledger, reads.FINISHED_PER_MINUTE, (60,)))
    assert finished == {("Index Only Scan", "tasks_finished_idx")}
    by_key = tasks_access(plan_nodes(big_ledger, reads.TASK_BY_KEY, ("k77",)))
    assert {index for _, index in by_key} == {"tasks_idempotency_key_idx"}
    dead = tasks_access(plan_nodes(big_ledger, reads.DEAD_COUNT, {"queue": None}))
    assert {index for _, index in dead} == {"tasks_dead_idx"}
    workers = tasks_access(plan_nodes(big_ledger, reads.WORKERS_SEEN, {"window_s": 300.0}))
    assert workers, "the workers query reads the tasks table"
    assert all(kind != "Seq Scan" for kind, _ in workers), workers
