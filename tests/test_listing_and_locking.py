"""Optimistic locking, on_commit callbacks, listing statement counts and strict lookups.

Every test runs on SQLite and PostgreSQL. Statement counts are measured with a
``before_cursor_execute`` listener, so an N+1 regression fails here.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from alchemium import (
    ConcurrencyConflictError,
    MultipleResultsError,
    NotFoundError,
    UnitOfWork,
)
from tests.conftest import statements
from tests.models import (
    Author,
    AuthorRepository,
    BookRepository,
    DocumentRepository,
    UserRepository,
)

Factory = async_sessionmaker[AsyncSession]


async def make_document(factory: Factory, title: str = "draft") -> int:
    async with UnitOfWork(factory) as uow:
        doc = await DocumentRepository.create(uow.session, {"title": title})
        await uow.flush()
        assert doc.version == 1
        return doc.id


# -- optimistic locking ---------------------------------------------------------------------


async def test_concurrent_update_raises_conflict(session_factory: Factory) -> None:
    doc_id = await make_document(session_factory)
    with pytest.raises(ConcurrencyConflictError) as info:
        async with UnitOfWork(session_factory) as second:
            stale = await DocumentRepository.get(second.session, doc_id)
            assert stale is not None
            assert stale.version == 1
            async with UnitOfWork(session_factory) as first:
                fresh = await DocumentRepository.get(first.session, doc_id)
                assert fresh is not None
                DocumentRepository.update(fresh, {"title": "first wins"})
            DocumentRepository.update(stale, {"title": "second loses"})
    err = info.value
    assert (err.model, err.primary_key) == ("Document", doc_id)
    assert isinstance(err.__cause__, StaleDataError)
    assert not isinstance(err, NotFoundError)
    async with UnitOfWork(session_factory) as uow:
        row = await DocumentRepository.get(uow.session, doc_id)
        assert row is not None
        assert (row.title, row.version) == ("first wins", 2)


async def test_update_after_concurrent_delete_raises_conflict(session_factory: Factory) -> None:
    doc_id = await make_document(session_factory)
    with pytest.raises(ConcurrencyConflictError) as info:
        async with UnitOfWork(session_factory) as second:
            stale = await DocumentRepository.get(second.session, doc_id)
            assert stale is not None
            async with UnitOfWork(session_factory) as first:
                gone = await DocumentRepository.get(first.session, doc_id)
                assert gone is not None
                await DocumentRepository.delete(first.session, gone)
            DocumentRepository.update(stale, {"title": "edit of a deleted row"})
    assert (info.value.model, info.value.primary_key) == ("Document", doc_id)
    assert isinstance(info.value.__cause__, StaleDataError)
    async with UnitOfWork(session_factory) as uow:
        assert await DocumentRepository.get(uow.session, doc_id) is None


async def test_delete_of_concurrently_updated_row_raises_conflict(
    session_factory: Factory,
) -> None:
    doc_id = await make_document(session_factory)
    with pytest.raises(ConcurrencyConflictError) as info:
        async with UnitOfWork(session_factory) as second:
            stale = await DocumentRepository.get(second.session, doc_id)
            assert stale is not None
            async with UnitOfWork(session_factory) as first:
                fresh = await DocumentRepository.get(first.session, doc_id)
                assert fresh is not None
                DocumentRepository.update(fresh, {"title": "changed meanwhile"})
            await DocumentRepository.delete(second.session, stale)
    assert (info.value.model, info.value.primary_key) == ("Document", doc_id)
    assert isinstance(info.value.__cause__, StaleDataError)
    async with UnitOfWork(session_factory) as uow:
        row = await DocumentRepository.get(uow.session, doc_id)
        assert row is not None
        assert row.version == 2


async def test_plain_session_delete_of_updated_row_raises_conflict(
    session_factory: Factory,
) -> None:
    """Without the repository, the ORM's versioned DELETE is mapped the same way."""
    doc_id = await make_document(session_factory)
    with pytest.raises(ConcurrencyConflictError) as info:
        async with UnitOfWork(session_factory) as second:
            stale = await DocumentRepository.get(second.session, doc_id)
            assert stale is not None
            async with UnitOfWork(session_factory) as first:
                fresh = await DocumentRepository.get(first.session, doc_id)
                assert fresh is not None
                DocumentRepository.update(fresh, {"title": "changed meanwhile"})
            await second.session.delete(stale)
    assert (info.value.model, info.value.primary_key) == ("Document", doc_id)
    assert isinstance(info.value.__cause__, StaleDataError)


async def test_sequential_updates_bump_the_version(session_factory: Factory) -> None:
    doc_id = await make_document(session_factory)
    for expected in (2, 3):
        async with UnitOfWork(session_factory) as uow:
            doc = await DocumentRepository.get(uow.session, doc_id)
            assert doc is not None
            DocumentRepository.update(doc, {"title": f"v{expected}"})
            await uow.flush()
            assert doc.version == expected


# -- on_commit --------------------------------------------------------------------------------


async def test_on_commit_runs_once_in_order_and_isolates_failures(
    session_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="alchemium.uow")
    calls: list[str] = []

    async def async_cb() -> None:
        calls.append("async")

    def failing() -> None:
        calls.append("failing")
        raise RuntimeError("boom")

    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "ann"})
        uow.on_commit(lambda: calls.append("sync"))
        uow.on_commit(failing)
        uow.on_commit(async_cb)
        assert calls == []  # nothing before commit
    assert calls == ["sync", "failing", "async"]
    assert any("on_commit callback" in r.getMessage() for r in caplog.records)
    failed = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert len(failed) == 1


async def test_on_commit_discarded_with_rolled_back_savepoint(session_factory: Factory) -> None:
    calls: list[str] = []
    async with UnitOfWork(session_factory) as uow:
        uow.on_commit(lambda: calls.append("outer"))
        with pytest.raises(ValueError, match="inner"):
            async with uow.savepoint():
                uow.on_commit(lambda: calls.append("inner"))
                raise ValueError("inner")
        async with uow.savepoint():
            uow.on_commit(lambda: calls.append("kept"))
    assert calls == ["outer", "kept"]


async def test_on_commit_never_runs_on_rollback(session_factory: Factory) -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="abort"):
        async with UnitOfWork(session_factory) as uow:
            uow.on_commit(lambda: calls.append("cb"))
            raise RuntimeError("abort")
    async with UnitOfWork(session_factory) as uow:
        uow.on_commit(lambda: calls.append("explicit"))
        await uow.rollback()
    assert calls == []


# -- listing ------------------------------------------------------------------------------------


async def seed_library(factory: Factory) -> dict[str, int]:
    """Three authors with 3, 2 and 1 books; returns author ids by name."""
    ids: dict[str, int] = {}
    async with UnitOfWork(factory) as uow:
        for name, n in (("ada", 3), ("bob", 2), ("cy", 1)):
            author = await AuthorRepository.create(uow.session, {"name": name})
            await uow.flush()
            ids[name] = author.id
            for i in range(n):
                await BookRepository.create(
                    uow.session, {"title": f"{name} python {i}", "author_id": author.id}
                )
    return ids


async def warm(session: AsyncSession) -> None:
    """Check out the connection first, so connect-time statements are not counted."""
    await UserRepository.count(session)


async def test_paginate_statement_counts(engine: AsyncEngine, session_factory: Factory) -> None:
    await seed_library(session_factory)
    async with session_factory() as session:
        await warm(session)
        with statements(engine) as seen:
            page = await AuthorRepository.paginate(
                session, {"name__in": ["ada", "bob", "cy"]}, order_by=["name"], page_size=2
            )
        assert [a.name for a in page.items] == ["ada", "bob"]
        assert page.total == 3
        assert len(seen) == 2, seen
        count_sql = seen[1].upper()
        assert "COUNT(*)" in count_sql
        assert "ORDER BY" not in count_sql
        assert "LIMIT" not in count_sql
        assert " OVER " not in count_sql
        assert "OVER (" not in count_sql

        with statements(engine) as seen:
            page = await AuthorRepository.paginate(
                session, order_by=["name"], page=2, page_size=2, with_count=False
            )
        assert [a.name for a in page.items] == ["cy"]
        assert page.total is None
        assert len(seen) == 1, seen

        with statements(engine) as seen:
            page = await AuthorRepository.paginate(
                session, order_by=["name"], page_size=2, joins=["books"]
            )
        assert [len(a.books) for a in page.items] == [3, 2]
        assert len(seen) == 3, seen  # page + selectin of books + count
    print(f"\n[{engine.dialect.name}] paginate statements: 2 (with count), 1 (without), 3 (+books)")


async def test_list_with_collection_eager_load_and_limit(
    engine: AsyncEngine, session_factory: Factory
) -> None:
    await seed_library(session_factory)
    async with session_factory() as session:
        await warm(session)
        with statements(engine) as seen:
            authors = await AuthorRepository.list(
                session, order_by=["name"], limit=2, joins=["books"]
            )
            # the children are loaded: touching them (lazy="raise") issues nothing
            titles = {a.name: sorted(b.title for b in a.books) for a in authors}
        assert [a.name for a in authors] == ["ada", "bob"]
        assert titles == {
            "ada": ["ada python 0", "ada python 1", "ada python 2"],
            "bob": ["bob python 0", "bob python 1"],
        }
        assert len(seen) == 2, seen
        assert "JOIN" not in seen[0].upper()  # the parent query is not a truncating join
        with statements(engine) as seen:
            skipped = await AuthorRepository.list(
                session, order_by=["name"], skip=2, limit=5, joins=["books"]
            )
        assert [(a.name, len(a.books)) for a in skipped] == [("cy", 1)]
        assert len(seen) == 2, seen
    print(f"\n[{engine.dialect.name}] list(joins=['books'], limit=2) statements: 2")


async def test_relationship_filter_counts_parents(
    engine: AsyncEngine, session_factory: Factory
) -> None:
    await seed_library(session_factory)
    async with session_factory() as session:
        flt = {"books__title__contains": "python"}
        authors = await AuthorRepository.list(session, flt, order_by=["name"])
        assert [a.name for a in authors] == ["ada", "bob", "cy"]  # each once
        assert await AuthorRepository.count(session, flt) == 3
        limited = await AuthorRepository.list(session, flt, order_by=["name"], limit=2)
        assert [a.name for a in limited] == ["ada", "bob"]
        page = await AuthorRepository.paginate(session, flt, order_by=["name"], page_size=2)
        assert page.total == 3
        assert [a.name for a in page.items] == ["ada", "bob"]
        assert await AuthorRepository.count(session, {"books__title__contains": "ada"}) == 1


# -- strict lookups and vanished rows ------------------------------------------------------------


async def test_get_one_strict(session_factory: Factory) -> None:
    await seed_library(session_factory)
    async with session_factory() as session:
        with pytest.raises(MultipleResultsError):
            await BookRepository.get_one(session, {"title__contains": "ada"}, strict=True)
        one = await BookRepository.get_one(session, {"title": "cy python 0"}, strict=True)
        assert one is not None
        assert one.title == "cy python 0"
        assert await BookRepository.get_one(session, {"title": "nope"}, strict=True) is None
        # the non-strict form returns one of the matches
        assert await BookRepository.get_one(session, {"title__contains": "ada"}) is not None


async def test_delete_of_vanished_row_raises_not_found(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        author = await AuthorRepository.create(uow.session, {"name": "ghost"})
        await uow.flush()
        author_id = author.id
    # loaded in this unit of work, deleted by another meanwhile
    with pytest.raises(NotFoundError):
        async with UnitOfWork(session_factory) as second:
            loaded = await AuthorRepository.get(second.session, author_id)
            assert loaded is not None
            async with UnitOfWork(session_factory) as first:
                gone = await AuthorRepository.get(first.session, author_id)
                assert gone is not None
                await AuthorRepository.delete(first.session, gone)
            await AuthorRepository.delete(second.session, loaded)
    # detached object from a closed unit of work, row gone
    with pytest.raises(NotFoundError):
        async with UnitOfWork(session_factory) as uow:
            await AuthorRepository.delete(uow.session, author)
    async with session_factory() as session:
        assert await AuthorRepository.get(session, author_id) is None
    assert isinstance(author, Author)
