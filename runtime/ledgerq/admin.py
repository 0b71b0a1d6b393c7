"""The operator commands behind ``ledgerq enqueue|show|stats|dead|cancel``.

Each command is a function that takes an open ``Ledger`` (and, for ``stats``,
the Redis queue lengths) and returns what it found or did; ``render_*``
functions turn that into plain-text tables for a terminal. State changes go
through the ledger's SQL functions (``enqueue_task``, ``cancel_task``,
``retry_task``), never through ad-hoc SQL.

Exit codes: 0 done; 1 the ledger or the dispatcher failed or refused (not
found, unreachable, a conflict); 2 invalid input.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

import click

from ledgerq import config, errors
from ledgerq.client import Client
from ledgerq.ledger import Ledger, probe
from ledgerq.queries import QueueSummary
from ledgerq.types import JsonObject, Task, TaskStatus, TaskTypeInfo

RETRY_BATCH = 500
DEAD_LIST_DEFAULT = 50

F = TypeVar("F", bound=Callable[..., Any])

STATUS_COLOURS = {
    TaskStatus.PENDING: "blue",
    TaskStatus.QUEUED: "blue",
    TaskStatus.RUNNING: "cyan",
    TaskStatus.SUCCEEDED: "green",
    TaskStatus.DEAD: "red",
    TaskStatus.CANCELLED: "yellow",
}
_STATUSES = list(TaskStatus)


# --- errors and output --------------------------------------------------------


def exit_code(exc: errors.LedgerqError) -> int:
    """2 for invalid input, 1 for everything else."""
    return 2 if isinstance(exc, errors.InvalidInput | errors.ConfigError) else 1


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit."""
    click.echo(f"ledgerq: {message}", err=True)
    sys.exit(code)


def command_errors(func: F) -> F:
    """ledgerq errors become one line on stderr and exit 1 (2 for invalid input)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.LedgerqError as exc:
            fail(errors.first_line(exc), exit_code(exc))

    return wrapper  # type: ignore[return-value]


def echo_json(value: Any) -> None:
    # ensure_ascii=False: "café" stays readable; the output is UTF-8 JSON all the same.
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str, ensure_ascii=False))


def styled_status(status: TaskStatus | str) -> str:
    """The status in its colour (click.echo drops colours when stdout is not a terminal)."""
    status = TaskStatus(status)
    return click.style(status.value, fg=STATUS_COLOURS[status], bold=status is TaskStatus.DEAD)


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[int] = (),
    styles: Callable[[int, int, str], str] | None = None,
) -> str:
    """A plain-text table; columns in ``right`` are right-aligned. ``styles(row,
    column, padded_text)`` may colour a cell after it was padded."""
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
    """A time as local ISO 8601 to the millisecond, with its zone."""
    return value.astimezone().isoformat(sep=" ", timespec="milliseconds") if value else "-"


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


def first_line(text: str | None, limit: int = 100) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return clip(line, limit)


def clip(text: str, limit: int) -> str:
    """text, or its first words within limit characters and an ellipsis: never
    cut mid-word (a word longer than the limit is cut)."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


class OneLineGroup(click.Group):
    """A click group whose usage errors are one line on stderr (exit 2), not a usage block."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else (prog_name or "ledgerq")
            click.echo(f"{path}: {exc.format_message()} (see {path} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"ledgerq: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


# --- opening the ledger ---------------------------------------------------------


def open_ledger(settings: config.Settings) -> Ledger:
    """A small pool on the ledger; LedgerUnavailable at once if it is down."""
    probe(settings.database_url)
    return Ledger.connect(settings.database_url, min_size=1, max_size=2)


# --- enqueue ---------------------------------------------------------------------


def read_payload(text: str | None) -> str | None:
    """PAYLOAD_JSON as given: ``-`` reads standard input, ``@FILE`` reads FILE
    (for payloads too large for a command line); anything else is the JSON."""
    if text == "-":
        return sys.stdin.read()
    if text is not None and text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except OSError as exc:
            raise errors.InvalidInput(
                f"PAYLOAD_JSON: cannot read {path!r}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise errors.InvalidInput(f"PAYLOAD_JSON: {path!r} is not UTF-8 text") from None
    return text


def parse_payload(text: str | None) -> JsonObject:
    """PAYLOAD_JSON (or ``-``, or ``@FILE``) as a JSON object; InvalidInput otherwise."""
    text = read_payload(text)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.InvalidInput(f"PAYLOAD_JSON is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        kind = "array" if isinstance(value, list) else type(value).__name__
        if value is None:
            kind = "null"
        raise errors.InvalidInput(f"PAYLOAD_JSON must be a JSON object, got {kind}")
    return value


def enqueue(
    ledger: Ledger,
    settings: config.Settings,
    task_type: str,
    payload: JsonObject,
    *,
    queue: str | None,
    priority: int,
    delay_s: float,
    idempotency_key: str | None,
    max_attempts: int | None,
) -> Task:
    """Create a task through enqueue_task (or return the one its key names)."""
    client = Client(settings, ledger=ledger)
    return client.enqueue(
        task_type, payload, queue=queue, priority=priority, delay=delay_s,
        idempotency_key=idempotency_key, max_attempts=max_attempts,
    )  # fmt: skip


def render_enqueued(task: Task) -> str:
    if task.created:
        head = f"task {task.id} created"
    else:
        head = f"task {task.id} already exists for idempotency key {task.idempotency_key!r}"
    return (
        f"{head}: {task.type} on queue {task.queue}, {styled_status(task.status)}, "
        f"created {when(task.created_at)}, due {when(task.run_at)}"
    )


# --- show ---------------------------------------------------------------------------

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


def render_task(task: Task) -> str:
    """The task and its attempt history, for a terminal."""
    fields = [
        ("type", task.type),
        ("queue", task.queue),
        (
            "status",
            styled_status(task.status) + (" (cancel requested)" if task.cancel_requested else ""),
        ),
        ("priority", str(task.priority)),
        ("attempts", f"{task.attempts}, max_attempts {task.max_attempts}"),
        ("payload", shown_json(task.payload)),
        ("idempotency key", task.idempotency_key or "-"),
        ("created", when(task.created_at)),
        ("due", when(task.run_at)),
        ("started", when(task.started_at)),
        ("finished", when(task.finished_at)),
    ]
    if task.result is not None:
        fields.append(("result", shown_json(task.result)))
    if task.last_error:
        fields.append(("last error", first_line(task.last_error, 200)))
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
                first_line(a.error, 80),
            ]
        )
    lines.append("")
    lines.append(
        table(
            ["attempt", "worker", "started", "took", "outcome", "error"],
            rows,
            right=(0, 3),
        )
    )
    return "\n".join(lines)


# --- stats ------------------------------------------------------------------------------


def stats_json(summary: Sequence[QueueSummary], in_redis: dict[str, int]) -> JsonObject:
    return {
        "queues": [
            {
                "queue": q.queue,
                "counts": {s.value: q.counts.get(s, 0) for s in _STATUSES},
                "oldest_pending_age_seconds": q.oldest_due_age_s,
                "finished_last_minute": q.finished_last_minute,
                "waiting_in_redis": in_redis.get(q.queue, 0),
            }
            for q in summary
        ]
    }


def render_stats(summary: Sequence[QueueSummary], in_redis: dict[str, int] | None) -> str:
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


def render_types(types: Sequence[TaskTypeInfo]) -> str:
    if not types:
        return "no task types registered yet: they appear when a worker starts"
    headers = ["type", "queue", "max attempts", "timeout", "workers alive", "last seen"]
    rows = [
        [
            t.task_type, t.queue, str(t.max_attempts),
            f"{t.timeout_s:g}s" if t.timeout_s is not None else "none",
            str(t.workers_alive), when(t.last_seen_at),
        ]
        for t in types
    ]  # fmt: skip
    return table(headers, rows, right=(2, 3, 4))


# --- dead -----------------------------------------------------------------------------


def dead_tasks(ledger: Ledger, *, queue: str | None, limit: int | None) -> Iterator[Task]:
    """DEAD tasks, newest first, a page at a time (all of them when limit is None)."""
    before: int | None = None
    left = limit
    while left is None or left > 0:
        size = RETRY_BATCH if left is None else min(left, RETRY_BATCH)
        page = ledger.list_tasks(status="DEAD", queue=queue, limit=size, before_id=before)
        yield from page
        if len(page) < size:
            return
        before = page[-1].id
        if left is not None:
            left -= len(page)


def render_dead(tasks: Sequence[Task]) -> str:
    if not tasks:
        return "no DEAD tasks"
    rows = [
        [
            str(t.id),
            t.type,
            t.queue,
            str(t.attempts),
            when(t.finished_at),
            first_line(t.last_error, 90),
        ]
        for t in tasks
    ]
    return table(["id", "type", "queue", "attempts", "died", "last error"], rows, right=(0, 3))


def retry_all(
    ledger: Ledger,
    *,
    queue: str | None,
    limit: int | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[int], list[int]]:
    """retry_task on every DEAD task (of queue), a page at a time.

    Returns (retried ids, skipped ids): a task skipped had left DEAD meanwhile
    (another operator retried it)."""
    retried: list[int] = []
    skipped: list[int] = []
    for task in dead_tasks(ledger, queue=queue, limit=limit):
        try:
            ledger.retry(task.id)
        except (errors.InvalidTransition, errors.TaskNotFound):
            skipped.append(task.id)
            continue
        retried.append(task.id)
        if progress is not None and len(retried) % RETRY_BATCH == 0:
            progress(len(retried))
    return retried, skipped


# --- cancel ----------------------------------------------------------------------------


def render_cancelled(task_id: int, status: TaskStatus) -> tuple[str, bool]:
    """What cancel_task's answer means, and whether the cancel took effect."""
    if status is TaskStatus.CANCELLED:
        return f"task {task_id}: {styled_status(status)}", True
    if status is TaskStatus.RUNNING:
        return (
            f"task {task_id}: cancellation requested; it is RUNNING and its worker "
            "stops it at the next heartbeat",
            True,
        )
    return f"task {task_id} is already {styled_status(status)}: nothing to cancel", False
