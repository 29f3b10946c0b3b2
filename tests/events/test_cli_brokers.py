"""``alchemium relay --publisher URL``: bad broker configuration fails at start, in one line."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events.outbox import Outbox
from alchemium.events.publishers import (
    KafkaPublisher,
    NatsPublisher,
    PublisherConfigurationError,
    PubSubPublisher,
    SnsPublisher,
    SqsPublisher,
    WebhookPublisher,
)
from alchemium.events.publishers.urls import publisher_from_url
from tests.events.brokers import WEBHOOK_SECRET, NatsServer
from tests.events.relay_support import by_status, insert_events
from tests.events.test_cli import assert_usage_error, cli
from tests.rig import free_port

Factory = async_sessionmaker[AsyncSession]
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def test_urls_name_their_publishers_and_options() -> None:
    env = {"ALCHEMIUM_WEBHOOK_SECRET": WEBHOOK_SECRET}
    nats = publisher_from_url("nats://h:4222?stream=EVENTS&subject=shop.{name}&name=orders")
    assert isinstance(nats, NatsPublisher)
    assert (nats.stream, nats.subject.text, nats.name) == ("EVENTS", "shop.{name}", "orders")
    kafka = publisher_from_url("kafka://a:9092,b:9092?topic=events&mode=structured")
    assert isinstance(kafka, KafkaPublisher)
    assert (kafka.bootstrap_servers, kafka.envelope.mode) == ("a:9092,b:9092", "structured")
    pubsub = publisher_from_url("pubsub://my-project/orders?emulator_host=127.0.0.1:8085")
    assert isinstance(pubsub, PubSubPublisher)
    assert pubsub.topic_path == "projects/my-project/topics/orders"
    sqs = publisher_from_url("sqs://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo")
    assert isinstance(sqs, SqsPublisher)
    assert (sqs.region, sqs.fifo) == ("eu-west-1", True)
    local = publisher_from_url("sqs+http://127.0.0.1:5000/123456789012/orders")
    assert isinstance(local, SqsPublisher)
    assert local.queue_url == "http://127.0.0.1:5000/123456789012/orders"
    sns = publisher_from_url("sns://arn:aws:sns:us-east-1:123456789012:orders.fifo")
    assert isinstance(sns, SnsPublisher)
    assert (sns.region, sns.fifo) == ("us-east-1", True)
    hook = publisher_from_url("https://partner.example.com/h?dead_on_4xx=false", environ=env)
    assert isinstance(hook, WebhookPublisher)
    assert hook.dead_on_4xx is False


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("ftp://x/y", "unknown publisher"),
        ("nats://h?strem=EVENTS", "unknown option(s) strem"),
        ("kafka://h:9092?topic=orders.{nmae}", "{nmae}"),
        ("https://partner.example.com/h", "ALCHEMIUM_WEBHOOK_SECRET"),
        ("sns://not-an-arn", "not a topic ARN"),
    ],
)
def test_bad_urls_fail_before_anything_connects(spec: str, fragment: str) -> None:
    with pytest.raises(PublisherConfigurationError) as raised:
        publisher_from_url(spec, environ={})
    assert fragment in str(raised.value)


@sqlite_only
async def test_cli_exit_codes_for_broker_configuration(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, nats_server: NatsServer
) -> None:
    await nats_server.add_stream("EVENTS", ["events.>"])
    events = await insert_events(session_factory, outbox, 3, destinations=["nats"])
    url = str(engine.url)
    code, _out, err = await cli("relay", "--url", url, "--publisher", "ftp://x", "--once")
    assert_usage_error(code, err, "unknown publisher")
    # The broker says the stream does not exist: configuration, exit 2.
    missing = f"{nats_server.url}?stream=NOPE"
    code, _out, err = await cli("relay", "--url", url, "--publisher", missing, "--once")
    assert_usage_error(code, err, "stream 'NOPE' does not exist")
    # Nothing listens there: the broker cannot be reached, exit 3 (as for a database).
    down = f"nats://127.0.0.1:{free_port()}?timeout=1"
    code, _out, err = await cli("relay", "--url", url, "--publisher", down, "--once")
    assert code == 3, err
    assert err.strip().splitlines()[-1].startswith("alchemium: error: NatsPublisher('nats')")
    assert "Traceback" not in err
    assert await by_status(engine, outbox) == {"pending": 3}  # nothing claimed meanwhile
    # Well configured: one pass delivers everything into the stream.
    good = f"{nats_server.url}?stream=EVENTS"
    code, _out, err = await cli("relay", "--url", url, "--publisher", good, "--once")
    assert code == 0, err
    assert await by_status(engine, outbox) == {"delivered": 3}
    assert [m.id for m in await nats_server.consumed("EVENTS")] == [str(e.id) for e in events]
