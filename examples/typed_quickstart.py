"""The quick start typed to pass mypy --strict: python examples/typed_quickstart.py

With ``CrudRepository[User]`` a type checker knows what each method returns. ``create``
returns a ``User``, but ``get_one`` returns ``User | None`` (no row may match), so the
quick start's ``found_user: User = await UserRepository.get_one(...)`` is an error under
``mypy --strict``. Narrow the result yourself, or let ``get_one_or_raise`` raise
``NotFoundError`` when nothing matches. tests/test_examples.py runs ``mypy --strict`` on
this file (and on the annotated form, which must fail). Embedded SQLite, in memory.
"""

import asyncio

from sqlalchemy import String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemium import CrudRepository, UnitOfWork


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    position: Mapped[str | None] = mapped_column(String(100))


class UserRepository(CrudRepository[User]):
    model = User


async def main() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async_session = async_sessionmaker(engine, expire_on_commit=False)

    async with UnitOfWork(async_session) as uow:
        user: User = await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        print(f"Created user with id: {user.id}")

    async with UnitOfWork(async_session) as uow:
        found_user = await UserRepository.get_one(uow.session, filters={"name": "Alice"})
        assert found_user is not None  # from here on the type checker knows it is a User
        print(f"Found user: {found_user.name}")
        UserRepository.update(obj=found_user, data={"position": "Team Lead"})

    async with UnitOfWork(async_session) as uow:
        lead: User = await UserRepository.get_one_or_raise(uow.session, {"name": "Alice"})
        print(f"{lead.name} is now {lead.position}")
        await UserRepository.delete(uow.session, lead)

    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
