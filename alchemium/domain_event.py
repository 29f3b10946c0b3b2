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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from alchemium.encoding import json_safe, plain_json
from alchemium.errors import EventSerializationError

__all__ = ["DomainEvent", "PendingEvent", "set_schema_version_resolver"]

# Where DomainEvent.create finds the schema version of an event name when none is given:
# the events package (alchemium.events.upcasting) installs its registry here. A hook, so
# this value type depends on nothing above it.
_version_of: Callable[[str], int] | None = None


def set_schema_version_resolver(resolver: Callable[[str], int] | None) -> None:
    """Make ``DomainEvent.create`` ask ``resolver(name)`` for the schema version of new events.

    ``None``: every event is created at version 1 unless given one. Installed by
    :mod:`alchemium.events.upcasting` (the declared versions); not for applications.
    """
    global _version_of
    _version_of = resolver


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _freeze_owned(value: Any) -> Any:
    """``_freeze`` for JSON nobody else holds (just decoded): dicts are wrapped, not copied."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                value[key] = _freeze_owned(item)  # same keys: safe while iterating
        return MappingProxyType(value)
    if isinstance(value, list):
        return tuple(_freeze_owned(v) if isinstance(v, (dict, list)) else v for v in value)
    return value


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """Something that happened to an aggregate, immutable and JSON-safe.

    ``id`` is the idempotency key: a consumer that may see an event twice (the relay
    delivers at least once) deduplicates on it. ``payload`` and ``metadata`` are
    read-only mappings; :meth:`to_dict` gives plain, mutable copies.
    ``schema_version`` is the version of the payload's shape (1 unless the event
    declares another, see :mod:`alchemium.events.upcasting`): events stored by older
    code are upcast to the current version wherever they are read back.
    """

    id: uuid.UUID
    name: str
    aggregate_type: str
    aggregate_id: str
    payload: Mapping[str, Any]
    occurred_at: dt.datetime
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    schema_version: int = 1

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
        schema_version: int | None = None,
    ) -> DomainEvent:
        """Build an event, converting payload and metadata to JSON-safe values (or raising).

        ``schema_version`` defaults to the version declared for ``name`` (1 if none).
        """
        if not isinstance(name, str) or not name:
            raise EventSerializationError(
                str(name), "name", name, reason="an event name must be a non-empty string"
            )
        if schema_version is None:
            schema_version = _version_of(name) if _version_of is not None else 1
        elif isinstance(schema_version, bool) or not isinstance(schema_version, int):
            raise EventSerializationError(
                name, "schema_version", schema_version, reason="a schema version is an int >= 1"
            )
        if schema_version < 1:
            raise EventSerializationError(
                name, "schema_version", schema_version, reason="a schema version is an int >= 1"
            )
        return cls(
            id=id or uuid.uuid4(),
            name=name,
            aggregate_type=aggregate_type,
            aggregate_id=str(aggregate_id),
            payload=_freeze(json_safe(dict(payload or {}), event=name, field="")),
            occurred_at=occurred_at or dt.datetime.now(dt.timezone.utc),
            metadata=_freeze(json_safe(dict(metadata or {}), event=name, field="metadata")),
            schema_version=schema_version,
        )

    def with_payload(
        self, payload: Mapping[str, Any], *, schema_version: int | None = None
    ) -> DomainEvent:
        """This event with another payload (checked JSON-safe), and version if given.

        Same id, name, aggregate, time and metadata: what an upcaster or a reader that
        opens sealed values hands on. Raises EventSerializationError like :meth:`create`.
        """
        return DomainEvent.create(
            self.name,
            aggregate_type=self.aggregate_type,
            aggregate_id=self.aggregate_id,
            payload=payload,
            metadata=plain_json(self.metadata),
            id=self.id,
            occurred_at=self.occurred_at,
            schema_version=self.schema_version if schema_version is None else schema_version,
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
            "schema_version": self.schema_version,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_stored(
        cls,
        *,
        id: uuid.UUID,
        name: str,
        aggregate_type: str,
        aggregate_id: str,
        payload: dict[str, Any],
        occurred_at: dt.datetime,
        metadata: dict[str, Any],
        schema_version: int,
    ) -> DomainEvent:
        """An event from the outbox's typed columns, ``payload`` and ``metadata`` as just
        decoded from JSON: they are taken over (made read-only in place), not copied.

        What a relay builds for every claimed row, so it skips :meth:`from_dict`'s
        conversions of values whose types the columns already guarantee.
        """
        return cls(
            id=id,
            name=name,
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            payload=_freeze_owned(payload),
            occurred_at=occurred_at,
            metadata=_freeze_owned(metadata),
            schema_version=schema_version,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainEvent:
        """Rebuild an event from :meth:`to_dict` output (what a broker consumer receives).

        A missing or null ``schema_version`` (output of versions before it existed) is 1.
        """
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
            schema_version=int(data.get("schema_version") or 1),
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
