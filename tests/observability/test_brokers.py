"""Trace context on the wire: AMQP headers and Redis Streams fields (real RabbitMQ and Redis).

With the relay traced, a message carries its publish span; without an SDK in the
relay, the context stored with the event when it was recorded.
"""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import telemetry
from alchemium.events import DomainEvent, OutboxRelay
from alchemium.events.outbox import Outbox
from alchemium.events.publishers import RabbitMQPublisher, RedisStreamPublisher
from tests.events.relay_support import RabbitServer, RedisServer, write_pending
from tests.observability.conftest import Spans, traceparent

Factory = async_sessionmaker[AsyncSession]

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])

RECORDED = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))


async def commit_traced_event(factory: Factory, outbox: Outbox, destination: str) -> DomainEvent:
    """An event recorded while a (remote) span was current, pending for ``destination``."""
    metadata: dict[str, str] = {}
    with trace.use_span(NonRecordingSpan(RECORDED)):
        telemetry.add_trace_context(metadata)
    event = DomainEvent.create(
        "user_created", aggregate_type="user", aggregate_id="1", metadata=metadata
    )
    async with factory() as session:
        await write_pending(session, outbox, [event], [destination])
        await session.commit()
    return event


@sqlite_only
async def test_amqp_headers_carry_the_publish_span(
    spans: Spans, session_factory: Factory, outbox: Outbox, rabbitmq_server: RabbitServer
) -> None:
    import aio_pika

    connection = await aio_pika.connect(rabbitmq_server.url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            "traced.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, routing_key="user_created")
        await commit_traced_event(session_factory, outbox, "rabbitmq")
        publisher = RabbitMQPublisher(rabbitmq_server.url, exchange="traced.events")
        try:
            assert await OutboxRelay(session_factory, publisher, listen=False).run_once() == 1
        finally:
            await publisher.close()
        message = await queue.get(timeout=5)
        await message.ack()
    finally:
        await connection.close()

    publish = spans.one("publish rabbitmq")
    assert publish.attributes is not None
    assert publish.attributes["messaging.system"] == "rabbitmq"
    assert publish.parent is not None
    assert publish.parent.span_id == RECORDED.span_id
    assert message.headers["traceparent"] == traceparent(publish)


@sqlite_only
async def test_redis_fields_carry_the_recorded_context_when_the_relay_is_not_traced(
    session_factory: Factory, outbox: Outbox, redis_server: RedisServer
) -> None:
    event = await commit_traced_event(session_factory, outbox, "redis")
    publisher = RedisStreamPublisher(redis_server.url)
    try:
        assert await OutboxRelay(session_factory, publisher, listen=False).run_once() == 1
    finally:
        await publisher.close()

    ((_, fields),) = await redis_server.entries("alchemium:events")
    assert fields["traceparent"] == event.metadata["traceparent"]
    assert fields["traceparent"] == f"00-{0xABC:032x}-{0xDEF:016x}-01"
    assert "tracestate" not in fields
