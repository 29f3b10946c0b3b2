"""Publish events to a RabbitMQ exchange with publisher confirms; needs ``alchemium[rabbitmq]``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope
from alchemium.telemetry import trace_headers

__all__ = ["RabbitMQPublisher"]

logger = logging.getLogger("alchemium.relay")


def _aio_pika() -> Any:
    try:
        import aio_pika
    except ImportError as err:
        raise OutboxError(
            "RabbitMQPublisher needs aio-pika: pip install 'alchemium[rabbitmq]'"
        ) from err
    return aio_pika


class RabbitMQPublisher:
    """Publishes each event to a topic exchange, routing key = event name.

    The channel uses publisher confirms: ``publish`` returns only once the broker
    acknowledged the message, and raises if it was nacked, returned as unroutable
    (``mandatory``: no queue is bound for it) or the connection failed. Messages
    are persistent, ``message_id`` is the event id (the consumer's deduplication
    key), ``type`` the event name, the body :meth:`DomainEvent.to_json`; headers
    ``aggregate_type``, ``aggregate_id``, ``schema_version``, for a delivery made
    by a replay ``replay: true``, and the trace context (``traceparent``,
    ``tracestate``: :func:`alchemium.telemetry.trace_headers`) for a consumer to
    continue the trace. The
    exchange is declared (durable) on first use. After a connection failure the
    next publish reconnects; the failed row stays pending and is retried.

    With ``envelope=CloudEventsEnvelope(...)`` the message follows the CloudEvents
    AMQP binding instead: binary mode puts the attributes in ``cloudEvents_*``
    headers and the payload in the body, structured mode sends the whole document as
    ``application/cloudevents+json``; ``message_id`` and ``type`` stay.
    """

    messaging_system = "rabbitmq"  # the publish span's messaging.system

    def __init__(
        self,
        url: str = "amqp://guest:guest@localhost/",
        *,
        exchange: str = "alchemium.events",
        name: str = "rabbitmq",
        mandatory: bool = True,
        timeout: float = 10.0,
        envelope: CloudEventsEnvelope | None = None,
    ) -> None:
        self.url = url
        self.envelope = envelope
        self.exchange_name = exchange
        self.name = name
        self.mandatory = mandatory
        self.timeout = timeout
        self._aio_pika = _aio_pika()  # fail now, not at the first event
        self._connection: Any = None
        self._exchange: Any = None
        self._lock = asyncio.Lock()

    async def _exchange_ready(self) -> Any:
        async with self._lock:
            if self._exchange is None or self._connection is None or self._connection.is_closed:
                await self.close()
                aio_pika = self._aio_pika
                self._connection = await aio_pika.connect(self.url, timeout=self.timeout)
                channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=self.mandatory
                )
                self._exchange = await channel.declare_exchange(
                    self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
            return self._exchange

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """Publish and wait for the broker's confirm; raises if it is not confirmed."""
        aio_pika = self._aio_pika
        exchange = await self._exchange_ready()
        if self.envelope is None:
            body, content_type = event.to_json().encode(), "application/json"
            headers = {
                "aggregate_type": event.aggregate_type,
                "aggregate_id": event.aggregate_id,
                "schema_version": event.schema_version,
                **trace_headers(event),
            }
        else:
            encoded = self.envelope.encode(event, "amqp", destination)
            body, content_type, headers = encoded.body, encoded.content_type, dict(encoded.headers)
        if event.metadata.get("replay"):
            headers["replay"] = True  # a delivery made by a replay (docs/lifecycle.md)
        message = aio_pika.Message(
            body=body,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(event.id),
            type=event.name,
            timestamp=event.occurred_at,
            headers=dict(headers),
        )
        try:
            await exchange.publish(
                message, routing_key=event.name, mandatory=self.mandatory, timeout=self.timeout
            )
        except Exception:
            # Whatever went wrong, start from a fresh connection next time.
            await self._drop()
            raise

    async def _drop(self) -> None:
        try:
            await self.close()
        except Exception:  # the connection is already broken; its error is not news
            logger.debug("closing a failed RabbitMQ connection raised", exc_info=True)

    async def close(self) -> None:
        """Close the connection, if open."""
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()

    def __repr__(self) -> str:
        return f"RabbitMQPublisher(exchange={self.exchange_name!r}, name={self.name!r})"
