"""How changes made through repositories become domain events (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import UnitOfWork, use_actor, use_tenant
from alchemium.events import DomainEvent, SubscriberRegistry
from tests.events.conftest import Received
from tests.models import (
    Memo,
    MemoRepository,
    OrderLine,
    OrderLineRepository,
    ScratchRepository,
    Status,
    User,
    UserRepository,
)

Sessions = async_sessionmaker[AsyncSession]


async def make_user(sessions: Sessions, registry: SubscriberRegistry, **values: object) -> int:
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice", **values})
        await uow.flush()
        return user.id


async def test_user_created_handler_gets_the_generated_id(
    sessions: Sessions, registry: SubscriberRegistry
) -> None:
    got: list[DomainEvent] = []

    @registry.on("user_created")
    async def welcome(event: DomainEvent) -> None:
        got.append(event)

    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice", "position": "Eng"})
        await uow.flush()
        user_id = user.id
        assert got == []  # nothing before commit

    assert len(got) == 1
    event = got[0]
    assert event.name == "user_created"
    assert event.aggregate_type == "user"
    assert event.aggregate_id == str(user_id)
    assert event.payload["id"] == user_id
    assert event.payload["name"] == "Alice"
    assert event.payload["position"] == "Eng"
    assert event.occurred_at.tzinfo is not None


async def test_created_payload_is_json_safe(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    when = dt.datetime(2024, 5, 17, 12, 30, tzinfo=dt.timezone.utc)
    await make_user(
        sessions,
        registry,
        status=Status.BLOCKED,
        balance=decimal.Decimal("12.50"),
        birthday=dt.date(1990, 1, 2),
        created_at=when,
    )
    payload = received.events[0].payload
    assert payload["status"] == "blocked"
    assert payload["balance"] == "12.50"
    assert payload["birthday"] == "1990-01-02"
    assert dt.datetime.fromisoformat(payload["created_at"]) == when


async def test_python_side_defaults_are_in_the_created_payload(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        line = await OrderLineRepository.create(uow.session, {"sku": "A-1"})
        await uow.flush()
        line_id = line.id
    (event,) = received.events
    assert event.payload["id"] == str(line_id)
    assert event.aggregate_id == str(line_id)
    assert event.payload["quantity"] == 1


async def test_update_records_only_the_changed_columns(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    user_id = await make_user(sessions, registry, position="Eng", age=30)
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.get(uow.session, user_id)
        assert user is not None
        UserRepository.update(user, {"position": "CTO", "age": 30, "name": "Alice"})

    assert received.names() == ["user_created", "user_updated"]
    updated = received.events[1]
    assert updated.aggregate_id == str(user_id)
    assert dict(updated.payload) == {"changes": {"position": {"old": "Eng", "new": "CTO"}}}


async def test_update_to_the_same_values_records_nothing(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    user_id = await make_user(sessions, registry, position="Eng")
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.get(uow.session, user_id)
        assert user is not None
        UserRepository.update(user, {"position": "Eng", "name": "Alice"})
    assert received.names() == ["user_created"]


async def test_update_after_an_explicit_commit_knows_the_old_value(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    # With expire_on_commit=True the commit expires the object: its old value must
    # still end up in the diff (it is not in the attribute history any more).
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice", "position": "Eng"})
        await uow.commit()
        UserRepository.update(user, {"position": "CTO"})
    assert received.names() == ["user_created", "user_updated"]
    assert dict(received.events[1].payload) == {
        "changes": {"position": {"old": "Eng", "new": "CTO"}}
    }


async def test_two_flushes_of_one_object_record_two_updates(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    user_id = await make_user(sessions, registry, age=1)
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.get(uow.session, user_id)
        assert user is not None
        UserRepository.update(user, {"age": 2})
        await uow.flush()
        UserRepository.update(user, {"age": 3})
    changes = [e.payload["changes"]["age"] for e in received.events[1:]]
    assert changes == [{"old": 1, "new": 2}, {"old": 2, "new": 3}]


async def test_delete_records_the_last_values(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    user_id = await make_user(sessions, registry, position="Eng")
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.get(uow.session, user_id)
        assert user is not None
        UserRepository.update(user, {"position": "Ex"})
        await uow.flush()
        await UserRepository.delete(uow.session, user)
    deleted = received.events[-1]
    assert deleted.name == "user_deleted"
    assert deleted.aggregate_id == str(user_id)
    assert deleted.payload["id"] == user_id
    assert deleted.payload["name"] == "Alice"
    assert deleted.payload["position"] == "Ex"


async def test_delete_of_an_object_from_an_earlier_unit_of_work(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice", "position": "Eng"})
        await uow.flush()
        user_id = user.id
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.delete(uow.session, user)
    deleted = received.events[-1]
    assert (deleted.name, deleted.aggregate_id) == ("user_deleted", str(user_id))
    assert deleted.payload["position"] == "Eng"


async def test_camel_case_models_are_snake_case_entities(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        line = await OrderLineRepository.create(uow.session, {"sku": "A-1", "quantity": 2})
        await uow.flush()
        line_id = line.id
    async with UnitOfWork(sessions, registry=registry) as uow:
        loaded = await OrderLineRepository.get(uow.session, line_id)
        assert loaded is not None
        OrderLineRepository.update(loaded, {"quantity": 3})
        await uow.flush()
        await OrderLineRepository.delete(uow.session, loaded)
    assert received.names() == ["order_line_created", "order_line_updated", "order_line_deleted"]
    assert {e.aggregate_type for e in received.events} == {"order_line"}


async def test_repository_can_rename_the_entity(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        memo = await MemoRepository.create(uow.session, {"text": "hi"})
        await uow.flush()
        MemoRepository.update(memo, {"text": "hello"})
    assert received.names() == ["note_created", "note_updated"]
    assert {e.aggregate_type for e in received.events} == {"note"}
    assert isinstance(memo, Memo)


async def test_repository_can_switch_events_off(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        scratch = await ScratchRepository.create(uow.session, {"text": "x"})
        await uow.flush()
        ScratchRepository.update(scratch, {"text": "y"})
        await uow.flush()
        await ScratchRepository.create_many(uow.session, [{"text": "a"}, {"text": "b"}])
        await ScratchRepository.update_where(uow.session, {}, {"text": "z"})
        await ScratchRepository.delete_where(uow.session, {})
    assert received.events == []


async def test_create_many_records_one_event_per_row(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        users = await UserRepository.create_many(
            uow.session, [{"name": "A"}, {"name": "B"}, {"name": "C"}]
        )
        ids = [u.id for u in users]
    assert received.names() == ["user_created"] * 3
    assert [e.aggregate_id for e in received.events] == [str(i) for i in ids]
    assert [e.payload["name"] for e in received.events] == ["A", "B", "C"]


async def test_update_where_records_one_event_per_changed_row(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        users = await UserRepository.create_many(
            uow.session,
            [{"name": "A", "age": 1}, {"name": "B", "age": 5}, {"name": "C", "age": 9}],
        )
        a, b, _ = (u.id for u in users)
    received.events.clear()
    async with UnitOfWork(sessions, registry=registry) as uow:
        count = await UserRepository.update_where(uow.session, {"age__lte": 5}, {"age": 5})
    assert count == 2
    # B already had age 5: the row matched but nothing changed, so no event.
    assert received.names() == ["user_updated"]
    (event,) = received.events
    assert event.aggregate_id == str(a)
    assert dict(event.payload) == {"changes": {"age": {"old": 1, "new": 5}}}
    assert b != a


async def test_delete_where_records_one_event_per_row_with_last_values(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create_many(
            uow.session, [{"name": "A", "age": 1}, {"name": "B", "age": 2}, {"name": "C"}]
        )
    received.events.clear()
    async with UnitOfWork(sessions, registry=registry) as uow:
        assert await UserRepository.delete_where(uow.session, {"age__is_null": False}) == 2
    assert received.names() == ["user_deleted"] * 2
    assert sorted(e.payload["name"] for e in received.events) == ["A", "B"]
    assert all(e.payload["id"] == int(e.aggregate_id) for e in received.events)


async def test_upsert_records_one_upserted_event_per_row(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    await make_user(sessions, registry, position="Eng")
    received.events.clear()
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.upsert_many(
            uow.session,
            [{"name": "Alice", "position": "CTO"}, {"name": "Bob", "position": "Dev"}],
            conflict=["name"],
        )
    assert received.names() == ["user_upserted"] * 2
    assert [(e.payload["name"], e.payload["position"]) for e in received.events] == [
        ("Alice", "CTO"),
        ("Bob", "Dev"),
    ]


async def test_uow_record_adds_a_custom_event(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    order_id = uuid.uuid4()
    async with UnitOfWork(sessions, registry=registry, metadata={"correlation_id": "c-1"}) as uow:
        event = uow.record(
            "order_placed",
            aggregate_type="order",
            aggregate_id=order_id,
            payload={"total": decimal.Decimal("9.90")},
            metadata={"causation_id": "x"},
        )
    assert received.events == [event]
    assert event.aggregate_id == str(order_id)
    assert dict(event.payload) == {"total": "9.90"}
    assert dict(event.metadata) == {"correlation_id": "c-1", "causation_id": "x"}


async def test_event_source_mixin_events_are_collected_at_commit(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        line = await OrderLineRepository.create(uow.session, {"sku": "A-1"})
        line.record_event("order_line_packed", {"box": 7})
        await uow.flush()
        line_id = line.id
    async with UnitOfWork(sessions, registry=registry) as uow:
        loaded = await OrderLineRepository.get(uow.session, line_id)
        assert isinstance(loaded, OrderLine)
        loaded.record_event("order_line_shipped", {"carrier": "ups"}, tracking="T1")
    assert received.names() == ["order_line_created", "order_line_packed", "order_line_shipped"]
    packed, shipped = received.events[1:]
    assert (packed.aggregate_type, packed.aggregate_id) == ("order_line", str(line_id))
    assert dict(packed.payload) == {"box": 7}
    assert shipped.aggregate_id == str(line_id)
    assert shipped.metadata["tracking"] == "T1"


async def test_event_source_mixin_on_a_deleted_object(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        line = await OrderLineRepository.create(uow.session, {"sku": "A-1"})
        await uow.flush()
        line_id = line.id
    async with UnitOfWork(sessions, registry=registry) as uow:
        loaded = await OrderLineRepository.get(uow.session, line_id)
        assert loaded is not None
        loaded.record_event("order_line_cancelled")
        await OrderLineRepository.delete(uow.session, loaded)
    assert received.names()[-2:] == ["order_line_deleted", "order_line_cancelled"]


async def test_events_carry_actor_and_tenant(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry, actor="alice", tenant="acme") as uow:
        await UserRepository.create(uow.session, {"name": "A"})
    with use_actor("bob"), use_tenant("globex"):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "B"})
    assert [(e.metadata["actor"], e.metadata["tenant"]) for e in received.events] == [
        ("alice", "acme"),
        ("bob", "globex"),
    ]


async def test_changes_outside_a_unit_of_work_record_nothing(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with sessions() as session:
        await UserRepository.create(session, {"name": "A"})
        await session.commit()
    async with UnitOfWork(sessions, registry=registry) as uow:
        assert await UserRepository.count(uow.session) == 1
        assert uow.pending_events == ()
    assert received.events == []
    assert User.__tablename__ == "users"


async def test_bulk_writes_skip_reading_rows_for_events_nobody_would_see(
    engine: AsyncEngine, registry: SubscriberRegistry
) -> None:
    """No outbox, audit, capture or subscriber of the event: one statement, no events."""
    from alchemium.events import disable_outbox

    disable_outbox()
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create_many(uow.session, [{"name": f"u{i}"} for i in range(3)])
    sent: list[str] = []

    def seen(_c: object, _cur: object, statement: str, *_a: object) -> None:
        sent.append(statement.split()[0].upper())

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with UnitOfWork(sessions, registry=registry) as uow:
            assert await UserRepository.update_where(uow.session, None, {"age": 1}) == 3
            assert await UserRepository.delete_where(uow.session, {"name": "u0"}) == 1
            assert uow.pending_events == ()
        assert sent == ["UPDATE", "DELETE"]
        sent.clear()
        changes: list[str] = []
        registry.subscribe("user_updated", lambda e: changes.append(e.aggregate_id), name="upd")
        async with UnitOfWork(sessions, registry=registry) as uow:
            assert await UserRepository.update_where(uow.session, None, {"age": 2}) == 2
        assert sent == ["SELECT", "UPDATE"]  # the rows read (locked) for their old values
        assert len(changes) == 2
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
