"""Registry, task definitions and Context: what a handler is and what it is given.

    tasks = Registry()

    @tasks.task("email.send", queue="default", max_attempts=5, timeout=30)
    async def send_email(ctx: Context, payload: dict) -> dict | None: ...

A handler may be ``async def`` (run on the worker's event loop) or plain
``def`` (run in a worker thread). Its second parameter's annotation declares
the payload type: ``dict`` (the default) takes the JSON object as it is; a
dataclass, TypedDict or pydantic model is validated before the handler runs,
and a payload that does not fit sends the task DEAD after that one attempt.

A task may also run on a schedule, stacked on its ``task`` decorator in either
order; the worker creates or updates the schedule in the ledger when it starts:

    @tasks.periodic("0 3 * * *", timezone="Europe/Berlin")
    @tasks.task("report.nightly")
    async def nightly(ctx: Context, payload: dict) -> None: ...
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
import typing
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pydantic

from ledgerq import errors, jsonvalue, storable, types
from ledgerq.ledger import (
    AsyncConn,
    AsyncLedger,
    AsyncTransaction,
    SyncConn,
    Transaction,
    is_integrity_error,
    is_lock_timeout,
)

TIMEOUT_DEFAULT_S = 30.0
#: How long ctx.once and once_in_transaction wait for an effect key another
#: attempt holds, when the handler has no timeout to derive it from.
EFFECT_LOCK_WAIT_DEFAULT_S = 60.0

OnUnknown = typing.Literal["run", "skip", "fail"]
ON_UNKNOWN: tuple[OnUnknown, ...] = ("run", "skip", "fail")
_effects_log = logging.getLogger("ledgerq.effects")

_MIXED_TRANSACTIONS = (
    "once_in_transaction was called from the event loop and from a thread in one attempt; "
    "an attempt has one transaction"
)

Handler = Callable[..., Any]
ExceptionTypes = tuple[type[BaseException], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class TaskDefinition:
    """A registered task type: its handler and how its attempts are run."""

    name: str
    fn: Handler
    queue: str = types.QUEUE_DEFAULT
    max_attempts: int = types.MAX_ATTEMPTS_DEFAULT
    timeout_s: float | None = TIMEOUT_DEFAULT_S
    retry_on: ExceptionTypes = ()
    dont_retry_on: ExceptionTypes = ()
    payload_type: Any = dict

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def parse_payload(self, payload: types.JsonObject) -> Any:
        """The payload as the handler declared it; InvalidPayload if it does not fit."""
        if (
            self.payload_type in (dict, types.JsonObject, Any)
            or self.payload_type is inspect.Parameter.empty
        ):
            return payload
        try:
            return _adapter(self.payload_type).validate_python(payload)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            raise errors.InvalidPayload(
                f"payload does not match {getattr(self.payload_type, '__name__', self.payload_type)}: {problems}"
            ) from None

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether a failed attempt with this exception should be retried."""
        if isinstance(exc, errors.NonRetryable):
            return False
        if self.dont_retry_on and isinstance(exc, self.dont_retry_on):
            return False
        if isinstance(exc, errors.Retryable):
            return True
        if self.retry_on:
            return isinstance(exc, self.retry_on)
        return not is_integrity_error(exc)


_ADAPTERS: dict[Any, pydantic.TypeAdapter[Any]] = {}


def _adapter(payload_type: Any) -> pydantic.TypeAdapter[Any]:
    adapter = _ADAPTERS.get(payload_type)
    if adapter is None:
        adapter = _ADAPTERS[payload_type] = pydantic.TypeAdapter(payload_type)
    return adapter


def _payload_type(fn: Handler) -> Any:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2:
        raise errors.ConfigError(
            f"handler {fn.__qualname__} must take (ctx, payload), got {len(params)} parameter(s)"
        )
    raw = params[1].annotation
    if raw is inspect.Parameter.empty:
        return dict
    # Resolve the payload's annotation on its own: another parameter's (ctx:
    # Context imported only under TYPE_CHECKING) must not hide it. A type that
    # cannot be resolved or validated is an error now, not a payload accepted
    # unchecked at run time.
    holder = SimpleNamespace(__annotations__={params[1].name: raw})
    globalns = getattr(inspect.unwrap(fn), "__globals__", {})
    try:
        annotation = typing.get_type_hints(holder, globalns=globalns)[params[1].name]
    except Exception as exc:
        raise errors.ConfigError(
            f"handler {fn.__qualname__}: cannot resolve the payload type {raw!r} ({exc}); "
            "define it at module level"
        ) from None
    origin = typing.get_origin(annotation)
    if annotation is dict or origin is dict:
        return dict
    if annotation not in (types.JsonObject, Any):
        try:
            _adapter(annotation)
        except pydantic.PydanticUserError as exc:
            raise errors.ConfigError(
                f"handler {fn.__qualname__}: payload type {raw!r} cannot be validated: "
                f"{errors.first_line(exc)}"
            ) from None
    return annotation


@dataclasses.dataclass(frozen=True, slots=True)
class _Periodic:
    """A ``periodic`` decoration, resolved against its task when the schedules are read."""

    fn: Handler
    cron: str
    name: str | None
    payload: types.JsonObject
    timezone: str
    overlap: bool
    catch_up: timedelta


class Registry:
    """The task types a worker can run, by name, and the schedules they run on."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}
        self._periodic: list[_Periodic] = []

    def task(
        self,
        name: str,
        *,
        queue: str = types.QUEUE_DEFAULT,
        max_attempts: int = types.MAX_ATTEMPTS_DEFAULT,
        timeout: float | None = TIMEOUT_DEFAULT_S,
        retry_on: Sequence[type[BaseException]] = (),
        dont_retry_on: Sequence[type[BaseException]] = (),
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of task type ``name``."""
        if not name or not name.strip():
            raise errors.ConfigError("task name must be a non-empty string")
        if max_attempts < 1:
            raise errors.ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        if timeout is not None and timeout <= 0:
            raise errors.ConfigError(f"timeout must be > 0 seconds, got {timeout}")

        def register(fn: Handler) -> Handler:
            if name in self._tasks:
                raise errors.ConfigError(f"task {name!r} is registered twice")
            self._tasks[name] = TaskDefinition(
                name=name,
                fn=fn,
                queue=queue,
                max_attempts=max_attempts,
                timeout_s=timeout,
                retry_on=tuple(retry_on),
                dont_retry_on=tuple(dont_retry_on),
                payload_type=_payload_type(fn),
            )
            return fn

        return register

    def periodic(
        self,
        cron: str,
        *,
        name: str | None = None,
        payload: types.JsonObject | None = None,
        timezone: str = "UTC",
        overlap: bool = True,
        catch_up: timedelta | None = None,
    ) -> Callable[[Handler], Handler]:
        """Run the decorated task on the schedule ``cron`` (five fields, a macro such
        as ``@hourly``, or ``@every 30 seconds``) in ``timezone``.

        Stack it on ``@tasks.task`` in either order. The schedule is named
        ``name`` (default: the task type) and enqueues ``payload`` (default
        ``{}``) with the task's queue and max_attempts. ``overlap=False`` skips a
        slot while the previous slot's task is not final; ``catch_up`` is how old
        a slot missed during downtime may be and still fire (default: only the
        latest). The ledger checks ``cron`` and ``timezone`` when a worker starts.
        """
        if not isinstance(cron, str) or not cron.strip():
            raise errors.ConfigError("cron must be a non-empty string")
        if name is not None and not name.strip():
            raise errors.ConfigError("schedule name must be a non-empty string")
        if payload is not None and not isinstance(payload, dict):
            raise errors.ConfigError(
                f"schedule payload must be a dict, got {type(payload).__name__}"
            )
        if catch_up is not None and (
            not isinstance(catch_up, timedelta) or catch_up < timedelta(0)
        ):
            raise errors.ConfigError(
                f"catch_up must be a timedelta of zero or more, got {catch_up!r}"
            )

        def register(fn: Handler) -> Handler:
            self._periodic.append(
                _Periodic(fn, cron, name, dict(payload or {}), timezone, overlap,
                          catch_up if catch_up is not None else timedelta(0))
            )  # fmt: skip
            return fn

        return register

    def schedules(self) -> list[types.NewSchedule]:
        """Every ``periodic`` schedule with its task's queue and max_attempts, by name.

        ConfigError if one decorates a function no ``task`` registered, or two
        share a name."""
        by_fn = {id(d.fn): d for d in self._tasks.values()}
        found: dict[str, types.NewSchedule] = {}
        for periodic in self._periodic:
            definition = by_fn.get(id(periodic.fn))
            if definition is None:
                raise errors.ConfigError(
                    f"@periodic on {periodic.fn.__qualname__}, which is not a registered task: "
                    "stack it on @tasks.task"
                )
            schedule = types.NewSchedule(
                name=periodic.name or definition.name,
                cron=periodic.cron,
                task_type=definition.name,
                payload=periodic.payload,
                queue=definition.queue,
                max_attempts=definition.max_attempts,
                timezone=periodic.timezone,
                overlap=periodic.overlap,
                catch_up=periodic.catch_up,
            )
            if schedule.name in found:
                raise errors.ConfigError(f"schedule {schedule.name!r} is defined twice")
            found[schedule.name] = schedule
        return [found[name] for name in sorted(found)]

    def get(self, name: str) -> TaskDefinition | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def queues(self) -> list[str]:
        return sorted({d.queue for d in self._tasks.values()})

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)


class _TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each line with the task id and attempt, and adds them as fields."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **(kwargs.get("extra") or {})}
        return f"id={extra.get('task_id')} attempt={extra.get('attempt')} {msg}", kwargs


class Context:
    """What a handler knows about the attempt it runs, and its effect helpers.

    ``ctx.once(key, fn, *args, on_unknown="run")`` runs ``fn`` only if the
    effect ``key`` was never recorded, records it with fn's JSON result, and
    returns the recorded result on later attempts. Attempts racing on one key
    take turns (an advisory lock), so fn never runs twice at once. A start mark
    is committed before fn runs: if the worker dies while fn runs, the record is
    not written and a later attempt finds the mark and applies ``on_unknown``
    ("run" fn again, "skip" it, or "fail"; give the side effect's provider the
    same key as its own idempotency key where it has one).

    ``ctx.once_in_transaction(key, fn)`` hands ``fn`` a database connection
    whose writes commit atomically with the effect record and the task's
    completion: exactly once for effects that are database writes.

    In an ``async def`` handler both are awaited; in a plain ``def`` handler
    they return the value directly.
    """

    def __init__(
        self,
        *,
        task_id: types.TaskId,
        attempt: int,
        task_type: str,
        queue: str,
        worker_id: str,
        ledger: AsyncLedger,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.task_type = task_type
        self.queue = queue
        self.worker_id = worker_id
        # A plain flag, not a threading.Event: a bool read is atomic, and this
        # object is built once per task on the worker's hot path.
        self._stop_requested = False
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._ledger = ledger
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._transaction: AsyncTransaction | Transaction | None = None
        #: Bounds an effect's hold (ctx.once, once_in_transaction): how long its
        #: session may sit idle holding the key before the server ends it, and how
        #: long an attempt waits for a key another one holds. The worker sets it
        #: from the handler's timeout plus the lease: a frozen attempt cannot block
        #: its retry for ever.
        self.transaction_timeout_s: float | None = None

    @property
    def transaction(self) -> AsyncTransaction | Transaction | None:
        """The transaction once_in_transaction began, for the worker to finish; None if none."""
        if self._transaction is None or not self._transaction.begun:
            return None
        return self._transaction

    def _in_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def once(
        self,
        effect_key: str,
        fn: Callable[..., Any],
        *args: Any,
        on_unknown: OnUnknown = "run",
    ) -> types.JsonValue:
        """Run fn(*args) once per effect_key; return its (recorded) JSON result.

        on_unknown says what to do when an earlier attempt started this effect
        and was lost before recording it (it may or may not have happened):
        "run" it again (the default), "skip" it (return None, run nothing), or
        "fail" the attempt for good naming that attempt. Each is logged as
        ``effect.unknown``.
        """
        if on_unknown not in ON_UNKNOWN:
            raise errors.ConfigError(
                f"on_unknown must be one of {', '.join(ON_UNKNOWN)}, got {on_unknown!r}"
            )
        if self._in_loop_thread():
            return self._once(effect_key, fn, args, on_unknown, fn_in_thread=False)
        future = asyncio.run_coroutine_threadsafe(
            self._once(effect_key, fn, args, on_unknown, fn_in_thread=True), self._loop
        )
        return future.result()

    async def _once(
        self,
        effect_key: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        on_unknown: OnUnknown,
        *,
        fn_in_thread: bool,
    ) -> types.JsonValue:
        try:
            hold = await self._ledger.effect_hold(
                effect_key, self.task_id, self.attempt,
                wait_s=self._lock_wait_s(), hold_s=self.transaction_timeout_s,
            )  # fmt: skip
        except errors.InvalidInput as exc:
            # A key the ledger cannot hold fails every attempt the same way.
            raise errors.NonRetryable(f"ctx.once: {exc.message}") from None
        except errors.LedgerError as exc:
            raise self._lock_refusal(effect_key, exc, "ctx.once") from None
        try:
            if hold.start.recorded:
                return hold.start.result
            if hold.start.unknown_attempt is not None and not self._may_run_unknown(
                effect_key, hold.start, on_unknown
            ):
                return None
            try:
                value = await asyncio.to_thread(fn, *args) if fn_in_thread else fn(*args)
                if inspect.isawaitable(value):
                    value = await value
            except Exception:
                hold.forget_start = True  # fn came back with an error: nothing is unknown
                raise
            try:
                value = storable.result(jsonvalue.plain(value))
                await hold.finish(self.task_id, value)
            except (errors.NonRetryable, errors.InvalidInput) as exc:
                raise errors.NonRetryable(
                    f"ctx.once({effect_key[:80]!r}): the effect ran but its result cannot "
                    f"be recorded ({exc}); failing for good rather than running it again"
                ) from None
            except errors.LedgerUnavailable:
                raise  # the start mark stays: the next attempt knows
            except errors.LedgerError as exc:
                raise errors.NonRetryable(
                    f"ctx.once({effect_key[:80]!r}): the effect ran but the ledger refused "
                    f"its record ({exc.message}); failing for good rather than running it again"
                ) from None
            return value
        finally:
            await hold.close()

    def _may_run_unknown(
        self, effect_key: str, start: types.EffectStart, on_unknown: OnUnknown
    ) -> bool:
        """Apply on_unknown to an effect a lost attempt started; True: run fn."""
        when = start.unknown_started_at.isoformat() if start.unknown_started_at else "?"
        who = f"attempt {start.unknown_attempt} of task {start.unknown_task_id} at {when}"
        _effects_log.warning(
            "effect.unknown key=%r task_id=%s attempt=%d: started by %s, never recorded (on_unknown=%s)",
            effect_key[:200], self.task_id, self.attempt, who, on_unknown,
        )  # fmt: skip
        if on_unknown == "fail":
            raise errors.NonRetryable(
                f"ctx.once({effect_key[:80]!r}): {who} started this effect and was lost before "
                "recording it, so it may or may not have happened (on_unknown='fail')"
            )
        return on_unknown == "run"

    def _lock_wait_s(self) -> float:
        return self.transaction_timeout_s or EFFECT_LOCK_WAIT_DEFAULT_S

    def _lock_refusal(
        self, effect_key: str, exc: errors.LedgerError, helper: str = "once_in_transaction"
    ) -> Exception:
        if is_lock_timeout(exc):
            return errors.Retryable(
                f"{helper}({effect_key[:80]!r}): another attempt held the effect's lock "
                f"for over {self._lock_wait_s():g} s (stalled?); retrying later"
            )
        return exc

    def once_in_transaction(self, effect_key: str, fn: Callable[[Any], Any]) -> types.JsonValue:
        """Run fn(conn) once per effect_key, inside the transaction that completes the task."""
        if self._in_loop_thread():
            return self._once_in_transaction(effect_key, fn)
        return self._sync_once_in_transaction(effect_key, fn)

    async def _once_in_transaction(
        self,
        effect_key: str,
        fn: Callable[[AsyncConn], Awaitable[types.JsonValue] | types.JsonValue],
    ) -> types.JsonValue:
        if self._transaction is None:
            self._transaction = self._ledger.transaction(
                lock_wait_s=self._lock_wait_s(), idle_s=self.transaction_timeout_s
            )
        transaction = self._transaction
        if not isinstance(transaction, AsyncTransaction):
            raise errors.ConfigError(_MIXED_TRANSACTIONS)
        try:
            recorded, result = await transaction.effect_lock(effect_key)
        except errors.LedgerError as exc:
            raise self._lock_refusal(effect_key, exc) from None
        if recorded:
            return result
        value = fn(await transaction.connection())
        if inspect.isawaitable(value):
            value = await value
        value = jsonvalue.plain(value)
        await transaction.record_effect(effect_key, self.task_id, value)
        return value

    def _sync_once_in_transaction(
        self, effect_key: str, fn: Callable[[SyncConn], types.JsonValue]
    ) -> types.JsonValue:
        if self._transaction is None:
            self._transaction = self._ledger.sync_transaction(
                lock_wait_s=self._lock_wait_s(), idle_s=self.transaction_timeout_s
            )
        transaction = self._transaction
        if not isinstance(transaction, Transaction):
            raise errors.ConfigError(_MIXED_TRANSACTIONS)
        try:
            recorded, result = transaction.effect_lock(effect_key)
        except errors.LedgerError as exc:
            raise self._lock_refusal(effect_key, exc) from None
        if recorded:
            return result
        value = jsonvalue.plain(fn(transaction.connection()))
        transaction.record_effect(effect_key, self.task_id, value)
        return value

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger named after the task type whose lines carry the task id and
        attempt (in the text, and as fields of JSON log lines)."""
        if self._logger is None:
            self._logger = _TaskLogger(
                logging.getLogger(f"ledgerq.task.{self.task_type}"),
                {
                    "task_id": self.task_id, "task_type": self.task_type, "queue": self.queue,
                    "attempt": self.attempt, "worker_id": self.worker_id,
                },
            )  # fmt: skip
        return self._logger

    def request_stop(self) -> None:
        """Ask the handler to stop: the task was cancelled, timed out, or its lease lost."""
        self._stop_requested = True

    @property
    def cancelled(self) -> bool:
        """True once the ledger asked this attempt to stop; long sync handlers may poll it."""
        return self._stop_requested
