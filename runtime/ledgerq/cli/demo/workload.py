"""What ``ledgerq demo`` does to the running system, through its HTTP API.

It kills a worker with SIGKILL in the middle of a long task (and starts a
replacement), submits the workload (a batch of each task type, one payment five
times at once under one idempotency key and once more with other content, a
flaky email, an invalid payload, an unknown type, an operation that exhausts
its attempts, a request the API must refuse), and watches until every accepted
task is final. What it sent and saw goes into a ``checks.Run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from ledgerq import errors, types
from ledgerq.cli import render, supervise
from ledgerq.cli.demo import app as demo_app
from ledgerq.cli.demo import checks

APP = "ledgerq.cli.demo.app:tasks"
WORKER_CONCURRENCY = 8
EMAILS = 30
PAYMENTS = 15
OPERATIONS = 8


class DemoFailed(errors.LedgerqError):
    """The demo could not run."""


def worker_args() -> list[str]:
    return [
        "worker", "--app", APP, "--concurrency", str(WORKER_CONCURRENCY),
        "--lease-seconds", str(checks.LEASE_S), "--grace-seconds", "2", "--log-level", "INFO",
    ]  # fmt: skip


async def wait_ready(http: Any, group: supervise.ProcessGroup, deadline: float) -> None:
    while True:
        no_crash(group, set())
        with contextlib.suppress(Exception):
            if (await http.get("/readyz")).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise DemoFailed("the API did not become ready in time")
        await asyncio.sleep(0.05)


def no_crash(group: supervise.ProcessGroup, killed: set[int]) -> None:
    for child in group.exited():
        if child.pid not in killed:
            raise DemoFailed(f"{child.name} exited unexpectedly with status {child.returncode}")


async def post(
    http: Any, run: checks.Run, body: dict[str, Any], kind: str, expect: types.TaskStatus
) -> int:
    headers = {}
    if "idempotency_key" in body:
        headers["Idempotency-Key"] = body.pop("idempotency_key")
    reply = await http.post("/tasks", json=body, headers=headers)
    if reply.status_code not in (200, 201):
        raise DemoFailed(f"POST /tasks answered {reply.status_code}: {reply.text[:200]}")
    task_id = int(reply.json()["id"])
    run.accepted_ids.add(task_id)
    run.expected[task_id] = (kind, expect)
    return task_id


async def kill_a_worker(
    http: Any,
    group: supervise.ProcessGroup,
    workers: list[supervise.Child],
    screen: render.Screen,
    run: checks.Run,
    deadline: float,
) -> None:
    """A long operation; SIGKILL the worker running it; start a replacement."""
    task_id = await post(
        http, run, {"type": "operation.run", "payload": {"name": "statement-rebuild", "seconds": 2.0}},
        "killed worker's task", types.TaskStatus.SUCCEEDED,
    )  # fmt: skip
    while True:
        task = (await http.get(f"/tasks/{task_id}")).json()
        if task["status"] == "RUNNING" and task["attempt_history"]:
            worker_id = task["attempt_history"][-1]["worker_id"]
            break
        no_crash(group, set())
        if time.monotonic() > deadline:
            raise DemoFailed(f"task {task_id} never started running")
        await asyncio.sleep(0.02)
    pid = int(worker_id.rsplit(":", 2)[1])
    victim = next((w for w in workers if w.pid == pid), None)
    if victim is None:
        raise DemoFailed(f"task {task_id} runs on {worker_id}, not on a worker the demo started")
    group.kill(victim)
    victim.process.wait()
    run.killed_task, run.killed_worker, run.killed_at = task_id, worker_id, datetime.now(UTC)
    replacement = group.start("worker-3", worker_args())
    screen.step(
        f"task {task_id} (operation.run, 2 s) RUNNING on {victim.name}: killed it with SIGKILL "
        f"mid-task; started worker-3 (pid {replacement.pid}) in its place"
    )


async def submit_workload(http: Any, screen: render.Screen, run: checks.Run) -> None:
    batch = []
    kinds = []
    for n in range(EMAILS):
        batch.append(
            {"type": "email.send", "payload": {"to": f"user{n}@example.com", "template": "welcome"}}
        )
        kinds.append("email")
    for n in range(PAYMENTS):
        batch.append({
            "type": "payment.charge", "payload": {"account": f"acct-{n}", "amount_cents": 1000 + n},
            "idempotency_key": f"charge-{n}",
        })  # fmt: skip
        kinds.append("payment")
    for n in range(OPERATIONS):
        batch.append({"type": "operation.run", "payload": {"name": f"close-{n}"}})
        kinds.append("operation")
    reply = await http.post("/tasks/batch", json={"tasks": batch})
    if reply.status_code != 200:
        raise DemoFailed(f"POST /tasks/batch answered {reply.status_code}: {reply.text[:200]}")
    for kind, result in zip(kinds, reply.json()["results"], strict=True):
        run.accepted_ids.add(result["id"])
        run.expected[result["id"]] = (kind, types.TaskStatus.SUCCEEDED)
    screen.step(
        f"POST /tasks/batch: {EMAILS} email.send, {PAYMENTS} payment.charge, "
        f"{OPERATIONS} operation.run -> 200"
    )

    # The same payment, five times at once, one key: one task.
    body = {"type": "payment.charge", "payload": {"account": "acct-dup", "amount_cents": 4200}}
    replies = await asyncio.gather(
        *(
            http.post("/tasks", json=body, headers={"Idempotency-Key": "charge-dup"})
            for _ in range(checks.DUPLICATE_SUBMITS)
        )
    )
    run.duplicate_codes = sorted(r.status_code for r in replies)
    run.duplicate_ids = {int(r.json()["id"]) for r in replies if r.status_code in (200, 201)}
    for task_id in run.duplicate_ids:
        run.accepted_ids.add(task_id)
        run.expected[task_id] = ("payment", types.TaskStatus.SUCCEEDED)
    codes = Counter(run.duplicate_codes)
    screen.step(
        f"POST /tasks x{checks.DUPLICATE_SUBMITS} at once, Idempotency-Key charge-dup: "
        + ", ".join(f"{n} x {code}" for code, n in sorted(codes.items()))
        + f" -> task(s) {', '.join(map(str, sorted(run.duplicate_ids)))}"
    )
    other = {"type": "payment.charge", "payload": {"account": "acct-dup", "amount_cents": 9999}}
    conflict = await http.post("/tasks", json=other, headers={"Idempotency-Key": "charge-dup"})
    run.conflict_code = conflict.status_code
    screen.step(f"same key, different amount -> {conflict.status_code} {_error_code(conflict)}")

    run.flaky_task = await post(
        http, run, {"type": "email.send", "payload": {"to": "flaky@example.com", "template": "receipt", "flaky_failures": 2}},
        "flaky email", types.TaskStatus.SUCCEEDED,
    )  # fmt: skip
    invalid = await post(
        http, run, {"type": "payment.charge", "payload": {"account": "acct-x", "amount_cents": "lots"}},
        "invalid payload", types.TaskStatus.DEAD,
    )  # fmt: skip
    unknown = await post(
        http,
        run,
        {"type": "sms.send", "payload": {"to": "+15550100"}},
        "unknown type",
        types.TaskStatus.DEAD,
    )
    exhausted = await post(
        http, run, {"type": "operation.run", "payload": {"name": "locked-period", "fail": True}, "max_attempts": 3},
        "exhausts retries", types.TaskStatus.DEAD,
    )  # fmt: skip
    screen.step(
        f"flaky email {run.flaky_task} (fails twice after sending), invalid payload {invalid}, "
        f"unknown type {unknown}, always-failing operation {exhausted} (max 3 attempts)"
    )
    refused = await http.post(
        "/tasks", json={"type": "email.send", "payload": ["not", "an object"]}
    )
    run.refused_code = refused.status_code
    run.refused_message = _error_message(refused)
    screen.step(
        f"a payload that is not a JSON object -> {refused.status_code}: {run.refused_message}"
    )


def _error_code(reply: Any) -> str:
    with contextlib.suppress(Exception):
        return str(reply.json()["error"]["code"])
    return ""


def _error_message(reply: Any) -> str:
    with contextlib.suppress(Exception):
        return str(reply.json()["error"]["message"])
    return reply.text[:120]  # type: ignore[no-any-return]


async def watch(
    http: Any,
    group: supervise.ProcessGroup,
    screen: render.Screen,
    run: checks.Run,
    deadline: float,
) -> None:
    """Progress by status until every accepted task is final."""
    killed = {c.pid for c in group.exited()}
    total = len(run.accepted_ids)
    while True:
        no_crash(group, killed)
        queues = (await http.get("/queues")).json()["queues"]
        counts: Counter[str] = Counter()
        for q in queues:
            if q["queue"] != demo_app.SCHEDULE_QUEUE:  # the schedule's own tasks: see periodic
                counts.update(q["counts"])
        final = sum(counts[s.value] for s in types.TaskStatus if s.is_final)
        parts = "  ".join(
            f"{render.styled_status(s)} {counts[s.value]:>3}" for s in types.TaskStatus
        )
        done = final >= total and sum(counts.values()) == total
        waiting = (
            ""
            if done
            # The last ones are usually a retry waiting out its backoff, or the
            # killed worker's task waiting for its lease to expire and the reaper.
            else f"; {total - final} running, or waiting for a retry's backoff or an expired lease"
        )
        screen.progress(f"{parts}   ({final}/{total} final{waiting})", force=done)
        if done:
            screen.step(f"all {total} accepted tasks reached a final state")
            return
        if time.monotonic() > deadline:
            raise DemoFailed(f"only {final} of {total} tasks were final when the time was up")
        await asyncio.sleep(0.2)
