"""Publishers: where the relay sends the events it claims from the outbox.

A publisher drains one or more *destinations* (the ``destination`` column of the
outbox delivery rows). The relay claims rows for ``publisher.name`` and calls
``publish(event, destination)`` once per row; raising means "not delivered, retry".
The broker adapters import their client library on first use, so ``alchemium``
itself never needs redis-py or aio-pika.
"""

from alchemium.events.publishers.base import Publisher, destinations_of
from alchemium.events.publishers.inprocess import InProcessPublisher
from alchemium.events.publishers.rabbitmq import RabbitMQPublisher
from alchemium.events.publishers.redis import RedisStreamPublisher

__all__ = [
    "InProcessPublisher",
    "Publisher",
    "RabbitMQPublisher",
    "RedisStreamPublisher",
    "destinations_of",
]
