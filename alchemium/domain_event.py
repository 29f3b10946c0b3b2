"""DomainEvent: the immutable record of something that happened to an aggregate.

A value type, like an exception: it depends on nothing but the error hierarchy and
the JSON conversion (:mod:`alchemium.encoding`), so the unit of work can hold the
events recorded in its transaction without knowing how they are stored or delivered.
Payloads are converted to JSON-safe values when the event is created.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from alchemium.encoding import json_safe, plain_json
from alchemium.errors import EventSerializationError

__all__ = ["DomainEvent", "PendingEvent"]


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
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
            raise EventSerializationError(
                str(name), "name", name, reason="an event name must be a non-empty string"
            )
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
            "payload": plain_json(self.payload),
            "occurred_at": self.occurred_at.isoformat(),
            "metadata": plain_json(self.metadata),
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


class PendingEvent(Protocol):
    """An event recorded now and built later, only if something will see it.

    Entity changes are recorded at every flush; turning them into DomainEvents (JSON
    conversion, a fresh id) is deferred until the commit knows who needs them. The
    unit of work holds these next to built events and calls :meth:`build` when asked.
    """

    @property
    def name(self) -> str:
        """The name the event will have (to decide whether anything wants it)."""
        ...

    def build(self) -> DomainEvent:
        """The DomainEvent; raises EventSerializationError for a value JSON cannot hold."""
        ...
