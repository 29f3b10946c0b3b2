"""Publish events to NATS JetStream, acknowledged and de-duplicated; needs ``alchemium[nats]``."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from alchemium.domain_event import DomainEvent
from alchemium.events.publishers.base import (
    PublisherConfigurationError,
    PublisherUnavailableError,
)
from alchemium.events.publishers.client import import_client, redact
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope, Template

__all__ = ["NatsPublisher"]

logger = logging.getLogger("alchemium.relay")

# A subject to publish to: dot-separated tokens, no whitespace, no wildcards.
SUBJECT = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")


class NatsPublisher:
    """Publishes each event to a JetStream subject and waits for the stream's ack.

    ``publish`` returns once a stream stored the message (its ``PubAck``); no stream
    for the subject, a timeout or a lost connection raise, and the row is retried.
    ``Nats-Msg-Id`` is the event id, so a redelivery (a retry after a lost ack, a
    relay that died before recording) inside the stream's duplicate window
    (``duplicate_window``, 2 minutes by default) is dropped by the server, which
    acknowledges it with ``duplicate=true``: that counts as delivered, never as a
    failure. Outside the window a redelivery is stored again (consumers deduplicate
    on the event id, as always).

    Args:
        url: ``nats://host:4222`` (several comma-separated; credentials in the URL).
        subject: template of the subject, per event (default ``events.{name}``).
        stream: if given, the stream the subjects must belong to: checked at
            :meth:`start` and sent as ``Nats-Expected-Stream``.
        envelope: CloudEvents binary mode (``ce-`` headers) by default.
        timeout: seconds to wait for a connection and for each ack.
    """

    def __init__(
        self,
        url: str = "nats://localhost:4222",
        *,
        subject: str = "events.{name}",
        stream: str | None = None,
        name: str = "nats",
        envelope: CloudEventsEnvelope | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._nats = import_client("nats", "NatsPublisher", "nats-py", "nats")
        self.url = url
        self.subject = Template(subject, what="NATS subject")
        self.stream = stream
        self.name = name
        self.envelope = envelope if envelope is not None else CloudEventsEnvelope()
        self.timeout = timeout
        self._connection: Any = None
        self._jetstream: Any = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> Any:
        async with self._lock:
            if self._connection is None or self._connection.is_closed:
                try:
                    # Bounded: with reconnection on, the client would retry the first
                    # connection forever.
                    self._connection = await asyncio.wait_for(
                        self._nats.connect(
                            self.url.split(","),
                            connect_timeout=self.timeout,
                            allow_reconnect=True,
                            max_reconnect_attempts=-1,  # an outage is waited out, not fatal
                            reconnect_time_wait=0.5,
                            error_cb=self._connection_error,
                        ),
                        self.timeout * 2,
                    )
                except Exception as err:
                    why = str(err) or f"no connection within {self.timeout * 2:g}s"
                    raise PublisherUnavailableError(
                        f"NatsPublisher({self.name!r}): cannot connect to {redact(self.url)}: "
                        f"{type(err).__name__}: {why}"
                    ) from err
                self._jetstream = self._connection.jetstream(timeout=self.timeout)
            return self._jetstream

    async def _connection_error(self, err: Exception) -> None:
        # Publishes during an outage raise and are retried; this is only the client's news.
        logger.debug("NatsPublisher(%r): %s: %s", self.name, type(err).__name__, err)

    async def start(self) -> None:
        """Connect, check that JetStream is enabled and that :attr:`stream` exists."""
        jetstream = await self._ready()
        try:
            await jetstream.account_info()
        except Exception as err:
            raise PublisherUnavailableError(
                f"NatsPublisher({self.name!r}): JetStream is not available at "
                f"{redact(self.url)}: {type(err).__name__}: {err}"
            ) from err
        if self.stream is not None:
            try:
                await jetstream.stream_info(self.stream)
            except Exception as err:
                raise PublisherConfigurationError(
                    f"NatsPublisher({self.name!r}): stream {self.stream!r} does not exist at "
                    f"{redact(self.url)} ({type(err).__name__}: {err})"
                ) from err

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """Publish with ``Nats-Msg-Id`` = event id; return once JetStream acknowledged."""
        subject = self.subject.render(event, destination, valid=SUBJECT)
        message = self.envelope.encode(event, "nats", destination)
        headers = {**message.headers, "Nats-Msg-Id": str(event.id)}
        jetstream = await self._ready()
        ack = await jetstream.publish(
            subject, message.body, timeout=self.timeout, stream=self.stream, headers=headers
        )
        if ack.duplicate:
            # Stored by an earlier attempt whose ack we never saw: delivered, not failed.
            logger.info(
                "event %s (%s) was already in stream %s (duplicate within its window)",
                event.id,
                event.name,
                ack.stream,
            )

    async def close(self) -> None:
        """Drain and close the connection, if open."""
        connection, self._connection, self._jetstream = self._connection, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()

    def __repr__(self) -> str:
        return f"NatsPublisher(subject={self.subject.text!r}, name={self.name!r})"
