"""The outbox written by the unit of work: contents, order, atomicity, delivery rows, fencing.

Every test runs on both shapes of the events table (alchemium's, Debezium's).
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest
from sqlalchemy import MetaData, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import OutboxError, UnitOfWork
from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    SubscriberRegistry,
    create_outbox_tables,
    flush_delivery_marks,
)
from alchemium.events.outbox import Outbox, database_now
from tests.events.conftest import Received, count, deliveries, outbox_events
from tests.events.relay_support import LONG_AGO
from tests.models import OrderLineRepository, Status, User, UserRepository

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def outbox(shaped_outbox: Outbox) -> Outbox:
    """This module's tests run on both shapes of the events table."""
    return shaped_outbox


async def test_commit_writes_exactly_the_recorded_events_in_recording_order(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    async with UnitOfWork(sessions, registry=registry, actor="alice") as uow:
        uow.record("batch_started", aggregate_type="batch", aggregate_id=7)
        users = [await UserRepository.create(uow.session, {"name": n}) for n in "ABC"]
        await uow.flush()
        UserRepository.update(users[0], {"position": "Lead"})
        await uow.flush()
        await UserRepository.delete(uow.session, users[2])
        # Change events are recorded when the change is flushed: this delete is only
        # flushed at commit, so it comes after the custom event recorded below.
        uow.record("batch_finished", aggregate_type="batch", aggregate_id=7, payload={"n": 3})

    rows = await outbox_events(engine, outbox)
    expected = [
        "batch_started",
        "user_created",
        "user_created",
        "user_created",
        "user_updated",
        "batch_finished",
        "user_deleted",
    ]
    assert [r["name"] for r in rows] == expected
    assert [r["id"] for r in rows] == [e.id for e in received.events]
    sequences = [r["sequence"] for r in rows]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == len(sequences)
    for row, event in zip(rows, received.events, strict=True):
        assert row["aggregate_type"] == event.aggregate_type
        assert row["aggregate_id"] == event.aggregate_id
        assert row["payload"] == event.to_dict()["payload"]
        assert row["metadata"] == {"actor": "alice"}


async def test_sequence_keeps_increasing_across_commits(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    for name in ("first", "second", "third"):
        async with UnitOfWork(sessions, registry=registry) as uow:
            uow.record(name, aggregate_type="x", aggregate_id=1)
    rows = await outbox_events(engine, outbox)
    assert [r["name"] for r in rows] == ["first", "second", "third"]
    assert rows[0]["sequence"] < rows[1]["sequence"] < rows[2]["sequence"]


async def test_outbox_rows_become_visible_together_with_the_business_rows(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    async def visible() -> tuple[int, int]:
        async with engine.connect() as conn:
            users = (await conn.execute(select(func.count()).select_from(User))).scalar_one()
            events = (
                await conn.execute(select(func.count()).select_from(outbox.events))
            ).scalar_one()
            return int(users), int(events)

    seen_by_handler: list[tuple[int, int]] = []

    @registry.on("user_created")
    async def check(event: DomainEvent) -> None:
        seen_by_handler.append(await visible())

    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        assert await visible() == (0, 0)  # not committed yet: nothing is visible
    assert seen_by_handler == [(1, 1)]
    assert await visible() == (1, 1)


async def test_payload_json_handles_datetime_date_decimal_uuid_enum(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    when = dt.datetime(2024, 2, 29, 23, 59, 59, tzinfo=dt.timezone.utc)
    key = uuid.uuid4()
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(
            uow.session,
            {
                "name": "Alice",
                "status": Status.BLOCKED,
                "balance": decimal.Decimal("1234.50"),
                "birthday": dt.date(1990, 12, 31),
                "created_at": when,
            },
        )
        await OrderLineRepository.create(uow.session, {"id": key, "sku": "A"})
        await uow.flush()
        uow.record(
            "all_types",
            aggregate_type="t",
            aggregate_id=key,
            payload={
                "at": when,
                "day": dt.date(2024, 1, 1),
                "amount": decimal.Decimal("0.10"),
                "key": key,
                "status": Status.ACTIVE,
                "nested": [{"amount": decimal.Decimal("1")}],
            },
        )
    user_row, line_row, custom_row = await outbox_events(engine, outbox)
    assert user_row["payload"]["status"] == "blocked"
    assert user_row["payload"]["balance"] == "1234.50"
    assert user_row["payload"]["birthday"] == "1990-12-31"
    assert dt.datetime.fromisoformat(user_row["payload"]["created_at"]) == when
    assert line_row["payload"]["id"] == str(key)
    assert line_row["aggregate_id"] == str(key)
    assert custom_row["payload"] == {
        "at": when.isoformat(),
        "day": "2024-01-01",
        "amount": "0.10",
        "key": str(key),
        "status": "active",
        "nested": [{"amount": "1"}],
    }
    # What a relay reads back is the event the in-process handler got.
    for row, event in zip((user_row, line_row, custom_row), received.events, strict=True):
        occurred = row["occurred_at"]
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=dt.timezone.utc)
        again = DomainEvent.from_dict({**row, "occurred_at": occurred})
        assert again.to_dict() == event.to_dict()


async def test_one_delivery_row_per_event_and_destination(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    registry.subscribe("user_created", lambda e: None, name="welcome")
    registry.subscribe("*", lambda e: None, name="audit_logger")
    registry.add_destination("broker", "user_created")
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
        uow.record("something_else", aggregate_type="x", aggregate_id=1)

    events = {r["name"]: r["id"] for r in await outbox_events(engine, outbox)}
    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(outbox.deliveries).order_by(outbox.deliveries.c.id))
        ).all()
    by_pair = {(r.event_id, r.destination): r for r in rows}
    assert set(by_pair) == {
        (events["user_created"], "welcome"),
        (events["user_created"], "audit_logger"),
        (events["user_created"], "broker"),
        (events["something_else"], "audit_logger"),
    }
    # In-process subscribers ran after commit; the broker's row waits for the relay.
    assert by_pair[events["user_created"], "welcome"].status == "delivered"
    assert by_pair[events["something_else"], "audit_logger"].status == "delivered"
    broker = by_pair[events["user_created"], "broker"]
    assert (broker.status, broker.attempts, broker.claim_token) == ("pending", 0, None)


async def test_in_process_rows_are_claimed_at_insert_so_the_relay_skips_them(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    during: list[object] = []

    @registry.on("user_created", name="welcome")
    async def welcome(event: DomainEvent) -> None:
        async with engine.begin() as conn:
            row = (await conn.execute(select(outbox.deliveries))).one()
            during.append((row.status, row.claim_token is not None, row.claimed_until is not None))
            claimed = await outbox.claim(
                conn,
                ["welcome"],
                limit=10,
                lease=30,
                token=uuid.uuid4(),
                claimed_by="relay",
            )
            during.append(claimed)

    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
    assert during[0] == ("claimed", True, True)
    assert during[1] == []
    assert (await deliveries(engine, outbox))["welcome"]["status"] == "delivered"


async def test_a_stale_completion_cannot_overwrite_a_reclaimed_row(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    relay_token = uuid.uuid4()
    d = outbox.deliveries

    @registry.on("user_created", name="slow")
    async def slow(event: DomainEvent) -> None:
        # The handler outlives its lease: the relay takes the row over meanwhile.
        async with engine.begin() as conn:
            past = database_now(-1)
            await conn.execute(update(d).values(claimed_until=past))
            claimed = await outbox.claim(
                conn, ["slow"], limit=10, lease=30, token=relay_token, claimed_by="relay"
            )
            assert len(claimed) == 1

    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})

    row = (await deliveries(engine, outbox))["slow"]
    # The after-commit dispatch completed under its own, older token: no effect.
    assert row["status"] == "claimed"
    assert row["claim_token"] == relay_token
    assert row["attempts"] == 2
    async with engine.begin() as conn:
        assert await outbox.mark_delivered(conn, relay_token) == 1
    assert (await deliveries(engine, outbox))["slow"]["status"] == "delivered"


async def test_rollback_leaves_no_outbox_rows(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    registry.subscribe("*", lambda e: None, name="any")
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            uow.record("custom", aggregate_type="x", aggregate_id=1)
            await uow.flush()
            raise RuntimeError
    assert await count(engine, outbox.events) == 0
    assert await count(engine, outbox.deliveries) == 0


async def test_create_outbox_tables_and_a_custom_table_name(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry
) -> None:
    custom = Outbox(MetaData(), table_name="my_events")
    await create_outbox_tables(engine, custom)
    await create_outbox_tables(engine, custom)  # idempotent
    async with UnitOfWork(sessions, registry=registry, outbox=custom) as uow:
        uow.record("hello", aggregate_type="x", aggregate_id=1)
    assert [r["name"] for r in await outbox_events(engine, custom)] == ["hello"]
    assert custom.events.name == "my_events"
    assert custom.deliveries.name == "my_events_delivery"


async def test_missing_outbox_tables_give_a_clear_error_and_commit_nothing(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], outbox: Outbox
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE {outbox.deliveries.name}"))
        await conn.execute(text(f"DROP TABLE {outbox.events.name}"))
    with pytest.raises(OutboxError, match="create_outbox_tables") as info:
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
    assert info.value.__cause__ is not None
    async with UnitOfWork(session_factory) as uow:
        assert await UserRepository.count(uow.session) == 0


@pytest.mark.parametrize("completion", ["keep", "delete", "archive"])
async def test_what_a_delivered_row_becomes_by_completion_mode(
    engine: AsyncEngine, registry: SubscriberRegistry, completion: str
) -> None:
    """Delivered by the after-commit dispatch and by the relay; a failed row stays either way."""
    metadata = MetaData()
    box = Outbox(metadata, table_name="completion_outbox", completion=completion)
    await create_outbox_tables(engine, box)
    failing = {"n": 0}

    def flaky(_event: DomainEvent) -> None:
        failing["n"] += 1
        if failing["n"] == 1:
            raise RuntimeError("first attempt fails")

    registry.subscribe("probe", flaky, name="flaky")
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    for i in range(3):
        async with UnitOfWork(sessions, registry=registry, outbox=box) as uow:
            uow.record("probe", aggregate_type="probe", aggregate_id=i)
    await flush_delivery_marks()
    relay = OutboxRelay(sessions, InProcessPublisher(registry), outbox=box, listen=False)
    async with engine.begin() as conn:  # the failed row: due now
        await conn.execute(update(box.deliveries).values(next_attempt_at=LONG_AGO))
    assert await relay.run_once() == 1
    async with engine.connect() as conn:
        left = (await conn.execute(select(box.deliveries.c.status))).scalars().all()
        archived = (
            (await conn.execute(select(box.archive.c.status))).scalars().all()
            if box.archive is not None
            else []
        )
    if completion == "keep":
        assert sorted(left) == ["delivered"] * 3
    else:
        assert left == []
    assert archived == (["delivered"] * 3 if completion == "archive" else [])


def test_an_unknown_completion_mode_is_refused() -> None:
    with pytest.raises(OutboxError, match="completion='archived'"):
        Outbox(MetaData(), completion="archived")
