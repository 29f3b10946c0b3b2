"""The pytest fixtures alchemium installs for its users' test suites."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import DomainEvent
from tests.models import UserRepository


async def test_captured_events_fixture_sees_committed_events(
    session_factory: async_sessionmaker[AsyncSession], captured_events: list[DomainEvent]
) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
    assert [e.name for e in captured_events] == ["user_created"]
    assert captured_events[0].payload["name"] == "Alice"


async def test_captured_on_commit_fixture_holds_callbacks_back(
    session_factory: async_sessionmaker[AsyncSession],
    captured_on_commit: list[Callable[[], Any]],
) -> None:
    ran: list[str] = []
    async with UnitOfWork(session_factory) as uow:
        uow.on_commit(lambda: ran.append("mail"))
    assert ran == []
    captured_on_commit[0]()
    assert ran == ["mail"]
