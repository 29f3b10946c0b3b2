"""Each broker's own rules for ordering and de-duplication, where peers shipped bugs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import (
    DomainEvent,
    KafkaPublisher,
    NatsPublisher,
    OutboxRelay,
    PublisherConfigurationError,
    PubSubPublisher,
    SnsPublisher,
    SqsPublisher,
    WebhookPublisher,
)
from alchemium.events.outbox import Outbox
from alchemium.events.outbox_schema import aware
from tests.events.brokers import (
    WEBHOOK_SECRET,
    KafkaServer,
    MotoServer,
    NatsServer,
    PubSubEmulator,
    WebhookReceiver,
)
from tests.events.relay_support import (
    by_status,
    database_time,
    delivery_rows,
    insert_events,
    make_events,
)

Factory = async_sessionmaker[AsyncSession]
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


# -- NATS JetStream -----------------------------------------------------------------------------


@sqlite_only
async def test_nats_redelivery_inside_the_dedup_window_counts_as_delivered(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, nats_server: NatsServer
) -> None:
    await nats_server.add_stream("EVENTS", ["events.>"], duplicate_window=120.0)
    (event,) = await insert_events(session_factory, outbox, 1, destinations=["nats"])
    publisher = NatsPublisher(nats_server.url, stream="EVENTS")
    try:
        relay = OutboxRelay(session_factory, publisher, listen=False)
        assert await relay.run_once() == 1
        # A relay that died before recording: the row is published again.
        async with engine.begin() as conn:
            await conn.execute(update(outbox.deliveries).values(status="pending"))
        assert await relay.run_once() == 1
    finally:
        await publisher.close()
    assert relay.stats.retried == 0  # the server's duplicate=true ack is a success
    assert await by_status(engine, outbox) == {"delivered": 1}
    assert [m.id for m in await nats_server.consumed("EVENTS")] == [str(event.id)]


@sqlite_only
async def test_nats_subject_per_event_and_no_stream_is_a_failure(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, nats_server: NatsServer
) -> None:
    await nats_server.add_stream("EVENTS", ["shop.user.>"])
    await insert_events(session_factory, outbox, 2, destinations=["nats"])
    subject = "shop.{aggregate_type}.{name}"
    publisher = NatsPublisher(nats_server.url, subject=subject, timeout=2)
    try:
        assert await OutboxRelay(session_factory, publisher, listen=False).run_once() == 2
        # No stream takes these subjects: no ack, so not delivered (plain NATS would
        # drop them silently).
        await insert_events(session_factory, outbox, 1, destinations=["orphan"])
        orphan = NatsPublisher(nats_server.url, subject="nowhere.{name}", name="orphan", timeout=2)
        try:
            assert await OutboxRelay(session_factory, orphan, listen=False).run_once() == 0
        finally:
            await orphan.close()
    finally:
        await publisher.close()
    assert await by_status(engine, outbox) == {"delivered": 2, "pending": 1}


# -- Kafka --------------------------------------------------------------------------------------


@sqlite_only
async def test_kafka_key_is_the_aggregate_id_and_acks_are_all(
    session_factory: Factory, outbox: Outbox, kafka_server: KafkaServer
) -> None:
    await kafka_server.create_topic("orders", partitions=3)
    events = await insert_events(session_factory, outbox, 9, destinations=["kafka"], aggregates=3)
    publisher = KafkaPublisher(kafka_server.bootstrap, topic="orders")
    try:
        assert await OutboxRelay(session_factory, publisher, listen=False).run_once() == 9
    finally:
        await publisher.close()
    records = await kafka_server.consumed("orders")
    keys = {r.id: r.headers["key"] for r in records}
    assert keys == {str(e.id): e.aggregate_id for e in events}
    # Tansu refuses InitProducerId: the publisher fell back to a plain producer, said so.
    assert publisher.idempotent_in_use is False


async def test_kafka_idempotence_required_but_refused_fails_at_start(
    kafka_server: KafkaServer,
) -> None:
    publisher = KafkaPublisher(kafka_server.bootstrap, idempotent=True)
    with pytest.raises(PublisherConfigurationError, match="cannot start a producer"):
        await publisher.start()


# -- Google Pub/Sub -----------------------------------------------------------------------------


async def test_pubsub_ordering_key_is_resumed_after_a_failed_publish(
    pubsub_emulator: PubSubEmulator,
) -> None:
    pubsub_emulator.create_topic("orders")
    first, second, third = make_events(3, aggregates=1)  # one aggregate: one ordering key
    publisher = PubSubPublisher(
        pubsub_emulator.project, "orders", emulator_host=pubsub_emulator.host, timeout=3
    )
    try:
        await publisher.publish(first, "pubsub")
        pubsub_emulator.stop()
        with pytest.raises(Exception):  # noqa: B017 - whatever the client says, it failed
            await publisher.publish(second, "pubsub")
        pubsub_emulator.start()
        pubsub_emulator.create_topic("orders")
        # Without resume_publish the client refuses every publish on this key from now on.
        await publisher.publish(third, "pubsub")
        await publisher.publish(second, "pubsub")  # the relay's retry
    finally:
        await publisher.close()
    received = await pubsub_emulator.consumed("orders")
    assert [m.id for m in received] == [str(third.id), str(second.id)]
    assert {m.headers.get("ce-partitionkey") for m in received} == {first.aggregate_id}


# -- SQS and SNS --------------------------------------------------------------------------------


async def test_sqs_fifo_group_is_the_aggregate_and_dedup_is_the_event_id(
    moto_server: MotoServer,
) -> None:
    url = await moto_server.create_queue("orders.fifo")
    event = make_events(1)[0]
    publisher = SqsPublisher(url, endpoint_url=moto_server.endpoint)
    try:
        await publisher.start()
        await publisher.publish(event, "sqs")
        await publisher.publish(event, "sqs")  # a redelivery inside the 5-minute window
    finally:
        await publisher.close()
    (message,) = await moto_server.consumed(url)
    assert message.id == str(event.id)
    assert message.headers["MessageGroupId"] == event.aggregate_id
    assert message.headers["MessageDeduplicationId"] == str(event.id)


async def test_sns_fifo_topic_gets_group_and_dedup_ids(moto_server: MotoServer) -> None:
    async with moto_server.client("sns") as sns:
        topic = await sns.create_topic(Name="orders.fifo", Attributes={"FifoTopic": "true"})
    event = make_events(1)[0]
    publisher = SnsPublisher(topic["TopicArn"], endpoint_url=moto_server.endpoint)
    try:
        await publisher.start()
        await publisher.publish(event, "sns")  # refused by SNS FIFO without both ids
    finally:
        await publisher.close()
    assert publisher.fifo


# -- Webhooks -----------------------------------------------------------------------------------


@sqlite_only
async def test_webhook_is_signed_by_the_standard_webhooks_scheme(
    session_factory: Factory, outbox: Outbox, webhook_receiver: WebhookReceiver
) -> None:
    events = await insert_events(session_factory, outbox, 3, destinations=["webhook"])
    publisher = WebhookPublisher(webhook_receiver.url, ["whsec_b2xk", WEBHOOK_SECRET])
    try:
        assert await OutboxRelay(session_factory, publisher, listen=False).run_once() == 3
    finally:
        await publisher.close()
    assert webhook_receiver.rejected == 0
    assert [m.id for m in webhook_receiver.received] == [str(e.id) for e in events]
    assert webhook_receiver.received[0].headers["webhook-id"] == str(events[0].id)


@sqlite_only
async def test_webhook_wrong_secret_is_a_permanent_4xx_and_dead_at_once(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, webhook_receiver: WebhookReceiver
) -> None:
    await insert_events(session_factory, outbox, 1, destinations=["webhook"])
    publisher = WebhookPublisher(webhook_receiver.url, "whsec_d3JvbmcgcGFzc3dvcmQ=")
    try:
        relay = OutboxRelay(session_factory, publisher, max_attempts=10, listen=False)
        assert await relay.run_once() == 0
    finally:
        await publisher.close()
    (row,) = await delivery_rows(engine, outbox)
    assert (row["status"], row["attempts"]) == ("dead", 1)
    assert "answered 401" in row["last_error"]
    assert webhook_receiver.rejected == 1


@sqlite_only
@pytest.mark.parametrize(
    ("answer", "dead_on_4xx", "status"),
    [
        ((404, {}), True, "dead"),
        ((404, {}), False, "pending"),
        ((408, {}), True, "pending"),
        ((500, {}), True, "pending"),
        ((429, {"retry-after": "3600"}), True, "pending"),
    ],
)
async def test_webhook_answers_decide_the_outcome(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    webhook_receiver: WebhookReceiver,
    answer: tuple[int, dict[str, str]],
    dead_on_4xx: bool,
    status: str,
) -> None:
    await insert_events(session_factory, outbox, 1, destinations=["webhook"])
    webhook_receiver.answers.append(answer)
    before = await database_time(engine)
    publisher = WebhookPublisher(webhook_receiver.url, WEBHOOK_SECRET, dead_on_4xx=dead_on_4xx)
    try:
        relay = OutboxRelay(session_factory, publisher, backoff_cap=1.0, listen=False)
        assert await relay.run_once() == 0
    finally:
        await publisher.close()
    (row,) = await delivery_rows(engine, outbox)
    assert (row["status"], row["attempts"]) == (status, 1)
    if answer[0] == 429:  # the receiver's hour, not the relay's backoff of at most 1 s
        assert "Retry-After 3600s" in row["last_error"]
        assert aware(row["next_attempt_at"]) >= before + dt.timedelta(seconds=3599)


@sqlite_only
async def test_webhook_timeout_is_retried(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    # A receiver that accepts the connection and never answers (until the test ends: a
    # connection left open past the event loop is reported in the next test).
    released = asyncio.Event()
    handlers: list[asyncio.Task[Any]] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await reader.read(65536)
        await released.wait()
        writer.close()
        with contextlib.suppress(ConnectionError):  # the client gave up and reset it
            await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await insert_events(session_factory, outbox, 1, destinations=["webhook"])
    publisher = WebhookPublisher(f"http://127.0.0.1:{port}/h", WEBHOOK_SECRET, timeout=0.5)
    try:
        assert await OutboxRelay(session_factory, publisher, listen=False).run_once() == 0
    finally:
        await publisher.close()
        released.set()
        server.close()
        await server.wait_closed()
        await asyncio.gather(*handlers)
    (row,) = await delivery_rows(engine, outbox)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "Timeout" in row["last_error"]


def test_webhook_body_is_the_structured_cloudevent() -> None:
    event = DomainEvent.create("x", aggregate_type="a", aggregate_id="1", payload={"k": 1})
    publisher = WebhookPublisher("https://example.com/h", WEBHOOK_SECRET)
    message = publisher.envelope.encode(event, "http")
    assert json.loads(message.body)["data"] == {"k": 1}
