"""A subscriber added after events were written starts from "now"; older events are opt-in."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import DomainEvent, SubscriberRegistry
from alchemium.events.outbox import Outbox
from alchemium.events.publishers import InProcessPublisher
from alchemium.events.relay import OutboxRelay
from tests.models import UserRepository

Factory = async_sessionmaker[AsyncSession]


async def _create(factory: Factory, registry: SubscriberRegistry, *names: str) -> None:
    async with UnitOfWork(factory, registry=registry) as uow:
        for name in names:
            await UserRepository.create(uow.session, {"name": name})


async def _drain(factory: Factory, registry: SubscriberRegistry, outbox: Outbox) -> int:
    relay = OutboxRelay(
        factory, InProcessPublisher(registry), outbox=outbox, listen=False, poll_interval=0.05
    )
    total = 0
    while delivered := await relay.run_once():
        total += delivered
    return total


async def test_late_subscriber_starts_from_now_unless_backfilled(
    session_factory: Factory, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    early: list[str] = []
    registry.subscribe("user_created", lambda e: early.append(e.payload["name"]), name="early")
    await _create(session_factory, registry, "old1", "old2")

    late: list[DomainEvent] = []
    registry.subscribe("user_created", late.append, name="late")
    await _create(session_factory, registry, "new1")
    assert await _drain(session_factory, registry, outbox) == 0  # dispatch already did it
    assert [e.payload["name"] for e in late] == ["new1"]  # from "now": no old events

    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    async with session_factory() as session, session.begin():
        assert await outbox.backfill(session, "late", since=since, registry=registry) == 2
    async with session_factory() as session, session.begin():
        # a second backfill adds nothing: the late subscriber has a row for every event
        assert await outbox.backfill(session, "late", since=since, registry=registry) == 0
    assert await _drain(session_factory, registry, outbox) == 2
    assert sorted(e.payload["name"] for e in late) == ["new1", "old1", "old2"]
    assert early == ["old1", "old2", "new1"]  # the early subscriber saw each exactly once
