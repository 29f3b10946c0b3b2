"""DomainEvent: the immutable record of something that happened to an aggregate.

Payloads are converted to JSON-safe values when the event is created, so an
event looks the same to an in-process handler right after commit and to a relay
subscriber reading it back from the outbox: datetimes/dates/times become ISO
strings, Decimals and UUIDs strings, Enums their value. Anything else raises
EventSerializationError naming the event and the field, inside the unit of work
and before commit.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from alchemium.errors import EventSerializationError

__all__ = ["DomainEvent", "json_safe"]


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


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """Something that happened to an aggregate, immutable and JSON-safe.

    ``id`` is the idempotency key: a consumer that may see an event twice (the relay
    delivers at least once) deduplicates on it. ``payload`` and ``metadata`` are
    read-only mappings; :meth:`to_dict` gives plain, mutable copies.
    """

    id: uuid.UUID
    name: str
    aggregate_type: str
    aggregate_id: str
    payload: Mapping[str, Any]
    occurred_at: dt.datetime
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def create(
        cls,
        name: str,
        *,
        aggregate_type: str,
        aggregate_id: str,
        payload: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        id: uuid.UUID | None = None,
        occurred_at: dt.datetime | None = None,
    ) -> DomainEvent:
        """Build an event, converting payload and metadata to JSON-safe values (or raising)."""
        if not isinstance(name, str) or not name:
            raise EventSerializationError(str(name), "name", name)
        return cls(
            id=id or uuid.uuid4(),
            name=name,
            aggregate_type=aggregate_type,
            aggregate_id=str(aggregate_id),
            payload=_freeze(json_safe(dict(payload or {}), event=name, field="")),
            occurred_at=occurred_at or dt.datetime.now(dt.timezone.utc),
            metadata=_freeze(json_safe(dict(metadata or {}), event=name, field="metadata")),
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-safe dict of the whole event (the wire format of broker publishers)."""
        return {
            "id": str(self.id),
            "name": self.name,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "payload": _thaw(self.payload),
            "occurred_at": self.occurred_at.isoformat(),
            "metadata": _thaw(self.metadata),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainEvent:
        """Rebuild an event from :meth:`to_dict` output (what a broker consumer receives)."""
        occurred = data["occurred_at"]
        if not isinstance(occurred, dt.datetime):
            occurred = dt.datetime.fromisoformat(str(occurred))
        return cls(
            id=data["id"] if isinstance(data["id"], uuid.UUID) else uuid.UUID(str(data["id"])),
            name=data["name"],
            aggregate_type=data["aggregate_type"],
            aggregate_id=str(data["aggregate_id"]),
            payload=_freeze(dict(data.get("payload") or {})),
            occurred_at=occurred,
            metadata=_freeze(dict(data.get("metadata") or {})),
        )
