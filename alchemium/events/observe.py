"""How the events package shows up in traces and logs: its spans and its log record fields.

Spans follow OpenTelemetry's semantic conventions for databases and messaging
(``docs/observability.md`` lists them). Each helper returns a context manager from
:func:`alchemium.telemetry.span`; callers check ``telemetry.enabled`` first, so
without opentelemetry none of this runs.

Log records of the dispatch and the relay carry :func:`log_fields` as ``extra=``
(``event_id``, ``event_name``, ``destination``, ``attempt``, ``claim_token``,
``relay_id``): a JSON log formatter finds them on the record. Payloads are never
logged, since they may hold personal data.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING, Any

from alchemium import telemetry as _telemetry
from alchemium.domain_event import DomainEvent

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext
    from sqlalchemy.orm import Session

    from alchemium.events.outbox import Outbox
    from alchemium.events.outbox_schema import DeliveryRow

__all__ = [
    "MESSAGING_SYSTEM",
    "claim_span",
    "dispatch_span",
    "log_fields",
    "outbox_write_span",
    "publish_span",
]

MESSAGING_SYSTEM = "alchemium"
"""``messaging.system`` of in-process deliveries and of the outbox (a publisher may name
its own broker with a ``messaging_system`` attribute: ``"redis"``, ``"rabbitmq"``)."""


def log_fields(
    event: DomainEvent,
    destination: str,
    *,
    attempt: int,
    claim: uuid.UUID | None = None,
    relay_id: str | None = None,
) -> dict[str, Any]:
    """The ``extra=`` fields of a log record about one delivery (never the payload)."""
    fields: dict[str, Any] = {
        "event_id": str(event.id),
        "event_name": event.name,
        "destination": destination,
        "attempt": attempt,
    }
    if claim is not None:
        fields["claim_token"] = str(claim)
    if relay_id is not None:
        fields["relay_id"] = relay_id
    return fields


def _database(session: Session) -> dict[str, Any]:
    bind = session.get_bind()
    return _telemetry.database_attributes(bind.dialect.name, bind.engine.url.database)


def outbox_write_span(
    outbox: Outbox, session: Session, events: int, rows: int
) -> contextlib.AbstractContextManager[Any]:
    """``INSERT <outbox table>``: the outbox rows written in the committing transaction."""
    if _telemetry.tracer() is None:  # the API without an SDK: build no attributes
        return contextlib.nullcontext()
    attributes = _database(session)
    attributes.update(
        {
            "db.operation.name": "INSERT",
            "db.collection.name": outbox.events.name,
            "db.operation.batch.size": rows,
            "messaging.batch.message_count": events,
        }
    )
    return _telemetry.span(f"INSERT {outbox.events.name}", "client", attributes)


def _message(event: DomainEvent, destination: str, system: str) -> dict[str, Any]:
    return {
        "messaging.system": system,
        "messaging.destination.name": destination,
        "messaging.message.id": str(event.id),
        "alchemium.event.name": event.name,
    }


def dispatch_span(event: DomainEvent, subscriber: str) -> contextlib.AbstractContextManager[Any]:
    """``process <subscriber>``: one after-commit call of an in-process subscriber.

    Its parent is the context stored with the event (the span current when it was
    recorded), else the current one.
    """
    attributes = _message(event, subscriber, MESSAGING_SYSTEM)
    attributes["messaging.operation.type"] = "process"
    attributes["messaging.operation.name"] = "process"
    return _telemetry.span(
        f"process {subscriber}", "consumer", attributes, parent=_telemetry.event_context(event)
    )


def claim_span(
    outbox: Outbox, *, dialect: str, relay_id: str, token: uuid.UUID, rows: int, started: int
) -> SpanContext | None:
    """``claim <outbox table>``: a relay round's claim that found ``rows`` rows (ended now).

    Started at ``started`` (``time.time_ns()`` before the claim); only claims that found
    rows make a span, so an idle relay records none. Returns its context, which the
    round's publish spans link to.
    """
    attributes = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "receive",
        "messaging.operation.name": "claim",
        "messaging.destination.name": outbox.events.name,
        "messaging.batch.message_count": rows,
        "db.system.name": dialect,
        "alchemium.relay.id": relay_id,
        "alchemium.claim_token": str(token),
    }
    return _telemetry.finished_span(
        f"claim {outbox.events.name}", "client", attributes, start_time=started
    )


def publish_span(
    row: DeliveryRow, publisher: object, claim: SpanContext
) -> contextlib.AbstractContextManager[Any]:
    """``publish <destination>``: one delivery by the relay, current while the publisher runs.

    Its parent is the context stored with the event, so it belongs to the trace of
    the request that recorded the event, and it links to the claim span of its
    round. An event recorded without a span gets the claim span as parent instead.
    """
    system = getattr(publisher, "messaging_system", None) or MESSAGING_SYSTEM
    attributes = _message(row.event, row.destination, str(system))
    attributes["messaging.operation.type"] = "send"
    attributes["messaging.operation.name"] = "publish"
    attributes["alchemium.delivery.attempt"] = row.attempts
    recorded = _telemetry.event_context(row.event)
    return _telemetry.span(
        f"publish {row.destination}",
        "producer",
        attributes,
        parent=claim if recorded is None else recorded,
        links=() if recorded is None else (claim,),
    )
