"""Database errors map to the same alchemium exceptions on SQLite and PostgreSQL."""

from __future__ import annotations

import decimal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import (
    AlchemiumError,
    CheckViolation,
    DataValidationError,
    ForeignKeyViolation,
    IntegrityViolation,
    NotNullViolation,
    TransactionError,
    UniqueViolation,
    UnitOfWork,
)
from tests.models import (
    AuthorRepository,
    Book,
    BookRepository,
    MembershipRepository,
    User,
    UserRepository,
)

Factory = async_sessionmaker[AsyncSession]
pytestmark = pytest.mark.usefixtures("both_commit_paths")


async def rows(factory: Factory, model: type[Any]) -> int:
    async with factory() as session:
        return int((await session.execute(select(func.count()).select_from(model))).scalar_one())


async def seed_alice(factory: Factory) -> None:
    async with UnitOfWork(factory) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})


def assert_chained(err: AlchemiumError) -> None:
    """The driver error is kept: SQLAlchemy's wrapper as __cause__, the driver's inside it."""
    cause = err.__cause__
    assert isinstance(cause, sa_exc.DBAPIError)
    assert cause.orig is not None
    assert err.__suppress_context__


# Each case: what to write (given an existing user "Alice"), the exception, and the
# (attribute, value) pairs it must carry per backend (None: the driver does not say).
Write = Callable[[AsyncSession], Awaitable[Any]]


async def duplicate_name(s: AsyncSession) -> Any:
    return await UserRepository.create(s, {"name": "Alice"})


async def missing_author(s: AsyncSession) -> Any:
    return await BookRepository.create(s, {"title": "Orphan", "author_id": 4242})


async def missing_title(s: AsyncSession) -> Any:
    author = await AuthorRepository.create(s, {"name": "Ann"})
    await s.flush()
    return await BookRepository.create(s, {"author_id": author.id})


async def negative_age(s: AsyncSession) -> Any:
    return await UserRepository.create(s, {"name": "Young", "age": -1})


VIOLATIONS: list[tuple[Write, type[IntegrityViolation], dict[str, dict[str, str | None]]]] = [
    (
        duplicate_name,
        UniqueViolation,
        {
            "sqlite": {"table": "users", "column": "name"},
            "postgresql": {"table": "users", "constraint": "users_name_key"},
        },
    ),
    (
        missing_author,
        ForeignKeyViolation,
        {"sqlite": {}, "postgresql": {"table": "books", "constraint": "books_author_id_fkey"}},
    ),
    (
        missing_title,
        NotNullViolation,
        {
            "sqlite": {"table": "books", "column": "title"},
            "postgresql": {"table": "books", "column": "title"},
        },
    ),
    (
        negative_age,
        CheckViolation,
        {
            "sqlite": {"constraint": "ck_users_age"},
            "postgresql": {"table": "users", "constraint": "ck_users_age"},
        },
    ),
]
IDS = ["unique", "foreign_key", "not_null", "check"]


@pytest.mark.parametrize(("write", "error", "names"), VIOLATIONS, ids=IDS)
async def test_violation_at_flush(
    session_factory: Factory,
    backend: str,
    write: Write,
    error: type[IntegrityViolation],
    names: dict[str, dict[str, str | None]],
) -> None:
    await seed_alice(session_factory)
    with pytest.raises(error) as info:
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "Bob"})
            await uow.flush()
            await write(uow.session)
            await uow.flush()
    assert_chained(info.value)
    for attr, value in names[backend].items():
        assert getattr(info.value, attr) == value, attr
        assert str(value) in str(info.value)
    assert await rows(session_factory, User) == 1
    assert await rows(session_factory, Book) == 0


@pytest.mark.parametrize(("write", "error", "names"), VIOLATIONS, ids=IDS)
async def test_violation_at_commit(
    session_factory: Factory,
    backend: str,
    write: Write,
    error: type[IntegrityViolation],
    names: dict[str, dict[str, str | None]],
) -> None:
    await seed_alice(session_factory)
    with pytest.raises(error) as info:
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "Bob"})
            await write(uow.session)
            # no flush: the violation surfaces when the block commits
    assert_chained(info.value)
    for attr, value in names[backend].items():
        assert getattr(info.value, attr) == value, attr
    assert await rows(session_factory, User) == 1
    assert await rows(session_factory, Book) == 0


async def test_deferred_foreign_key_fails_at_commit_itself(session_factory: Factory) -> None:
    with pytest.raises(ForeignKeyViolation) as info:
        async with UnitOfWork(session_factory) as uow:
            await MembershipRepository.create(uow.session, {"user_id": 999})
            await uow.flush()  # deferred: the flush is accepted
            await uow.commit()
    assert_chained(info.value)
    async with UnitOfWork(session_factory) as uow:
        assert await MembershipRepository.count(uow.session) == 0


async def test_bulk_insert_violation_is_mapped_and_writes_nothing(
    session_factory: Factory,
) -> None:
    await seed_alice(session_factory)
    with pytest.raises(UniqueViolation) as info:
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create_many(uow.session, [{"name": "Bob"}, {"name": "Alice"}])
    assert_chained(info.value)
    assert await rows(session_factory, User) == 1


async def test_update_where_violation_is_mapped(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(uow.session, [{"name": "a"}, {"name": "b"}])
    with pytest.raises(UniqueViolation):
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.update_where(uow.session, {"name": "b"}, {"name": "a"})
    with pytest.raises(CheckViolation):
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.update_where(uow.session, {}, {"age": -5})
    async with UnitOfWork(session_factory) as uow:
        stored = await UserRepository.list(uow.session, order_by="name")
    assert [(u.name, u.age) for u in stored] == [("a", None), ("b", None)]


async def test_swallowed_violation_does_not_let_the_block_commit(
    session_factory: Factory,
) -> None:
    await seed_alice(session_factory)
    with pytest.raises(TransactionError):
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "Bob"})
            await uow.flush()
            with pytest.raises(UniqueViolation):
                await duplicate_name(uow.session)
                await uow.flush()
            # the user ignored the error; the transaction is lost and must not commit
    assert await rows(session_factory, User) == 1


async def test_users_own_exception_propagates_unchanged(session_factory: Factory) -> None:
    class PaymentDeclined(Exception):
        pass

    boom = PaymentDeclined("card declined")
    with pytest.raises(PaymentDeclined) as info:
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "Bob"})
            await uow.flush()
            raise boom
    assert info.value is boom
    assert info.value.__cause__ is None
    assert await rows(session_factory, User) == 0


async def test_users_exception_inside_savepoint_propagates_unchanged(
    session_factory: Factory,
) -> None:
    boom = KeyError("nope")
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "kept"})
        with pytest.raises(KeyError) as info:
            async with uow.savepoint():
                await UserRepository.create(uow.session, {"name": "dropped"})
                raise boom
        assert info.value is boom
    async with UnitOfWork(session_factory) as uow:
        assert [u.name for u in await UserRepository.list(uow.session)] == ["kept"]


@pytest.mark.parametrize(
    "data",
    [
        {"name": "x" * 101},
        {"name": "ok", "position": "y" * 101},
        {"name": "ok", "age": 2**31},
        {"name": "ok", "age": -(2**31) - 1},
        {"name": "ok", "balance": decimal.Decimal("10000000000")},
        {"name": "ok", "balance": 10**10},
    ],
    ids=[
        "name_too_long",
        "position_too_long",
        "int_overflow",
        "int_underflow",
        "numeric",
        "int_numeric",
    ],
)
async def test_value_that_does_not_fit_is_rejected_on_both_databases(
    session_factory: Factory, data: dict[str, Any]
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(DataValidationError):
            await UserRepository.create(uow.session, data)
        with pytest.raises(DataValidationError):
            await UserRepository.create_many(uow.session, [data])
    assert await rows(session_factory, User) == 0


async def test_values_at_the_limits_are_stored(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(
            uow.session,
            {
                "name": "x" * 100,
                "age": 2**31 - 1,
                "balance": decimal.Decimal("9999999999.99"),
            },
        )
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"age": 2**31 - 1})
    assert user.balance == decimal.Decimal("9999999999.99")
