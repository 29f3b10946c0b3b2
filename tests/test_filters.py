"""The filter language against real rows on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pytest
from sqlalchemy import func, or_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import (
    FieldNotFoundError,
    InvalidFilterError,
    RelationNotFoundError,
    UnitOfWork,
)
from tests.models import (
    AuthorRepository,
    Book,
    BookRepository,
    Status,
    TagRepository,
    User,
    UserRepository,
)

Factory = async_sessionmaker[AsyncSession]

PEOPLE: list[dict[str, Any]] = [
    {
        "name": "Alice",
        "age": 30,
        "position": "Engineer",
        "email": "alice@example.com",
        "balance": decimal.Decimal("10.00"),
        "birthday": dt.date(1990, 1, 1),
    },
    {
        "name": "bob",
        "age": 25,
        "position": "engineer",
        "balance": decimal.Decimal("0"),
        "status": Status.BLOCKED,
    },
    {
        "name": "Carol",
        "position": "Manager",
        "email": "carol@ex_ample.com",
        "balance": decimal.Decimal("100.50"),
        "birthday": dt.date(1985, 6, 15),
    },
    {"name": "dave%", "age": 40, "email": "dave@example.org", "birthday": dt.date(2000, 12, 31)},
    {
        "name": "Eve_x",
        "age": 35,
        "position": "Team Lead",
        "email": "eve@example.com",
        "balance": decimal.Decimal("5"),
    },
]


@pytest.fixture
async def people(session_factory: Factory) -> Factory:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(uow.session, PEOPLE)
    return session_factory


async def names(factory: Factory, filters: Any) -> list[str]:
    async with UnitOfWork(factory) as uow:
        found = await UserRepository.list(uow.session, filters, order_by="id")
        count = await UserRepository.count(uow.session, filters)
        exists = await UserRepository.exists(uow.session, filters)
    assert count == len(found)
    assert exists is bool(found)
    return [u.name for u in found]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"name": "Alice"}, ["Alice"]),
        ({"name__eq": "bob"}, ["bob"]),
        ({"age": None}, ["Carol"]),
        ({"age__eq": None}, ["Carol"]),
        # ne includes NULLs: "not 30" is true of an unknown age.
        ({"age__ne": 30}, ["bob", "Carol", "dave%", "Eve_x"]),
        ({"age__ne": None}, ["Alice", "bob", "dave%", "Eve_x"]),
        ({"age__lt": 30}, ["bob"]),
        ({"age__lte": 30}, ["Alice", "bob"]),
        ({"age__gt": 30}, ["dave%", "Eve_x"]),
        ({"age__gte": 35}, ["dave%", "Eve_x"]),
        ({"age__in": [25, 40, 99]}, ["bob", "dave%"]),
        ({"age__in": (25,)}, ["bob"]),
        ({"age__in": []}, []),
        ({"age__not_in": [25, 40]}, ["Alice", "Carol", "Eve_x"]),
        ({"age__not_in": []}, ["Alice", "bob", "Carol", "dave%", "Eve_x"]),
        ({"position__like": "%ngineer"}, ["Alice", "bob"]),
        ({"position__like": "Eng%"}, ["Alice"]),
        ({"position__like": "eng%"}, ["bob"]),
        ({"position__ilike": "ENG%"}, ["Alice", "bob"]),
        ({"name__like": "_ob"}, ["bob"]),
        ({"name__like": "dave\\%"}, ["dave%"]),
        ({"name__like": "Eve\\_x"}, ["Eve_x"]),
        ({"name__like": "Eve\\_"}, []),
        ({"name__like": "%*%"}, []),
        ({"name__like": "[A]%"}, []),
        ({"name__like": "%"}, ["Alice", "bob", "Carol", "dave%", "Eve_x"]),
        ({"name__ilike": "DAVE\\%"}, ["dave%"]),
        ({"_not": {"position__like": "%eer"}}, ["Carol", "dave%", "Eve_x"]),
        ({"email__is_null": True}, ["bob"]),
        ({"email__is_null": False}, ["Alice", "Carol", "dave%", "Eve_x"]),
        ({"age__between": [30, 35]}, ["Alice", "Eve_x"]),
        ({"age__between": (35, 30)}, []),
        ({"name__startswith": "A"}, ["Alice"]),
        ({"name__startswith": "a"}, []),
        ({"name__endswith": "%"}, ["dave%"]),
        ({"name__endswith": "_x"}, ["Eve_x"]),
        ({"name__endswith": "X"}, []),
        ({"email__contains": "_"}, ["Carol"]),
        ({"email__contains": "example"}, ["Alice", "dave%", "Eve_x"]),
        ({"position__contains": "eer"}, ["Alice", "bob"]),
        ({"position__contains": "Eng"}, ["Alice"]),
        ({"position__icontains": "ENG"}, ["Alice", "bob"]),
        ({"name__icontains": "%"}, ["dave%"]),
        ({"name__icontains": "E_"}, ["Eve_x"]),
        ({"balance__gt": decimal.Decimal("5")}, ["Alice", "Carol"]),
        ({"balance__gte": 5}, ["Alice", "Carol", "Eve_x"]),
        ({"birthday__lt": dt.date(1990, 1, 2)}, ["Alice", "Carol"]),
        ({"status": Status.BLOCKED}, ["bob"]),
        ({"status__ne": Status.BLOCKED}, ["Alice", "Carol", "dave%", "Eve_x"]),
        ({"status__in": [Status.BLOCKED]}, ["bob"]),
        ({"age__gt": 20, "position__is_null": False, "email__is_null": False}, ["Alice", "Eve_x"]),
        ({}, ["Alice", "bob", "Carol", "dave%", "Eve_x"]),
        (None, ["Alice", "bob", "Carol", "dave%", "Eve_x"]),
    ],
)
async def test_operator(people: Factory, filters: Any, expected: list[str]) -> None:
    assert await names(people, filters) == expected


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"_or": [{"age": 25}, {"name": "Carol"}]}, ["bob", "Carol"]),
        ({"_and": [{"age__gte": 30}, {"age__lte": 35}]}, ["Alice", "Eve_x"]),
        # _not is two-valued: rows whose comparison is unknown (NULL age) match the negation.
        ({"_not": {"age__gte": 30}}, ["bob", "Carol"]),
        ({"_not": {"age": 25, "position": "engineer"}}, ["Alice", "Carol", "dave%", "Eve_x"]),
        (
            {
                "_or": [
                    {"_and": [{"age__gt": 20}, {"age__lt": 30}]},
                    {"_not": {"age__is_null": False}},
                ]
            },
            ["bob", "Carol"],
        ),
        (
            {
                "email__is_null": False,
                "_or": [
                    {"name__startswith": "A"},
                    {"_and": [{"age__gt": 30}, {"_not": {"name": "Eve_x"}}]},
                ],
            },
            ["Alice", "dave%"],
        ),
        ({"_or": [{"age": 1}, {"age": 2}]}, []),
    ],
)
async def test_groups(people: Factory, filters: Any, expected: list[str]) -> None:
    assert await names(people, filters) == expected


@pytest.mark.parametrize(
    ("filters", "key"),
    [
        ({"_or": []}, "_or"),
        ({"_and": []}, "_and"),
        ({"_or": {"age": 1}}, "_or"),
        ({"_and": "age=1"}, "_and"),
        ({"_or": [{"age": 1}, {}]}, "_or"),
        ({"_or": [{"age": 1}, "x"]}, "_or"),
        ({"_not": []}, "_not"),
        ({"_not": {}}, "_not"),
        ({"_x": [{"age": 1}]}, "_x"),
        ({"_OR": [{"age": 1}]}, "_OR"),
        ({"_or": [{"_nope": {"age": 1}}]}, "_nope"),
    ],
)
async def test_malformed_group_raises_invalid_filter_naming_the_key(
    people: Factory, filters: Any, key: str
) -> None:
    async with UnitOfWork(people) as uow:
        with pytest.raises(InvalidFilterError) as info:
            await UserRepository.list(uow.session, filters)
    assert info.value.key == key
    assert info.value.model == "User"
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    ("filters", "error", "needle"),
    [
        ({"nope": 1}, FieldNotFoundError, "nope"),
        ({"nope__gt": 1}, FieldNotFoundError, "nope"),
        ({"age__foo": 1}, InvalidFilterError, "foo"),
        ({"age__gt__lt": 1}, InvalidFilterError, "gt"),
        ({"nope__name": 1}, RelationNotFoundError, "nope"),
        ({"age__in": 5}, InvalidFilterError, "list"),
        ({"age__in": "25"}, InvalidFilterError, "list"),
        ({"age__in": [1, None]}, InvalidFilterError, "None"),
        ({"age__between": [1]}, InvalidFilterError, "between"),
        ({"age__gt": "thirty"}, InvalidFilterError, "age__gt"),
        ({"age": "thirty"}, InvalidFilterError, "age"),
        ({"age__gt": None}, InvalidFilterError, "None"),
        ({"age__gt": [1, 2]}, InvalidFilterError, "single value"),
        ({"age__is_null": "yes"}, InvalidFilterError, "is_null"),
        ({"name__contains": 3}, InvalidFilterError, "string"),
        ({"age__contains": "3"}, InvalidFilterError, "text columns"),
        ({"name__like": "abc\\"}, InvalidFilterError, "backslash"),
        ({"name__ilike": "\\"}, InvalidFilterError, "backslash"),
        ({"status": "nonsense"}, InvalidFilterError, "status"),
        ({"": 1}, InvalidFilterError, "empty"),
        ({"__age": 1}, InvalidFilterError, "empty"),
        ({"age__": 1}, InvalidFilterError, "empty"),
        ("age = 1", InvalidFilterError, "dict"),
        (42, InvalidFilterError, "dict"),
    ],
)
async def test_bad_filter_raises_the_documented_error(
    people: Factory, filters: Any, error: type[Exception], needle: str
) -> None:
    async with UnitOfWork(people) as uow:
        with pytest.raises(error, match=needle) as info:
            await UserRepository.list(uow.session, filters)
        with pytest.raises(error):
            await UserRepository.count(uow.session, filters)
        with pytest.raises(error):
            await UserRepository.delete_where(uow.session, filters)
    assert "User" in str(info.value)
    assert await names(people, None) == [p["name"] for p in PEOPLE]


async def test_unknown_field_lists_the_valid_fields(people: Factory) -> None:
    async with UnitOfWork(people) as uow:
        with pytest.raises(FieldNotFoundError) as info:
            await UserRepository.list(uow.session, {"nmae": "Alice"})
    assert info.value.field == "nmae"
    assert "name" in info.value.valid
    assert "name" in str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "name; DROP TABLE users; --",
        "name = 'x' OR 1=1 --",
        "name) OR (1=1",
        "name__eq) OR (1=1",
        'name" OR "1"="1',
        "users.name",
        "id::text",
    ],
)
async def test_sql_in_filter_keys_is_rejected(people: Factory, key: str) -> None:
    async with UnitOfWork(people) as uow:
        with pytest.raises((FieldNotFoundError, InvalidFilterError, RelationNotFoundError)):
            await UserRepository.list(uow.session, {key: "x"})
        with pytest.raises((FieldNotFoundError, InvalidFilterError, RelationNotFoundError)):
            await UserRepository.delete_where(uow.session, {key: "x"})
    assert len(await names(people, None)) == len(PEOPLE)


@pytest.mark.parametrize(
    "value",
    ["x' OR '1'='1", "'; DROP TABLE users; --", "%", "_", "\\", "Alice' --", '") OR 1=1 --'],
)
async def test_sql_in_filter_values_is_data(people: Factory, value: str) -> None:
    assert await names(people, {"name": value}) == []
    assert await names(people, {"name__in": [value]}) == []
    assert await names(people, {"name__startswith": value}) == []
    async with UnitOfWork(people) as uow:
        await UserRepository.create(uow.session, {"name": value})
    assert await names(people, {"name": value}) == [value]
    assert await names(people, {"name__contains": value}) == (
        ["dave%", value] if value == "%" else ["Eve_x", value] if value == "_" else [value]
    )
    assert len(await names(people, None)) == len(PEOPLE) + 1


async def test_plain_sqlalchemy_expressions_are_accepted(people: Factory) -> None:
    assert await names(people, User.age > 30) == ["dave%", "Eve_x"]
    assert await names(people, [User.age > 20, {"position__is_null": False}]) == [
        "Alice",
        "bob",
        "Eve_x",
    ]
    assert await names(people, or_(func.lower(User.name) == "alice", User.age == 40)) == [
        "Alice",
        "dave%",
    ]
    assert await names(people, [{"_or": [{"age": 25}, {"age": 40}]}, User.email.is_(None)]) == [
        "bob"
    ]


# -- relationships ------------------------------------------------------------------------


@pytest.fixture
async def library(session_factory: Factory) -> Factory:
    """Ann wrote A1 (red, blue) and A2 (red); Bob wrote B1 (no tags); Cy wrote nothing."""
    async with UnitOfWork(session_factory) as uow:
        s = uow.session
        ann, bob, _cy = await AuthorRepository.create_many(
            s, [{"name": "Ann"}, {"name": "Bob"}, {"name": "Cy"}]
        )
        red, blue = await TagRepository.create_many(s, [{"label": "red"}, {"label": "blue"}])
        a1, a2, _b1 = await BookRepository.create_many(
            s,
            [
                {"title": "A1", "pages": 100, "author_id": ann.id},
                {"title": "A2", "pages": 200, "author_id": ann.id},
                {"title": "B1", "pages": 300, "author_id": bob.id},
            ],
        )
        secondary = Book.tags.property.secondary
        assert secondary is not None
        await s.execute(
            secondary.insert(),
            [
                {"book_id": a1.id, "tag_id": red.id},
                {"book_id": a1.id, "tag_id": blue.id},
                {"book_id": a2.id, "tag_id": red.id},
            ],
        )
    return session_factory


async def titles(factory: Factory, filters: Any, **kwargs: Any) -> list[str]:
    async with UnitOfWork(factory) as uow:
        found = await BookRepository.list(uow.session, filters, order_by="title", **kwargs)
        count = await BookRepository.count(uow.session, filters)
    assert count == len(found)
    return [b.title for b in found]


async def authors(factory: Factory, filters: Any, **kwargs: Any) -> list[str]:
    async with UnitOfWork(factory) as uow:
        found = await AuthorRepository.list(uow.session, filters, order_by="name", **kwargs)
        count = await AuthorRepository.count(uow.session, filters)
        page = await AuthorRepository.paginate(uow.session, filters, order_by="name", page_size=1)
    assert count == len(found)
    assert page.total == count
    return [a.name for a in found]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"author__name": "Ann"}, ["A1", "A2"]),
        ({"author__name__startswith": "B"}, ["B1"]),
        ({"tags__label": "red"}, ["A1", "A2"]),
        ({"tags__label__in": ["red", "blue"]}, ["A1", "A2"]),
        ({"tags__label": "blue", "author__name": "Ann"}, ["A1"]),
        ({"_not": {"tags__label": "red"}}, ["B1"]),
        ({"_or": [{"tags__label": "blue"}, {"author__name": "Bob"}]}, ["A1", "B1"]),
        ({"author__books__tags__label": "blue"}, ["A1", "A2"]),
    ],
)
async def test_filter_through_relationships(
    library: Factory, filters: Any, expected: list[str]
) -> None:
    assert await titles(library, filters) == expected


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        # Ann has three matching (book, tag) pairs but appears once and counts once.
        ({"books__tags__label__in": ["red", "blue"]}, ["Ann"]),
        ({"books__pages__gte": 100}, ["Ann", "Bob"]),
        ({"books__title__is_null": False}, ["Ann", "Bob"]),
        ({"_not": {"books__pages__gte": 0}}, ["Cy"]),
    ],
)
async def test_filter_through_collections_has_no_duplicate_parents(
    library: Factory, filters: Any, expected: list[str]
) -> None:
    assert await authors(library, filters) == expected


async def test_relationship_filter_with_limit_counts_parents(library: Factory) -> None:
    async with UnitOfWork(library) as uow:
        first = await AuthorRepository.list(
            uow.session, {"books__pages__gt": 0}, order_by="name", limit=2, joins=["books"]
        )
    assert [(a.name, len(a.books)) for a in first] == [("Ann", 2), ("Bob", 1)]


@pytest.mark.parametrize(
    ("filters", "error", "needle"),
    [
        ({"publisher__name": "x"}, RelationNotFoundError, "publisher"),
        ({"author__nope": "x"}, FieldNotFoundError, "nope"),
        ({"author": "Ann"}, InvalidFilterError, "relationship"),
        ({"tags__label__foo": "x"}, InvalidFilterError, "foo"),
        ({"tags__label__in": "red"}, InvalidFilterError, "list"),
    ],
)
async def test_bad_relationship_filter(
    library: Factory, filters: Any, error: type[Exception], needle: str
) -> None:
    async with UnitOfWork(library) as uow:
        with pytest.raises(error, match=needle):
            await BookRepository.list(uow.session, filters)


async def test_update_and_delete_where_through_relationships(library: Factory) -> None:
    async with UnitOfWork(library) as uow:
        assert (
            await BookRepository.update_where(uow.session, {"tags__label": "red"}, {"pages": 1})
            == 2
        )
        assert await BookRepository.delete_where(uow.session, {"author__name": "Bob"}) == 1
    assert await titles(library, {"pages": 1}) == ["A1", "A2"]
    assert await titles(library, None) == ["A1", "A2"]
