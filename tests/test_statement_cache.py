"""The statement cache of get_one()/list() returns what the uncached build returns."""

from __future__ import annotations

import decimal
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import alchemium.repository as repository
from alchemium import InvalidFilterError, UnitOfWork
from tests.models import UserRepository

Factory = async_sessionmaker[AsyncSession]

PEOPLE: list[dict[str, Any]] = [
    {"name": f"user{i}", "age": i % 7 if i % 5 else None, "position": f"p{i % 3}"}
    for i in range(40)
]

SHAPES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    # (first call, second call with the same shape and other values)
    ({"name": "user3"}, {"name": "user4"}),
    ({"age__gte": 3, "position": "p1"}, {"age__gte": 5, "position": "p2"}),
    ({"age__in": [1, 2]}, {"age__in": (3, 4, 5)}),
    ({"age__not_in": [1]}, {"age__not_in": [2, 3]}),
    ({"age__ne": 2, "position__lt": "p2"}, {"age__ne": 4, "position__lt": "p1"}),
    ({"age": 2}, {"age": None}),  # None: same keys, built uncached
    ({"age__in": [1]}, {"age__in": []}),  # empty list: uncached
    ({"balance__gt": decimal.Decimal("1")}, {"balance__gt": 1}),  # int for Numeric: uncached
]


@pytest.fixture
async def people(session_factory: Factory) -> Factory:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(uow.session, PEOPLE)
    return session_factory


async def _read(factory: Factory, filters: dict[str, Any]) -> list[Any]:
    async with UnitOfWork(factory) as uow:
        page = await UserRepository.list(
            uow.session, filters, order_by=["-age", "name"], skip=1, limit=5
        )
        everything = await UserRepository.list(uow.session, filters, order_by="id")
        one = await UserRepository.get_one(uow.session, filters, order_by="id")
    return [[u.id for u in page], [u.id for u in everything], one.id if one else None]


@pytest.mark.parametrize(("first", "second"), SHAPES)
async def test_cached_statements_match_uncached(
    people: Factory, first: dict[str, Any], second: dict[str, Any], monkeypatch: Any
) -> None:
    cached = [await _read(people, first), await _read(people, second)]
    monkeypatch.setattr(repository, "cached_select", lambda *a, **k: None)
    assert cached == [await _read(people, first), await _read(people, second)]


async def test_a_cache_hit_still_validates_values(people: Factory) -> None:
    async with UnitOfWork(people) as uow:
        await UserRepository.list(uow.session, {"age__gte": 1}, limit=2)
        with pytest.raises(InvalidFilterError):
            await UserRepository.list(uow.session, {"age__gte": "one"}, limit=2)
        with pytest.raises(InvalidFilterError):
            await UserRepository.list(uow.session, {"age__gte": 2**40}, limit=2)
        with pytest.raises(InvalidFilterError):
            await UserRepository.list(uow.session, {"age__in": "12"}, limit=2)
        with pytest.raises(Exception, match="limit"):
            await UserRepository.list(uow.session, {"age__gte": 1}, limit=-1)
