"""The demo's flow-control part: two tenants share a queue under limits.

Through the HTTP API it sets the ``tenants`` queue's ``max_running`` and
``per_key_max_running``, pauses the queue, enqueues a big tenant's backlog and
then a small tenant's few tasks (``tenant.sync``, each one concurrency key),
watches that nothing starts while the queue is paused, and resumes it. Once
every task is final, ``verify`` reads the queue's attempt history back from the
ledger and judges, from the attempts' own intervals, the most tasks that were
RUNNING at once per key and in the queue, that no attempt started before the
resume, that no task spent an attempt waiting, and that the small tenant
finished early instead of behind the big one's backlog.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ledgerq import types
from ledgerq.cli import render
from ledgerq.cli.demo import checks
from ledgerq.cli.demo.app import TENANT_QUEUE
from ledgerq.cli.demo.workload import DemoFailed
from ledgerq.ledger import AsyncLedger

MAX_RUNNING = 3
PER_KEY_MAX_RUNNING = 2
BIG_TENANT, SMALL_TENANT = "big-co", "small-co"
BIG_TASKS, SMALL_TASKS = 40, 4
TASK_S = 0.2
#: How long the demo watches the paused queue start nothing.
PAUSE_WATCH_S = 1.0
KIND = "tenant sync"


@dataclasses.dataclass(slots=True)
class FlowRun:
    """What the flow-control part sent and saw."""

    big: list[int] = dataclasses.field(default_factory=list)
    small: list[int] = dataclasses.field(default_factory=list)
    resumed_at: datetime | None = None
    running_while_paused: int = 0


async def submit(http: Any, ledger: AsyncLedger, screen: render.Screen, run: checks.Run) -> FlowRun:
    """Configure and pause the queue, enqueue both tenants, watch, resume."""
    flow = FlowRun()
    limits = {"max_running": MAX_RUNNING, "per_key_max_running": PER_KEY_MAX_RUNNING}
    await _call(http.put(f"/queues/{TENANT_QUEUE}/settings", json=limits), "PUT settings")
    await _call(http.post(f"/queues/{TENANT_QUEUE}/pause"), "POST pause")
    for tenant, count, ids in (
        (BIG_TENANT, BIG_TASKS, flow.big),
        (SMALL_TENANT, SMALL_TASKS, flow.small),
    ):
        batch = [
            {
                "type": "tenant.sync", "queue": TENANT_QUEUE, "concurrency_key": tenant,
                "payload": {"tenant": tenant, "n": n, "seconds": TASK_S},
            }
            for n in range(count)
        ]  # fmt: skip
        reply = await _call(http.post("/tasks/batch", json={"tasks": batch}), "POST /tasks/batch")
        ids += [int(r["id"]) for r in reply["results"]]
    for task_id in flow.big + flow.small:
        run.accepted_ids.add(task_id)
        run.expected[task_id] = (KIND, types.TaskStatus.SUCCEEDED)
    screen.step(
        f"queue {TENANT_QUEUE}: max_running {MAX_RUNNING}, per_key_max_running "
        f"{PER_KEY_MAX_RUNNING}, paused; enqueued {BIG_TASKS} tasks of {BIG_TENANT}, then "
        f"{SMALL_TASKS} of {SMALL_TENANT} ({TASK_S:g} s each)"
    )
    watch_until = time.monotonic() + PAUSE_WATCH_S
    while time.monotonic() < watch_until:  # the subject: nothing starts while paused
        flow.running_while_paused = max(flow.running_while_paused, await _started(http))
        await asyncio.sleep(0.1)
    await _call(http.post(f"/queues/{TENANT_QUEUE}/resume"), "POST resume")
    settings = {s.queue: s for s in await ledger.queue_settings()}
    flow.resumed_at = settings[TENANT_QUEUE].updated_at  # resume_queue's own time
    screen.step(
        f"{flow.running_while_paused} started in {PAUSE_WATCH_S:g} s while paused; "
        f"resumed {TENANT_QUEUE}"
    )
    return flow


async def _call(request: Any, what: str) -> Any:
    reply = await request
    if reply.status_code != 200:
        raise DemoFailed(f"{what} answered {reply.status_code}: {reply.text[:200]}")
    return reply.json()


async def _started(http: Any) -> int:
    """Tasks of the queue that started (running or finished), per GET /queues."""
    for queue in (await _call(http.get("/queues"), "GET /queues"))["queues"]:
        if queue["queue"] == TENANT_QUEUE:
            counts = queue["counts"]
            return int(counts["RUNNING"] + counts["SUCCEEDED"] + counts["DEAD"])
    return 0


# --- checking against the ledger ---------------------------------------------------------


def most_at_once(spans: Iterable[tuple[datetime, datetime]]) -> int:
    """The most intervals [start, end) that overlap at one instant."""
    # An end sorts before a start at the same instant: a slot freed and taken
    # at once is not two tasks at a time.
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


async def verify(ledger: AsyncLedger, flow: FlowRun) -> list[checks.Check]:
    ids = flow.big + flow.small
    tasks: dict[int, types.Task] = {t.id: t for t in await ledger.get_many(ids, history=True)}
    attempts = [(t, a) for t in tasks.values() for a in t.attempt_history]
    spans: dict[str, list[tuple[datetime, datetime]]] = {BIG_TENANT: [], SMALL_TENANT: []}
    unfinished = 0
    for task, attempt in attempts:
        if attempt.finished_at is None:
            unfinished += 1
            continue
        key = BIG_TENANT if task.id in flow.big else SMALL_TENANT
        spans[key].append((attempt.started_at, attempt.finished_at))
    per_key = {key: most_at_once(found) for key, found in spans.items()}
    per_queue = most_at_once(spans[BIG_TENANT] + spans[SMALL_TENANT])
    first_start = min((a.started_at for _, a in attempts), default=None)
    statuses = Counter(t.status.value for t in tasks.values())
    one_attempt = sum(1 for t in tasks.values() if t.attempts == 1 and len(t.attempt_history) == 1)
    pause_held = (
        flow.running_while_paused == 0
        and first_start is not None
        and flow.resumed_at is not None
        and first_start >= flow.resumed_at
    )
    limits_held = per_queue <= MAX_RUNNING and all(
        n <= PER_KEY_MAX_RUNNING for n in per_key.values()
    )
    all_once = statuses == Counter({"SUCCEEDED": len(ids)}) and one_attempt == len(ids)
    after = (
        f"{(first_start - flow.resumed_at).total_seconds():.2f} s after resume_queue"
        if first_start is not None and flow.resumed_at is not None
        else "never"
    )
    limits = checks.Check(
        "6. Flow-control limits hold fleet-wide; a paused queue starts nothing",
        [
            f"most RUNNING at once, from the attempts' intervals: queue {TENANT_QUEUE} "
            f"{per_queue} (max_running {MAX_RUNNING}); "
            + ", ".join(f"{k} {n}" for k, n in per_key.items())
            + f" (per_key_max_running {PER_KEY_MAX_RUNNING})",
            f"paused while {len(ids)} tasks were enqueued: {flow.running_while_paused} started "
            f"in {PAUSE_WATCH_S:g} s; the first attempt started {after}",
            f"{len(ids)} tasks: "
            + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
            + f", {one_attempt} in exactly one attempt (waiting on a limit spends none)"
            + (f"; {unfinished} attempt(s) never ended" if unfinished else ""),
        ],
        pause_held and limits_held and all_once and not unfinished,
    )
    return [limits, _check_turns(tasks, flow)]


def _check_turns(tasks: dict[int, types.Task], flow: FlowRun) -> checks.Check:
    name = "6. Keys take turns: a small tenant is not held back by a big one's backlog"
    small_done = [tasks[i].finished_at for i in flow.small if i in tasks]
    big_done = sorted(f for i in flow.big if i in tasks and (f := tasks[i].finished_at))
    if not small_done or None in small_done or len(big_done) != len(flow.big):
        return checks.Check(name, ["some tasks of the tenants did not finish"], False)
    small_last = max(d for d in small_done if d is not None)
    big_before = sum(1 for f in big_done if f <= small_last)
    start = flow.resumed_at or big_done[0]
    evidence = [
        f"{SMALL_TENANT}'s {len(flow.small)} tasks, enqueued behind {BIG_TENANT}'s "
        f"{len(flow.big)}, all done {render.age((small_last - start).total_seconds())} after the "
        f"resume, when {BIG_TENANT} had done {big_before} of {len(flow.big)} (all of "
        f"{BIG_TENANT}: {render.age((big_done[-1] - start).total_seconds())})"
    ]
    # In creation order the small tenant would wait for the whole backlog.
    return checks.Check(name, evidence, big_before <= len(flow.big) // 2)
