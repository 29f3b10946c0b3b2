"""Mistakes users make get an alchemium error saying what to do, the same on both databases.

Wrong objects where a session or a session factory belongs, lookups that one database
answers and the other refuses, and orderings keyset pagination cannot follow: each
raises a RepositoryUsageError / UnitOfWorkError / QueryError naming what was passed and
what to pass, before anything is sent to the database, never a raw AttributeError,
TypeError or driver error.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import create_engine, func
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from alchemium import (
    DataValidationError,
    OrderByFieldError,
    RepositoryUsageError,
    UnitOfWork,
    UnitOfWorkError,
)
from tests.models import User, UserRepository

Factory = async_sessionmaker[AsyncSession]


def wrong_objects(engine: AsyncEngine, factory: Factory) -> dict[str, tuple[Any, str]]:
    """What users pass instead of a session or a factory, and what the message must say."""
    sync_engine = create_engine("sqlite://")
    return {
        "unit of work": (UnitOfWork(factory), "uow.session"),
        "None": (None, "None"),
        "sync Session": (Session(sync_engine), "async_sessionmaker"),
        "AsyncEngine": (engine, "async_sessionmaker(engine)"),
        "sync sessionmaker": (sessionmaker(sync_engine), "async_sessionmaker"),
        "sync Engine": (sync_engine, "create_async_engine"),
    }


WRONG = ["unit of work", "None", "sync Session", "AsyncEngine", "sync sessionmaker", "sync Engine"]


@pytest.mark.parametrize("wrong", WRONG)
async def test_unit_of_work_refuses_what_is_not_a_session_factory(
    engine: AsyncEngine, session_factory: Factory, wrong: str, caplog: pytest.LogCaptureFixture
) -> None:
    value, advice = wrong_objects(engine, session_factory)[wrong]
    with caplog.at_level(logging.DEBUG), pytest.raises(UnitOfWorkError) as info:
        async with UnitOfWork(value):
            pass
    message = str(info.value)
    assert "expects a session factory" in message
    assert advice in message
    assert info.value.__cause__ is None
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks logged


async def test_unit_of_work_refuses_a_session_in_place_of_its_factory(
    session_factory: Factory,
) -> None:
    async with session_factory() as session:
        with pytest.raises(UnitOfWorkError, match="async_sessionmaker the session came from"):
            UnitOfWork(session)  # type: ignore[arg-type]


async def test_a_factory_returning_something_else_is_refused_when_the_block_starts(
    session_factory: Factory,
) -> None:
    sync_factory = sessionmaker(create_engine("sqlite://"))
    with pytest.raises(UnitOfWorkError, match="returned a Session, not an AsyncSession"):
        async with UnitOfWork(lambda: sync_factory()):  # type: ignore[arg-type, return-value]
            pass


@pytest.mark.parametrize("wrong", [*WRONG, "session factory"])
@pytest.mark.parametrize(
    "call",
    [
        lambda s: UserRepository.create(s, {"name": "a"}),
        lambda s: UserRepository.get(s, 1),
        lambda s: UserRepository.list(s),
        lambda s: UserRepository.count(s),
        lambda s: UserRepository.update_where(s, {"name": "a"}, {"age": 1}),
        lambda s: UserRepository.delete_where(s, {"name": "a"}),
        lambda s: UserRepository.keyset(s),
    ],
    ids=["create", "get", "list", "count", "update_where", "delete_where", "keyset"],
)
async def test_repositories_refuse_what_is_not_a_session(
    engine: AsyncEngine, session_factory: Factory, wrong: str, call: Any
) -> None:
    value, advice = (
        (session_factory, "async with UnitOfWork(factory)")
        if wrong == "session factory"
        else wrong_objects(engine, session_factory)[wrong]
    )
    with pytest.raises(RepositoryUsageError) as info:
        await call(value)
    message = str(info.value)
    assert message.startswith("UserRepository.")
    assert "expects an AsyncSession" in message
    assert advice in message


async def test_get_with_a_key_of_the_wrong_type_raises_the_same_error_everywhere(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "ann"})
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(DataValidationError, match=r"User\.id: primary key 'abc' is a str"):
            await UserRepository.get(uow.session, "abc")
        with pytest.raises(DataValidationError, match="cannot be None"):
            await UserRepository.get(uow.session, None)


async def test_get_with_a_dict_of_other_columns_says_to_use_get_one(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(RepositoryUsageError, match=r"primary key \(id\).*get_one"):
            await UserRepository.get(uow.session, {"name": "ann"})
        with pytest.raises(RepositoryUsageError, match="1 column"):
            await UserRepository.get(uow.session, (1, 2))
        assert await UserRepository.get(uow.session, {"id": 1}) is None


async def test_keyset_orders_by_model_columns_as_by_their_names(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(uow.session, [{"name": f"u{i}"} for i in range(5)])
    async with UnitOfWork(session_factory) as uow:
        by_name = await UserRepository.keyset(uow.session, order_by="-name", limit=2)
        by_column = await UserRepository.keyset(uow.session, order_by=User.name.desc(), limit=2)
        assert [u.name for u in by_column.items] == [u.name for u in by_name.items]
        assert by_column.next_cursor == by_name.next_cursor
        rest = await UserRepository.keyset(
            uow.session, order_by=[User.name.desc()], after=by_column.next_cursor, limit=5
        )
        assert [u.name for u in rest.items] == ["u2", "u1", "u0"]
        ascending = await UserRepository.keyset(uow.session, order_by=User.name, limit=1)
        assert [u.name for u in ascending.items] == ["u0"]


async def test_keyset_refuses_expressions_it_cannot_make_a_cursor_of(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(OrderByFieldError, match="cannot order User"):
            await UserRepository.keyset(uow.session, order_by=func.lower(User.name))
        with pytest.raises(OrderByFieldError, match="salary"):
            await UserRepository.keyset(uow.session, order_by="-salary")
