"""Event name patterns: ``*`` and ``?`` route events to subscribers and external destinations."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import EventConfigurationError, UnitOfWork
from alchemium.events import (
    DomainEvent,
    OutboxRelay,
    RedisStreamPublisher,
    SubscriberRegistry,
)
from alchemium.events.outbox import Outbox
from tests.events.relay_support import RedisServer, delivery_rows
from tests.models import UserRepository

Sessions = async_sessionmaker[AsyncSession]


def noop(event: DomainEvent) -> None:
    pass


def test_star_matches_any_run_and_question_mark_one_character() -> None:
    registry = SubscriberRegistry("r")
    registry.add_destination("users", "user_*")
    registry.add_destination("created", "*_created")
    registry.add_destination("v1", "order_v?")
    registry.add_destination("exact", "user_created")
    assert registry.destinations_for("user_created") == ["users", "created", "exact"]
    assert registry.destinations_for("user_") == ["users"]  # * also matches nothing
    assert registry.destinations_for("order_v1") == ["v1"]
    assert registry.destinations_for("order_v10") == []  # ? is exactly one character
    assert registry.destinations_for("superuser_created") == ["created"]  # the whole name
    assert registry.destinations_for("users_deleted") == []  # "user_" is not a prefix of it
    assert registry.destinations_for("user.created") == []  # . is a plain character


def test_a_destination_can_take_several_patterns() -> None:
    registry = SubscriberRegistry("r")
    registry.add_destination("kafka", "user_*")
    registry.add_destination("kafka", "order_*")
    assert registry.destinations_for("order_placed") == ["kafka"]
    assert registry.destinations_for("user_created") == ["kafka"]
    assert registry.destinations_for("invoice_sent") == []


def test_subscriber_patterns_fire_after_exact_names_in_subscription_order() -> None:
    registry = SubscriberRegistry("r")
    registry.subscribe("*", noop, name="everything")
    registry.subscribe("user_*", noop, name="users")
    registry.subscribe("user_created", noop, name="exact")
    registry.subscribe("order_*", noop, name="orders")
    assert [s.name for s in registry.subscribers_for("user_created")] == [
        "exact",
        "everything",
        "users",
    ]
    assert [s.name for s in registry.subscribers_for("order_placed")] == ["everything", "orders"]


def test_routes_are_recomputed_when_subscriptions_change() -> None:
    registry = SubscriberRegistry("r")
    assert registry.subscribers_for("user_created") == []
    assert registry.destinations_for("user_created") == []  # both cached as empty now
    registry.subscribe("user_*", noop, name="users")
    registry.add_destination("kafka", "user_*")
    assert [s.name for s in registry.subscribers_for("user_created")] == ["users"]
    assert registry.destinations_for("user_created") == ["kafka"]
    registry.unsubscribe("users")
    assert registry.subscribers_for("user_created") == []
    with registry.scoped() as scope:
        scope.add_destination("audit", "*")
        assert registry.destinations_for("user_created") == ["kafka", "audit"]
    assert registry.destinations_for("user_created") == ["kafka"]
    registry.clear()
    assert registry.destinations_for("user_created") == []


@pytest.mark.parametrize("pattern", ["user_[cd]*", "user_[!x]", "]", ""])
def test_unsupported_patterns_are_refused_when_registered(pattern: str) -> None:
    registry = SubscriberRegistry("r")
    with pytest.raises(EventConfigurationError, match="destination 'kafka'"):
        registry.add_destination("kafka", pattern)
    with pytest.raises(EventConfigurationError, match="subscriber 'handler'"):
        registry.subscribe(pattern, noop, name="handler")
    assert registry.subscribers == []
    assert registry.destinations_for("user_created") == []


async def test_pattern_subscriber_receives_matching_events_after_commit(
    session_factory: Sessions, registry: SubscriberRegistry
) -> None:
    got: list[str] = []

    @registry.on("user_*")
    def user_events(event: DomainEvent) -> None:
        got.append(event.name)

    async with UnitOfWork(session_factory, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        UserRepository.update(user, {"position": "CTO"})
        uow.record("order_placed", aggregate_type="order", aggregate_id=1)
    assert got == ["user_created", "user_updated"]


async def test_destination_pattern_gets_delivery_rows_and_the_relay_publishes_to_redis(
    engine: AsyncEngine,
    session_factory: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    redis_server: RedisServer,
) -> None:
    registry.add_destination("kafka", "user_*")
    async with UnitOfWork(session_factory, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        uow.record("order_placed", aggregate_type="order", aggregate_id=1)

    rows = await delivery_rows(engine, outbox)
    assert [(r["destination"], r["status"]) for r in rows] == [("kafka", "pending")]

    publisher = RedisStreamPublisher(redis_server.url, name="kafka", stream="kafka")
    try:
        relay = OutboxRelay(session_factory, publisher, listen=False, outbox=outbox)
        assert await relay.run_once() == 1
    finally:
        await publisher.close()
    entries = await redis_server.entries("kafka")
    assert [fields["name"] for _id, fields in entries] == ["user_created"]
    event = DomainEvent.from_dict(json.loads(entries[0][1]["event"]))
    assert event.payload["name"] == "Alice"
    assert [r["status"] for r in await delivery_rows(engine, outbox)] == ["delivered"]
