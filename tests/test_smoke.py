from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from tests.models import User, UserRepository


async def test_create_and_read_back(session_factory: async_sessionmaker[AsyncSession]) -> None:
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice", "position": "Eng"})
        await uow.flush()
        assert user.id is not None
    async with UnitOfWork(session_factory) as uow:
        found = await UserRepository.get_one(asession=uow.session, filters={"name": "Alice"})
        assert isinstance(found, User)
        assert found.position == "Eng"
