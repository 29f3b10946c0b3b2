"""Fixtures of the dashboard tests: the action log table, seeded outboxes, an HTTP client.

Every test runs on SQLite and PostgreSQL (the ``engine`` fixture); clients talk to the
real ASGI app through httpx's ASGITransport, browsers to a real uvicorn server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from alchemium.dashboard import create_app
from alchemium.events import DomainEvent, OutboxRelay
from alchemium.events.outbox import Outbox
from alchemium.events.outbox_actions import OutboxAction, OutboxActionLog, create_action_table
from tests.events.relay_support import Sink, insert_events

Factory = async_sessionmaker[AsyncSession]

TOKEN = "test-token-0123456789abcdef"
ORIGIN = "http://dash.test"


@pytest.fixture
async def action_log(engine: AsyncEngine) -> OutboxActionLog:
    """The action log table, created in the test database (outside the models' metadata)."""
    log = OutboxActionLog(MetaData())
    await create_action_table(engine, log)
    return log


@pytest.fixture
def make_app(
    engine: AsyncEngine, outbox: Outbox, action_log: OutboxActionLog
) -> Callable[..., Starlette]:
    """``create_app`` on the test database, with the test's outbox and action log."""

    def make(**options: Any) -> Starlette:
        options.setdefault("outbox", outbox)
        options.setdefault("action_log", action_log)
        return create_app(engine, **options)

    return make


def client(app: Starlette, **headers: str) -> httpx.AsyncClient:
    """An httpx client of ``app`` (no network: ASGITransport) on ``http://dash.test``."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=ORIGIN, headers=headers
    )


def bearer(actor: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if actor:
        headers["X-Alchemium-Actor"] = actor
    return headers


@dataclass
class Seeded:
    """What :func:`seed` committed: events per destination and the dead delivery ids."""

    events: list[DomainEvent]
    dead_ids: list[int]


async def seed(
    factory: Factory,
    outbox: Outbox,
    *,
    delivered: int = 0,
    dead: int = 0,
    pending: int = 0,
    destination: str = "sink",
    name: str = "user_created",
) -> Seeded:
    """Commit events for ``destination`` and let a relay leave them delivered, dead or pending.

    ``dead`` events fail once with ``max_attempts=1``; ``pending`` ones are committed
    after the relay ran. Payloads are ``{"n": i}``.
    """
    first = await insert_events(factory, outbox, delivered + dead, destinations=(destination,))
    doomed = {e.id for e in first[delivered:]}
    if first:
        sink = Sink(name=destination, fail=lambda e: e.id in doomed)
        relay = OutboxRelay(factory, sink, max_attempts=1, listen=False, outbox=outbox)
        for _ in range(100):
            if not await relay.run_once() and relay.stats.dead >= len(doomed):
                break
    later = await insert_events(factory, outbox, pending, destinations=(destination,))
    events = [*first, *later]
    if name != "user_created":
        await rename_events(factory, outbox, [e.id for e in events], name)
    d = outbox.deliveries
    async with factory() as session:
        rows = await session.execute(
            select(d.c.id).where(d.c.status == "dead", d.c.event_id.in_(doomed)).order_by(d.c.id)
        )
        dead_ids = [int(i) for i in rows.scalars()]
    return Seeded(events, dead_ids)


async def rename_events(
    factory: Factory, outbox: Outbox, ids: Sequence[uuid.UUID], name: str
) -> None:
    async with factory() as session:
        await session.execute(
            outbox.events.update().where(outbox.events.c.id.in_(ids)).values(name=name)
        )
        await session.commit()


async def statuses(factory: Factory, outbox: Outbox, ids: Sequence[int]) -> list[str]:
    """The status of each delivery id, in the order given."""
    d = outbox.deliveries
    async with factory() as session:
        rows = dict(
            (await session.execute(select(d.c.id, d.c.status).where(d.c.id.in_(ids)))).all()
        )
    return [rows[i] for i in ids]


async def recorded(engine: AsyncEngine, log: OutboxActionLog) -> list[OutboxAction]:
    async with engine.connect() as conn:
        return await log.recent(conn)


@pytest.fixture
async def read_only(make_app: Callable[..., Starlette]) -> AsyncIterator[httpx.AsyncClient]:
    async with client(make_app()) as c:
        yield c
