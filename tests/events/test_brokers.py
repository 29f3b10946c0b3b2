"""Every broker publisher, by the same rules, against real servers the rig starts.

One case per broker (``broker`` fixture): NATS JetStream (``nats-server``), Kafka
(Tansu, a Kafka-protocol broker), Google Pub/Sub (the Cloud CLI's emulator), SQS FIFO
and SNS FIFO (moto in server mode), signed webhooks (a receiver that verifies the
signature). For each: a consumer reads CloudEvents the relay published; an outage
loses nothing (duplicates counted); per-aggregate order holds with several ordered
relays (PostgreSQL); bad configuration fails when the relay starts.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import (
    DomainEvent,
    KafkaPublisher,
    NatsPublisher,
    OutboxRelay,
    Publisher,
    PublisherConfigurationError,
    PublisherUnavailableError,
    PubSubPublisher,
    SnsPublisher,
    SqsPublisher,
    WebhookPublisher,
)
from alchemium.events.outbox import Outbox
from tests.events.brokers import (
    WEBHOOK_SECRET,
    Consumed,
    KafkaServer,
    MotoServer,
    NatsServer,
    PubSubEmulator,
    WebhookReceiver,
    running_receiver,
)
from tests.events.relay_support import by_status, eventually, insert_events
from tests.rig import free_port

Factory = async_sessionmaker[AsyncSession]
BROKERS = ["nats", "kafka", "pubsub", "sqs", "sns", "webhook"]
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])  # the broker is what is tested


@dataclass
class BrokerCase:
    """A broker and how to publish to it, read it back, take it down and bring it up."""

    destination: str
    make: Callable[..., Publisher]  # make(timeout=...) -> a publisher for it
    read: Callable[[], Awaitable[list[Consumed]]]  # what a consumer sees that is new
    down: Callable[[], Awaitable[None]]
    up: Callable[[], Awaitable[None]]  # start again, re-creating what a restart lost
    bad: list[tuple[Callable[[], Publisher], type[Exception]]]  # misconfigured publishers
    seen: list[Consumed] = field(default_factory=list)

    async def collect(self) -> list[Consumed]:
        """Everything consumed so far (restarts of in-memory brokers included)."""
        self.seen.extend(await self.read())
        return self.seen


async def _nats(server: NatsServer) -> BrokerCase:
    await server.add_stream("EVENTS", ["events.>"], duplicate_window=120.0)
    read_so_far: list[int] = [0]

    async def read() -> list[Consumed]:
        every = await server.consumed("EVENTS")
        new, read_so_far[0] = every[read_so_far[0] :], len(every)
        return new

    async def down() -> None:
        server.stop()

    async def up() -> None:
        server.start()  # file storage: the stream and its messages survive

    return BrokerCase(
        "nats",
        lambda timeout=5.0: NatsPublisher(server.url, stream="EVENTS", timeout=timeout),
        read,
        down,
        up,
        bad=[
            (lambda: NatsPublisher(server.url, stream="MISSING"), PublisherConfigurationError),
            (
                lambda: NatsPublisher(f"nats://127.0.0.1:{free_port()}", timeout=1),
                PublisherUnavailableError,
            ),
        ],
    )


async def _kafka(server: KafkaServer) -> BrokerCase:
    await server.create_topic("orders")
    read_so_far: list[int] = [0]

    async def read() -> list[Consumed]:
        every = await server.consumed("orders")
        new, read_so_far[0] = every[read_so_far[0] :], len(every)
        return new

    async def down() -> None:
        await case.collect()  # memory storage: what it holds is read before it goes
        server.stop()

    async def up() -> None:
        server.start()
        await server.create_topic("orders")
        read_so_far[0] = 0

    case = BrokerCase(
        "kafka",
        lambda timeout=5.0: KafkaPublisher(server.bootstrap, topic="orders", timeout=timeout),
        read,
        down,
        up,
        bad=[
            (
                lambda: KafkaPublisher(server.bootstrap, topic="missing-topic"),
                PublisherConfigurationError,
            ),
            (
                lambda: KafkaPublisher(f"127.0.0.1:{free_port()}", timeout=1),
                PublisherUnavailableError,
            ),
        ],
    )
    return case


async def _nothing() -> None:
    return None


async def _pubsub(emulator: PubSubEmulator) -> BrokerCase:
    emulator.create_topic("orders")

    async def read() -> list[Consumed]:
        return await emulator.consumed("orders")  # pulled and acknowledged

    async def down() -> None:
        emulator.stop()

    async def up() -> None:
        emulator.start()
        emulator.create_topic("orders")

    def make(timeout: float = 10.0) -> Publisher:
        return PubSubPublisher(
            emulator.project, "orders", emulator_host=emulator.host, timeout=timeout
        )

    return BrokerCase(
        "pubsub",
        make,
        read,
        down,
        up,
        bad=[
            (
                lambda: PubSubPublisher(emulator.project, "missing", emulator_host=emulator.host),
                PublisherConfigurationError,
            ),
            (
                lambda: PubSubPublisher(
                    emulator.project, "orders", emulator_host=f"127.0.0.1:{free_port()}", timeout=2
                ),
                PublisherUnavailableError,
            ),
        ],
    )


async def _sqs(server: MotoServer) -> BrokerCase:
    url = await server.create_queue("orders.fifo")

    async def read() -> list[Consumed]:
        return await server.consumed(url)  # received and deleted

    async def down() -> None:
        server.stop()

    async def up() -> None:
        server.start()
        await server.create_queue("orders.fifo")

    return BrokerCase(
        "sqs",
        lambda timeout=5.0: SqsPublisher(url, endpoint_url=server.endpoint, timeout=timeout),
        read,
        down,
        up,
        bad=[
            (
                lambda: SqsPublisher(
                    url.replace("orders", "missing"), endpoint_url=server.endpoint
                ),
                PublisherConfigurationError,
            ),
            (
                lambda: SqsPublisher(
                    url, endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=1
                ),
                PublisherUnavailableError,
            ),
        ],
    )


async def _sns(server: MotoServer) -> BrokerCase:
    arn: list[str] = []
    queue_url: list[str] = []

    def topology() -> None:
        # Synchronous on purpose: after a restart no publish may reach the topic before
        # its subscription exists (SNS accepts and drops what no one subscribes to).
        queue_url[:] = [
            server.sync_client("sqs").create_queue(
                QueueName="orders-sub.fifo", Attributes={"FifoQueue": "true"}
            )["QueueUrl"]
        ]
        sns, sqs = server.sync_client("sns"), server.sync_client("sqs")
        topic = sns.create_topic(
            Name="orders.fifo",
            Attributes={"FifoTopic": "true", "ContentBasedDeduplication": "false"},
        )
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url[0], AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        sns.subscribe(
            TopicArn=topic["TopicArn"],
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": "true"},
        )
        arn[:] = [topic["TopicArn"]]

    topology()

    async def read() -> list[Consumed]:
        return await server.consumed(queue_url[0])

    async def down() -> None:
        server.stop()

    async def up() -> None:
        server.start()
        topology()

    return BrokerCase(
        "sns",
        lambda timeout=5.0: SnsPublisher(arn[0], endpoint_url=server.endpoint, timeout=timeout),
        read,
        down,
        up,
        bad=[
            (
                lambda: SnsPublisher(arn[0] + "-missing", endpoint_url=server.endpoint),
                PublisherConfigurationError,
            ),
            (
                lambda: SnsPublisher(
                    arn[0], endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=1
                ),
                PublisherUnavailableError,
            ),
        ],
    )


async def _webhook(receiver: WebhookReceiver) -> BrokerCase:
    read_so_far: list[int] = [0]

    async def read() -> list[Consumed]:
        new = receiver.received[read_so_far[0] :]
        read_so_far[0] = len(receiver.received)
        return new

    return BrokerCase(
        "webhook",
        lambda timeout=5.0: WebhookPublisher(receiver.url, WEBHOOK_SECRET, timeout=timeout),
        read,
        receiver.stop,
        receiver.start,
        bad=[
            (
                lambda: WebhookPublisher("ftp://example.com/x", WEBHOOK_SECRET),
                PublisherConfigurationError,
            ),
            (
                lambda: WebhookPublisher(receiver.url, "not-a-secret"),
                PublisherConfigurationError,
            ),
        ],
    )


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerCase]:
    kind = request.param
    if kind == "nats":
        yield await _nats(request.getfixturevalue("nats_server"))
    elif kind == "kafka":
        yield await _kafka(request.getfixturevalue("kafka_server"))
    elif kind == "pubsub":
        yield await _pubsub(request.getfixturevalue("pubsub_emulator"))
    elif kind == "sqs":
        yield await _sqs(request.getfixturevalue("moto_server"))
    elif kind == "sns":
        yield await _sns(request.getfixturevalue("moto_server"))
    else:  # an async fixture cannot be asked for by name from here: started inline
        async with running_receiver() as receiver:
            yield await _webhook(receiver)


async def _close(publisher: Publisher) -> None:
    close = getattr(publisher, "close", None)
    if close is not None:
        await close()


def _by_aggregate(consumed: list[Consumed]) -> dict[str, list[int]]:
    """The payload numbers each aggregate's consumer saw, first sightings, in order."""
    order: dict[str, list[int]] = {}
    for message in consumed:
        seen = order.setdefault(message.subject, [])
        if message.data["n"] not in seen:
            seen.append(message.data["n"])
    return order


# -- the tests --------------------------------------------------------------------------------


@sqlite_only
async def test_consumer_reads_the_cloudevents_the_relay_published(
    session_factory: Factory, outbox: Outbox, broker: BrokerCase
) -> None:
    events = await insert_events(
        session_factory, outbox, 6, destinations=[broker.destination], aggregates=2
    )
    publisher = broker.make()
    try:
        relay = OutboxRelay(session_factory, publisher, listen=False)
        assert await relay.run_once() == 6
    finally:
        await _close(publisher)
    consumed = await eventually(broker.collect, timeout=20)
    assert sorted(c.id for c in consumed) == sorted(str(e.id) for e in events)
    sent = {str(e.id): e for e in events}
    for message in consumed:
        assert message.subject == sent[message.id].aggregate_id
        assert message.data == dict(sent[message.id].payload)
    assert _by_aggregate(consumed) == {"0": [0, 2, 4], "1": [1, 3, 5]}


@sqlite_only
async def test_bad_configuration_fails_when_the_relay_starts(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, broker: BrokerCase
) -> None:
    await insert_events(session_factory, outbox, 1, destinations=[broker.destination])
    for make, error in broker.bad:
        try:
            publisher = make()
        except error as err:  # refused when created: even earlier
            refused: Exception = err
            assert "\n" not in str(refused)
            continue
        relay = OutboxRelay(session_factory, publisher, listen=False)
        try:
            with pytest.raises(error) as raised:
                await relay.run()
        finally:
            await _close(publisher)
        assert "\n" not in str(raised.value)
    # Nothing was claimed: the row waits, untouched, for a relay that can publish.
    assert await by_status(engine, outbox) == {"pending": 1}


@sqlite_only
async def test_outage_loses_nothing_and_counts_duplicates(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    broker: BrokerCase,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publisher = broker.make(timeout=2.0)
    relay = OutboxRelay(
        session_factory,
        publisher,
        listen=False,
        poll_interval=0.1,
        backoff_base=0.05,
        backoff_cap=0.5,
        publish_timeout=15,
        max_attempts=10_000,
    )
    running = asyncio.create_task(relay.run())
    try:
        first = await insert_events(session_factory, outbox, 10, destinations=[broker.destination])
        await eventually(lambda: relay.stats.delivered >= 10, timeout=30)
        await broker.collect()
        await broker.down()
        second = await insert_events(session_factory, outbox, 10, destinations=[broker.destination])
        await eventually(lambda: relay.stats.retried >= 3, timeout=60)
        await broker.up()
        await eventually(lambda: _all_delivered(engine, outbox, 20), timeout=90, interval=0.2)
    finally:
        relay.stop()
        await running
        await _close(publisher)
    consumed = await eventually(
        lambda: _has(broker, {str(e.id) for e in first + second}), timeout=30
    )
    ids = [c.id for c in consumed]
    assert set(ids) >= {str(e.id) for e in first + second}
    with capsys.disabled():
        print(
            f"\n[outage {broker.destination}] events=20 consumed={len(ids)} "
            f"duplicates={len(ids) - len(set(ids))} retried={relay.stats.retried}"
        )


async def _all_delivered(engine: AsyncEngine, outbox: Outbox, n: int) -> bool:
    return await by_status(engine, outbox) == {"delivered": n}


async def _has(broker: BrokerCase, ids: set[str]) -> list[Consumed] | None:
    consumed = await broker.collect()
    return consumed if {c.id for c in consumed} >= ids else None


@dataclass
class Flaky:
    """Wraps a publisher: refuses a random share of publishes before they reach the broker."""

    inner: Publisher
    rate: float
    random: random.Random = field(default_factory=lambda: random.Random(16))

    @property
    def name(self) -> Any:
        return self.inner.name

    async def start(self) -> None:
        await getattr(self.inner, "start", _nothing)()

    async def publish(self, event: DomainEvent, destination: str) -> None:
        if self.random.random() < self.rate:
            raise ConnectionError("injected failure before publishing")
        await self.inner.publish(event, destination)


@pytest.mark.parametrize("backend", ["postgresql"])  # several relays at once
async def test_ordered_relays_keep_each_aggregates_order_at_the_consumer(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    broker: BrokerCase,
    new_engine: Callable[[], AsyncEngine],
) -> None:
    n, aggregates = 40, 4
    await insert_events(
        session_factory, outbox, n, destinations=[broker.destination], aggregates=aggregates
    )
    publishers = [broker.make() for _ in range(3)]
    relays = [
        OutboxRelay(
            async_sessionmaker(new_engine(), expire_on_commit=False),
            Flaky(p, rate=0.2),
            ordered=True,
            batch_size=5,
            listen=False,
            poll_interval=0.05,
            backoff_base=0.01,
            backoff_cap=0.05,
            max_attempts=1000,
        )
        for p in publishers
    ]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        await eventually(lambda: _all_delivered(engine, outbox, n), timeout=120, interval=0.2)
    finally:
        for r in relays:
            r.stop()
        await asyncio.gather(*tasks)
        for p in publishers:
            await _close(p)
    assert sum(r.stats.retried for r in relays) > 0  # the failures happened
    consumed = await eventually(lambda: _count(broker, n), timeout=30)
    expected = {str(a): list(range(a, n, aggregates)) for a in range(aggregates)}
    assert _by_aggregate(consumed) == expected


async def _count(broker: BrokerCase, n: int) -> list[Consumed] | None:
    consumed = await broker.collect()
    return consumed if len({c.id for c in consumed}) >= n else None
