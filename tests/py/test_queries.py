"""The runtime's SQL (queries.py): every named query is used, and each one plans.

A query text nobody sends is dead weight that still has to be kept in step
with the schema; one that no longer plans (a renamed column, a dropped
function) would only fail when its caller runs. Both are caught here, before.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledgerq import errors, queries, types
from ledgerq.ledger import AsyncLedger

Conn = psycopg.Connection[Any]

RUNTIME = Path(queries.__file__).parent
QUERIES_SOURCE = Path(queries.__file__).read_text()


def named_queries() -> list[str]:
    """Every module-level ``NAME: LiteralString = ...`` in queries.py."""
    return [
        node.target.id
        for node in ast.parse(QUERIES_SOURCE).body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(node.annotation, ast.Name)
        and node.annotation.id == "LiteralString"
    ]


def plans_using(name: str) -> set[str]:
    """The public functions of queries.py whose body mentions name."""
    return {
        node.name
        for node in ast.parse(QUERIES_SOURCE).body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))
    }


@functools.cache
def runtime_references() -> frozenset[str]:
    """Every ``queries.X`` the runtime's other modules mention."""
    found: set[str] = set()
    for path in RUNTIME.rglob("*.py"):
        if path.name == "queries.py" and path.parent == RUNTIME:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "queries"
            ):
                found.add(node.attr)
    return frozenset(found)


def called_plans() -> set[str]:
    """The plans the runtime calls, and those they run in turn (``yield from``)."""
    tree = ast.parse(QUERIES_SOURCE)
    bodies = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    called = set(runtime_references()) & set(bodies)
    pending = list(called)
    while pending:
        for n in ast.walk(bodies[pending.pop()]):
            if (
                isinstance(n, ast.YieldFrom)
                and isinstance(n.value, ast.Call)
                and isinstance(n.value.func, ast.Name)
                and n.value.func.id in bodies
                and n.value.func.id not in called
            ):
                called.add(n.value.func.id)
                pending.append(n.value.func.id)
    return called


def test_queries_py_names_its_queries() -> None:
    assert len(named_queries()) >= 20
    assert "PING" in named_queries()


@pytest.mark.parametrize("name", named_queries())
def test_every_named_query_is_sent_by_a_plan_the_runtime_calls(name: str) -> None:
    plans = plans_using(name)
    assert plans, f"queries.{name} is used by no plan"
    called = plans & called_plans()
    direct = name in runtime_references()
    assert called or direct, f"queries.{name} is used only by {sorted(plans)}, which nothing calls"


def test_every_plan_is_called_by_the_runtime() -> None:
    tree = ast.parse(QUERIES_SOURCE)
    plans = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and isinstance(node.returns, ast.Subscript | ast.Name)
        and ast.unparse(node.returns).startswith("Plan")
    }
    uncalled = plans - runtime_references() - _plans_composed_by_other_plans(tree)
    assert not uncalled, f"plans nothing calls: {sorted(uncalled)}"


def _plans_composed_by_other_plans(tree: ast.Module) -> set[str]:
    return {
        n.value.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.YieldFrom)
        and isinstance(n.value, ast.Call)
        and isinstance(n.value.func, ast.Name)
    }


def test_every_named_query_passes_explain_on_the_migrated_schema(db: Conn) -> None:
    failed = {}
    for name in named_queries():
        text = getattr(queries, name)
        named = sorted(set(re.findall(r"%\((\w+)\)s", text)))
        # Untyped NULLs: the server infers each parameter's type from the query,
        # so EXPLAIN checks every table, column and function the text names.
        params: dict[str, None] | list[None] = (
            dict.fromkeys(named) if named else [None] * text.count("%s")
        )
        try:
            db.execute(f"EXPLAIN {text}", params or None).fetchall()  # type: ignore[arg-type]
        except psycopg.Error as exc:
            failed[name] = errors.first_line(exc)
    assert failed == {}


# --- the bounds the edges share --------------------------------------------------------


async def test_list_tasks_pages_up_to_the_shared_bound_and_says_where_the_next_starts(
    db_url: str,
) -> None:
    ledger = await AsyncLedger.connect(db_url, max_size=2)
    try:
        made = [t.id for t in await ledger.enqueue_tasks([types.NewTask("t")] * 5)]
        first = await ledger.list_tasks(limit=3)
        assert [t.id for t in first.tasks] == made[:1:-1]
        assert first.next_before_id == made[2]
        rest = await ledger.list_tasks(limit=3, before_id=first.next_before_id)
        assert [t.id for t in rest.tasks] == made[1::-1]
        assert rest.next_before_id is None
        exact = await ledger.list_tasks(limit=5)
        assert (len(exact.tasks), exact.next_before_id) == (5, None)
        widest = await ledger.list_tasks(limit=types.LIST_LIMIT_MAX)
        assert len(widest.tasks) == 5
        with pytest.raises(errors.InvalidInput, match=f"between 1 and {types.LIST_LIMIT_MAX},"):
            await ledger.list_tasks(limit=types.LIST_LIMIT_MAX + 1)
    finally:
        await ledger.close()
