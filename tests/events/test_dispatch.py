"""After-commit dispatch and the rollback paths that must never dispatch (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import (
    EventSerializationError,
    IntegrityViolation,
    UniqueViolation,
    UnitOfWork,
)
from alchemium.events import DomainEvent, SubscriberRegistry, add_before_commit_hook
from alchemium.events.outbox import Outbox, disable_outbox
from alchemium.events.recording import remove_before_commit_hook
from tests.events.conftest import Received, count, deliveries, outbox_events
from tests.models import (
    Attachment,
    AttachmentRepository,
    Keepsake,
    KeepsakeRepository,
    Membership,
    MembershipRepository,
    MemoRepository,
    Opaque,
    User,
    UserRepository,
)

Sessions = async_sessionmaker[AsyncSession]


async def users_in_db(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(User))).scalar_one())


async def assert_nothing_committed(engine: AsyncEngine, outbox: Outbox, received: Received) -> None:
    assert await users_in_db(engine) == 0
    assert await count(engine, outbox.events) == 0
    assert await count(engine, outbox.deliveries) == 0
    assert received.events == []


# -- handlers run after commit -------------------------------------------------------------


async def test_sync_and_async_handlers_run_once_after_commit(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry
) -> None:
    seen: list[tuple[str, int]] = []

    @registry.on("user_created")
    def sync_handler(event: DomainEvent) -> None:
        seen.append(("sync", int(event.aggregate_id)))

    @registry.on("user_created")
    async def async_handler(event: DomainEvent) -> None:
        # Runs after COMMIT: another connection already sees the row.
        seen.append(("async", await users_in_db(engine)))

    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        user_id = user.id
    assert seen == [("sync", user_id), ("async", 1)]


async def test_handler_defined_inside_a_function_still_fires(
    sessions: Sessions, registry: SubscriberRegistry
) -> None:
    got: list[str] = []

    def subscribe_local() -> None:
        async def local_handler(event: DomainEvent) -> None:
            got.append(event.name)

        registry.subscribe("user_created", local_handler)

    subscribe_local()
    gc.collect()  # blinker's default weak reference would be gone now
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
    assert got == ["user_created"]


async def test_handlers_receive_the_immutable_event_not_orm_objects(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    user_id = 0
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        user_id = user.id
    async with UnitOfWork(sessions, registry=registry) as uow:
        loaded = await UserRepository.get(uow.session, user_id)
        assert loaded is not None
        UserRepository.update(loaded, {"name": "Alicia"})

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    for event in received.events:
        assert isinstance(event, DomainEvent)
        assert plain(event.to_dict())
        with pytest.raises(dataclasses.FrozenInstanceError):
            event.name = "other"  # type: ignore[misc]
        with pytest.raises(TypeError):
            event.payload["name"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        received.events[1].payload["changes"]["name"]["new"] = "x"


async def test_events_are_dispatched_in_recording_order(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        uow.record("first", aggregate_type="thing", aggregate_id=1)
        await UserRepository.create(uow.session, {"name": "A"})
        await uow.flush()
        uow.record("second", aggregate_type="thing", aggregate_id=1)
        await MemoRepository.create(uow.session, {"text": "x"})
    assert received.names() == ["first", "user_created", "second", "note_created"]


# -- a failing handler ---------------------------------------------------------------------


async def test_one_failing_handler_does_not_stop_the_others(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = {"first": 0, "failing": 0, "third": 0}

    @registry.on("user_created", name="first")
    def first(event: DomainEvent) -> None:
        calls["first"] += 1

    @registry.on("user_created", name="failing")
    async def failing(event: DomainEvent) -> None:
        calls["failing"] += 1
        raise RuntimeError("smtp is down")

    @registry.on("user_created", name="third")
    async def third(event: DomainEvent) -> None:
        calls["third"] += 1

    with caplog.at_level(logging.ERROR, logger="alchemium.events"):
        async with UnitOfWork(sessions, registry=registry) as uow:  # does not raise
            await UserRepository.create(uow.session, {"name": "Alice"})

    assert calls == {"first": 1, "failing": 1, "third": 1}
    assert await users_in_db(engine) == 1
    (event_row,) = await outbox_events(engine, outbox)
    rows = await deliveries(engine, outbox)
    assert set(rows) == {"first", "failing", "third"}
    for name in ("first", "third"):
        assert rows[name]["status"] == "delivered"
        assert rows[name]["delivered_at"] is not None
        assert rows[name]["claim_token"] is None
    assert rows["failing"]["status"] == "pending"
    assert rows["failing"]["attempts"] == 1
    assert rows["failing"]["last_error"] == "RuntimeError: smtp is down"
    assert rows["failing"]["claim_token"] is None
    assert all(r["event_id"] == event_row["id"] for r in rows.values())
    assert str(event_row["id"]) in caplog.text
    assert "failing" in caplog.text


async def test_all_handlers_succeeding_mark_every_row_delivered(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    registry.subscribe("user_created", lambda e: None, name="a")
    registry.subscribe("*", lambda e: None, name="b")
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
    rows = await deliveries(engine, outbox)
    assert {k: v["status"] for k, v in rows.items()} == {"a": "delivered", "b": "delivered"}


# -- rollback paths: no outbox row, no handler call -----------------------------------------


async def test_user_exception_rolls_back_without_dispatch(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    with pytest.raises(ValueError, match="changed my mind"):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            await uow.flush()
            uow.record("custom", aggregate_type="x", aggregate_id=1)
            raise ValueError("changed my mind")
    await assert_nothing_committed(engine, outbox, received)


async def test_failed_flush_rolls_back_without_dispatch(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    with pytest.raises(UniqueViolation):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            await uow.flush()
            await UserRepository.create(uow.session, {"name": "Alice"})
            await uow.flush()
    await assert_nothing_committed(engine, outbox, received)


async def test_failed_commit_rolls_back_without_dispatch(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    # The foreign key is deferred: the flush succeeds, the COMMIT itself fails.
    with pytest.raises(IntegrityViolation):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            await MembershipRepository.create(uow.session, {"user_id": 424242})
            await uow.flush()
    await assert_nothing_committed(engine, outbox, received)
    assert await count(engine, Membership.__table__) == 0


async def test_cancellation_inside_the_block_rolls_back_without_dispatch(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    flushed = asyncio.Event()

    async def work() -> None:
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            await uow.flush()
            flushed.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await flushed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_nothing_committed(engine, outbox, received)


async def test_cancellation_during_the_commit_path_rolls_back_without_dispatch(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    in_hook = asyncio.Event()

    async def slow_hook(uow: UnitOfWork) -> None:
        in_hook.set()
        await asyncio.Event().wait()

    async def work() -> None:
        async with UnitOfWork(sessions, registry=registry) as uow:
            uow.before_commit(slow_hook)
            await UserRepository.create(uow.session, {"name": "Alice"})

    task = asyncio.create_task(work())
    await in_hook.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_nothing_committed(engine, outbox, received)


async def test_events_inside_a_rolled_back_savepoint_are_discarded(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        # Not flushed yet: entering the savepoint flushes it, outside the savepoint.
        await UserRepository.create(uow.session, {"name": "Outer"})
        with pytest.raises(RuntimeError):
            async with uow.savepoint():
                await UserRepository.create(uow.session, {"name": "Inner"})
                await uow.flush()
                uow.record("inner_custom", aggregate_type="x", aggregate_id=1)
                raise RuntimeError("undo the inner part")
        async with uow.savepoint():
            uow.record("kept_custom", aggregate_type="x", aggregate_id=2)
    assert received.names() == ["user_created", "kept_custom"]
    assert received.events[0].payload["name"] == "Outer"
    assert [r["name"] for r in await outbox_events(engine, outbox)] == [
        "user_created",
        "kept_custom",
    ]
    assert await users_in_db(engine) == 1


async def test_mixin_events_recorded_inside_a_rolled_back_savepoint_are_discarded(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    from tests.models import OrderLineRepository

    async with UnitOfWork(sessions, registry=registry) as uow:
        line = await OrderLineRepository.create(uow.session, {"sku": "A"})
        line.record_event("order_line_packed")
        with pytest.raises(RuntimeError):
            async with uow.savepoint():
                line.record_event("order_line_lost")
                raise RuntimeError
    assert received.names() == ["order_line_created", "order_line_packed"]


async def test_rolled_back_mixin_events_never_reach_a_later_unit_of_work(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    from tests.models import OrderLineRepository

    async with UnitOfWork(sessions, registry=registry) as uow:
        line = await OrderLineRepository.create(uow.session, {"sku": "A"})
        await uow.flush()
        line_id = line.id
    with pytest.raises(RuntimeError):
        async with UnitOfWork(sessions, registry=registry) as uow:
            loaded = await OrderLineRepository.get(uow.session, line_id)
            assert loaded is not None
            loaded.record_event("order_line_lost")
            raise RuntimeError
    async with UnitOfWork(sessions, registry=registry) as uow:
        uow.session.add(loaded)
    assert received.names() == ["order_line_created"]


# -- before-commit hooks -------------------------------------------------------------------


async def test_before_commit_hook_writes_rows_in_the_transaction(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    async def hook(uow: UnitOfWork) -> None:
        names = [e.name for e in uow.pending_events]
        await MemoRepository.create(uow.session, {"text": ",".join(names)})

    async with UnitOfWork(sessions, registry=registry) as uow:
        uow.before_commit(hook)
        await UserRepository.create(uow.session, {"name": "Alice"})
    assert received.names() == ["user_created", "note_created"]
    assert received.events[1].payload["text"] == "user_created"


@pytest.mark.parametrize("scope", ["unit_of_work", "global"])
async def test_before_commit_hook_exception_aborts_the_commit(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
    scope: str,
) -> None:
    async def failing_hook(uow: UnitOfWork) -> None:
        await MemoRepository.create(uow.session, {"text": "written by the hook"})
        await uow.flush()
        raise LookupError("hook failed")

    if scope == "global":
        add_before_commit_hook(failing_hook)
    try:
        with pytest.raises(LookupError, match="hook failed"):
            async with UnitOfWork(sessions, registry=registry) as uow:
                if scope == "unit_of_work":
                    uow.before_commit(failing_hook)
                await UserRepository.create(uow.session, {"name": "Alice"})
    finally:
        remove_before_commit_hook(failing_hook)
    await assert_nothing_committed(engine, outbox, received)
    from tests.models import Memo

    assert await count(engine, Memo.__table__) == 0


# -- serialization -------------------------------------------------------------------------


async def test_unserializable_custom_payload_names_event_and_field(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    with pytest.raises(EventSerializationError) as info:
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            uow.record(
                "order_placed",
                aggregate_type="order",
                aggregate_id=1,
                payload={"lines": [{"sku": "A"}, {"sku": object()}]},
            )
    assert info.value.event == "order_placed"
    assert info.value.field == "lines[1].sku"
    assert "order_placed" in str(info.value)
    assert "lines[1].sku" in str(info.value)
    await assert_nothing_committed(engine, outbox, received)


async def test_unserializable_column_value_fails_before_commit_naming_the_field(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    outbox: Outbox,
    received: Received,
) -> None:
    with pytest.raises(EventSerializationError) as info:
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            await KeepsakeRepository.create(uow.session, {"thing": Opaque()})
    assert (info.value.event, info.value.field) == ("keepsake_created", "thing")
    message = str(info.value)
    assert "tests.models.Opaque" in message
    assert "register_encoder" in message
    assert "event_exclude" in message
    await assert_nothing_committed(engine, outbox, received)
    assert await count(engine, Keepsake.__table__) == 0


async def test_unserializable_mixin_payload_fails_at_record_time(
    sessions: Sessions, registry: SubscriberRegistry, received: Received
) -> None:
    from tests.models import OrderLineRepository

    with pytest.raises(EventSerializationError) as info:
        async with UnitOfWork(sessions, registry=registry) as uow:
            line = await OrderLineRepository.create(uow.session, {"sku": "A"})
            line.record_event("order_line_packed", {"box": Opaque()})
    assert (info.value.event, info.value.field) == ("order_line_packed", "box")
    assert received.events == []


# -- without an outbox ---------------------------------------------------------------------


async def test_without_outbox_handlers_still_run_after_commit_best_effort(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    disable_outbox()
    got: list[str] = []

    @registry.on("user_created", name="broken")
    def broken(event: DomainEvent) -> None:
        raise RuntimeError("not retried")

    @registry.on("user_created", name="working")
    async def working(event: DomainEvent) -> None:
        got.append(event.payload["name"])

    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
    assert got == ["Alice"]
    assert await users_in_db(engine) == 1
    assert await count(engine, outbox.events) == 0  # the table exists but is not used

    with pytest.raises(ValueError):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Bob"})
            await uow.flush()
            raise ValueError
    assert got == ["Alice"]


# -- change events nobody sees -------------------------------------------------------------


async def test_values_of_unknown_types_are_converted_at_flush_even_if_nobody_sees_them(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    # Known immutable values (bytes, here) wait until something needs the event; a
    # value of a type known only at runtime might change after the flush, so it is
    # converted there, and one no encoder knows fails there with what to do.
    disable_outbox()
    async with UnitOfWork(sessions, registry=registry) as uow:
        await AttachmentRepository.create(uow.session, {"data": b"\x00\x01"})
    assert await count(engine, Attachment.__table__) == 1
    with pytest.raises(EventSerializationError, match="register_encoder"):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await KeepsakeRepository.create(uow.session, {"thing": Opaque()})
    assert await count(engine, Keepsake.__table__) == 0


async def test_pending_events_builds_the_recorded_changes(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    disable_outbox()
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        first = uow.pending_events
        assert [e.name for e in first] == ["user_created"]
        assert uow.pending_events == first  # built once: same ids
        await AttachmentRepository.create(uow.session, {"data": b"\x00"})
        await uow.flush()
        *before, attachment = uow.pending_events
        assert tuple(before) == first
        assert attachment.payload["data"] == "AA=="  # base64
        await uow.rollback()


async def test_capture_events_sees_changes_without_outbox_or_subscribers(
    sessions: Sessions, outbox: Outbox
) -> None:
    from alchemium.events.testing import capture_events

    disable_outbox()
    with capture_events() as captured:
        async with UnitOfWork(sessions, registry=SubscriberRegistry("nobody")) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
    assert [e.name for e in captured] == ["user_created"]
