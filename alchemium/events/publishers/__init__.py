"""Publishers: where the relay sends the events it claims from the outbox.

A publisher drains one or more *destinations* (the ``destination`` column of the
outbox delivery rows). The relay claims rows for ``publisher.name`` and calls
``publish(event, destination)`` once per row (or ``publish_many`` once per batch, if the
publisher has it: :class:`BatchPublisher`); raising means "not delivered, retry"
(:class:`PermanentPublishError`: dead now; :class:`RetryLater`: retry after the
broker's delay). The broker adapters import their client library when they are
created, so ``alchemium`` itself never needs a broker's client; each is an extra
(``alchemium[redis]``, ``[rabbitmq]``, ``[nats]``, ``[kafka]``, ``[pubsub]``, ``[aws]``,
``[webhook]``). Importing this package imports none of them.
"""

from alchemium.events.publishers.aws import SnsPublisher, SqsPublisher
from alchemium.events.publishers.base import (
    BatchPublisher,
    PermanentPublishError,
    Publisher,
    PublisherConfigurationError,
    PublisherUnavailableError,
    RetryLater,
    StartablePublisher,
    destinations_of,
    start_publisher,
)
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope, EncodedEvent, Template
from alchemium.events.publishers.inprocess import InProcessPublisher
from alchemium.events.publishers.kafka import KafkaPublisher
from alchemium.events.publishers.nats import NatsPublisher
from alchemium.events.publishers.pubsub import PubSubPublisher
from alchemium.events.publishers.rabbitmq import RabbitMQPublisher
from alchemium.events.publishers.redis import RedisStreamPublisher
from alchemium.events.publishers.webhook import WebhookPublisher, WebhookRefused

__all__ = [
    "BatchPublisher",
    "CloudEventsEnvelope",
    "EncodedEvent",
    "InProcessPublisher",
    "KafkaPublisher",
    "NatsPublisher",
    "PermanentPublishError",
    "PubSubPublisher",
    "Publisher",
    "PublisherConfigurationError",
    "PublisherUnavailableError",
    "RabbitMQPublisher",
    "RedisStreamPublisher",
    "RetryLater",
    "SnsPublisher",
    "SqsPublisher",
    "StartablePublisher",
    "Template",
    "WebhookPublisher",
    "WebhookRefused",
    "destinations_of",
    "start_publisher",
]
