"""Hostile and random input: correct results or an AlchemiumError, never a driver error or SQL.

Two properties, on SQLite and PostgreSQL, driven by hypothesis:

* Valid random filters (nested ``_or``/``_and``/``_not`` groups over typed
  operators) return exactly the rows a Python evaluation of the same filter
  selects from a known data set.
* Arbitrary junk (unknown fields and operators, SQL fragments in keys and
  values, odd types, bad order_by and pagination values) either returns a list,
  or is rejected before any SQL is sent: the call raises a ``QueryError``,
  ``DataValidationError`` or ``RepositoryUsageError`` and no statement reached the
  driver (counted with SQLAlchemy's ``before_cursor_execute`` event), so it cannot
  be the database refusing it. A canary table survives, proving nothing was
  interpolated into SQL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import (
    AlchemiumError,
    DataValidationError,
    QueryError,
    RepositoryUsageError,
    UnitOfWork,
)
from tests.conftest import statements
from tests.models import UserRepository

ROWS: list[dict[str, Any]] = [
    {"name": f"user{i:02d}", "age": None if i % 5 == 0 else (i * 7) % 50, "position": p}
    for i, p in enumerate(["dev", "ops", None, "Lead", "DEV", "qa", None, "ops", "dev", "ceo"] * 2)
]

SQL_BITS = [
    "'; DROP TABLE canary; --",
    "name) OR 1=1 --",
    '" OR ""="',
    "%",
    "_",
    "\\",
    "name; DELETE FROM users",
    "1 UNION SELECT * FROM canary",
]


def _cmp(op: str, value: Any) -> Callable[[Any], bool]:
    def test(x: Any) -> bool:
        if op == "eq":
            return x is None if value is None else x == value
        if op == "ne":
            return x is not None if value is None else (x is None or x != value)
        if op == "in":
            return x is not None and x in value
        if op == "not_in":
            return x is None or x not in value
        if op == "is_null":
            return (x is None) == value
        if x is None:
            return False
        if op == "between":
            return bool(value[0] <= x <= value[1])
        if op == "startswith":
            return bool(x.startswith(value))
        if op == "endswith":
            return bool(x.endswith(value))
        if op == "contains":
            return value in x
        return {
            "lt": x < value,
            "lte": x <= value,
            "gt": x > value,
            "gte": x >= value,
        }[op]

    return test


ages = st.integers(min_value=-5, max_value=55)
age_leaf = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne", "lt", "lte", "gt", "gte"]), ages),
    st.tuples(st.sampled_from(["in", "not_in"]), st.lists(ages, max_size=4)),
    st.tuples(st.just("is_null"), st.booleans()),
    st.tuples(st.just("between"), st.tuples(ages, ages).map(sorted).map(list)),
).map(lambda t: ("age", *t))
text_values = st.sampled_from(
    ["dev", "DEV", "ops", "qa", "lead", "Lead", "ceo", "de", "E", "o", "", "user0", "1", "%", "_"]
)
text_leaf = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne", "startswith", "endswith", "contains"]), text_values),
    st.tuples(st.sampled_from(["in", "not_in"]), st.lists(text_values, max_size=3)),
    st.tuples(st.just("is_null"), st.booleans()),
).flatmap(lambda t: st.sampled_from(["name", "position"]).map(lambda f: (f, *t)))
leaf = st.one_of(age_leaf, text_leaf).map(lambda t: ({f"{t[0]}__{t[1]}": t[2]}, t))


def _evaluate(spec: Any, row: dict[str, Any]) -> bool:
    kind = spec[0]
    if kind == "leaf":
        field, op, value = spec[1]
        return _cmp(op, value)(row[field])
    if kind == "and":
        return all(_evaluate(s, row) for s in spec[1])
    if kind == "or":
        return any(_evaluate(s, row) for s in spec[1])
    return not _evaluate(spec[1], row)


def _filters() -> st.SearchStrategy[tuple[dict[str, Any], Any]]:
    base = leaf.map(lambda lt: (lt[0], ("leaf", lt[1])))

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        group = st.lists(children, min_size=1, max_size=3)
        return st.one_of(
            group.map(lambda cs: ({"_or": [c[0] for c in cs]}, ("or", [c[1] for c in cs]))),
            group.map(lambda cs: ({"_and": [c[0] for c in cs]}, ("and", [c[1] for c in cs]))),
            children.map(lambda c: ({"_not": c[0]}, ("not", c[1]))),
        )

    return st.recursive(base, extend, max_leaves=6)


@pytest.fixture
async def seeded(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    factory = async_sessionmaker(engine, expire_on_commit=False)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE canary (id INTEGER PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO canary (id) VALUES (42)"))
    async with UnitOfWork(factory) as uow:
        await UserRepository.create_many(uow.session, ROWS)
    return factory


_settings = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)


@_settings
@given(spec=_filters())
async def test_random_valid_filters_match_a_python_evaluation(
    seeded: async_sessionmaker[AsyncSession], spec: tuple[dict[str, Any], Any]
) -> None:
    filters, tree = spec
    expected = sorted(r["name"] for r in ROWS if _evaluate(tree, r))
    async with UnitOfWork(seeded) as uow:
        found = await UserRepository.list(uow.session, filters, order_by="name")
        count = await UserRepository.count(uow.session, filters)
    assert [u.name for u in found] == expected, filters
    assert count == len(expected)


junk_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(SQL_BITS),
    st.binary(max_size=5),
)
junk_value = st.recursive(
    junk_scalar,
    lambda c: st.one_of(
        st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=2)
    ),
    max_leaves=5,
)
junk_key = st.one_of(
    st.sampled_from(["name", "age", "position", "id", "status", "balance", "birthday"]).flatmap(
        lambda f: st.sampled_from(
            ["", "__eq", "__in", "__like", "__between", "__gt", "__nope"]
        ).map(lambda op: f + op)
    ),
    st.sampled_from(SQL_BITS),
    st.sampled_from(["_or", "_and", "_not", "_xor", "__", "author__name", "a__b__c"]),
    st.text(max_size=15),
)
junk_filters = st.dictionaries(junk_key, junk_value, max_size=3)
junk_order = st.one_of(
    st.none(),
    st.sampled_from(["name", "-age", "nope", *SQL_BITS]),
    st.integers(),
    st.lists(st.text(max_size=8), max_size=2),
)
junk_page = st.one_of(
    st.none(), st.integers(min_value=-3, max_value=5), st.text(max_size=3), st.floats()
)


# What rejects input before any SQL is sent; a database refusing it would have sent SQL.
REJECTED_BEFORE_SQL = (QueryError, DataValidationError, RepositoryUsageError)


async def answered_or_rejected_before_sql(engine: AsyncEngine, call: Awaitable[Any]) -> Any:
    """``await call``: its result, or None if it was rejected before sending any SQL."""
    with statements(engine) as sent:
        try:
            return await call
        except AlchemiumError as err:
            rejected = err
    what = f"{type(rejected).__name__}: {rejected}"
    assert isinstance(rejected, REJECTED_BEFORE_SQL), what
    assert sent == [], f"rejected after sending SQL ({what}): {sent}"
    return None


@_settings
@given(filters=junk_filters, order_by=junk_order, skip=junk_page, limit=junk_page)
# Always tried, then hypothesis explores: values of the wrong type for their column
# (a database would refuse them too, but only after receiving them), bad paging.
@example(filters={"age": "thirty"}, order_by=None, skip=None, limit=None)
@example(filters={"name__in": [1, 2]}, order_by=None, skip=None, limit=None)
@example(filters={"age__between": ["a", "z"]}, order_by="-age", skip=None, limit=None)
@example(filters={"position__gt": 3.5}, order_by=None, skip=None, limit=None)
@example(filters={}, order_by="nope; DROP TABLE canary", skip=-1, limit="10")
async def test_junk_input_is_rejected_before_any_sql_or_answered(
    engine: AsyncEngine,
    seeded: async_sessionmaker[AsyncSession],
    filters: Any,
    order_by: Any,
    skip: Any,
    limit: Any,
) -> None:
    async with UnitOfWork(seeded) as uow:
        listed = UserRepository.list(uow.session, filters, order_by, skip, limit)
        found = await answered_or_rejected_before_sql(engine, listed)
        assert found is None or isinstance(found, list)
        counted = await answered_or_rejected_before_sql(
            engine, UserRepository.count(uow.session, filters)
        )
        assert counted is None or counted >= 0
    async with seeded() as session:
        canary = (await session.execute(text("SELECT id FROM canary"))).scalar_one()
        users = (await session.execute(text("SELECT count(*) FROM users"))).scalar_one()
    assert canary == 42
    assert users == len(ROWS)
