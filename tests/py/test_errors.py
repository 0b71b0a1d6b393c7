"""errors.first_line: how every log line and one-line command error quotes an exception."""

from __future__ import annotations

import pytest

from ledgerq import errors


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (ValueError("bad amount\n  at line 3"), "bad amount"),
        (OSError("  \n connection refused \n"), "connection refused"),
        (errors.TaskNotFound("task 7 does not exist"), "task 7 does not exist"),
        (errors.LedgerUnavailable(), "Cannot reach the ledger (PostgreSQL)."),
        (RuntimeError(), "RuntimeError"),
        (KeyError(""), "''"),
    ],
)
def test_first_line_is_the_message_first_line_or_the_class_name(
    exc: BaseException, line: str
) -> None:
    assert errors.first_line(exc) == line
