"""Registry, task definitions and Context: registration, declared payload types,
error classification, and what a handler's Context carries."""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from typing import TYPE_CHECKING, Any

import helpers
import psycopg
import pydantic
import pytest
import typing_extensions

from ledgerq import Context, InvalidPayload, NonRetryable, Registry, Retryable, config, errors
from ledgerq.registry import TIMEOUT_DEFAULT_S, TaskDefinition

if TYPE_CHECKING:
    from ledgerq.registry import Context as TypeCheckingOnlyContext


@dataclasses.dataclass
class Email:
    to: str
    subject: str = "hello"


class Refund(typing_extensions.TypedDict):
    order_id: int
    cents: int


class StdlibRefund(typing.TypedDict):
    order_id: int


class Invoice(pydantic.BaseModel):
    number: str
    lines: list[int]


# --- registration --------------------------------------------------------------------


def test_decorator_registers_async_and_sync_handlers_and_returns_them() -> None:
    tasks = Registry()

    async def send(ctx: Context, payload: dict[str, Any]) -> None: ...

    def build(ctx: Context, payload: dict[str, Any]) -> None: ...

    assert tasks.task("email.send", queue="mail", max_attempts=7, timeout=12)(send) is send
    assert tasks.task("report.build")(build) is build

    email = tasks.get("email.send")
    report = tasks.get("report.build")
    assert email is not None and report is not None
    assert (email.fn, email.queue, email.max_attempts, email.timeout_s) == (send, "mail", 7, 12)
    assert email.is_async and not report.is_async
    assert (report.queue, report.max_attempts, report.timeout_s) == (
        "default",
        5,
        TIMEOUT_DEFAULT_S,
    )
    assert tasks.names() == ["email.send", "report.build"]
    assert tasks.queues() == ["default", "mail"]
    assert "email.send" in tasks and "nope" not in tasks and tasks.get("nope") is None
    assert len(tasks) == 2


def test_timeout_none_means_no_timeout() -> None:
    tasks = Registry()

    @tasks.task("forever", timeout=None)
    async def forever(ctx: Context, payload: dict[str, Any]) -> None: ...

    definition = tasks.get("forever")
    assert definition is not None and definition.timeout_s is None


def test_registering_a_name_twice_raises_config_error() -> None:
    tasks = Registry()

    @tasks.task("dup")
    async def first(ctx: Context, payload: dict[str, Any]) -> None: ...

    with pytest.raises(errors.ConfigError, match="'dup' is registered twice"):

        @tasks.task("dup")
        async def second(ctx: Context, payload: dict[str, Any]) -> None: ...

    definition = tasks.get("dup")
    assert definition is not None and definition.fn is first


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("", {}, "task name must be a non-empty string"),
        ("   ", {}, "task name must be a non-empty string"),
        ("t", {"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
        ("t", {"timeout": 0}, "timeout must be > 0 seconds, got 0"),
        ("t", {"timeout": -1.5}, "timeout must be > 0 seconds, got -1.5"),
    ],
)
def test_bad_options_raise_config_error(name: str, options: dict[str, Any], message: str) -> None:
    tasks = Registry()
    with pytest.raises(errors.ConfigError, match=message):
        tasks.task(name, **options)
    assert len(tasks) == 0


def test_handler_without_a_payload_parameter_raises_config_error() -> None:
    tasks = Registry()

    async def no_payload(ctx: Context) -> None: ...

    with pytest.raises(errors.ConfigError, match=r"must take \(ctx, payload\), got 1 parameter"):
        tasks.task("t")(no_payload)
    assert "t" not in tasks


# --- declared payload types ------------------------------------------------------------


def _definition(handler: Any) -> TaskDefinition:
    tasks = Registry()
    tasks.task("t")(handler)
    definition = tasks.get("t")
    assert definition is not None
    return definition


def test_dataclass_payload_is_validated_and_built() -> None:
    async def handler(ctx: Context, payload: Email) -> None: ...

    definition = _definition(handler)
    assert definition.payload_type is Email
    assert definition.parse_payload({"to": "a@b.c"}) == Email("a@b.c", "hello")
    with pytest.raises(InvalidPayload, match=r"payload does not match Email: to: Field required"):
        definition.parse_payload({"subject": "hi"})


def test_typeddict_payload_is_validated_and_stays_a_dict() -> None:
    def handler(ctx: Context, payload: Refund) -> None: ...

    definition = _definition(handler)
    parsed = definition.parse_payload({"order_id": 4, "cents": 250})
    assert parsed == {"order_id": 4, "cents": 250} and type(parsed) is dict
    with pytest.raises(InvalidPayload, match=r"payload does not match Refund: cents: "):
        definition.parse_payload({"order_id": 4, "cents": "a lot"})


def test_stdlib_typeddict_payload_is_checked_at_registration() -> None:
    # pydantic validates typing.TypedDict only from Python 3.12 on; before, the
    # task must fail to register rather than fail every attempt at run time.
    def handler(ctx: Context, payload: StdlibRefund) -> None: ...

    if sys.version_info >= (3, 12):
        assert _definition(handler).parse_payload({"order_id": 1}) == {"order_id": 1}
    else:
        with pytest.raises(errors.ConfigError, match="payload type 'StdlibRefund' cannot be"):
            _definition(handler)


def test_pydantic_model_payload_is_validated_and_built() -> None:
    async def handler(ctx: Context, payload: Invoice) -> None: ...

    definition = _definition(handler)
    assert definition.parse_payload({"number": "F-1", "lines": [1, 2]}) == Invoice(
        number="F-1", lines=[1, 2]
    )
    with pytest.raises(InvalidPayload, match=r"payload does not match Invoice: lines.1: "):
        definition.parse_payload({"number": "F-1", "lines": [1, "two"]})


@pytest.mark.parametrize("annotation", ["dict", "dict[str, Any]", "Any", "none"])
def test_plain_dict_payload_is_passed_through_unchanged(annotation: str) -> None:
    handlers = {
        "dict": _dict_handler,
        "dict[str, Any]": _dict_str_any_handler,
        "Any": _any_handler,
        "none": _unannotated_handler,
    }
    definition = _definition(handlers[annotation])
    payload: dict[str, Any] = {"anything": [1, {"goes": None}]}
    assert definition.parse_payload(payload) is payload


async def _dict_handler(ctx: Context, payload: dict) -> None: ...  # type: ignore[type-arg]


async def _dict_str_any_handler(ctx: Context, payload: dict[str, Any]) -> None: ...


async def _any_handler(ctx: Context, payload: Any) -> None: ...


async def _unannotated_handler(ctx, payload):  # type: ignore[no-untyped-def,unused-ignore]
    ...


def test_payload_type_resolves_when_another_annotation_cannot() -> None:
    # ctx's annotation names a type imported only for type checkers: the
    # payload's own declared type must still be found and enforced.
    async def handler(ctx: TypeCheckingOnlyContext, payload: Email) -> None: ...

    definition = _definition(handler)
    assert definition.payload_type is Email
    with pytest.raises(InvalidPayload):
        definition.parse_payload({})


def test_unresolvable_payload_type_raises_config_error_instead_of_accepting_anything() -> None:
    @dataclasses.dataclass
    class LocalPayload:  # invisible to the handler's module globals
        n: int

    async def handler(ctx: Context, payload: LocalPayload) -> None: ...

    with pytest.raises(errors.ConfigError, match="cannot resolve the payload type 'LocalPayload'"):
        _definition(handler)


# --- error classification -----------------------------------------------------------------


def _classifier(**options: Any) -> TaskDefinition:
    tasks = Registry()

    @tasks.task("t", **options)
    async def handler(ctx: Context, payload: dict[str, Any]) -> None: ...

    definition = tasks.get("t")
    assert definition is not None
    return definition


def _integrity_error() -> BaseException:
    try:
        try:
            raise psycopg.errors.UniqueViolation("duplicate key")
        except psycopg.Error as exc:
            raise RuntimeError("wrapped by the handler") from exc
    except RuntimeError as wrapped:
        return wrapped


def test_default_classification() -> None:
    d = _classifier()
    assert d.is_retryable(ValueError("x"))
    assert d.is_retryable(ConnectionError("x"))
    assert d.is_retryable(Retryable("x"))
    assert not d.is_retryable(NonRetryable("x"))
    assert not d.is_retryable(InvalidPayload("x"))
    assert not d.is_retryable(psycopg.errors.UniqueViolation("x"))
    assert not d.is_retryable(psycopg.errors.ForeignKeyViolation("x"))
    assert not d.is_retryable(_integrity_error())  # found through __cause__


def test_retry_on_narrows_retries_to_the_listed_exceptions() -> None:
    d = _classifier(retry_on=[ConnectionError, TimeoutError])
    assert d.is_retryable(ConnectionResetError("x"))  # a subclass
    assert d.is_retryable(TimeoutError())
    assert not d.is_retryable(ValueError("x"))
    assert d.is_retryable(Retryable("x"))  # an explicit Retryable still retries
    assert not d.is_retryable(NonRetryable("x"))


def test_dont_retry_on_excludes_the_listed_exceptions() -> None:
    d = _classifier(dont_retry_on=[KeyError])
    assert not d.is_retryable(KeyError("x"))
    assert d.is_retryable(ValueError("x"))
    both = _classifier(retry_on=[LookupError], dont_retry_on=[KeyError])
    assert both.is_retryable(IndexError("x"))
    assert not both.is_retryable(KeyError("x"))


# --- Context ----------------------------------------------------------------------------------


async def test_context_carries_the_attempts_identity_and_a_logger(
    settings: config.Settings, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = Registry()
    seen: dict[str, Any] = {}

    @tasks.task("ctx.probe", queue="probes")
    async def probe(ctx: Context, payload: dict[str, Any]) -> None:
        seen.update(
            task_id=ctx.task_id,
            attempt=ctx.attempt,
            task_type=ctx.task_type,
            queue=ctx.queue,
            worker_id=ctx.worker_id,
            cancelled=ctx.cancelled,
        )
        ctx.logger.info("probing")

    caplog.set_level(logging.INFO, logger="ledgerq.task")
    async with helpers.running(settings, tasks) as s:
        task_id = await s.enqueue("ctx.probe")
        await helpers.wait_for_status(s.ledger, task_id, "SUCCEEDED")
    assert seen == {
        "task_id": task_id,
        "attempt": 1,
        "task_type": "ctx.probe",
        "queue": "probes",
        "worker_id": "test-worker",
        "cancelled": False,
    }
    # The line itself carries the task id and attempt, for plain-text logs.
    (record,) = [r for r in caplog.records if r.getMessage() == f"id={task_id} attempt=1 probing"]
    assert record.name == "ledgerq.task.ctx.probe"
    assert (record.task_id, record.attempt, record.worker_id) == (task_id, 1, "test-worker")  # type: ignore[attr-defined]
