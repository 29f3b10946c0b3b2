"""Subscribers: wildcard, unsubscribe, scoped and isolated registries, strong references."""

from __future__ import annotations

import gc

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import EventError, UnitOfWork
from alchemium.events import DomainEvent, SubscriberRegistry, default_registry, off, on
from tests.models import UserRepository

Sessions = async_sessionmaker[AsyncSession]


def noop(event: DomainEvent) -> None:
    pass


async def create_user(session_factory: Sessions, registry: SubscriberRegistry | None) -> None:
    async with UnitOfWork(session_factory, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        uow.record("custom_thing", aggregate_type="thing", aggregate_id=1)


async def test_wildcard_subscriber_receives_every_event(
    session_factory: Sessions, registry: SubscriberRegistry
) -> None:
    specific: list[str] = []
    everything: list[str] = []
    registry.subscribe("user_created", lambda e: specific.append(e.name), name="specific")
    registry.subscribe("*", lambda e: everything.append(e.name), name="everything")
    await create_user(session_factory, registry)
    assert specific == ["user_created"]
    assert everything == ["user_created", "custom_thing"]


def test_subscribers_for_lists_specific_then_wildcard_in_subscription_order() -> None:
    registry = SubscriberRegistry("r")
    registry.subscribe("*", noop, name="w1")
    registry.subscribe("user_created", noop, name="s1")
    registry.subscribe("user_created", noop, name="s2")
    registry.subscribe("user_deleted", noop, name="other")
    assert [s.name for s in registry.subscribers_for("user_created")] == ["s1", "s2", "w1"]
    assert [s.name for s in registry.subscribers_for("nobody_listens")] == ["w1"]


async def test_unsubscribe_by_handler_and_by_name(
    session_factory: Sessions, registry: SubscriberRegistry
) -> None:
    got: list[str] = []

    def by_handler(event: DomainEvent) -> None:
        got.append("by_handler")

    registry.subscribe("user_created", by_handler)
    registry.subscribe("user_created", lambda e: got.append("by_name"), name="by_name")
    registry.unsubscribe(by_handler)
    off("by_name", registry=registry)
    await create_user(session_factory, registry)
    assert got == []
    assert registry.subscribers == []
    with pytest.raises(EventError, match="by_name"):
        registry.unsubscribe("by_name")


async def test_module_level_on_and_off_use_the_default_registry(
    session_factory: Sessions,
) -> None:
    got: list[str] = []

    @on("user_created", name="tests.default_registry_handler")
    async def handler(event: DomainEvent) -> None:
        got.append(event.name)

    try:
        assert default_registry.subscriber("tests.default_registry_handler") is not None
        await create_user(session_factory, None)
    finally:
        off(handler)
    await create_user_again(session_factory)
    assert got == ["user_created"]


async def create_user_again(session_factory: Sessions) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "Bob"})


async def test_registries_do_not_see_each_others_handlers(session_factory: Sessions) -> None:
    first, second = SubscriberRegistry("first"), SubscriberRegistry("second")
    got: list[str] = []
    first.subscribe("user_created", lambda e: got.append("first"), name="h")
    second.subscribe("user_created", lambda e: got.append("second"), name="h")
    await create_user(session_factory, second)
    assert got == ["second"]


async def test_scoped_removes_subscriptions_made_inside_the_block(
    session_factory: Sessions, registry: SubscriberRegistry
) -> None:
    got: list[str] = []
    registry.subscribe("user_created", lambda e: got.append("outside"), name="outside")
    with registry.scoped() as scope:
        scope.subscribe("user_created", lambda e: got.append("inside"), name="inside")
        scope.add_destination("broker")
        assert [s.name for s in registry.subscribers] == ["outside", "inside"]
    assert [s.name for s in registry.subscribers] == ["outside"]
    assert registry.destinations_for("user_created") == []
    await create_user(session_factory, registry)
    assert got == ["outside"]


async def test_handler_defined_in_a_function_is_kept_alive(
    session_factory: Sessions, registry: SubscriberRegistry
) -> None:
    got: list[str] = []

    def install() -> None:
        def closure(event: DomainEvent) -> None:
            got.append(event.name)

        registry.on("user_created")(closure)

    install()
    gc.collect()
    assert len(registry.subscribers_for("user_created")) == 1
    await create_user(session_factory, registry)
    assert got == ["user_created"]


def test_subscriber_names_are_unique_per_registry() -> None:
    registry = SubscriberRegistry("r")
    first = registry.subscribe("user_created", noop)
    assert first.name == f"{__name__}.noop"
    assert registry.subscribe("user_created", noop) is first  # idempotent
    with pytest.raises(EventError, match="already exists"):
        registry.subscribe("user_deleted", noop)
    with pytest.raises(EventError, match="already exists"):
        registry.subscribe("user_created", lambda e: None, name=first.name)
    registry.subscribe("user_deleted", noop, name="noop_for_deletes")
    assert len(registry.subscribers) == 2


def test_invalid_subscriptions_are_rejected() -> None:
    registry = SubscriberRegistry("r")
    with pytest.raises(EventError, match="callable"):
        registry.subscribe("user_created", "not a function")  # type: ignore[arg-type]
    registry.add_destination("broker")
    with pytest.raises(EventError, match="destination"):
        registry.subscribe("user_created", noop, name="broker")
    registry.subscribe("user_created", noop, name="welcome")
    with pytest.raises(EventError, match="subscriber"):
        registry.add_destination("welcome")


def test_clear_removes_everything() -> None:
    registry = SubscriberRegistry("r")
    registry.subscribe("*", noop)
    registry.add_destination("broker")
    registry.clear()
    assert registry.subscribers == []
    assert registry.subscribers_for("x") == []
    assert registry.destinations_for("x") == []
