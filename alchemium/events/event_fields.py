"""What the wire formats read from an event beyond its own fields: schema version, trace context.

One place for both the CloudEvents envelope (``dataschema`` / ``schemaversion``,
``traceparent``) and the Debezium-shaped outbox table (its schema-version and
``tracingspancontext`` columns), so they always agree.
"""

from __future__ import annotations

from collections.abc import Mapping

from alchemium.domain_event import DomainEvent
from alchemium.telemetry import TRACE_KEYS

__all__ = ["TRACE_KEYS", "schema_version_of", "trace_context_of"]


def schema_version_of(event: DomainEvent) -> str:
    """The payload's schema version (``event.schema_version``) as a string.

    A string: it goes into headers, templates and text columns.
    """
    return str(event.schema_version)


def trace_context_of(event: DomainEvent) -> Mapping[str, str]:
    """The W3C trace context recorded in the event's metadata (``traceparent``, ``tracestate``)."""
    return {k: str(event.metadata[k]) for k in TRACE_KEYS if k in event.metadata}
