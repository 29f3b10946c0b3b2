"""Publish events to Kafka (``acks=all``, idempotent producer); needs ``alchemium[kafka]``."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from alchemium.domain_event import DomainEvent
from alchemium.events.publishers.base import (
    PermanentPublishError,
    PublisherConfigurationError,
    PublisherUnavailableError,
)
from alchemium.events.publishers.client import import_client
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope, Template

__all__ = ["KafkaPublisher"]

logger = logging.getLogger("alchemium.relay")

TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# Errors retrying cannot fix: the record itself or the topic's name is wrong.
_PERMANENT = ("MessageSizeTooLargeError", "RecordTooLargeError", "InvalidTopicError")


class KafkaPublisher:
    """Publishes each event to a Kafka topic; ``publish`` returns once all in-sync replicas have it.

    - The key is the partition key (the aggregate id by default), so the events of
      one aggregate go to one partition and stay in order there.
    - ``acks="all"``: the leader answers once every in-sync replica stored the record.
    - The idempotent producer (``enable_idempotence``) is on where the broker
      supports it (Kafka 0.11+; a broker that refuses ``InitProducerId`` at start
      gets a plain producer and a warning, ``idempotent_in_use`` says which): a retry
      inside the
      producer after a lost ack is not written twice. It does not span producer
      restarts: a relay that dies before recording its outcome publishes the
      record again (consumers deduplicate on the ``ce_id`` header / event id).
    - CloudEvents binary mode by default (``ce_`` headers, the payload as value).

    Args:
        bootstrap_servers: ``"host:9092"`` or several, comma-separated.
        topic: template of the topic per event (default ``events``).
        idempotent: ``None`` (default) uses the idempotent producer if the broker
            supports it; ``True`` requires it; ``False`` turns it off.
        timeout: seconds for one acknowledgement (and for connecting at start).
        client_options: passed to ``aiokafka.AIOKafkaProducer`` (``security_protocol``,
            ``sasl_mechanism``, ``ssl_context``, ...).
    """

    def __init__(
        self,
        bootstrap_servers: str = "localhost:9092",
        *,
        topic: str = "events",
        name: str = "kafka",
        envelope: CloudEventsEnvelope | None = None,
        idempotent: bool | None = None,
        timeout: float = 10.0,
        **client_options: Any,
    ) -> None:
        self._aiokafka = import_client("aiokafka", "KafkaPublisher", "aiokafka", "kafka")
        self.bootstrap_servers = bootstrap_servers
        self.topic = Template(topic, what="Kafka topic")
        self.name = name
        self.envelope = envelope if envelope is not None else CloudEventsEnvelope()
        self.idempotent = idempotent
        self.timeout = timeout
        self.client_options = client_options
        self.idempotent_in_use: bool | None = None  # known once started
        self._producer: Any = None
        self._lock = asyncio.Lock()

    def _new_producer(self, idempotent: bool) -> Any:
        return self._aiokafka.AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=idempotent,
            request_timeout_ms=int(self.timeout * 1000),
            **self.client_options,
        )

    async def _ready(self) -> Any:
        async with self._lock:
            if self._producer is None:
                self._producer = await self._started(self.idempotent is not False)
            return self._producer

    async def _started(self, idempotent: bool) -> Any:
        """A started producer; without idempotence if ``idempotent`` is auto and refused."""
        errors = self._aiokafka.errors
        producer = self._new_producer(idempotent)
        try:
            await producer.start()
        except Exception as err:
            await producer.stop()
            refused = isinstance(err, errors.KafkaError) and not isinstance(
                err, errors.KafkaConnectionError
            )
            if idempotent and refused and self.idempotent is None:
                # InitProducerId refused: the broker has no idempotent producer.
                logger.warning(
                    "KafkaPublisher(%r): %s refused the idempotent producer (%s: %s); "
                    "publishing without it",
                    self.name,
                    self.bootstrap_servers,
                    type(err).__name__,
                    err,
                )
                return await self._started(False)
            error = PublisherConfigurationError if refused else PublisherUnavailableError
            raise error(
                f"KafkaPublisher({self.name!r}): cannot start a producer on "
                f"{self.bootstrap_servers}: {type(err).__name__}: {err}"
            ) from err
        self.idempotent_in_use = idempotent
        return producer

    async def start(self) -> None:
        """Connect (credentials checked), and check that a fixed topic exists."""
        producer = await self._ready()
        if self.topic.fields:
            return  # a topic per event: nothing to check before the first one
        topic = self.topic.text
        if not TOPIC.fullmatch(topic):
            raise PublisherConfigurationError(
                f"KafkaPublisher({self.name!r}): {topic!r} is not a valid topic name"
            )
        metadata = await producer.client.fetch_all_metadata()
        if topic not in metadata.topics():
            raise PublisherConfigurationError(
                f"KafkaPublisher({self.name!r}): topic {topic!r} does not exist at "
                f"{self.bootstrap_servers} (create it, or enable auto-creation)"
            )

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """Send with key = partition key and wait for ``acks=all``; raises if not acknowledged."""
        topic = self.topic.render(event, destination, valid=TOPIC)
        message = self.envelope.encode(event, "kafka", destination)
        headers = [(k, v.encode()) for k, v in message.headers.items()]
        producer = await self._ready()
        try:
            await producer.send_and_wait(
                topic, value=message.body, key=message.partition_key.encode(), headers=headers
            )
        except Exception as err:
            if type(err).__name__ in _PERMANENT:
                raise PermanentPublishError(
                    f"event {event.id} ({event.name}): Kafka refused the record for {topic!r}: "
                    f"{type(err).__name__}: {err}"
                ) from err
            raise

    async def close(self) -> None:
        """Flush and stop the producer, if started."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def __repr__(self) -> str:
        return f"KafkaPublisher(topic={self.topic.text!r}, name={self.name!r})"
