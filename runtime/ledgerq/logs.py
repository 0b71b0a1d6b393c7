"""Logging for the ``ledgerq`` services: a level and a format, set once at start-up.

``--log-level`` (or ``LEDGERQ_LOG_LEVEL``; default INFO, any case) and
``--log-format text|json`` (or ``LEDGERQ_LOG_FORMAT``; default text). Text is
one line per event: ``time LEVEL logger message``. JSON is one object per line
with ``time``, ``level``, ``logger`` and ``message``, plus the fields a line
carries (``task_id``, ``task_type``, ``queue``, ``attempt``, ``worker_id``,
``duration_s``, ...) and ``exception`` when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

from ledgerq import errors

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
LEVEL_DEFAULT = "INFO"
FORMAT_DEFAULT = "text"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Attributes every LogRecord has: anything else on a record is a field of the line.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}  # fmt: skip


def level_name(value: str | None = None) -> str:
    """The level from value, else LEDGERQ_LOG_LEVEL, else INFO; in upper case."""
    raw = value or os.environ.get("LEDGERQ_LOG_LEVEL") or LEVEL_DEFAULT
    name = raw.strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LEVELS:
        raise errors.ConfigError(
            f"log level must be one of {', '.join(LEVELS)} (any case), got {raw!r}"
        )
    return name


def format_name(value: str | None = None) -> str:
    """The format from value, else LEDGERQ_LOG_FORMAT, else text."""
    raw = value or os.environ.get("LEDGERQ_LOG_FORMAT") or FORMAT_DEFAULT
    name = raw.strip().lower()
    if name not in FORMATS:
        raise errors.ConfigError(f"log format must be text or json, got {raw!r}")
    return name


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the record's own fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """Send every log line to stderr at level, in fmt (both resolved as above)."""
    handler = logging.StreamHandler(sys.stderr)
    if format_name(fmt) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name(level))
