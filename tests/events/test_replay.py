"""Replay: fresh deliveries of retained events, routed as at commit, idempotent, in batches.

Replay builds on backfill, which used to hand a later subscriber every retained event
whatever it subscribed to; both now route by the registry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import MetaData, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import OutboxError, UnitOfWork
from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    RabbitMQPublisher,
    RedisStreamPublisher,
    SubscriberRegistry,
    create_outbox_tables,
    flush_delivery_marks,
)
from alchemium.events.outbox import Outbox
from tests.events.relay_support import (
    LONG_AGO,
    RabbitServer,
    RedisServer,
    Sink,
    delivery_rows,
    rabbitmq_consumer,
    run_cli,
)
from tests.models import OrderLineRepository, UserRepository

Factory = async_sessionmaker[AsyncSession]

SINCE = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)


async def history(factory: Factory, registry: SubscriberRegistry) -> None:
    """Three users and two order lines, committed before anyone subscribed."""
    async with UnitOfWork(factory, registry=registry) as uow:
        for name in ("ann", "bob", "cy"):
            await UserRepository.create(uow.session, {"name": name})
        for sku in ("a-1", "b-2"):
            await OrderLineRepository.create(uow.session, {"sku": sku})


async def drain(factory: Factory, *publishers: Sink) -> int:
    return await OutboxRelay(factory, list(publishers), listen=False).drain()


async def test_backfill_gives_a_late_subscriber_only_the_events_it_subscribes_to(
    session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    await history(session_factory, registry)
    registry.subscribe("user_*", lambda e: None, name="late")
    async with session_factory() as session:
        assert await outbox.backfill(session, "late", since=SINCE, registry=registry) == 3
        await session.commit()
    sink = Sink("late")
    assert await drain(session_factory, sink) == 3
    assert {e.name for e in sink.received} == {"user_created"}  # no order_line events


async def test_replay_schedules_routed_events_once_and_marks_them(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    await history(session_factory, registry)
    registry.add_destination("search", "user_*")
    report = await outbox.replay(
        session_factory, "search", since=SINCE, registry=registry, batch_size=2, pause=0
    )
    assert (report.matched, report.created, report.redelivered, report.skipped) == (3, 3, 0, 0)
    assert report.batches == 2  # 2 + 1 events

    again = await outbox.replay(session_factory, "search", since=SINCE, registry=registry, pause=0)
    assert (again.created, again.redelivered, again.skipped) == (0, 0, 3)  # still pending
    rows = [r for r in await delivery_rows(engine, outbox) if r["destination"] == "search"]
    assert len(rows) == 3
    assert all(r["replayed_at"] is not None for r in rows)

    sink = Sink("search")
    assert await drain(session_factory, sink) == 3
    assert all(e.metadata["replay"] is True for e in sink.received)

    # Delivered: a replay delivers them again (and only then).
    third = await outbox.replay(session_factory, "search", since=SINCE, registry=registry, pause=0)
    assert (third.created, third.redelivered) == (0, 3)
    assert await drain(session_factory, sink) == 3
    assert len(sink.received) == 6


@pytest.mark.parametrize("completion", ["delete", "archive"])
async def test_replay_when_delivered_rows_leave_the_table(
    engine: AsyncEngine, registry: SubscriberRegistry, completion: str
) -> None:
    """completion="delete"/"archive": new rows, still once; purged events are gone."""
    box = Outbox(MetaData(), table_name="completion_outbox", completion=completion)
    await create_outbox_tables(engine, box)
    seen: list[DomainEvent] = []
    registry.subscribe("probe", seen.append, name="seen")
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    for i in range(3):
        async with UnitOfWork(sessions, registry=registry, outbox=box) as uow:
            uow.record("probe", aggregate_type="probe", aggregate_id=i)
    await flush_delivery_marks()
    assert len(seen) == 3
    async with engine.connect() as conn:
        assert (await conn.scalar(select(func.count()).select_from(box.deliveries))) == 0

    report = await box.replay(sessions, "seen", since=SINCE, registry=registry, pause=0)
    assert (report.matched, report.created, report.redelivered) == (3, 3, 0)
    again = await box.replay(sessions, "seen", since=SINCE, registry=registry, pause=0)
    assert (again.created, again.skipped) == (0, 3)  # pending: never twice
    relay = OutboxRelay(sessions, InProcessPublisher(registry), outbox=box, listen=False)
    assert await relay.drain() == 3
    assert len(seen) == 6

    async with sessions() as session:  # retention: the events go, nothing can bring them back
        await box.purge(session, older_than=0)
        await session.commit()
    gone = await box.replay(sessions, "seen", since=SINCE, registry=registry, pause=0)
    assert gone.matched == 0


@dataclass
class WaitingCounter(Sink):
    """A Sink that counts, at each publish, the replayed rows still waiting for it."""

    engine: AsyncEngine | None = None
    outbox: Outbox | None = None
    most_waiting: int = 0

    async def publish(self, event: DomainEvent, destination: str) -> None:
        assert self.engine is not None
        assert self.outbox is not None
        d = self.outbox.deliveries
        async with self.engine.connect() as conn:
            waiting = await conn.scalar(
                select(func.count()).where(
                    d.c.destination == destination,
                    d.c.status.in_(("pending", "claimed")),
                    d.c.replayed_at.is_not(None),
                )
            )
        self.most_waiting = max(self.most_waiting, int(waiting or 0))
        await super().publish(event, destination)


async def test_max_waiting_paces_a_replay_by_the_relays(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    async with UnitOfWork(session_factory, registry=registry) as uow:
        for i in range(10):
            await UserRepository.create(uow.session, {"name": f"user {i}"})
    registry.add_destination("search", "user_*")
    sink = WaitingCounter("search", engine=engine, outbox=outbox)
    relay = OutboxRelay(session_factory, sink, listen=False, batch_size=1, poll_interval=0.05)
    running = asyncio.create_task(relay.run())
    try:
        report = await outbox.replay(
            session_factory,
            "search",
            since=SINCE,
            registry=registry,
            batch_size=2,
            pause=0,
            max_waiting=2,
        )
    finally:
        relay.stop()
        await running
    assert report.created == 10
    assert await drain(session_factory, sink) == 10 - len(sink.received)
    assert len(sink.received) == 10
    # Each batch waited for the relay: never more than max_waiting - 1 + batch_size.
    assert 1 <= sink.most_waiting <= 3


async def test_replay_filters_by_time_event_type_and_aggregate(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    await history(session_factory, registry)
    e = outbox.events
    async with session_factory() as session:  # "ann" happened long ago
        await session.execute(
            update(e).where(e.c.payload["name"].as_string() == "ann").values(occurred_at=LONG_AGO)
        )
        await session.commit()
    registry.add_destination("archive", "*")

    async def matched(**filters: object) -> int:
        report = await outbox.replay(
            session_factory,
            "archive",
            registry=registry,
            pause=0,
            **filters,  # type: ignore[arg-type]
        )
        return report.matched

    assert await matched(since=SINCE) == 4  # 2 users, 2 order lines
    assert await matched(since=LONG_AGO, until=SINCE) == 1  # ann
    assert await matched(since=LONG_AGO, event_types=["order_line_*"]) == 2
    user = (await delivery_rows(engine, outbox))[0]["aggregate_id"]
    assert await matched(since=LONG_AGO, aggregate_type="user", aggregate_id=user) == 1
    assert await matched(since=LONG_AGO, aggregate_type="order_line") == 2


async def test_a_destination_nobody_subscribed_needs_its_event_types(
    session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    await history(session_factory, registry)
    with pytest.raises(OutboxError, match=r"'warehouse'.*neither a subscriber nor a destination"):
        await outbox.replay(session_factory, "warehouse", since=SINCE, registry=registry)
    report = await outbox.replay(
        session_factory,
        "warehouse",
        since=SINCE,
        registry=registry,
        event_types=["order_line_created"],
        pause=0,
    )
    assert report.created == 2


async def test_replay_from_the_command_line(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    db_url: str,
) -> None:
    await history(session_factory, registry)
    args = ("outbox", "replay", "--url", db_url, "--destination", "warehouse", "--since", "1d")
    done = await asyncio.to_thread(run_cli, *args, "--event-type", "user_*", "--pause", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "replay to warehouse: 3 event(s) matched, 3 scheduled (3 new, 0 redelivered), "
        "0 skipped (already pending, dead or abandoned), 1 batch(es)"
    )
    refused = await asyncio.to_thread(run_cli, *args)
    assert refused.returncode == 2
    assert "neither a subscriber nor a destination" in refused.stderr
    status = await asyncio.to_thread(run_cli, "outbox", "status", "--url", db_url, "--json")
    [warehouse] = [
        d for d in json.loads(status.stdout)["destinations"] if d["destination"] == "warehouse"
    ]
    assert warehouse["pending"] == 3


async def test_a_broker_sees_the_replay_mark_and_the_schema_version(
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    await history(session_factory, registry)
    registry.add_destination("redis", "user_created")
    await outbox.replay(session_factory, "redis", since=SINCE, registry=registry, pause=0)
    publisher = RedisStreamPublisher(redis_server.url)
    try:
        assert await OutboxRelay(session_factory, publisher, listen=False).drain() == 3
    finally:
        await publisher.close()
    entries = await redis_server.entries("alchemium:events")
    assert [(f["replay"], f["schema_version"]) for _, f in entries] == [("1", "1")] * 3
    received = [DomainEvent.from_dict(json.loads(f["event"])) for _, f in entries]
    assert all(e.metadata["replay"] is True and e.schema_version == 1 for e in received)


@pytest.mark.parametrize("backend", ["sqlite"])  # the broker side; the database does not matter
async def test_rabbitmq_messages_carry_the_replay_header_and_the_schema_version(
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    rabbitmq_server: RabbitServer,
) -> None:
    await history(session_factory, registry)
    registry.add_destination("rabbitmq", "user_created")
    url = rabbitmq_server.url
    async with rabbitmq_consumer(url, "replay.events", "user_created") as take:
        await outbox.replay(session_factory, "rabbitmq", since=SINCE, registry=registry, pause=0)
        publisher = RabbitMQPublisher(url, exchange="replay.events")
        try:
            assert await OutboxRelay(session_factory, publisher, listen=False).drain() == 3
        finally:
            await publisher.close()
        received = await take(3)
    assert [(m.headers["replay"], m.headers["schema_version"]) for m in received] == [(True, 1)] * 3
    assert all(json.loads(m.body)["metadata"]["replay"] is True for m in received)
