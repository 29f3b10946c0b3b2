"""Broker publishers against real ``redis-server`` and ``rabbitmq-server`` processes.

The outage tests stop a running broker and start it again: events committed meanwhile
stay pending (never marked delivered) and reach the broker once it is back.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.errors import OutboxError
from alchemium.events import (
    BatchPublisher,
    CloudEventsEnvelope,
    DomainEvent,
    OutboxRelay,
    Publisher,
    RabbitMQPublisher,
    RedisStreamPublisher,
)
from alchemium.events.outbox import Outbox
from tests.events.relay_support import (
    RabbitServer,
    RedisServer,
    Sink,
    by_status,
    delivery_rows,
    eventually,
    insert_events,
    rabbitmq_consumer,
)
from tests.rig import free_port

Factory = async_sessionmaker[AsyncSession]

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])  # the broker is what is tested


def test_publishers_satisfy_the_protocol() -> None:
    assert isinstance(Sink(), Publisher)
    assert isinstance(RedisStreamPublisher("redis://127.0.0.1:1"), Publisher)


def test_missing_client_library_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    monkeypatch.setitem(sys.modules, "aio_pika", None)
    with pytest.raises(OutboxError, match=r"alchemium\[redis\]"):
        RedisStreamPublisher()
    with pytest.raises(OutboxError, match=r"alchemium\[rabbitmq\]"):
        RabbitMQPublisher()


@sqlite_only
async def test_redis_publisher_delivers_to_a_stream_consumer(
    session_factory: Factory, outbox: Outbox, redis_server: RedisServer
) -> None:
    events = await insert_events(session_factory, outbox, 5, destinations=["redis"])
    publisher = RedisStreamPublisher(redis_server.url, stream="orders")
    try:
        relay = OutboxRelay(session_factory, publisher, listen=False)
        assert await relay.run_once() == 5
    finally:
        await publisher.close()

    entries = await redis_server.entries("orders")
    assert [fields["event_id"] for _id, fields in entries] == [str(e.id) for e in events]
    received = DomainEvent.from_dict(json.loads(entries[0][1]["event"]))
    assert received == events[0]


@sqlite_only
async def test_redis_publisher_pipelines_each_claimed_batch(
    session_factory: Factory, outbox: Outbox, redis_server: RedisServer
) -> None:
    events = await insert_events(session_factory, outbox, 250, destinations=["redis"])
    publisher = RedisStreamPublisher(redis_server.url, stream="batched")
    assert isinstance(publisher, BatchPublisher)  # the relay calls publish_many
    try:
        relay = OutboxRelay(session_factory, publisher, batch_size=100, listen=False)
        assert await relay.drain() == 250
    finally:
        await publisher.close()
    entries = await redis_server.entries("batched")
    assert [fields["event_id"] for _id, fields in entries] == [str(e.id) for e in events]


@sqlite_only
async def test_redis_outage_leaves_events_pending_until_it_is_back(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, redis_server: RedisServer
) -> None:
    events = await insert_events(session_factory, outbox, 3, destinations=["redis"])
    publisher = RedisStreamPublisher(redis_server.url, timeout=1.0)
    relay = OutboxRelay(session_factory, publisher, backoff_base=0.01, listen=False)
    try:
        redis_server.stop()
        assert await relay.run_once() == 0
        rows = await delivery_rows(engine, outbox)
        assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 1)}
        assert all("Error" in r["last_error"] for r in rows)

        redis_server.start()  # same port, empty (no persistence)
        await asyncio.sleep(0.05)
        assert await relay.run_once() == 3
    finally:
        await publisher.close()
    assert await by_status(engine, outbox) == {"delivered": 3}
    entries = await redis_server.entries("alchemium:events")
    assert [f["event_id"] for _i, f in entries] == [str(e.id) for e in events]


@sqlite_only
async def test_rabbitmq_publisher_delivers_with_confirms_to_a_consumer(
    session_factory: Factory, outbox: Outbox, rabbitmq_server: RabbitServer
) -> None:
    async with rabbitmq_consumer(rabbitmq_server.url, "shop.events", "user_created") as take:
        events = await insert_events(session_factory, outbox, 4, destinations=["rabbitmq"])
        publisher = RabbitMQPublisher(rabbitmq_server.url, exchange="shop.events")
        try:
            relay = OutboxRelay(session_factory, publisher, listen=False)
            assert await relay.run_once() == 4
        finally:
            await publisher.close()
        received = await take(4)
    assert [m.message_id for m in received] == [str(e.id) for e in events]
    assert DomainEvent.from_dict(json.loads(received[0].body)) == events[0]
    assert received[0].type == "user_created"


@sqlite_only
async def test_rabbitmq_unroutable_or_unreachable_leaves_events_pending(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, rabbitmq_server: RabbitServer
) -> None:
    await insert_events(session_factory, outbox, 2, destinations=["rabbitmq"])
    unreachable = RabbitMQPublisher(f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=2)
    relay = OutboxRelay(session_factory, unreachable, backoff_base=0.01, listen=False)
    assert await relay.run_once() == 0
    # Reachable, but no queue is bound: the broker returns the message (mandatory).
    unroutable = RabbitMQPublisher(rabbitmq_server.url, exchange="nobody.listens")
    relay = OutboxRelay(session_factory, unroutable, backoff_base=0.01, listen=False)
    await asyncio.sleep(0.05)
    try:
        assert await relay.run_once() == 0
    finally:
        await unroutable.close()
    rows = await delivery_rows(engine, outbox)
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 2)}


@sqlite_only
async def test_redis_and_rabbitmq_speak_cloudevents_when_asked(
    session_factory: Factory,
    outbox: Outbox,
    redis_server: RedisServer,
    rabbitmq_server: RabbitServer,
) -> None:
    import aio_pika
    from cloudevents.core.bindings import amqp

    envelope = CloudEventsEnvelope(source="/shop")
    (event,) = await insert_events(session_factory, outbox, 1, destinations=["redis", "rabbitmq"])
    connection = await aio_pika.connect(rabbitmq_server.url)
    redis = RedisStreamPublisher(redis_server.url, stream="ce", envelope=envelope)
    rabbit = RabbitMQPublisher(rabbitmq_server.url, exchange="ce.events", envelope=envelope)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            "ce.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, routing_key="#")
        assert await OutboxRelay(session_factory, [redis, rabbit], listen=False).run_once() == 2
        message = await queue.get(timeout=5)
        await message.ack()
    finally:
        await redis.close()
        await rabbit.close()
        await connection.close()
    ((_id, fields),) = await redis_server.entries("ce")
    document = json.loads(fields["event"])  # structured mode: one CloudEvents document
    assert (document["specversion"], document["id"], document["source"]) == (
        "1.0",
        str(event.id),
        "/shop",
    )
    parsed = amqp.from_amqp_event(  # binary mode: cloudEvents_* application properties
        amqp.AMQPMessage(
            properties={"content-type": message.content_type},
            application_properties=dict(message.headers),
            application_data=message.body,
        )
    )
    assert (parsed.get_id(), parsed.get_subject()) == (str(event.id), event.aggregate_id)
    assert parsed.get_data() == dict(event.payload)


async def _drain_queue(url: str, queue_name: str) -> list[str]:
    """The ``message_id`` of every message left in the durable queue, acknowledged."""
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        ids = []
        while (message := await queue.get(timeout=5, fail=False)) is not None:
            await message.ack()
            ids.append(str(message.message_id))
        return ids
    finally:
        await connection.close()


@sqlite_only
async def test_rabbitmq_stopped_while_a_relay_runs_loses_no_event(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, rabbitmq_server: RabbitServer
) -> None:
    import aio_pika

    exchange_name, queue_name = f"outage-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(rabbitmq_server.url)
    try:  # a durable queue: what the broker confirmed survives its restart
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(queue_name, durable=True)
        await queue.bind(exchange, routing_key="#")
    finally:
        await connection.close()

    publisher = RabbitMQPublisher(rabbitmq_server.url, exchange=exchange_name, timeout=2)
    relay = OutboxRelay(
        session_factory,
        publisher,
        poll_interval=0.1,
        backoff_base=0.05,
        backoff_cap=0.5,
        max_attempts=1000,
        listen=False,
    )

    async def rows_of(events: list[DomainEvent]) -> list[dict[str, object]]:
        ids = {e.id for e in events}
        return [r for r in await delivery_rows(engine, outbox) if r["event_id"] in ids]

    task = asyncio.create_task(relay.run())
    try:
        before = await insert_events(session_factory, outbox, 5, destinations=["rabbitmq"])
        await eventually(lambda: relay.stats.delivered >= 5, timeout=30)

        await asyncio.to_thread(rabbitmq_server.stop)
        during = await insert_events(session_factory, outbox, 5, destinations=["rabbitmq"])

        async def all_tried() -> bool:
            return all(r["attempts"] >= 1 for r in await rows_of(during))

        await eventually(all_tried, timeout=30, interval=0.1)
        assert {r["status"] for r in await rows_of(during)} <= {"pending", "claimed"}

        await asyncio.to_thread(rabbitmq_server.start)
        after = await insert_events(session_factory, outbox, 5, destinations=["rabbitmq"])

        async def all_delivered() -> bool:
            return await by_status(engine, outbox) == {"delivered": 15}

        await eventually(all_delivered, timeout=60, interval=0.2)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 30)
        await publisher.close()
    received = await _drain_queue(rabbitmq_server.url, queue_name)
    committed = {str(e.id) for e in before + during + after}
    duplicates = len(received) - len(set(received))
    print(
        f"\nRabbitMQ stopped and started under a running relay: {len(committed)} events, "
        f"{len(received)} messages, {duplicates} duplicate(s), "
        f"{len(committed - set(received))} lost; relay {relay.stats}"
    )
    assert set(received) == committed  # none lost (duplicates allowed: at least once)
    assert relay.stats.retried > 0  # the outage was seen
