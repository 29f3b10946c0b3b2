"""Objects that outlive their unit of work: written by the next one, never dropped silently.

Objects are usable after the unit of work that loaded them has ended (the README says
so); passing one to ``update``, ``delete``, ``hard_delete`` or ``restore`` inside a new
unit of work writes it there, with its event. Where nothing could write it (no unit of
work is current, or the object was never saved), RepositoryUsageError says what to do.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import (
    ConcurrencyConflictError,
    NotFoundError,
    RepositoryUsageError,
    UnitOfWork,
    current_unit_of_work,
)
from alchemium.events import capture_events
from tests.models import (
    Document,
    DocumentRepository,
    Project,
    ProjectRepository,
    User,
    UserRepository,
)

Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
def session_factory(engine: AsyncEngine, expire_on_commit: bool) -> Factory:
    """With SQLAlchemy's default expire_on_commit=True too: detached objects are then expired."""
    return async_sessionmaker(engine, expire_on_commit=expire_on_commit)


async def load_user(factory: Factory, name: str = "ann") -> User:
    """A User created and loaded by a unit of work that has ended (so: detached)."""
    async with UnitOfWork(factory) as uow:
        await UserRepository.create(uow.session, {"name": name, "email": f"{name}@old"})
    async with UnitOfWork(factory) as uow:
        return await UserRepository.get_one_or_raise(uow.session, {"name": name})


async def stored_email(factory: Factory, name: str = "ann") -> str | None:
    async with factory() as session:
        return (
            await session.execute(select(User.email).where(User.name == name))
        ).scalar_one_or_none()


async def test_update_of_a_detached_object_is_written_by_the_current_unit_of_work(
    session_factory: Factory,
) -> None:
    ann = await load_user(session_factory)
    with capture_events() as events:
        async with UnitOfWork(session_factory):
            written = UserRepository.update(ann, {"email": "ann@new"})
            assert written is ann
    assert await stored_email(session_factory) == "ann@new"
    [event] = events
    assert event.name == "user_updated"
    assert event.payload["changes"] == {"email": {"old": "ann@old", "new": "ann@new"}}


async def test_the_event_of_a_detached_update_has_the_stored_old_value(
    session_factory: Factory,
) -> None:
    """Another transaction changed the row since the object was loaded: old is what was stored."""
    ann = await load_user(session_factory)
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.update_where(uow.session, {"name": "ann"}, {"email": "ann@mid"})
    with capture_events() as events:
        async with UnitOfWork(session_factory):
            UserRepository.update(ann, {"email": "ann@new"})
    assert events[0].payload["changes"]["email"] == {"old": "ann@mid", "new": "ann@new"}


async def test_a_detached_update_of_a_row_held_by_the_session_updates_that_instance(
    session_factory: Factory,
) -> None:
    ann = await load_user(session_factory)
    async with UnitOfWork(session_factory) as uow:
        fresh = await UserRepository.get_one_or_raise(uow.session, {"name": "ann"})
        written = UserRepository.update(ann, {"email": "ann@new"})
        assert written is fresh
        assert fresh.email == "ann@new"
    assert await stored_email(session_factory) == "ann@new"


async def test_a_detached_update_of_a_deleted_row_raises_not_found(
    session_factory: Factory,
) -> None:
    ann = await load_user(session_factory)
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.delete_where(uow.session, {"name": "ann"})
    with pytest.raises(NotFoundError, match="User"):
        async with UnitOfWork(session_factory):
            UserRepository.update(ann, {"email": "ann@new"})


@pytest.mark.parametrize("expire_on_commit", [False], ids=["keep"])
async def test_a_detached_versioned_object_still_detects_a_concurrent_change(
    session_factory: Factory,
) -> None:
    """The version the object was loaded with is checked (expire_on_commit=True discards it)."""
    async with UnitOfWork(session_factory) as uow:
        await DocumentRepository.create(uow.session, {"id": 1, "title": "v1"})
    async with UnitOfWork(session_factory) as uow:
        doc = await DocumentRepository.get_one_or_raise(uow.session, {"id": 1})
    async with UnitOfWork(session_factory) as uow:
        other = await DocumentRepository.get_one_or_raise(uow.session, {"id": 1})
        DocumentRepository.update(other, {"title": "v2 by someone else"})
    with pytest.raises(ConcurrencyConflictError, match="Document"):
        async with UnitOfWork(session_factory):
            DocumentRepository.update(doc, {"title": "v2 by us"})
    async with session_factory() as session:
        assert (await session.get(Document, 1)).title == "v2 by someone else"  # type: ignore[union-attr]


async def test_update_of_a_detached_object_outside_any_unit_of_work_raises(
    session_factory: Factory,
) -> None:
    ann = await load_user(session_factory)
    assert current_unit_of_work() is None
    with pytest.raises(RepositoryUsageError, match="no unit of work is current") as info:
        UserRepository.update(ann, {"email": "ann@new"})
    assert "async with UnitOfWork" in str(info.value)
    assert await stored_email(session_factory) == "ann@old"


async def test_update_of_a_transient_object_raises_instead_of_changing_memory_only(
    session_factory: Factory,
) -> None:
    await load_user(session_factory)
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(RepositoryUsageError, match="never saved") as info:
            UserRepository.update(User(id=999), {"email": "x@y"})
        assert "User(id=999)" in str(info.value)
        assert "update_where" in str(info.value)
        assert uow.pending_events == ()


@pytest.mark.parametrize("method", ["delete", "hard_delete"])
async def test_delete_of_a_detached_object_is_written_with_its_event(
    session_factory: Factory, method: str
) -> None:
    ann = await load_user(session_factory)
    with capture_events() as events:
        async with UnitOfWork(session_factory) as uow:
            await getattr(UserRepository, method)(uow.session, ann)
    assert await stored_email(session_factory) is None
    assert [e.name for e in events] == ["user_deleted"]


@pytest.mark.parametrize("method", ["delete", "hard_delete", "restore"])
async def test_writing_a_transient_object_raises_a_usage_error(
    session_factory: Factory, method: str
) -> None:
    repository = ProjectRepository if method == "restore" else UserRepository
    obj = Project(id=5, name="p") if method == "restore" else User(id=5, name="u")
    async with UnitOfWork(session_factory) as uow:
        with pytest.raises(RepositoryUsageError, match="never saved"):
            await getattr(repository, method)(uow.session, obj)


async def test_restore_and_hard_delete_of_detached_soft_deleted_objects(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        kept = await ProjectRepository.create(uow.session, {"name": "kept"})
        gone = await ProjectRepository.create(uow.session, {"name": "gone"})
    async with UnitOfWork(session_factory) as uow:
        await ProjectRepository.delete(uow.session, kept)
        await ProjectRepository.delete(uow.session, gone)
    with capture_events() as events:
        async with UnitOfWork(session_factory) as uow:
            await ProjectRepository.restore(uow.session, kept)
            await ProjectRepository.hard_delete(uow.session, gone)
    assert sorted(e.name for e in events) == ["project_deleted", "project_restored"]
    async with UnitOfWork(session_factory) as uow:
        names = [p.name for p in await ProjectRepository.list(uow.session, include_deleted=True)]
    assert names == ["kept"]


async def test_restore_of_a_pending_object_keeps_it_in_the_session(
    session_factory: Factory,
) -> None:
    """It used to be taken out of the session, so the restore and its INSERT were lost."""
    async with UnitOfWork(session_factory) as uow:
        project = Project(name="fresh")
        project.deleted_at = None
        uow.session.add(project)
        restored = await ProjectRepository.restore(uow.session, project)
        assert restored is project
    async with session_factory() as session:
        assert (await session.execute(select(func.count()).select_from(Project))).scalar() == 1
