"""What ``ledgerq demo`` submitted, and each guarantee checked against the ledger.

The demo (``run`` and ``workload``) records what it sent in a ``Run``;
``verify`` reads back every task, attempt and effect and turns each guarantee
into a ``Check`` with its evidence. Nothing is assumed: a guarantee is upheld
only if the ledger's own records show it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime
from typing import Any

import click
import psycopg

from ledgerq import config, types
from ledgerq.cli import render
from ledgerq.cli.demo import app as demo_app
from ledgerq.ledger import AsyncLedger

# The demo's settings that its checks quote as evidence.
LEASE_S = 3
REAPER_INTERVAL_S = 0.5
DUPLICATE_SUBMITS = 5


@dataclasses.dataclass(slots=True)
class Check:
    """One guarantee, how this run checked it, and whether it held."""

    guarantee: str
    evidence: list[str]
    upheld: bool


@dataclasses.dataclass(slots=True)
class Run:
    """What the demo submitted and saw."""

    expected: dict[int, tuple[str, types.TaskStatus]] = dataclasses.field(default_factory=dict)
    accepted_ids: set[int] = dataclasses.field(default_factory=set)
    notes: list[str] = dataclasses.field(default_factory=list)
    duplicate_codes: list[int] = dataclasses.field(default_factory=list)
    duplicate_ids: set[int] = dataclasses.field(default_factory=set)
    conflict_code: int | None = None
    refused_code: int | None = None
    refused_message: str = ""
    killed_task: int | None = None
    killed_worker: str | None = None
    killed_at: datetime | None = None
    flaky_task: int | None = None


# --- checking against the ledger ---------------------------------------------------------


async def verify(
    ledger: AsyncLedger, settings: config.Settings, run: Run
) -> tuple[list[Check], str]:
    tasks: list[types.Task] = []
    before: int | None = None
    while True:  # every task, a page at a time
        page = await ledger.list_tasks(limit=types.LIST_LIMIT_MAX, before_id=before)
        tasks += page.tasks
        if page.next_before_id is None:
            break
        before = page.next_before_id
    tasks = [t for t in tasks if t.queue != demo_app.SCHEDULE_QUEUE]  # checked by periodic
    history = await ledger.attempts_of([t.id for t in tasks])
    tasks = [dataclasses.replace(t, attempt_history=history.get(t.id, ())) for t in tasks]
    by_id: dict[int, types.Task] = {t.id: t for t in tasks}
    effects = await ledger.effects_of(list(by_id))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        logs = demo_app.log_rows(conn)
    checks = [
        check_final(run, by_id),
        check_recovery(run, by_id),
        check_attempts(tasks),
        check_effects(by_id, effects, logs, run),
        check_idempotency(run, tasks),
        check_bad_input(run, by_id),
    ]
    return checks, render_logs(effects, logs)


def check_final(run: Run, by_id: dict[int, types.Task]) -> Check:
    missing = sorted(run.accepted_ids - by_id.keys())
    unknown = sorted(by_id.keys() - run.accepted_ids)
    open_ = sorted(t.id for t in by_id.values() if not t.status.is_final)
    by_status = Counter(t.status.value for t in by_id.values())
    evidence = [
        f"{len(run.accepted_ids)} tasks accepted by the API, {len(by_id)} in the ledger, "
        f"{len(by_id) - len(open_)} final ("
        + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
        + ")"
    ]
    if missing:
        evidence.append(f"missing from the ledger: {missing}")
    if unknown:
        evidence.append(f"in the ledger but never accepted: {unknown}")
    if open_:
        evidence.append(f"not final: {open_}")
    return Check(
        "1. An accepted task is durable and runs to a final state",
        evidence,
        not (missing or unknown or open_),
    )


def check_attempts(tasks: list[types.Task]) -> Check:
    problems = []
    count = 0
    for task in tasks:
        numbers = [a.attempt for a in task.attempt_history]
        count += len(numbers)
        if numbers != list(range(1, len(numbers) + 1)) or len(numbers) != task.attempts:
            problems.append(f"task {task.id}: attempt numbers {numbers}, attempts={task.attempts}")
        for earlier, later in zip(task.attempt_history, task.attempt_history[1:], strict=False):
            if earlier.finished_at is None or earlier.finished_at > later.started_at:
                problems.append(
                    f"task {task.id}: attempts {earlier.attempt} and {later.attempt} overlap"
                )
        if any(a.finished_at is None for a in task.attempt_history):
            problems.append(f"task {task.id}: an attempt never ended")
    evidence = [
        f"{count} attempts over {len(tasks)} tasks: numbers unique and consecutive, "
        "each ended before the next began"
        if not problems
        else f"{len(problems)} problem(s)",
        *problems[:5],
    ]
    return Check("2. At most one attempt of a task runs at a time", evidence, not problems)


def check_recovery(run: Run, by_id: dict[int, types.Task]) -> Check:
    task = by_id.get(run.killed_task or 0)
    name = "1. A task survives its worker's kill -9: reaped, then finished by another worker"
    if task is None:
        return Check(name, ["the killed worker's task is missing"], False)
    attempts = task.attempt_history
    lost = [a for a in attempts if a.outcome is types.AttemptOutcome.LOST]
    ok = (
        task.status is types.TaskStatus.SUCCEEDED
        and len(attempts) == 2
        and attempts[0].outcome is types.AttemptOutcome.LOST
        and attempts[0].worker_id == run.killed_worker
        and attempts[1].outcome is types.AttemptOutcome.SUCCEEDED
        and attempts[1].worker_id != run.killed_worker
    )
    evidence = [
        f"task {task.id}: "
        + "; ".join(
            f"attempt {a.attempt} on {a.worker_id}: {a.outcome.value if a.outcome else 'open'}"
            for a in attempts
        )
    ]
    if lost and run.killed_at is not None and len(attempts) > 1:
        reaped = lost[0].finished_at
        again = attempts[1].started_at
        if reaped is not None:
            evidence.append(
                f"SIGKILL -> reaped after {render.age((reaped - run.killed_at).total_seconds())}, running "
                f"again after {render.age((again - run.killed_at).total_seconds())} (lease {LEASE_S} s + "
                f"reaper {REAPER_INTERVAL_S:g} s + backoff)"
            )
    return Check(name, evidence, ok)


def check_effects(
    by_id: dict[int, types.Task], effects: list[Any], logs: dict[str, dict[str, int]], run: Run
) -> Check:
    problems = []
    recorded = Counter(e.effect_key for e in effects)
    problems += [f"effect {k} recorded {n} times" for k, n in recorded.items() if n > 1]
    for table_name, prefix in demo_app.LOG_PREFIXES.items():
        keys = {k for k in recorded if k.startswith(prefix)}
        rows = logs[table_name]
        problems += [f"{table_name}: {k} written {n} times" for k, n in rows.items() if n != 1]
        if set(rows) != keys:
            problems.append(f"{table_name}: rows {len(rows)} != effects recorded {len(keys)}")
    effect_tasks = Counter(e.task_id for e in effects)
    for task in by_id.values():
        if task.status is types.TaskStatus.SUCCEEDED and effect_tasks[task.id] != 1:
            problems.append(f"task {task.id} SUCCEEDED with {effect_tasks[task.id]} effects")
    flaky = by_id.get(run.flaky_task or 0)
    flaky_emails = logs["email_logs"].get(f"email:{run.flaky_task}", 0)
    if flaky is None or flaky.attempts != 3 or flaky_emails != 1:
        problems.append(
            f"flaky email: {flaky.attempts if flaky else '?'} attempts, {flaky_emails} emails"
        )
    rows_total = sum(sum(r.values()) for r in logs.values())
    evidence = [
        f"{len(recorded)} effect keys recorded once each; {rows_total} rows in the execution "
        "logs, one per key; every SUCCEEDED task has exactly one effect",
        f"flaky email {run.flaky_task}: {flaky.attempts if flaky else '?'} attempts, "
        f"{flaky_emails} email sent (ctx.once)",
        *problems[:5],
    ]
    return Check("3. An effect happens once per effect key", evidence, not problems)


def check_idempotency(run: Run, tasks: list[types.Task]) -> Check:
    keys = Counter(t.idempotency_key for t in tasks if t.idempotency_key is not None)
    reused = [k for k, n in keys.items() if n > 1]
    codes = Counter(run.duplicate_codes)
    ok = (
        not reused
        and len(run.duplicate_ids) == 1
        and codes == Counter({201: 1, 200: DUPLICATE_SUBMITS - 1})
        and keys["charge-dup"] == 1
        and run.conflict_code == 409
    )
    evidence = [
        f"{DUPLICATE_SUBMITS} concurrent submits of one key: "
        + " + ".join(f"{n} x {c}" for c, n in sorted(codes.items(), reverse=True))
        + f", {len(run.duplicate_ids)} task; other content with that key: {run.conflict_code}",
        f"{len(keys)} idempotency keys in the ledger, none on two tasks"
        if not reused
        else f"keys on two tasks: {reused}",
    ]
    return Check("4. The same idempotency key never creates two tasks", evidence, ok)


def check_bad_input(run: Run, by_id: dict[int, types.Task]) -> Check:
    problems = []
    dead_lines = []
    for task_id, (kind, expected) in sorted(run.expected.items()):
        task = by_id.get(task_id)
        if task is None or task.status is not expected:
            problems.append(
                f"task {task_id} ({kind}): {task.status if task else 'missing'}, expected {expected}"
            )
            continue
        if expected is types.TaskStatus.DEAD:
            want = 3 if kind == "exhausts retries" else 1
            reason = (task.last_error or "").splitlines()[0] if task.last_error else ""
            if task.attempts != want or not reason:
                problems.append(
                    f"task {task_id} ({kind}): DEAD after {task.attempts} attempts, reason {reason!r}"
                )
            dead_lines.append(f"{kind} -> DEAD after {task.attempts}: {render.clip(reason, 90)}")
    succeeded = sum(1 for _, e in run.expected.values() if e is types.TaskStatus.SUCCEEDED)
    refused_ok = run.refused_code == 422 and "payload" in run.refused_message
    if not refused_ok:
        problems.append(f"bad request answered {run.refused_code}: {run.refused_message}")
    evidence = [
        f"refused at the door: {run.refused_code} ({render.clip(run.refused_message, 60)})",
        *dead_lines,
        f"the other {succeeded} tasks SUCCEEDED",
        *problems[:5],
    ]
    return Check(
        "5. Bad input gets a clear error or goes DEAD with a reason; the rest flows",
        evidence,
        not problems,
    )


def render_logs(effects: list[Any], logs: dict[str, dict[str, int]]) -> str:
    recorded = {e.effect_key for e in effects}
    rows = []
    for table_name, prefix in demo_app.LOG_PREFIXES.items():
        counts = logs[table_name]
        rows.append(
            [
                f"demo.{table_name}",
                str(sum(1 for k in recorded if k.startswith(prefix))),
                str(sum(counts.values())),
                str(sum(1 for n in counts.values() if n > 1)),
            ]
        )
    return render.table(
        ["execution log", "effects recorded", "rows written", "keys written twice"],
        rows,
        right=(1, 2, 3),
    )


def render_checks(checks: list[Check]) -> str:
    lines = [click.style("guarantee (README), checked against the ledger", bold=True)]
    width = max(len(c.guarantee) for c in checks)
    for check in checks:
        mark = (
            click.style("upheld", fg="green")
            if check.upheld
            else click.style("VIOLATED", fg="red", bold=True)
        )
        lines.append(f"{check.guarantee.ljust(width)}  {mark}")
        lines += [f"     {line}" for line in check.evidence]
    return "\n".join(lines)
