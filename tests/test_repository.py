"""CrudRepository on SQLite and PostgreSQL: every method, and bad input rejected before I/O."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import (
    CrudRepository,
    DataValidationError,
    FieldNotFoundError,
    MultipleResultsError,
    NotFoundError,
    OrderByFieldError,
    PaginationParameterError,
    RelationNotFoundError,
    RepositoryUsageError,
    UnitOfWork,
)
from alchemium.events import disable_outbox
from tests.conftest import statements
from tests.models import (
    AttachmentRepository,
    AuthorRepository,
    Book,
    BookRepository,
    DocumentRepository,
    Status,
    Tag,
    TagRepository,
    User,
    UserRepository,
)

Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
def session_factory(engine: AsyncEngine, expire_on_commit: bool) -> Factory:
    """Every repository test runs with SQLAlchemy's default ``expire_on_commit=True`` too."""
    return async_sessionmaker(engine, expire_on_commit=expire_on_commit)


async def user_count(factory: Factory) -> int:
    async with factory() as session:
        return int((await session.execute(select(func.count()).select_from(User))).scalar_one())


async def seed_users(factory: Factory, n: int = 5) -> None:
    async with UnitOfWork(factory) as uow:
        await UserRepository.create_many(
            uow.session,
            [
                {"name": f"user{i}", "age": 20 + i, "position": "eng" if i % 2 else "ops"}
                for i in range(n)
            ],
        )


async def seed_library(factory: Factory) -> None:
    """Two authors; Ann wrote two tagged books, Bob one untagged book."""
    async with UnitOfWork(factory) as uow:
        s = uow.session
        ann = await AuthorRepository.create(s, {"name": "Ann"})
        bob = await AuthorRepository.create(s, {"name": "Bob"})
        red = await TagRepository.create(s, {"label": "red"})
        blue = await TagRepository.create(s, {"label": "blue"})
        await uow.flush()
        b1 = await BookRepository.create(s, {"title": "A1", "pages": 100, "author_id": ann.id})
        b2 = await BookRepository.create(s, {"title": "A2", "pages": 200, "author_id": ann.id})
        await BookRepository.create(s, {"title": "B1", "pages": 300, "author_id": bob.id})
        await uow.flush()
        # lazy="raise" everywhere, so populate the association table explicitly.
        await s.execute(
            Book.tags.property.secondary.insert(),  # type: ignore[union-attr]
            [
                {"book_id": b1.id, "tag_id": red.id},
                {"book_id": b1.id, "tag_id": blue.id},
                {"book_id": b2.id, "tag_id": red.id},
            ],
        )


# -- create -------------------------------------------------------------------------------


async def test_create_inserts_at_flush_and_gets_an_id(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice", "age": 30})
        assert user.id is None
        await uow.flush()
        assert isinstance(user.id, int)
        user_id = user.id
    async with UnitOfWork(session_factory) as uow:
        again = await UserRepository.get(uow.session, user_id)
        assert again is not None
        assert (again.name, again.age, again.status) == ("Alice", 30, Status.ACTIVE)


async def test_create_many_returns_objects_with_primary_keys(session_factory: Factory) -> None:
    rows = [{"name": f"u{i}", "age": i} for i in range(7)]
    async with UnitOfWork(session_factory) as uow:
        users = await UserRepository.create_many(uow.session, rows)
        assert [u.name for u in users] == [r["name"] for r in rows]
        ids = [u.id for u in users]
        assert all(isinstance(i, int) for i in ids)
        assert len(set(ids)) == 7
        created = [(u.id, u.name) for u in users]
    async with UnitOfWork(session_factory) as uow:
        stored = await UserRepository.list(uow.session, order_by="id")
        assert [(u.id, u.name) for u in stored] == created


async def test_create_many_of_many_rows_keeps_input_order_across_batches(
    session_factory: Factory,
) -> None:
    """Several INSERT batches; on SQLite RETURNING's order is not relied upon."""
    rows = [{"name": f"user{i:05}", "age": i % 97} for i in range(2500)]
    async with UnitOfWork(session_factory) as uow:
        users = await UserRepository.create_many(uow.session, rows)
        assert [(u.name, u.age) for u in users] == [(r["name"], r["age"]) for r in rows]
        assert [u.id for u in users] == sorted(u.id for u in users)


async def test_create_many_with_given_keys_in_any_order(session_factory: Factory) -> None:
    rows = [{"id": i, "name": f"k{i}"} for i in (905, 12, 433, 7)]
    async with UnitOfWork(session_factory) as uow:
        users = await UserRepository.create_many(uow.session, rows)
        assert [(u.id, u.name) for u in users] == [(r["id"], r["name"]) for r in rows]


async def test_create_many_objects_are_the_sessions_own_and_track_changes(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        first, second = await UserRepository.create_many(
            uow.session, [{"name": "a"}, {"name": "b", "age": 5}]
        )
        assert first in uow.session
        assert await UserRepository.get(uow.session, first.id) is first  # no second copy
        assert first.status is Status.ACTIVE  # the column default, as the database stored it
        assert second.position is None  # every column is loaded: no lazy load in async code
        UserRepository.update(second, {"age": 6})
    async with UnitOfWork(session_factory) as uow:
        assert (await UserRepository.get_one_or_raise(uow.session, {"name": "b"})).age == 6


async def test_create_many_of_a_versioned_model_goes_through_the_orm(
    session_factory: Factory,
) -> None:
    """The ORM sets the first version; a plain INSERT would leave it NULL."""
    async with UnitOfWork(session_factory) as uow:
        docs = await DocumentRepository.create_many(uow.session, [{"title": "a"}, {"title": "b"}])
        assert [d.version for d in docs] == [1, 1]


async def test_create_many_with_no_rows_does_nothing(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        assert await UserRepository.create_many(uow.session, []) == []
    assert await user_count(session_factory) == 0


async def test_upsert_inserts_then_updates(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        first = await UserRepository.upsert(
            uow.session, {"name": "Alice", "position": "Eng"}, conflict=["name"]
        )
        assert first.id is not None
        first_id = first.id
    async with UnitOfWork(session_factory) as uow:
        second = await UserRepository.upsert(
            uow.session, {"name": "Alice", "position": "Lead"}, conflict=["name"]
        )
        assert second.id == first_id
        assert second.position == "Lead"
    async with UnitOfWork(session_factory) as uow:
        stored = await UserRepository.list(uow.session)
        assert [(u.id, u.name, u.position) for u in stored] == [(first_id, "Alice", "Lead")]


async def test_upsert_refreshes_an_object_already_in_the_session(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        alice = await UserRepository.create(uow.session, {"name": "Alice", "position": "Eng"})
        await uow.flush()
        again = await UserRepository.upsert(
            uow.session, {"name": "Alice", "position": "Lead"}, conflict=["name"]
        )
        assert again is alice
        assert alice.position == "Lead"


async def test_upsert_many_mixes_inserts_and_updates(session_factory: Factory) -> None:
    await seed_users(session_factory, 2)
    async with UnitOfWork(session_factory) as uow:
        result = await UserRepository.upsert_many(
            uow.session,
            [{"name": "user0", "age": 99}, {"name": "new", "age": 1}],
            conflict=["name"],
        )
        assert [(u.name, u.age) for u in result] == [("user0", 99), ("new", 1)]
    async with UnitOfWork(session_factory) as uow:
        stored = await UserRepository.list(uow.session, order_by="name")
        assert [(u.name, u.age) for u in stored] == [("new", 1), ("user0", 99), ("user1", 21)]


async def test_upsert_with_unknown_conflict_column_is_rejected(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(FieldNotFoundError, match="nope"):
            await UserRepository.upsert(uow.session, {"name": "A"}, conflict=["nope"])
    assert await user_count(session_factory) == 0


# -- read ---------------------------------------------------------------------------------


async def test_get_by_primary_key_or_none(session_factory: Factory) -> None:
    await seed_users(session_factory, 2)
    async with UnitOfWork(session_factory) as uow:
        first = await UserRepository.first(uow.session, order_by="id")
        assert first is not None
        assert await UserRepository.get(uow.session, first.id) is first
        assert await UserRepository.get(uow.session, 10_000) is None


async def test_get_one_returns_match_or_none(session_factory: Factory) -> None:
    await seed_users(session_factory, 3)
    async with UnitOfWork(session_factory) as uow:
        found = await UserRepository.get_one(uow.session, {"name": "user1"})
        assert found is not None
        assert found.age == 21
        assert await UserRepository.get_one(uow.session, {"name": "nobody"}) is None


async def test_get_one_strict_raises_on_several_matches(session_factory: Factory) -> None:
    await seed_users(session_factory, 4)
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(MultipleResultsError, match="User"):
            await UserRepository.get_one(uow.session, {"position": "eng"}, strict=True)
        one = await UserRepository.get_one(uow.session, {"name": "user2"}, strict=True)
        assert one is not None
        assert one.name == "user2"


async def test_get_one_or_raise_names_model_and_filters(session_factory: Factory) -> None:
    await seed_users(session_factory, 1)
    async with UnitOfWork(session_factory) as uow:
        found = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
        assert found.name == "user0"
        with pytest.raises(NotFoundError) as info:
            await UserRepository.get_one_or_raise(uow.session, {"name": "ghost"})
    assert info.value.model == "User"
    assert info.value.criteria == {"name": "ghost"}
    assert "User" in str(info.value)
    assert "ghost" in str(info.value)


async def test_list_filters_orders_skips_and_limits(session_factory: Factory) -> None:
    await seed_users(session_factory, 6)
    async with UnitOfWork(session_factory) as uow:
        s = uow.session
        everyone = await UserRepository.list(s, order_by="name")
        assert [u.name for u in everyone] == [f"user{i}" for i in range(6)]
        desc = await UserRepository.list(s, order_by="-age")
        assert [u.age for u in desc] == [25, 24, 23, 22, 21, 20]
        engs = await UserRepository.list(s, filters={"position": "eng"}, order_by=["-age"])
        assert [u.name for u in engs] == ["user5", "user3", "user1"]
        window = await UserRepository.list(s, order_by="age", skip=2, limit=3)
        assert [u.age for u in window] == [22, 23, 24]
        assert await UserRepository.list(s, order_by="age", limit=0) == []
        multi = await UserRepository.list(s, order_by=["position", "-age"])
        assert [u.name for u in multi] == ["user5", "user3", "user1", "user4", "user2", "user0"]
        expr = await UserRepository.list(s, order_by=User.age.desc(), limit=1)
        assert [u.age for u in expr] == [25]


async def test_list_joins_eager_load_relationships(session_factory: Factory) -> None:
    await seed_library(session_factory)
    async with UnitOfWork(session_factory) as uow:
        books = await BookRepository.list(
            uow.session, order_by="title", joins=["author", "tags"], limit=2
        )
        assert [(b.title, b.author.name) for b in books] == [("A1", "Ann"), ("A2", "Ann")]
        assert sorted(t.label for t in books[0].tags) == ["blue", "red"]
        authors = await AuthorRepository.list(uow.session, order_by="name", joins=["books.tags"])
        assert [len(a.books) for a in authors] == [2, 1]
        assert sorted(t.label for b in authors[0].books for t in b.tags) == ["blue", "red", "red"]


async def test_unloaded_relationship_raises_instead_of_lazy_loading(
    session_factory: Factory,
) -> None:
    await seed_library(session_factory)
    async with UnitOfWork(session_factory) as uow:
        book = await BookRepository.first(uow.session, order_by="title")
        assert book is not None
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            _ = book.author
        loaded = await BookRepository.get_one(uow.session, {"title": "A1"}, joins=["author"])
        assert loaded is not None
        assert loaded.author.name == "Ann"


async def test_unknown_join_is_rejected(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(RelationNotFoundError, match="publisher"):
            await BookRepository.list(uow.session, joins=["publisher"])


async def test_first_count_and_exists(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        assert await UserRepository.first(uow.session) is None
        assert await UserRepository.count(uow.session) == 0
        assert await UserRepository.exists(uow.session) is False
    await seed_users(session_factory, 5)
    async with UnitOfWork(session_factory) as uow:
        s = uow.session
        oldest = await UserRepository.first(s, order_by="-age")
        assert oldest is not None
        assert oldest.name == "user4"
        assert await UserRepository.count(s) == 5
        assert await UserRepository.count(s, {"position": "ops"}) == 3
        assert await UserRepository.exists(s, {"age__gt": 23}) is True
        assert await UserRepository.exists(s, {"age__gt": 99}) is False


async def test_paginate_returns_items_and_total(session_factory: Factory) -> None:
    await seed_users(session_factory, 7)
    async with UnitOfWork(session_factory) as uow:
        page = await UserRepository.paginate(uow.session, order_by="age", page=2, page_size=3)
        assert [u.age for u in page.items] == [23, 24, 25]
        assert (page.total, page.page, page.page_size, page.pages) == (7, 2, 3, 3)
        last = await UserRepository.paginate(uow.session, order_by="age", page=3, page_size=3)
        assert [u.age for u in last.items] == [26]
        filtered = await UserRepository.paginate(
            uow.session, {"position": "eng"}, order_by="age", page_size=2
        )
        assert [u.age for u in filtered.items] == [21, 23]
        assert filtered.total == 3
        uncounted = await UserRepository.paginate(
            uow.session, order_by="age", page_size=2, with_count=False
        )
        assert [u.age for u in uncounted.items] == [20, 21]
        assert uncounted.total is None
        assert uncounted.pages is None


async def test_keyset_pagination_walks_every_row_once(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        # Duplicate ages so the primary-key tie-breaker matters.
        await UserRepository.create_many(
            uow.session, [{"name": f"k{i:02}", "age": i // 3} for i in range(11)]
        )
    for order, expected_key in (
        ("age", lambda u: (u[1], u[0])),
        ("-age", lambda u: (-u[1], u[0])),
    ):
        seen: list[tuple[int, int]] = []  # (id, age), read inside the unit of work
        cursor = None
        pages = 0
        while True:
            async with UnitOfWork(session_factory) as uow:
                page = await UserRepository.keyset(
                    uow.session, order_by=order, after=cursor, limit=4
                )
                seen.extend((u.id, u.age) for u in page.items)
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert pages == 3
        assert len(seen) == 11
        assert len({u[0] for u in seen}) == 11
        assert seen == sorted(seen, key=expected_key)


async def test_keyset_with_filters_and_datetime_key(session_factory: Factory) -> None:
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(
            uow.session,
            [
                {"name": f"d{i}", "created_at": base + dt.timedelta(hours=i), "age": i % 2}
                for i in range(6)
            ],
        )
    names: list[str] = []
    cursor = None
    while True:
        async with UnitOfWork(session_factory) as uow:
            page = await UserRepository.keyset(
                uow.session, {"age": 0}, order_by="-created_at", after=cursor, limit=2
            )
            names += [u.name for u in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert names == ["d4", "d2", "d0"]


async def test_keyset_over_enum_and_binary_keys(session_factory: Factory) -> None:
    # A cursor holds each key in its JSON form (an enum's value, bytes in base64) and is
    # decoded by the column's type.
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(
            uow.session,
            [{"name": f"e{i}", "status": [Status.ACTIVE, Status.BLOCKED][i % 2]} for i in range(4)],
        )
        await AttachmentRepository.create_many(
            uow.session, [{"data": bytes([i])} for i in (3, 1, 2)]
        )
    for repository, key in ((UserRepository, "status"), (AttachmentRepository, "data")):
        seen: list[Any] = []
        cursor = None
        while True:
            async with UnitOfWork(session_factory) as uow:
                page = await repository.keyset(uow.session, order_by=key, after=cursor, limit=1)
                seen += [getattr(row, key) for row in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert len(seen) == (4 if key == "status" else 3)
        assert seen == sorted(seen, key=lambda v: v.name if isinstance(v, Status) else v)


async def test_keyset_rejects_a_forged_cursor(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(PaginationParameterError, match="after"):
            await UserRepository.keyset(uow.session, after="not-a-cursor")
        with pytest.raises(OrderByFieldError):
            await UserRepository.keyset(uow.session, order_by="nope")


# -- update -------------------------------------------------------------------------------


async def test_update_sets_attributes_written_at_commit(session_factory: Factory) -> None:
    await seed_users(session_factory, 1)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
        returned = UserRepository.update(obj=user, data={"position": "lead", "age": 41})
        assert returned is user
    async with UnitOfWork(session_factory) as uow:
        again = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
        assert (again.position, again.age) == ("lead", 41)


async def test_update_rejects_unknown_key_and_wrong_type(session_factory: Factory) -> None:
    await seed_users(session_factory, 1)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
        with pytest.raises(FieldNotFoundError, match="salary"):
            UserRepository.update(obj=user, data={"position": "boss", "salary": 1})
        with pytest.raises(DataValidationError, match="age"):
            UserRepository.update(obj=user, data={"age": "old"})
        assert user.position == "ops"
        assert user.age == 20


async def test_update_where_returns_row_count(session_factory: Factory) -> None:
    await seed_users(session_factory, 5)
    async with UnitOfWork(session_factory) as uow:
        assert await UserRepository.update_where(uow.session, {"position": "eng"}, {"age": 0}) == 2
        assert await UserRepository.update_where(uow.session, {"name": "x"}, {"age": 1}) == 0
    async with UnitOfWork(session_factory) as uow:
        assert await UserRepository.count(uow.session, {"age": 0}) == 2
        assert await UserRepository.count(uow.session, {"position": "eng", "age": 0}) == 2


async def test_update_where_refreshes_loaded_objects(session_factory: Factory) -> None:
    await seed_users(session_factory, 2)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user1"})
        await UserRepository.update_where(uow.session, {"name": "user1"}, {"age": 77})
        assert user.age == 77


async def test_delete_where_takes_loaded_objects_out_of_the_session(
    session_factory: Factory,
) -> None:
    await seed_users(session_factory, 2)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user1"})
        await UserRepository.delete_where(uow.session, {"name": "user1"})
        assert inspect(user).was_deleted
        assert user not in uow.session


async def test_bulk_writes_return_no_keys_when_the_session_holds_none_to_update(
    engine: AsyncEngine, session_factory: Factory
) -> None:
    """With no loaded object to keep in step, a bulk write is one plain statement (as Core's).

    No outbox, so nothing wants the rows' change events (which need RETURNING).
    """
    disable_outbox()
    await seed_users(session_factory, 3)
    with statements(engine) as sent:
        async with UnitOfWork(session_factory) as uow:
            assert await UserRepository.update_where(uow.session, {"age__gte": 0}, {"age": 9}) == 3
            assert await UserRepository.delete_where(uow.session, {"age": 9}) == 3
    writes = [s for s in sent if s.lstrip().startswith(("UPDATE", "DELETE"))]
    assert len(writes) == 2
    assert not any("RETURNING" in s for s in writes)


# -- delete -------------------------------------------------------------------------------


async def test_delete_object_loaded_in_an_earlier_closed_unit_of_work(
    session_factory: Factory,
) -> None:
    await seed_users(session_factory, 2)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.delete(uow.session, user)
    async with UnitOfWork(session_factory) as uow:
        assert [u.name for u in await UserRepository.list(uow.session)] == ["user1"]


async def test_delete_object_loaded_in_the_same_unit_of_work(session_factory: Factory) -> None:
    await seed_users(session_factory, 2)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user1"})
        await UserRepository.delete(uow.session, user)
    assert await user_count(session_factory) == 1


async def test_delete_of_a_row_that_no_longer_exists_raises_not_found(
    session_factory: Factory,
) -> None:
    await seed_users(session_factory, 1)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
        user_id = user.id
    async with UnitOfWork(session_factory) as uow:
        assert await UserRepository.delete_where(uow.session, {"id": user_id}) == 1
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(NotFoundError, match="User"):
            await UserRepository.delete(uow.session, user)


async def test_delete_where_returns_row_count(session_factory: Factory) -> None:
    await seed_users(session_factory, 5)
    async with UnitOfWork(session_factory) as uow:
        assert await UserRepository.delete_where(uow.session, {"age__gte": 23}) == 2
        assert await UserRepository.delete_where(uow.session, {"age__gte": 23}) == 0
    assert await user_count(session_factory) == 3


async def test_delete_where_without_unit_of_work(session_factory: Factory) -> None:
    await seed_users(session_factory, 3)
    async with session_factory() as session:
        assert await UserRepository.delete_where(session, {"position": "ops"}) == 2
        assert await UserRepository.update_where(session, {}, {"age": 5}) == 1
        await session.commit()
    assert await user_count(session_factory) == 1


# -- bad input ----------------------------------------------------------------------------


async def test_unknown_data_key_is_rejected_before_anything_is_sent(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(FieldNotFoundError) as info:
            await UserRepository.create(uow.session, {"name": "A", "salary": 10})
        assert info.value.model == "User"
        assert info.value.field == "salary"
        assert "name" in info.value.valid
        with pytest.raises(FieldNotFoundError, match="salary"):
            await UserRepository.create_many(
                uow.session, [{"name": "B"}, {"name": "C", "salary": 1}]
            )
        with pytest.raises(FieldNotFoundError, match="salary"):
            await UserRepository.upsert(uow.session, {"name": "D", "salary": 1}, conflict=["name"])
        with pytest.raises(FieldNotFoundError, match="salary"):
            await UserRepository.update_where(uow.session, {}, {"salary": 1})
        assert not uow.session.new
    assert await user_count(session_factory) == 0


async def test_relationship_is_not_a_data_key(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(FieldNotFoundError, match="books"):
            await AuthorRepository.create(uow.session, {"name": "A", "books": []})


@pytest.mark.parametrize(
    "data",
    [
        {"name": "A", "age": "thirty"},
        {"name": 42},
        {"name": "A", "age": True},
        {"name": "A", "balance": "1.5"},
        {"name": "A", "birthday": "2020-01-01"},
        {"name": "A", "birthday": dt.datetime(2020, 1, 1)},
        {"name": "A", "created_at": "2020-01-01T00:00:00"},
    ],
)
async def test_wrong_value_type_raises_data_validation_error(
    session_factory: Factory, data: dict[str, Any]
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(DataValidationError) as info:
            await UserRepository.create(uow.session, data)
        assert info.value.model == "User"
        with pytest.raises(DataValidationError):
            await UserRepository.create_many(uow.session, [data])
    assert await user_count(session_factory) == 0


async def test_accepted_value_types_round_trip(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(
            uow.session,
            {
                "name": "A",
                "balance": decimal.Decimal("12.50"),
                "birthday": dt.date(2000, 2, 29),
                "created_at": dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc),
                "status": Status.BLOCKED,
            },
        )
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "A"})
        assert user.balance == decimal.Decimal("12.50")
        assert user.birthday == dt.date(2000, 2, 29)
        assert user.status is Status.BLOCKED


async def test_data_must_be_a_mapping(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(DataValidationError, match="dict"):
            await UserRepository.create(uow.session, [("name", "A")])  # type: ignore[arg-type]


@pytest.mark.parametrize("order_by", ["nope", "-nope", ["name", "salary"], "tags", 42])
async def test_bad_order_by_raises_order_by_field_error(
    session_factory: Factory, order_by: Any
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(OrderByFieldError) as info:
            await UserRepository.list(uow.session, order_by=order_by)
    assert info.value.model == "User"
    assert "name" in info.value.valid


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"limit": -1}, "limit"),
        ({"skip": -5}, "skip"),
        ({"limit": "10"}, "limit"),
        ({"skip": 1.5}, "skip"),
        ({"limit": True}, "limit"),
    ],
)
async def test_bad_skip_or_limit_raises_pagination_error(
    session_factory: Factory, kwargs: dict[str, Any], parameter: str
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(PaginationParameterError) as info:
            await UserRepository.list(uow.session, **kwargs)
    assert info.value.parameter == parameter
    assert info.value.model == "User"


@pytest.mark.parametrize(
    "kwargs", [{"page": 0}, {"page": -1}, {"page_size": 0}, {"page_size": -10}]
)
async def test_bad_page_raises_pagination_error(
    session_factory: Factory, kwargs: dict[str, Any]
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(PaginationParameterError):
            await UserRepository.paginate(uow.session, **kwargs)
        with pytest.raises(PaginationParameterError):
            await UserRepository.keyset(uow.session, limit=0)


async def test_repository_without_model_raises_usage_error(session_factory: Factory) -> None:
    class Bare(CrudRepository[User]):
        pass

    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(RepositoryUsageError, match=r"Bare\.model is not set"):
            await Bare.create(uow.session, {"name": "A"})
        with pytest.raises(RepositoryUsageError):
            await Bare.list(uow.session)
        with pytest.raises(RepositoryUsageError):
            Bare.update(User(), {"name": "x"})
    assert await user_count(session_factory) == 0


async def test_update_and_delete_reject_objects_of_another_model(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(RepositoryUsageError, match="expects a User"):
            UserRepository.update(Tag(label="x"), {"name": "x"})  # type: ignore[arg-type]
        with pytest.raises(RepositoryUsageError, match="expects a User"):
            await UserRepository.delete(uow.session, Tag(label="x"))  # type: ignore[arg-type]


async def test_plain_repository_subclass_without_generic_works(session_factory: Factory) -> None:
    class PlainTagRepository(CrudRepository):  # type: ignore[type-arg]
        model = Tag

    async with UnitOfWork(session_factory) as uow:
        tag = await PlainTagRepository.create(uow.session, {"label": "x"})
        await uow.flush()
        assert await PlainTagRepository.get(uow.session, tag.id) is tag


# -- the session argument -----------------------------------------------------------------


async def test_session_is_accepted_positionally_and_as_keyword(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        a = await UserRepository.create(uow.session, {"name": "pos"})
        b = await UserRepository.create(asession=uow.session, data={"name": "kw"})
        await UserRepository.create_many(asession=uow.session, rows=[{"name": "kw2"}])
        await uow.flush()
        assert await UserRepository.get(asession=uow.session, pk=a.id) is a
        found = await UserRepository.get_one(asession=uow.session, filters={"name": "kw"})
        assert found is b
        assert await UserRepository.count(asession=uow.session) == 3
        assert await UserRepository.exists(asession=uow.session, filters={"name": "pos"})
        listed = await UserRepository.list(asession=uow.session, order_by="name")
        assert [u.name for u in listed] == ["kw", "kw2", "pos"]
        page = await UserRepository.paginate(asession=uow.session, page_size=2)
        assert page.total == 3
        assert (
            await UserRepository.update_where(
                asession=uow.session, filters={"name": "kw"}, data={"age": 3}
            )
            == 1
        )
        await UserRepository.delete(asession=uow.session, obj=a)
        assert await UserRepository.delete_where(asession=uow.session, filters={"age": 3}) == 1
    assert await user_count(session_factory) == 1


# -- edge cases found while testing -------------------------------------------------------


async def test_create_many_with_rows_of_different_keys(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        users = await UserRepository.create_many(
            uow.session, [{"name": "a"}, {"name": "b", "age": 3}, {"name": "c", "position": "x"}]
        )
        assert [u.name for u in users] == ["a", "b", "c"]
        assert all(u.id is not None for u in users)
    async with UnitOfWork(session_factory) as uow:
        stored = await UserRepository.list(uow.session, order_by="name")
        assert [(u.name, u.age, u.position) for u in stored] == [
            ("a", None, None),
            ("b", 3, None),
            ("c", None, "x"),
        ]


async def test_upsert_many_only_overwrites_the_columns_each_row_gives(
    session_factory: Factory,
) -> None:
    await seed_users(session_factory, 2)  # user0: age 20 ops, user1: age 21 eng
    async with UnitOfWork(session_factory) as uow:
        result = await UserRepository.upsert_many(
            uow.session,
            [{"name": "user0", "age": 99}, {"name": "user1", "position": "lead"}],
            conflict=["name"],
        )
        assert [u.name for u in result] == ["user0", "user1"]
    async with UnitOfWork(session_factory) as uow:
        stored = await UserRepository.list(uow.session, order_by="name")
        assert [(u.name, u.age, u.position) for u in stored] == [
            ("user0", 99, "ops"),
            ("user1", 21, "lead"),
        ]


async def test_upsert_of_only_the_conflict_columns_returns_the_existing_row(
    session_factory: Factory,
) -> None:
    await seed_users(session_factory, 1)
    async with UnitOfWork(session_factory) as uow:
        existing = await UserRepository.upsert(uow.session, {"name": "user0"}, conflict=["name"])
        assert (existing.name, existing.age) == ("user0", 20)
        both = await UserRepository.upsert_many(
            uow.session, [{"name": "user0"}, {"name": "fresh"}], conflict=["name"]
        )
        assert [u.name for u in both] == ["user0", "fresh"]
    assert await user_count(session_factory) == 2


async def test_keyset_over_a_nullable_column_loses_no_rows(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(
            uow.session,
            [{"name": f"n{i}", "age": None if i % 3 == 0 else i % 4} for i in range(10)],
        )
    for order in ("age", "-age"):
        seen: list[tuple[str, int | None]] = []  # (name, age), read inside the unit of work
        cursor = None
        while True:
            async with UnitOfWork(session_factory) as uow:
                page = await UserRepository.keyset(
                    uow.session, order_by=order, after=cursor, limit=3
                )
                seen.extend((u.name, u.age) for u in page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(name for name, _ in seen) == sorted(f"n{i}" for i in range(10)), order
        async with UnitOfWork(session_factory) as uow:
            # keyset and list agree on the order, NULLs included, on both databases
            listed = await UserRepository.keyset(uow.session, order_by=order, limit=100)
            listed_names = [u.name for u in listed.items]
        assert [name for name, _ in seen] == listed_names
        ages = [age for _, age in seen]
        non_null = [a for a in ages if a is not None]
        assert non_null == sorted(non_null, reverse=order.startswith("-"))
        # NULLs sort as the largest value: last ascending, first descending.
        if order == "age":
            assert ages[-4:] == [None] * 4
        else:
            assert ages[:4] == [None] * 4


async def test_list_sorts_null_as_the_largest_value_on_both_databases(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(
            uow.session, [{"name": "a", "age": 2}, {"name": "b"}, {"name": "c", "age": 1}]
        )
    async with UnitOfWork(session_factory) as uow:
        asc = [u.name for u in await UserRepository.list(uow.session, order_by="age")]
        desc = [u.name for u in await UserRepository.list(uow.session, order_by="-age")]
    assert asc == ["c", "a", "b"]
    assert desc == ["b", "a", "c"]


async def test_delete_after_close_with_expire_on_commit(
    engine: Any, expire_on_commit: bool
) -> None:
    factory = async_sessionmaker(engine, expire_on_commit=expire_on_commit)
    await seed_users(factory, 2)
    async with UnitOfWork(factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
        created = await UserRepository.create(uow.session, {"name": "fresh"})
    async with UnitOfWork(factory) as uow:
        await UserRepository.delete(uow.session, user)
        await UserRepository.delete(uow.session, created)
    async with UnitOfWork(factory) as uow:
        assert [u.name for u in await UserRepository.list(uow.session)] == ["user1"]


async def test_delete_of_a_never_saved_object_raises_a_usage_error(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(RepositoryUsageError, match="User was never saved"):
            await UserRepository.delete(uow.session, User(name="ghost"))
        pending = await UserRepository.create(uow.session, {"name": "pending"})
        await UserRepository.delete(uow.session, pending)  # never flushed: just discarded
    assert await user_count(session_factory) == 0


async def test_delete_of_a_row_removed_by_another_transaction_meanwhile(
    session_factory: Factory,
) -> None:
    await seed_users(session_factory, 1)
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
        async with UnitOfWork(session_factory) as other:
            await UserRepository.delete_where(other.session, {"name": "user0"})
        with pytest.raises(NotFoundError, match="User"):
            await UserRepository.delete(uow.session, user)
            await uow.flush()


async def test_update_of_a_row_deleted_meanwhile_raises_not_found(session_factory: Factory) -> None:
    await seed_users(session_factory, 1)
    with pytest.raises(NotFoundError, match="User") as info:
        async with UnitOfWork(session_factory) as uow:
            user = await UserRepository.get_one_or_raise(uow.session, {"name": "user0"})
            user_id = user.id
            async with UnitOfWork(session_factory) as other:
                assert await UserRepository.delete_where(other.session, {"id": user_id}) == 1
            UserRepository.update(user, {"position": "lead"})
    assert info.value.criteria == user_id
    assert type(info.value.__cause__).__name__ == "StaleDataError"
    assert await user_count(session_factory) == 0
