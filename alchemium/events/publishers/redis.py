"""Publish events to a Redis stream (``XADD``); needs ``alchemium[redis]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope
from alchemium.telemetry import trace_headers

__all__ = ["RedisStreamPublisher"]


def _redis_asyncio() -> Any:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as err:
        raise OutboxError(
            "RedisStreamPublisher needs redis-py: pip install 'alchemium[redis]'"
        ) from err
    return redis_asyncio


class RedisStreamPublisher:
    """Appends each event to a Redis stream with ``XADD``.

    Entry fields: ``event_id`` (the consumer's deduplication key: delivery is at
    least once), ``name``, ``aggregate_type``, ``aggregate_id``, ``event`` (the
    whole event as JSON, see :meth:`DomainEvent.to_json`), ``schema_version``, for
    a delivery made by a replay ``replay`` (``"1"``), and the trace context
    (``traceparent``, ``tracestate``: :func:`alchemium.telemetry.trace_headers`) for a
    consumer to continue the trace. The entry id is Redis's
    own (``*``). ``XADD`` returns only after Redis accepted the entry; with Redis
    persistence off, an accepted entry can still be lost if Redis itself restarts.
    The client connects on first use and reconnects by itself after an outage; a
    publish during an outage raises, so the row stays pending and is retried. The
    relay hands it a claimed batch at once (:meth:`publish_many`, a pipeline).

    With ``envelope=CloudEventsEnvelope(...)`` the ``event`` field holds the
    CloudEvents structured document instead (Redis has no CloudEvents binding, so
    the mode is always structured); the other fields stay.
    """

    messaging_system = "redis"  # the publish span's messaging.system

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        stream: str = "alchemium:events",
        name: str = "redis",
        maxlen: int | None = None,
        timeout: float = 5.0,
        client: Any = None,
        envelope: CloudEventsEnvelope | None = None,
    ) -> None:
        self.url = url
        self.stream = stream
        self.name = name
        self.maxlen = maxlen
        self.timeout = timeout
        self._client = client
        self._owns_client = client is None
        self.envelope = envelope
        if client is None:
            _redis_asyncio()  # fail now, not at the first event, if redis-py is missing

    def _connect(self) -> Any:
        if self._client is None:
            self._client = _redis_asyncio().from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        return self._client

    def _fields(self, event: DomainEvent, destination: str) -> dict[str, str]:
        fields = {
            "event_id": str(event.id),
            "name": event.name,
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "event": event.to_json()
            if self.envelope is None
            else self.envelope.encode(event, "http", destination, mode="structured").body.decode(),
            "schema_version": str(event.schema_version),
            **trace_headers(event),
        }
        if event.metadata.get("replay"):
            fields["replay"] = "1"  # a delivery made by a replay (docs/lifecycle.md)
        return fields

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """``XADD`` the event to :attr:`stream`; raises if Redis does not accept it."""
        await self._connect().xadd(
            self.stream,
            self._fields(event, destination),
            maxlen=self.maxlen,
            approximate=self.maxlen is not None,
        )

    async def publish_many(
        self, items: Sequence[tuple[DomainEvent, str]]
    ) -> list[BaseException | None]:
        """``XADD`` every event in one pipeline: one round trip for the relay's batch.

        Not a transaction (no ``MULTI``): Redis runs the commands in order, and each
        event's outcome is its own command's (an error Redis answers fails only that
        event). A connection lost before the replies raises: every event of the batch
        is retried, and those Redis had already appended arrive twice (at least once;
        consumers deduplicate on ``event_id``).
        """
        async with self._connect().pipeline(transaction=False) as pipe:
            for event, destination in items:
                pipe.xadd(
                    self.stream,
                    self._fields(event, destination),
                    maxlen=self.maxlen,
                    approximate=self.maxlen is not None,
                )
            replies = await pipe.execute(raise_on_error=False)
        return [r if isinstance(r, BaseException) else None for r in replies]

    async def close(self) -> None:
        """Close the client connection pool (if this publisher created it)."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    def __repr__(self) -> str:
        return f"RedisStreamPublisher(stream={self.stream!r}, name={self.name!r})"
