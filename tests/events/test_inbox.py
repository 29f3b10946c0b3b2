"""The inbox: a handler that writes only to the same database has its effects exactly once.

The effect under test is one ``scratches`` row per handled event (that repository
records no events of its own). Redelivery is real: a relay that publishes and then
stalls past its lease, so a second relay claims and publishes the same rows again;
and three deliveries of each event racing each other.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from sqlalchemy import MetaData, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import SerializationFailure, UnitOfWork
from alchemium.events import (
    DomainEvent,
    Inbox,
    InProcessPublisher,
    OutboxRelay,
    SubscriberRegistry,
    enable_inbox,
)
from alchemium.events.outbox import Outbox
from tests.events.relay_support import by_status, delivery_rows, eventually, insert_events
from tests.models import Scratch, ScratchRepository

Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
async def inbox(engine: AsyncEngine) -> Inbox:
    box = enable_inbox(MetaData())  # its own metadata: the other tests' schema stays as is
    async with engine.begin() as conn:
        await conn.run_sync(box.metadata.create_all)
    return box


async def effects(engine: AsyncEngine) -> Counter[str]:
    """How many effect rows each event id produced."""
    async with engine.connect() as conn:
        return Counter((await conn.execute(select(Scratch.text))).scalars())


def credit_handler(
    inbox: Inbox, factory: Factory, registry: SubscriberRegistry, calls: Counter[str], **kw: float
) -> None:
    """Subscribe ``credit``: one scratch row per event, at most once; count the calls."""
    pause = kw.get("pause", 0.0)

    async def credit(uow: UnitOfWork, event: DomainEvent) -> None:
        await ScratchRepository.create(uow.session, {"text": str(event.id)})
        if pause:
            await asyncio.sleep(pause)  # widen the window for a concurrent delivery

    handler = inbox.idempotent(factory, name="credit")(credit)

    async def counted(event: DomainEvent) -> None:
        calls[str(event.id)] += 1
        await handler(event)

    registry.subscribe("*", counted, name="credit")


async def test_mark_is_true_once_and_rolls_back_with_the_unit_of_work(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, inbox: Inbox
) -> None:
    event_id = uuid.uuid4()
    with pytest.raises(RuntimeError):
        async with UnitOfWork(session_factory) as uow:
            assert await inbox.mark(uow, "credit", event_id) is True
            raise RuntimeError("the effect failed")
    async with UnitOfWork(session_factory) as uow:  # the failed attempt left no row
        assert await inbox.mark(uow, "credit", event_id) is True
        assert await inbox.mark(uow, "credit", event_id) is False
        assert await inbox.mark(uow, "other", event_id) is True
    async with UnitOfWork(session_factory) as uow:
        assert await inbox.mark(uow.session, "credit", event_id) is False
        assert await inbox.processed(uow.session, "credit") == {event_id}


async def test_redelivery_by_the_relay_has_one_effect(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    inbox: Inbox,
    registry: SubscriberRegistry,
) -> None:
    calls: Counter[str] = Counter()
    credit_handler(inbox, session_factory, registry, calls)
    events = await insert_events(session_factory, outbox, 20, destinations=["credit"])
    publisher = InProcessPublisher(registry)
    published = asyncio.Event()

    class DiesAfterPublishing:
        """Publishes, then hangs until cancelled: a relay killed before recording."""

        name = "credit"

        async def publish(self, event: DomainEvent, destination: str) -> None:
            await publisher.publish(event, destination)
            published.set()
            await asyncio.sleep(3600)

    first = OutboxRelay(session_factory, DiesAfterPublishing(), lease=0.5, listen=False)
    doomed = asyncio.create_task(first.run_once())
    waiter = asyncio.create_task(published.wait())
    await asyncio.wait({doomed, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert published.is_set(), (
        doomed.done() and doomed.result(),
        await delivery_rows(engine, outbox),
    )
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert await by_status(engine, outbox) == {"claimed": 20}

    second = OutboxRelay(session_factory, publisher, lease=5, listen=False)
    delivered = await eventually(second.run_once, timeout=10, interval=0.1)  # after the lease

    assert delivered == 20
    assert await by_status(engine, outbox) == {"delivered": 20}
    assert calls[str(events[0].id)] == 2  # the first event really was delivered twice
    assert await effects(engine) == Counter({str(e.id): 1 for e in events})
    async with session_factory() as session:
        assert await inbox.processed(session, "credit") == {e.id for e in events}


async def test_concurrent_deliveries_of_one_event_have_one_effect(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    inbox: Inbox,
    registry: SubscriberRegistry,
) -> None:
    calls: Counter[str] = Counter()
    credit_handler(inbox, session_factory, registry, calls, pause=0.05)
    events = await insert_events(session_factory, outbox, 10, destinations=["credit"])
    publisher = InProcessPublisher(registry)

    # Three deliveries of every event at once, as relays racing on an expired lease would.
    await asyncio.gather(*(publisher.publish(e, "credit") for e in events for _ in range(3)))

    assert calls == Counter({str(e.id): 3 for e in events})
    assert await effects(engine) == Counter({str(e.id): 1 for e in events})
    async with engine.connect() as conn:
        rows = (await conn.execute(select(func.count()).select_from(inbox.table))).scalar_one()
    assert rows == 10


async def test_purge_removes_only_old_rows_in_batches(
    session_factory: Factory, outbox: Outbox, inbox: Inbox
) -> None:
    async with UnitOfWork(session_factory) as uow:
        for _ in range(5):
            await inbox.mark(uow, "credit", uuid.uuid4())
    async with session_factory() as session:
        assert await inbox.purge(session, older_than=3600) == 0
        assert await inbox.purge(session, older_than=0, batch_size=3) == 3
        assert await inbox.purge(session, older_than=0) == 2
        await session.commit()


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_racing_mark_under_repeatable_read_is_a_serialization_failure(
    session_factory: Factory, outbox: Outbox, inbox: Inbox
) -> None:
    event_id = uuid.uuid4()
    snapshot_taken = asyncio.Event()

    async def racing_delivery() -> bool:
        async with UnitOfWork(session_factory, isolation_level="REPEATABLE READ") as uow:
            await uow.session.execute(select(1))  # its snapshot predates the first commit
            snapshot_taken.set()
            return await inbox.mark(uow, "credit", event_id)

    async with UnitOfWork(session_factory, isolation_level="REPEATABLE READ") as first:
        assert await inbox.mark(first, "credit", event_id) is True
        racing = asyncio.create_task(racing_delivery())
        await asyncio.wait_for(snapshot_taken.wait(), 10)
    with pytest.raises(SerializationFailure):
        await asyncio.wait_for(racing, 10)
    async with session_factory() as session:
        assert await inbox.processed(session, "credit") == {event_id}
