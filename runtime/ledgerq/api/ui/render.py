"""Turning ledger values into dashboard HTML: the Jinja2 environment (autoescaping
every value: payloads, errors and names are user data), small formatters, the
throughput chart and the attempts timeline, both plain inline SVG."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import jinja2
from starlette.responses import HTMLResponse

from ledgerq import reads
from ledgerq.types import Attempt, JsonValue, QueueSettings, TaskStatus

ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("ledgerq.api.ui", "templates"),
    autoescape=True,  # every {{ value }} is HTML-escaped, in every template
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

#: Sent with every dashboard page: nothing from elsewhere, no framing, no caching.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A rendered template as a response with the dashboard's headers."""
    html = ENVIRONMENT.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


#: Shown where a value is missing.
NONE = "\N{EN DASH}"


def age(seconds: float | None) -> str:
    """A duration for people: 42 s, 3 min, 2 h 5 min, 3 d 4 h."""
    if seconds is None:
        return NONE
    s = max(0, int(seconds))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def when(value: datetime | None) -> str:
    """A timestamp in UTC, to the second."""
    if value is None:
        return NONE
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty_json(value: JsonValue) -> str:
    """JSON indented for reading (escaped by the template, like any text)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


ENVIRONMENT.filters.update(age=age, when=when, pretty_json=pretty_json)


# --- throughput chart ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    x: float
    ok_height: float
    failed_height: float
    label: str


@dataclasses.dataclass(frozen=True, slots=True)
class Chart:
    """An SVG bar chart of tasks finished per minute: succeeded, and dead or cancelled."""

    width: int
    height: int
    bar_width: float
    peak: int
    total: int
    bars: tuple[Bar, ...]
    ticks: tuple[tuple[float, str], ...]


CHART_WIDTH = 1200
CHART_HEIGHT = 160


def throughput_chart(
    buckets: Iterable[reads.FinishedBucket],
    now: datetime,
    minutes: int = reads.THROUGHPUT_MINUTES,
) -> Chart:
    """One bar per minute of the last ``minutes`` (the current one last)."""
    start = now.astimezone(UTC).replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    ok = [0] * minutes
    failed = [0] * minutes
    for b in buckets:
        slot = int((b.minute.astimezone(UTC) - start).total_seconds() // 60)
        if 0 <= slot < minutes:
            if b.status is TaskStatus.SUCCEEDED:
                ok[slot] += b.count
            else:
                failed[slot] += b.count
    peak = max((o + f for o, f in zip(ok, failed, strict=True)), default=0)
    scale = (CHART_HEIGHT - 20) / peak if peak else 0.0
    step = CHART_WIDTH / minutes
    bars = tuple(
        Bar(
            x=i * step,
            ok_height=ok[i] * scale,
            failed_height=failed[i] * scale,
            label=f"{(start + timedelta(minutes=i)).strftime('%H:%M')}: "
            f"{ok[i]} succeeded, {failed[i]} dead or cancelled",
        )
        for i in range(minutes)
    )
    ticks = tuple(
        (i * step, (start + timedelta(minutes=i)).strftime("%H:%M")) for i in range(0, minutes, 10)
    )
    return Chart(CHART_WIDTH, CHART_HEIGHT, step, peak, sum(ok) + sum(failed), bars, ticks)


# --- attempts timeline ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    attempt: Attempt
    left_pct: float
    width_pct: float


def timeline(attempts: Sequence[Attempt], now: datetime) -> list[Span]:
    """Each attempt as a span on one time axis, from the first start to the last end.

    A running attempt ends now; every span is at least 0.5% wide, so a quick
    attempt stays visible beside a long one."""
    if not attempts:
        return []
    begin = min(a.started_at for a in attempts)
    end = max((a.finished_at or now) for a in attempts)
    total = max((end - begin).total_seconds(), 1e-3)
    spans = []
    for a in attempts:
        left = (a.started_at - begin).total_seconds() / total * 100
        width = ((a.finished_at or now) - a.started_at).total_seconds() / total * 100
        spans.append(Span(a, min(left, 99.5), max(width, 0.5)))
    return spans


def queue_rows(
    depths: Iterable[Any],
    buckets: Iterable[reads.FinishedBucket],
    settings: Mapping[str, QueueSettings],
) -> list[dict[str, Any]]:
    """One row per queue known from live counts, the last hour or its settings."""
    rows: dict[str, dict[str, Any]] = {}

    def row(queue: str) -> dict[str, Any]:
        return rows.setdefault(
            queue,
            {
                "queue": queue,
                "counts": dict.fromkeys(TaskStatus, 0),
                "oldest_pending_age_s": None,
                "finished_hour": 0,
                "settings": settings.get(queue),
            },
        )

    for d in depths:
        r = row(d.queue)
        r["counts"][d.status] = d.count
        if d.status is TaskStatus.PENDING:
            r["oldest_pending_age_s"] = d.oldest_due_age_s
    for b in buckets:
        r = row(b.queue)
        r["finished_hour"] += b.count
        if b.status is not TaskStatus.DEAD:  # DEAD is counted live, in full
            r["counts"][b.status] += b.count
    for queue in settings:
        row(queue)
    return [rows[q] for q in sorted(rows)]
