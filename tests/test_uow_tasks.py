"""One UnitOfWork, one task at a time: two tasks using it at once get a clear error."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import UnitOfWork, UnitOfWorkError
from tests.models import UserRepository

Factory = async_sessionmaker[AsyncSession]
pytestmark = pytest.mark.usefixtures("both_commit_paths")


async def test_two_tasks_at_once_raise_unit_of_work_error(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(uow.session, [{"name": f"x{i}"} for i in range(50)])

    async def reader(uow: UnitOfWork) -> None:
        for _ in range(20):
            await UserRepository.list(uow.session, {"name__startswith": "x"})

    async def writer(uow: UnitOfWork) -> None:
        for i in range(20):
            await UserRepository.create(uow.session, {"name": f"w{i}"})
            await uow.flush()

    with pytest.raises(UnitOfWorkError, match="another task"):
        async with UnitOfWork(session_factory) as uow:
            await asyncio.gather(reader(uow), writer(uow))
    async with UnitOfWork(session_factory) as uow:
        # the failed unit of work rolled back: none of the writer's rows exist
        assert await UserRepository.count(uow.session, {"name__startswith": "w"}) == 0


async def test_tasks_taking_turns_may_share_a_unit_of_work(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        for i in range(3):
            # each task finishes before the next starts: sequential use is fine
            await asyncio.create_task(UserRepository.create(uow.session, {"name": f"t{i}"}))
            await asyncio.create_task(uow.flush())
        assert await UserRepository.count(uow.session) == 3
