"""Plain text for a terminal: status colours, tables, times, and each operator
command's output, plus the demo's live screen.

Colours go through ``click.style``; ``click.echo`` drops them when stdout is not
a terminal, so scripts and tests read plain text. ``--json`` output is built
from the same values with ``to_json()``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import click

from ledgerq import display, types

STATUS_COLOURS = {
    types.TaskStatus.PENDING: "blue",
    types.TaskStatus.QUEUED: "blue",
    types.TaskStatus.RUNNING: "cyan",
    types.TaskStatus.SUCCEEDED: "green",
    types.TaskStatus.DEAD: "red",
    types.TaskStatus.CANCELLED: "yellow",
}
_STATUSES = list(types.TaskStatus)


# --- pieces -----------------------------------------------------------------------------


def echo_json(value: Any) -> None:
    # ensure_ascii=False: "café" stays readable; the output is UTF-8 JSON all the same.
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str, ensure_ascii=False))


def styled_status(status: types.TaskStatus | str) -> str:
    """The status in its colour."""
    status = types.TaskStatus(status)
    return click.style(
        status.value, fg=STATUS_COLOURS[status], bold=status is types.TaskStatus.DEAD
    )


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[int] = (),
    styles: Callable[[int, int, str], str] | None = None,
) -> str:
    """A plain-text table; columns in ``right`` are right-aligned. ``styles(row,
    column, padded_text)`` may colour a cell after it was padded."""
    rows = [[display.printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str], row_index: int | None) -> str:
        out = []
        for i, cell in enumerate(cells):
            padded = cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            if styles is not None and row_index is not None:
                padded = styles(row_index, i, padded)
            out.append(padded)
        return "  ".join(out).rstrip()

    head = click.style(line(headers, None), bold=True)
    return "\n".join([head, *(line(r, n) for n, r in enumerate(rows))])


def when(value: datetime | None) -> str:
    """A time as local ISO 8601 to the millisecond, with its zone (in UTC when
    local time would fall outside years 1 to 9999: 9999-12-31T23:00Z is year
    10000 east of Greenwich)."""
    if value is None:
        return "-"
    try:
        value = value.astimezone()
    except (OverflowError, OSError, ValueError):
        value = value.astimezone(UTC)
    return value.isoformat(sep=" ", timespec="milliseconds")


def age(seconds: float | None) -> str:
    """A duration a person reads at a glance: 850ms, 4.2s, 3m07s, 2h05m."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def clip(text: str | None, limit: int = 100) -> str:
    """The first line of text within limit characters (an error in a table cell):
    cut at a word with an ellipsis, never mid-word (a word longer than the limit
    is cut)."""
    line = (text or "").strip().split("\n", 1)[0] if (text or "").strip() else ""
    line = display.printable(line)
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


#: How much of a payload or result `show` prints; `--json` prints everything.
SHOWN_JSON_MAX = 2000


def shown_json(value: Any) -> str:
    """value as JSON for a terminal: non-ASCII kept, and cut (saying so) past SHOWN_JSON_MAX."""
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= SHOWN_JSON_MAX:
        return text
    return (
        f"{text[:SHOWN_JSON_MAX]}… ({len(text):,} characters in all; "
        "`ledgerq show ID --json` prints everything)"
    )


# --- what the operator commands print ---------------------------------------------------


def enqueued(task: types.Task) -> str:
    if task.created:
        head = f"task {task.id} created"
    else:
        key = display.printable(repr(task.idempotency_key))
        head = f"task {task.id} already exists for idempotency key {key}"
    task_type, queue = display.printable(task.type), display.printable(task.queue)
    return (
        f"{head}: {task_type} on queue {queue}, {styled_status(task.status)}, "
        f"created {when(task.created_at)}, due {when(task.run_at)}"
    )


def task_detail(task: types.Task) -> str:
    """The task and its attempt history."""
    fields = [
        ("type", display.printable(task.type)),
        ("queue", display.printable(task.queue)),
        (
            "status",
            styled_status(task.status) + (" (cancel requested)" if task.cancel_requested else ""),
        ),
        ("priority", str(task.priority)),
        ("attempts", f"{task.attempts}, max_attempts {task.max_attempts}"),
        ("payload", shown_json(task.payload)),
        ("idempotency key", display.printable(task.idempotency_key or "-")),
        ("concurrency key", display.printable(task.concurrency_key or "-")),
        ("created", when(task.created_at)),
        ("due", when(task.run_at)),
        ("started", when(task.started_at)),
        ("finished", when(task.finished_at)),
    ]
    if task.result is not None:
        fields.append(("result", shown_json(task.result)))
    if task.last_error:
        fields.append(("last error", clip(task.last_error, 200)))
    width = max(len(name) for name, _ in fields)
    lines = [click.style(f"task {task.id}", bold=True)]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in fields]
    if not task.attempt_history:
        lines.append("no attempts yet")
        return "\n".join(lines)
    rows = []
    for a in task.attempt_history:
        took = (a.finished_at - a.started_at).total_seconds() if a.finished_at else None
        rows.append(
            [
                str(a.attempt),
                a.worker_id,
                when(a.started_at),
                age(took) if took is not None else "running",
                a.outcome.value if a.outcome else "-",
                clip(a.error, 80),
            ]
        )
    lines.append("")
    headers = ["attempt", "worker", "started", "took", "outcome", "error"]
    lines.append(table(headers, rows, right=(0, 3)))
    return "\n".join(lines)


def stats_json(summary: Sequence[types.QueueSummary], in_redis: dict[str, int]) -> types.JsonObject:
    return {
        "queues": [q.to_json() | {"waiting_in_redis": in_redis.get(q.queue, 0)} for q in summary]
    }


def stats(summary: Sequence[types.QueueSummary], in_redis: dict[str, int] | None) -> str:
    """The stats table; in_redis None: Redis could not be asked ("?")."""
    if not summary:
        return "no tasks in the ledger yet"
    headers = ["queue", *(s.value for s in _STATUSES), "in Redis", "oldest pending", "done/min"]
    rows = [
        [
            q.queue,
            *(str(q.counts.get(s, 0)) for s in _STATUSES),
            str(in_redis.get(q.queue, 0)) if in_redis is not None else "?",
            age(q.oldest_due_age_s),
            str(q.finished_last_minute),
        ]
        for q in summary
    ]
    colours = {i + 1: STATUS_COLOURS[s] for i, s in enumerate(_STATUSES)}

    def style(row: int, column: int, text: str) -> str:
        if column in colours and text.strip() != "0":
            return click.style(text, fg=colours[column])
        return text

    return table(headers, rows, right=range(1, len(headers)), styles=style)


def task_types(found: Sequence[types.TaskTypeInfo]) -> str:
    if not found:
        return "no task types registered yet: they appear when a worker starts"
    headers = ["type", "queue", "max attempts", "timeout", "workers alive", "last seen"]
    rows = [
        [
            t.task_type, t.queue, str(t.max_attempts),
            f"{t.timeout_s:g}s" if t.timeout_s is not None else "none",
            str(t.workers_alive), when(t.last_seen_at),
        ]
        for t in found
    ]  # fmt: skip
    return table(headers, rows, right=(2, 3, 4))


def dead(tasks: Sequence[types.Task]) -> str:
    if not tasks:
        return "no DEAD tasks"
    rows = [
        [str(t.id), t.type, t.queue, str(t.attempts), when(t.finished_at), clip(t.last_error, 90)]
        for t in tasks
    ]
    return table(["id", "type", "queue", "attempts", "died", "last error"], rows, right=(0, 3))


def cancelled(task_id: int, status: types.TaskStatus) -> tuple[str, bool]:
    """What cancel_task's answer means, and whether the cancel took effect."""
    if status is types.TaskStatus.CANCELLED:
        return f"task {task_id}: {styled_status(status)}", True
    if status is types.TaskStatus.RUNNING:
        return (
            f"task {task_id}: cancellation requested; it is RUNNING and its worker "
            "stops it at the next heartbeat",
            True,
        )
    return f"task {task_id} is already {styled_status(status)}: nothing to cancel", False


# --- a live screen ------------------------------------------------------------------------


class Screen:
    """Step lines and a progress line that rewrites itself on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self._progress_shown = False
        self._last_line = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, text: str) -> None:
        self._end_progress()
        click.echo(f"{self.elapsed():5.1f}s  {text}", file=self.out, color=self.tty)

    def progress(self, text: str, *, force: bool = False) -> None:
        line = f"{self.elapsed():5.1f}s  {text}"
        if self.tty:
            click.echo(f"\r\x1b[2K{line}", file=self.out, nl=False, color=True)
            self._progress_shown = True
        elif force or time.monotonic() - self._last_line >= 1.0:
            click.echo(line, file=self.out)
            self._last_line = time.monotonic()

    def _end_progress(self) -> None:
        if self._progress_shown:
            click.echo("", file=self.out)
            self._progress_shown = False

    def block(self, text: str) -> None:
        self._end_progress()
        click.echo(text, file=self.out, color=self.tty)


def schedules(found: Sequence[types.Schedule]) -> str:
    if not found:
        return "no schedules"
    rows = [
        [
            s.name,
            s.cron,
            s.timezone,
            s.task_type,
            s.queue,
            "paused" if s.paused else "active",
            when(s.next_run_at),
            when(s.last_slot),
            str(s.last_task_id) if s.last_task_id is not None else "-",
        ]
        for s in found
    ]
    headers = ["name", "cron", "timezone", "type", "queue", "state", "next run", "last slot",
               "last task"]  # fmt: skip
    return table(headers, rows, right=(8,))


# --- queues and their flow control ---------------------------------------------------------


def settings_text(settings: types.JsonObject) -> str:
    """A queue's settings on one line, in the README's order: ``max_running=5 burst=10``."""
    known = [k for k in types.QUEUE_SETTING_KEYS if k in settings]
    others = sorted(k for k in settings if k not in types.QUEUE_SETTING_KEYS)
    return " ".join(f"{k}={_setting(settings[k])}" for k in known + others) or "-"


def _setting(value: types.JsonValue) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def queues(summary: Sequence[types.QueueSummary]) -> str:
    """The queues table: counts by status, paused or not, settings."""
    if not summary:
        return "no queues yet: a queue appears with its first task, or when it is configured"
    headers = ["queue", *(s.value for s in _STATUSES), "state", "settings"]
    rows = [
        [
            q.queue,
            *(str(q.counts.get(s, 0)) for s in _STATUSES),
            "paused" if q.paused else "active",
            settings_text(q.settings),
        ]
        for q in summary
    ]
    state_column = len(_STATUSES) + 1

    def style(row: int, column: int, text: str) -> str:
        if column == state_column and summary[row].paused:
            return click.style(text, fg="yellow", bold=True)
        return text

    return table(headers, rows, right=range(1, state_column), styles=style)


def queue_paused(done: types.QueuePaused) -> str:
    """What pause or resume did."""
    name = display.printable(repr(done.queue))
    state = "paused" if done.paused else "resumed"
    if done.changed:
        return f"queue {name} {state}"
    return f"queue {name} was already {state if done.paused else 'active'}: nothing changed"


def queue_configured(queue: str, settings: types.JsonObject) -> str:
    """A queue's settings after ``ledgerq queues set``."""
    name = display.printable(repr(queue))
    if not settings:
        return f"queue {name} has no settings"
    return f"queue {name}: {display.printable(settings_text(settings))}"
