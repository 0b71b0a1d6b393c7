"""JSON-able results and payloads: models, dataclasses, dates, decimals and
UUIDs serialize; anything else is a clear error before anything is recorded."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid
from typing import Any

import helpers
import psycopg
import pydantic
import pytest

from ledgerq import Client, Context, Registry, config, errors, jsonvalue

Conn = psycopg.Connection[Any]
WHEN = dt.datetime(2026, 12, 3, 8, 30, tzinfo=dt.UTC)
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


class Colour(enum.Enum):
    RED = "red"


class Line(pydantic.BaseModel):
    sku: str
    price: decimal.Decimal
    at: dt.datetime


@dataclasses.dataclass
class Order:
    order_id: uuid.UUID
    day: dt.date
    lines: list[Line]
    colour: Colour = Colour.RED
    tags: tuple[str, ...] = ("a",)


ORDER = Order(ID, dt.date(2026, 12, 3), [Line(sku="x", price=decimal.Decimal("9.99"), at=WHEN)])
ORDER_JSON = {
    "order_id": str(ID),
    "day": "2026-12-03",
    "lines": [{"sku": "x", "price": "9.99", "at": "2026-12-03T08:30:00Z"}],
    "colour": "red",
    "tags": ["a"],
}


def test_plain_turns_models_dataclasses_dates_decimals_and_uuids_into_json() -> None:
    assert jsonvalue.plain(ORDER) == ORDER_JSON
    assert jsonvalue.plain({"when": WHEN, "amount": decimal.Decimal("0.10"), 1: ID}) == {
        "when": "2026-12-03T08:30:00+00:00", "amount": "0.10", "1": str(ID),
    }  # fmt: skip
    assert jsonvalue.plain(dt.time(8, 30)) == "08:30:00"
    marker = object()
    assert jsonvalue.plain([marker])[0] is marker  # left for the encoder to refuse


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"items": [1, {2, 3}]}, "payload['items'][1]: a set is not JSON"),
        ({"n": float("nan")}, "payload['n']: nan is not JSON"),
        ({"raw": b"x"}, "payload['raw']: a bytes is not JSON"),
        ({(1, 2): 1}, "payload: a key of type tuple is not JSON"),
        ([1, 2], "payload must be a JSON object"),
        ("text", "payload must be a JSON object"),
    ],
)
def test_payload_names_what_is_not_json(value: Any, words: str) -> None:
    with pytest.raises(errors.InvalidInput) as caught:
        jsonvalue.payload(value)
    assert words in caught.value.message


def test_enqueue_takes_a_dataclass_or_model_payload_and_refuses_what_is_not_json(
    settings: config.Settings, db: Conn
) -> None:
    with Client(settings) as client:
        task = client.enqueue("order.pack", ORDER)
        line = client.enqueue("line.check", ORDER.lines[0])
        with pytest.raises(errors.InvalidInput, match=r"payload\['at'\]: a set is not JSON"):
            client.enqueue("order.pack", {"at": {1}})
        with pytest.raises(errors.InvalidInput, match=r"payload\['day'\]"):
            client.enqueue_many(
                [{"task_type": "a", "payload": {}}, {"task_type": "b", "payload": {"day": {1}}}]
            )
    assert client.get(task.id).payload == ORDER_JSON
    assert db.execute("SELECT payload FROM ledgerq.tasks WHERE id = %s", (line.id,)).fetchone() == (
        ORDER_JSON["lines"][0],
    )
    assert db.execute("SELECT count(*) FROM ledgerq.tasks").fetchone() == (2,)


async def test_handler_results_that_are_models_dataclasses_or_dates_are_stored_as_json(
    settings: config.Settings,
) -> None:
    tasks = Registry()

    @tasks.task("order.build")
    async def build(ctx: Context, payload: dict[str, Any]) -> Order:
        return ORDER

    @tasks.task("line.build")
    def line(ctx: Context, payload: dict[str, Any]) -> Line:
        return ORDER.lines[0]

    @tasks.task("when")
    async def when(ctx: Context, payload: dict[str, Any]) -> dt.datetime:
        return WHEN

    async with helpers.running(settings, tasks) as s:
        ids = [await s.enqueue(name) for name in ("order.build", "line.build", "when")]
        results = [(await helpers.wait_for_status(s.ledger, i, "SUCCEEDED")).result for i in ids]
    assert results == [ORDER_JSON, ORDER_JSON["lines"][0], "2026-12-03T08:30:00+00:00"]


async def test_a_handler_result_that_is_not_json_fails_for_good_after_one_attempt(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    runs: list[int] = []

    @tasks.task("bad.result", max_attempts=5)
    async def bad(ctx: Context, payload: dict[str, Any]) -> Any:
        runs.append(ctx.attempt)
        return {"ids": {1, 2}}

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("bad.result")
        task = await helpers.wait_for_status(s.ledger, task_id, "DEAD")
    assert runs == [1]
    assert task.last_error is not None
    assert task.last_error.startswith("NonRetryable: handler returned a value that is not JSON")
    assert "set" in task.last_error


async def test_ctx_once_records_a_model_or_dataclass_result_as_json(
    settings: config.Settings, db: Conn
) -> None:
    tasks = Registry()
    seen: list[Any] = []

    @tasks.task("charge")
    async def charge(ctx: Context, payload: dict[str, Any]) -> None:
        seen.append(await ctx.once("charge:1", lambda: ORDER))

    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("charge")
        await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert seen == [ORDER_JSON]
    assert db.execute("SELECT result FROM ledgerq.effects").fetchone() == (ORDER_JSON,)
