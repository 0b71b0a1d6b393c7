"""Every exception ledgerq raises, in one tree.

    LedgerqError
    ├── ConfigError                 bad settings or options, found at start-up
    ├── LedgerError                 PostgreSQL: unreachable, or refused a call
    │   ├── LedgerUnavailable       cannot connect / connection lost
    │   ├── InvalidInput            SQLSTATE LQ422: bad arguments
    │   ├── TaskNotFound            SQLSTATE LQ404: no task with that id
    │   ├── IdempotencyConflict     SQLSTATE LQ409: key reused with other content
    │   ├── InvalidTransition       SQLSTATE LQ409: e.g. retrying a RUNNING task
    │   └── LeaseLost               this attempt no longer owns its task
    └── DispatchError               Redis
        └── DispatchUnavailable     cannot connect / connection lost

    HandlerOutcome                  raised by task handlers, not by the library
    ├── Retryable                   retry with backoff (the default for any error)
    └── NonRetryable                the task goes DEAD after this attempt
        └── InvalidPayload          the payload does not fit the handler

Each class's docstring is its default message. Driver exceptions (psycopg,
redis) are translated at the seam in ledger.py and dispatch.py and never
leave those modules untranslated. ``first_line(exc)`` is how any exception is
quoted in a log line or a one-line command error.
"""

from __future__ import annotations


class LedgerqError(Exception):
    """ledgerq failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(LedgerqError):
    """Invalid configuration."""


class LedgerError(LedgerqError):
    """The ledger (PostgreSQL) refused the call."""


class LedgerUnavailable(LedgerError):
    """Cannot reach the ledger (PostgreSQL)."""


class InvalidInput(LedgerError):
    """Invalid input."""


class TaskNotFound(LedgerError):
    """No task with that id."""


class IdempotencyConflict(LedgerError):
    """The idempotency key is already used by a task with a different type or payload."""


class InvalidTransition(LedgerError):
    """The task is not in a state that allows this."""


class LeaseLost(LedgerError):
    """This attempt no longer owns its task: its lease expired and another attempt took over."""


class DispatchError(LedgerqError):
    """The dispatcher (Redis) refused the call."""


class DispatchUnavailable(DispatchError):
    """Cannot reach the dispatcher (Redis)."""


class HandlerOutcome(Exception):
    """A task handler's outcome."""


class Retryable(HandlerOutcome):
    """The attempt failed and should be retried with backoff."""


class NonRetryable(HandlerOutcome):
    """The attempt failed and must not be retried: the task goes DEAD."""


class InvalidPayload(NonRetryable):
    """The payload does not match what the handler accepts."""


def first_line(exc: BaseException) -> str:
    """The first line of exc's message, or its class name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
