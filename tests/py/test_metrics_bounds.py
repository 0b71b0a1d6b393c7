"""Metric label values chosen by clients are bounded: 20,000 distinct task types and
many queues keep /metrics small, and the tasks past the limit are counted as ``other``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from api_support import api_client

from ledgerq import config, metrics

MAX_TYPES = 50
MAX_QUEUES = 5
TYPES = 20_000


@pytest.fixture
def small_label_limits() -> Iterator[None]:
    metrics.configure_labels(max_types=MAX_TYPES, max_queues=MAX_QUEUES)
    yield
    metrics.configure_labels(
        max_types=metrics.MAX_TYPES_DEFAULT, max_queues=metrics.MAX_QUEUES_DEFAULT
    )


@pytest.fixture
async def client(
    settings: config.Settings, small_label_limits: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as c:
        yield c


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _total(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE))


async def test_twenty_thousand_task_types_keep_metrics_small_and_fold_into_other(
    client: httpx.AsyncClient,
) -> None:
    enqueued_before = _total((await client.get("/metrics")).text, "ledgerq_tasks_enqueued_total")
    for start in range(0, TYPES, 1000):
        batch = [
            {"type": f"bound-{n}", "queue": f"bq-{n % 20}"} for n in range(start, start + 1000)
        ]
        response = await client.post("/tasks/batch", json={"tasks": batch})
        assert response.status_code == 200, response.text

    text = (await client.get("/metrics")).text
    print(f"/metrics: {len(text)} bytes, {text.count(chr(10))} lines")
    assert len(text) < 200_000
    own_types = set(re.findall(r'type="(bound-\d+)"', text))
    assert len(own_types) == MAX_TYPES
    own_queues = set(re.findall(r'queue="(bq-\d+)"', text))
    assert len(own_queues) <= MAX_QUEUES
    # Every task is counted once: the admitted ones under their names, the rest as other.
    assert _total(text, "ledgerq_tasks_enqueued_total") - enqueued_before == TYPES
    assert _sample(text, "ledgerq_tasks_enqueued_total", 'queue="other",type="other"') > 0
    depth_queues = set(re.findall(r'^ledgerq_queue_depth\{queue="([^"]*)"', text, re.M))
    assert "other" in depth_queues
    assert len(depth_queues) <= MAX_QUEUES + 1 + 20  # + queues other tests' runs admitted earlier


def test_label_values_admit_the_first_ones_then_answer_other() -> None:
    values = metrics.LabelValues(2)
    assert [values(v) for v in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        "other",
        "a",
        "other",
        "b",
    ]
    assert metrics.LabelValues(0)("a") == "other"
