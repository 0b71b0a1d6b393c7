"""Python values as JSON: what handlers return and what callers enqueue.

``plain(value)`` turns the values a Python program naturally holds into JSON
types, recursively:

- pydantic models → ``model_dump(mode="json")``; dataclass instances → an
  object of their fields; enums → their value; tuples → arrays;
- ``datetime``, ``date`` and ``time`` → ISO 8601 text (a datetime keeps its
  zone); ``Decimal`` → text (exact: a float would round it); ``UUID`` → text.

Anything else is left as it is, for the JSON encoder to refuse; with
``strict=True`` it raises ``InvalidInput`` naming where it is
(``payload["items"][2]: a set is not JSON``), and so do NaN and Infinity.
``payload(value)`` is the strict form for a task's payload, which must come
out as a JSON object. No I/O here.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import math
import uuid
from collections.abc import Mapping
from typing import Any

import pydantic

from ledgerq import errors
from ledgerq.types import JsonObject, JsonValue

_SCALARS = (str, int, bool, type(None))


def plain(value: Any, *, strict: bool = False, where: str = "value") -> JsonValue:
    """value with models, dataclasses, dates, decimals and UUIDs as JSON types."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, float):
        if strict and not math.isfinite(value):
            raise errors.InvalidInput(f"{where}: {value} is not JSON (NaN and Infinity are not)")
        return value
    if isinstance(value, Mapping):
        out: JsonObject = {}
        for key, item in value.items():
            if isinstance(key, enum.Enum):
                key = key.value
            if not isinstance(key, str):
                if strict and not isinstance(key, int | float | bool):
                    raise errors.InvalidInput(
                        f"{where}: a key of type {type(key).__name__} is not JSON (keys are text)"
                    )
                key = str(key)
            out[key] = plain(item, strict=strict, where=f"{where}[{key[:40]!r}]")
        return out
    if isinstance(value, list | tuple):
        return [plain(item, strict=strict, where=f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, pydantic.BaseModel):
        return plain(value.model_dump(mode="json"), strict=strict, where=where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return plain(fields, strict=strict, where=where)
    if isinstance(value, enum.Enum):
        return plain(value.value, strict=strict, where=where)
    if isinstance(value, datetime.date | datetime.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if strict and not value.is_finite():
            raise errors.InvalidInput(f"{where}: {value} is not JSON (NaN and Infinity are not)")
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if strict:
        raise errors.InvalidInput(
            f"{where}: a {type(value).__name__} is not JSON "
            "(use objects, arrays, text, numbers, booleans, null, models, dataclasses, "
            "dates, decimals or UUIDs)"
        )
    return value


def payload(value: Any) -> JsonObject:
    """A task's payload as a JSON object; InvalidInput naming what is not JSON."""
    if value is None:
        return {}
    converted = plain(value, strict=True, where="payload")
    if not isinstance(converted, dict):
        raise errors.InvalidInput(
            "payload must be a JSON object (a dict, a pydantic model or a dataclass), "
            f"got {type(value).__name__}"
        )
    return converted
