"""Database errors map to the same alchemium exceptions on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import decimal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemium import (
    AlchemiumError,
    CheckViolation,
    CommitOutcomeUnknownError,
    CrudRepository,
    DatabaseProgrammingError,
    DataValidationError,
    DeadlockDetected,
    ForeignKeyViolation,
    IntegrityViolation,
    NotNullViolation,
    SerializationFailure,
    TransactionError,
    UniqueViolation,
    UnitOfWork,
    run_in_transaction,
)
from tests.conftest import make_engine
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


# -- bugs are not outages: the class of an error says whether to retry ------------------------


class Ghost(DeclarativeBase):
    """Tables that exist in the code but not in the database (migrations not run)."""


class Phantom(Ghost):
    __tablename__ = "phantoms"
    id: Mapped[int] = mapped_column(primary_key=True)


class UserWithNickname(Ghost):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    nickname: Mapped[str | None] = mapped_column(String(100))


class PhantomRepository(CrudRepository[Phantom]):
    model = Phantom


class NicknameRepository(CrudRepository[UserWithNickname]):
    model = UserWithNickname


async def missing_table(s: AsyncSession) -> Any:
    return await PhantomRepository.create(s, {"id": 1})


async def missing_column(s: AsyncSession) -> Any:
    return await NicknameRepository.create(s, {"name": "Nick", "nickname": "n"})


async def conflict_target_without_unique_constraint(s: AsyncSession) -> Any:
    return await UserRepository.upsert(s, {"name": "Bob", "position": "x"}, conflict=["position"])


async def bad_sql(s: AsyncSession) -> Any:
    return await s.execute(text("SELEC name FROM users"))


@pytest.mark.parametrize(
    "write",
    [missing_table, missing_column, conflict_target_without_unique_constraint, bad_sql],
    ids=["missing_table", "missing_column", "on_conflict_without_unique_constraint", "bad_sql"],
)
async def test_a_statement_the_database_refuses_is_a_programming_error_never_retried(
    session_factory: Factory, write: Write
) -> None:
    attempts = 0

    async def work(uow: UnitOfWork) -> None:
        nonlocal attempts
        attempts += 1
        await write(uow.session)

    with pytest.raises(DatabaseProgrammingError) as info:
        await run_in_transaction(session_factory, work, attempts=5)
    assert attempts == 1
    assert info.value.transient is False
    assert not isinstance(info.value, TransactionError)
    assert_chained(info.value)


def test_transient_is_documented_on_every_error_class() -> None:
    assert SerializationFailure("x").transient
    assert DeadlockDetected("x").transient
    assert TransactionError("connection lost").transient
    assert not TransactionError("unknown", transient=False).transient
    assert not CommitOutcomeUnknownError("x").transient
    for cls in (DataValidationError, UniqueViolation, DatabaseProgrammingError):
        assert cls.transient is False
    assert AlchemiumError.transient is False


async def test_a_lost_connection_before_commit_is_retried(
    session_factory: Factory, engine: AsyncEngine, backend: str, tmp_path: Path
) -> None:
    """The first attempt loses its connection (PostgreSQL) or finds the database busy (SQLite)."""
    attempts = 0
    if backend == "postgresql":

        async def break_first_attempt(uow: UnitOfWork) -> None:
            pid = await uow.session.scalar(text("SELECT pg_backend_pid()"))
            async with engine.connect() as other:
                await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await UserRepository.count(uow.session)

        factory = session_factory
    else:
        # A second connection holds SQLite's write lock; the unit of work waits 50 ms at most.
        busy = make_engine(str(engine.url), connect_args={"timeout": 0.05})
        factory = async_sessionmaker(busy, expire_on_commit=False)
        holder = await engine.connect()

        async def break_first_attempt(uow: UnitOfWork) -> None:
            await holder.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                await UserRepository.create(uow.session, {"name": "Busy"})
                await uow.flush()
            finally:
                await holder.rollback()

    async def work(uow: UnitOfWork) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await break_first_attempt(uow)
        await UserRepository.create(uow.session, {"name": "Retried"})

    try:
        await run_in_transaction(factory, work, attempts=3, backoff=0.01)
    finally:
        if backend != "postgresql":
            await holder.close()
            await busy.dispose()
    assert attempts == 2
    async with UnitOfWork(session_factory) as uow:
        names = [u.name for u in await UserRepository.list(uow.session)]
    assert names == ["Retried"]


async def test_a_connection_lost_during_commit_is_an_unknown_outcome_never_retried(
    session_factory: Factory, engine: AsyncEngine, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("needs a COMMIT that waits on the server (a deferred trigger) to kill it")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON users "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
            )
        )
    attempts = 0

    async def work(uow: UnitOfWork) -> None:
        nonlocal attempts
        attempts += 1
        pid = await uow.session.scalar(text("SELECT pg_backend_pid()"))

        async def kill_during_commit() -> None:
            async with engine.connect() as other:
                for _ in range(100):  # until the backend sits in the deferred trigger
                    waiting = await other.scalar(
                        text("SELECT wait_event FROM pg_stat_activity WHERE pid = :pid"),
                        {"pid": pid},
                    )
                    if waiting == "PgSleep":
                        break
                    await asyncio.sleep(0.05)
                await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        uow.session.info["killer"] = asyncio.create_task(kill_during_commit())
        await UserRepository.create(uow.session, {"name": "Maybe"})

    with pytest.raises(CommitOutcomeUnknownError) as info:
        await run_in_transaction(session_factory, work, attempts=5)
    assert attempts == 1
    assert info.value.transient is False
    assert "may or may not have committed" in str(info.value)
