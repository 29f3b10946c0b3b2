"""Fixtures shared by the domain-event tests: sessions, handler recorders, outbox readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import DomainEvent, SubscriberRegistry, flush_delivery_marks
from alchemium.events.outbox import Outbox


@pytest.fixture
def sessions(engine: AsyncEngine, expire_on_commit: bool) -> async_sessionmaker[AsyncSession]:
    """A session factory run with both ``expire_on_commit=False`` and ``True``."""
    return async_sessionmaker(engine, expire_on_commit=expire_on_commit)


@dataclass
class Received:
    """Every event a test's handlers received, in call order."""

    events: list[DomainEvent] = field(default_factory=list)

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def handler(self, event: DomainEvent) -> None:
        self.events.append(event)


@pytest.fixture
def received(registry: SubscriberRegistry) -> Received:
    """A wildcard subscriber (named ``received``) recording every event after commit."""
    rec = Received()
    registry.subscribe("*", rec.handler, name="received")
    return rec


async def outbox_events(engine: AsyncEngine, outbox: Outbox) -> list[dict[str, Any]]:
    """The rows of the outbox event table in sequence order."""
    await flush_delivery_marks()
    async with engine.connect() as conn:
        keyed = select(*(c.label(c.key) for c in outbox.events.c))  # the same in both shapes
        rows = await conn.execute(keyed.order_by(outbox.events.c.sequence))
        return [dict(r._mapping) for r in rows]


async def deliveries(engine: AsyncEngine, outbox: Outbox) -> dict[str, dict[str, Any]]:
    """The delivery rows keyed by destination (tests that use one event per destination)."""
    await flush_delivery_marks()  # the after-commit marks of the test's commits
    async with engine.connect() as conn:
        rows = await conn.execute(select(outbox.deliveries).order_by(outbox.deliveries.c.id))
        return {r.destination: dict(r._mapping) for r in rows}


async def count(engine: AsyncEngine, table: Any) -> int:
    """Number of rows in ``table``."""
    from sqlalchemy import func

    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


# Fixtures of the relay / publisher / CLI tests live with their helpers.
from tests.events.brokers import (  # noqa: E402, F401
    kafka_server,
    moto_server,
    nats_server,
    pubsub_emulator,
    webhook_receiver,
)
from tests.events.relay_support import (  # noqa: E402, F401
    new_engine,
    rabbitmq_server,
    redis_server,
)
