"""Values the ledger can store and read back: checked before they are sent.

PostgreSQL's ``jsonb`` refuses NaN and Infinity, a NUL character (``\\u0000``)
and a lone UTF-16 surrogate; ``text`` refuses NUL and cannot be encoded from a
lone surrogate. Sent anyway, such a value fails the whole statement that
carries it, and with it every other outcome of the same batch. So the worker
checks each result here and sends only what will be stored, and cleans error
texts (which are only for people to read) instead of refusing them.

Bounds: a result of at most RESULT_MAX_BYTES of JSON, an error text of at most
ERROR_TEXT_MAX characters (the middle is cut, keeping the summary and where the
error came from), a ``run_at`` whose UTC instant falls in years 1 to 9999 (the
clients and the HTTP API check it before sending).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ledgerq import errors
from ledgerq.types import JsonValue

RESULT_MAX_BYTES = 1_000_000
ERROR_TEXT_MAX = 8000
RUN_AT_RANGE = "years 1 to 9999 in UTC"


def run_at(value: datetime) -> datetime:
    """value as UTC, if the ledger can store it and every reader decode it back;
    InvalidInput otherwise.

    An aware datetime near year 1 or 9999 can be another year in UTC
    (9999-12-31T23:59:59-14:00 is year 10000), which PostgreSQL stores and
    psycopg cannot read. A naive one is the session's time zone's to place.
    """
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise errors.InvalidInput(f"run_at must fall within {RUN_AT_RANGE}, got {value}") from None


def result(value: Any) -> JsonValue:
    """value as JSON the ledger can store; NonRetryable naming why it cannot be."""
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str):
            _check_text(value, "result")
        return value
    try:
        dumped = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = "it holds NaN or Infinity" if "Out of range float" in str(exc) else str(exc)
        raise errors.NonRetryable(f"handler returned a value that is not JSON: {reason}") from None
    if len(dumped) > RESULT_MAX_BYTES:  # ASCII (ensure_ascii): characters are bytes
        raise errors.NonRetryable(
            f"handler returned a result of {len(dumped)} bytes of JSON; "
            f"the ledger keeps at most {RESULT_MAX_BYTES}"
        )
    decoded: JsonValue = json.loads(dumped)
    _check_json(decoded, "result")
    return decoded


def error_text(text: str) -> str:
    """text as the ledger can store it: NUL and lone surrogates escaped, length bounded."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > ERROR_TEXT_MAX:
        half = ERROR_TEXT_MAX // 2
        text = text[:half] + "\n...\n" + text[-half:]
    return text


def _check_json(value: JsonValue, where: str) -> None:
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"{where} key {key[:40]!r}")
            _check_json(item, f"{where}[{key[:40]!r}]")


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise errors.NonRetryable(
            f"handler returned a {where} holding a NUL character (\\u0000), "
            "which PostgreSQL cannot store"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.NonRetryable(
            f"handler returned a {where} holding a lone surrogate, which is not valid UTF-8"
        ) from None
