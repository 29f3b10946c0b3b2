"""JSON-safe values: what an event payload may hold and how other values are converted.

An event looks the same to an in-process handler right after commit and to a relay
subscriber reading it back from the outbox, so payloads are converted to plain JSON
types when the event is created: datetimes/dates/times become ISO strings, Decimals
and UUIDs strings, Enums their value. Anything else raises EventSerializationError
naming the event and the field, inside the unit of work and before commit.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Mapping
from typing import Any

from alchemium.errors import EventSerializationError

__all__ = ["json_safe"]


def json_safe(value: Any, *, event: str, field: str) -> Any:
    """Return ``value`` as plain JSON types, or raise EventSerializationError for ``field``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise EventSerializationError(event, field, value)
        return value
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value, event=event, field=field)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise EventSerializationError(event, f"{field}.{key!r}", key)
            out[key] = json_safe(item, event=event, field=f"{field}.{key}" if field else key)
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(v, event=event, field=f"{field}[{i}]") for i, v in enumerate(value)]
    raise EventSerializationError(event, field, value)
