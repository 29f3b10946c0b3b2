"""capture_events(): what users' own tests use to see the events their code committed."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import DomainEvent, SubscriberRegistry, capture_events, capture_on_commit
from tests.models import UserRepository

Sessions = async_sessionmaker[AsyncSession]


async def create(sessions: Sessions, registry: SubscriberRegistry, name: str) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": name})


async def test_capture_events_records_committed_events_in_order(
    sessions: Sessions, registry: SubscriberRegistry
) -> None:
    with capture_events() as events:
        await create(sessions, registry, "Alice")
        async with UnitOfWork(sessions, registry=registry) as uow:
            uow.record("greeted", aggregate_type="user", aggregate_id=1, payload={"hi": True})
    assert [e.name for e in events] == ["user_created", "greeted"]
    assert all(isinstance(e, DomainEvent) for e in events)
    assert events[0].payload["name"] == "Alice"


async def test_capture_events_ignores_rolled_back_work(
    sessions: Sessions, registry: SubscriberRegistry
) -> None:
    with capture_events() as events, pytest.raises(RuntimeError):
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            await uow.flush()
            raise RuntimeError
    assert events == []


async def test_capture_events_sees_tasks_started_inside_and_nothing_after(
    sessions: Sessions, registry: SubscriberRegistry
) -> None:
    with capture_events() as events:
        await asyncio.gather(
            asyncio.create_task(create(sessions, registry, "A")),
            asyncio.create_task(create(sessions, registry, "B")),
        )
    await create(sessions, registry, "C")
    assert sorted(e.payload["name"] for e in events) == ["A", "B"]


async def test_nested_captures_both_receive(
    sessions: Sessions, registry: SubscriberRegistry
) -> None:
    with capture_events() as outer:
        await create(sessions, registry, "A")
        with capture_events() as inner:
            await create(sessions, registry, "B")
    assert [e.payload["name"] for e in outer] == ["A", "B"]
    assert [e.payload["name"] for e in inner] == ["B"]


async def test_capture_events_without_outbox_or_subscribers(
    sessions: Sessions, registry: SubscriberRegistry
) -> None:
    from alchemium.events import disable_outbox

    disable_outbox()
    with capture_events() as events:
        await create(sessions, registry, "Alice")
    assert [e.name for e in events] == ["user_created"]


async def test_capture_on_commit_collects_callbacks_instead_of_running_them(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    ran: list[str] = []

    async def notify() -> None:
        ran.append("async")

    with capture_on_commit() as callbacks:
        async with UnitOfWork(session_factory) as uow:
            uow.on_commit(lambda: ran.append("sync"))
            uow.on_commit(notify)
        with pytest.raises(RuntimeError):
            async with UnitOfWork(session_factory) as uow:
                uow.on_commit(lambda: ran.append("rolled back"))
                raise RuntimeError
    assert ran == []  # collected, not run
    assert len(callbacks) == 2
    callbacks[0]()
    await callbacks[1]()
    assert ran == ["sync", "async"]


async def test_capture_on_commit_with_execute_runs_them_too(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    ran: list[int] = []
    with capture_on_commit(execute=True) as callbacks:
        async with UnitOfWork(session_factory) as uow:
            uow.on_commit(lambda: ran.append(1))
    assert ran == [1]
    assert len(callbacks) == 1
