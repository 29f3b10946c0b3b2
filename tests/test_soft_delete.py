"""Soft delete on SQLite and PostgreSQL: delete marks, every read hides, restore, hard delete."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import (
    CrudRepository,
    NotFoundError,
    RepositoryUsageError,
    UniqueViolation,
    UnitOfWork,
)
from alchemium.events import capture_events
from alchemium.events.audit import (
    AuditLog,
    audit_history,
)
from tests.models import (
    Project,
    ProjectRepository,
    Task,
    TaskRepository,
    UserRepository,
)

Factory = async_sessionmaker[AsyncSession]


async def stored_projects(factory: Factory) -> int:
    """Rows in the table, deleted or not, bypassing the repository."""
    async with factory() as session:
        stmt = select(func.count()).select_from(Project)
        return int((await session.execute(stmt)).scalar_one())


async def seed(factory: Factory) -> dict[str, int]:
    """Projects alpha (task "x" deleted), beta (task "x" live) and gamma; alpha is deleted."""
    async with UnitOfWork(factory) as uow:
        s = uow.session
        alpha = await ProjectRepository.create(s, {"name": "alpha"})
        beta = await ProjectRepository.create(s, {"name": "beta"})
        gamma = await ProjectRepository.create(s, {"name": "gamma"})
        await uow.flush()
        gone = await TaskRepository.create(s, {"title": "x", "project_id": alpha.id})
        await TaskRepository.create(s, {"title": "x", "project_id": beta.id})
        await TaskRepository.create(s, {"title": "y", "project_id": beta.id})
        await uow.flush()
        await TaskRepository.delete(s, gone)
        await ProjectRepository.delete(s, alpha)
    return {"alpha": alpha.id, "beta": beta.id, "gamma": gamma.id}


async def test_delete_marks_the_row_instead_of_deleting_it(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    assert await stored_projects(session_factory) == 3
    async with session_factory() as session:
        found = await ProjectRepository.get(session, ids["alpha"], include_deleted=True)
    assert found is not None
    assert found.deleted_at is not None


async def test_every_read_hides_soft_deleted_rows(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    alpha = {"name": "alpha"}
    async with session_factory() as s:
        repo = ProjectRepository
        assert await repo.get(s, ids["alpha"]) is None
        assert await repo.get_one(s, alpha) is None
        with pytest.raises(NotFoundError):
            await repo.get_one_or_raise(s, alpha)
        assert [p.name for p in await repo.list(s, order_by="name")] == ["beta", "gamma"]
        first = await repo.first(s, order_by="name")
        assert first is not None
        assert first.name == "beta"
        assert await repo.count(s) == 2
        assert await repo.exists(s, alpha) is False
        page = await repo.paginate(s, order_by="name", page_size=1)
        assert (page.total, [p.name for p in page.items]) == (2, ["beta"])
        keyset = await repo.keyset(s, order_by="name", limit=5)
        assert [p.name for p in keyset.items] == ["beta", "gamma"]


async def test_include_deleted_shows_them_again(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    alpha = {"name": "alpha"}
    async with session_factory() as s:
        repo = ProjectRepository
        assert await repo.get(s, ids["alpha"], include_deleted=True) is not None
        assert await repo.get_one(s, alpha, include_deleted=True) is not None
        assert await repo.get_one_or_raise(s, alpha, include_deleted=True) is not None
        listed = await repo.list(s, order_by="name", include_deleted=True)
        assert [p.name for p in listed] == ["alpha", "beta", "gamma"]
        first = await repo.first(s, order_by="name", include_deleted=True)
        assert first is not None
        assert first.name == "alpha"
        assert await repo.count(s, include_deleted=True) == 3
        assert await repo.exists(s, alpha, include_deleted=True) is True
        page = await repo.paginate(s, page_size=2, include_deleted=True)
        assert page.total == 3
        keyset = await repo.keyset(s, order_by="name", include_deleted=True)
        assert len(keyset.items) == 3


async def test_relationship_filters_do_not_match_through_deleted_rows(
    session_factory: Factory,
) -> None:
    ids = await seed(session_factory)
    async with UnitOfWork(session_factory) as uow:
        alpha = await ProjectRepository.get(uow.session, ids["alpha"], include_deleted=True)
        assert alpha is not None
        await ProjectRepository.restore(uow.session, alpha)
    async with session_factory() as s:
        # alpha is live again but its task "x" is deleted: only beta matches.
        matched = await ProjectRepository.list(s, {"tasks__title": "x"})
        assert [p.id for p in matched] == [ids["beta"]]
        assert await ProjectRepository.count(s, {"tasks__title": "x"}) == 1
        assert await ProjectRepository.exists(s, {"tasks__title": "x", "name": "alpha"}) is False
        assert await ProjectRepository.count(s, {"_not": {"tasks__title": "x"}}) == 2
        # include_deleted applies to the related rows as well.
        everything = await ProjectRepository.list(
            s, {"tasks__title": "x"}, order_by="id", include_deleted=True
        )
        assert [p.id for p in everything] == [ids["alpha"], ids["beta"]]
    async with UnitOfWork(session_factory) as uow:
        await TaskRepository.create(uow.session, {"title": "z", "project_id": ids["gamma"]})
        gamma = await ProjectRepository.get(uow.session, ids["gamma"])
        assert gamma is not None
        await ProjectRepository.delete(uow.session, gamma)
    async with session_factory() as s:
        # A live task of a deleted project is not reached through it.
        assert await TaskRepository.list(s, {"project__name": "gamma"}) == []
        assert await TaskRepository.count(s, {"project__name": "beta"}) == 2


async def test_eager_loaded_children_leave_out_deleted_ones(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with session_factory() as s:
        (beta,) = await ProjectRepository.list(s, {"id": ids["beta"]}, joins=["tasks"])
        assert sorted(t.title for t in beta.tasks) == ["x", "y"]
    async with UnitOfWork(session_factory) as uow:
        (task,) = await TaskRepository.list(uow.session, {"title": "y"})
        await TaskRepository.delete(uow.session, task)
    async with session_factory() as s:
        (beta,) = await ProjectRepository.list(s, {"id": ids["beta"]}, joins=["tasks"])
        assert [t.title for t in beta.tasks] == ["x"]
        # A to-one relationship to a soft-deleted row loads as None.
        (orphan,) = await TaskRepository.list(
            s, {"project_id": ids["alpha"]}, joins=["project"], include_deleted=True
        )
        assert orphan.project is not None  # include_deleted reaches the related row too
    async with UnitOfWork(session_factory) as uow:
        await TaskRepository.create(uow.session, {"title": "w", "project_id": ids["alpha"]})
    async with session_factory() as s:
        (live,) = await TaskRepository.list(s, {"title": "w"}, joins=["project"])
        assert live.project is None


async def test_update_where_leaves_deleted_rows_alone(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with UnitOfWork(session_factory) as uow:
        changed = await ProjectRepository.update_where(
            uow.session, {"name__in": ["alpha", "beta"]}, {"name": "beta2"}
        )
    assert changed == 1
    async with session_factory() as s:
        alpha = await ProjectRepository.get(s, ids["alpha"], include_deleted=True)
        assert alpha is not None
        assert alpha.name == "alpha"


async def test_delete_where_soft_deletes_and_include_deleted_purges(
    session_factory: Factory,
) -> None:
    await seed(session_factory)
    async with UnitOfWork(session_factory) as uow:
        assert (
            await ProjectRepository.delete_where(uow.session, {"name__in": ["alpha", "beta"]}) == 1
        )
    async with session_factory() as s:
        assert await ProjectRepository.count(s) == 1
    assert await stored_projects(session_factory) == 3
    async with UnitOfWork(session_factory) as uow:
        await TaskRepository.delete_where(uow.session, None, include_deleted=True)
        purged = await ProjectRepository.delete_where(
            uow.session, {"name__in": ["alpha", "beta"]}, include_deleted=True
        )
    assert purged == 2
    assert await stored_projects(session_factory) == 1


async def test_restore_brings_a_row_back(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with session_factory() as s:
        alpha = await ProjectRepository.get(s, ids["alpha"], include_deleted=True)
    assert alpha is not None
    async with UnitOfWork(session_factory) as uow:
        restored = await ProjectRepository.restore(uow.session, alpha)
        assert restored.deleted_at is None
    async with session_factory() as s:
        back = await ProjectRepository.get(s, ids["alpha"])
        assert back is not None
        assert back.deleted_at is None


async def test_hard_delete_removes_the_row(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with UnitOfWork(session_factory) as uow:
        s = uow.session
        await TaskRepository.delete_where(s, {"project_id": ids["alpha"]}, include_deleted=True)
        alpha = await ProjectRepository.get(s, ids["alpha"], include_deleted=True)
        assert alpha is not None
        await ProjectRepository.hard_delete(s, alpha)  # already soft-deleted: still removable
        gamma = await ProjectRepository.get(s, ids["gamma"])
        assert gamma is not None
        await ProjectRepository.hard_delete(s, gamma)
    assert await stored_projects(session_factory) == 1


async def test_deleting_a_deleted_row_raises_not_found(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with session_factory() as s:
        alpha = await ProjectRepository.get(s, ids["alpha"], include_deleted=True)
    assert alpha is not None
    with pytest.raises(NotFoundError):
        async with UnitOfWork(session_factory) as uow:
            await ProjectRepository.delete(uow.session, alpha)


async def test_object_from_a_closed_unit_of_work_can_be_deleted_and_restored(
    engine: AsyncEngine, expire_on_commit: bool
) -> None:
    factory = async_sessionmaker(engine, expire_on_commit=expire_on_commit)
    async with UnitOfWork(factory) as uow:
        project = await ProjectRepository.create(uow.session, {"name": "solo"})
    async with UnitOfWork(factory) as uow:
        await ProjectRepository.delete(uow.session, project)
    async with UnitOfWork(factory) as uow:
        assert await ProjectRepository.count(uow.session) == 0
        await ProjectRepository.restore(uow.session, project)
    async with factory() as s:
        assert await ProjectRepository.count(s) == 1


async def test_events_mark_soft_deletes_and_restores(session_factory: Factory) -> None:
    with capture_events() as events:
        async with UnitOfWork(session_factory) as uow:
            a = await ProjectRepository.create(uow.session, {"name": "a"})
            b = await ProjectRepository.create(uow.session, {"name": "b"})
            c = await ProjectRepository.create(uow.session, {"name": "c"})
        async with UnitOfWork(session_factory) as uow:
            await ProjectRepository.delete(uow.session, a)
            await ProjectRepository.delete_where(uow.session, {"name": "b"})
        async with UnitOfWork(session_factory) as uow:
            await ProjectRepository.restore(uow.session, a)
            await ProjectRepository.restore(uow.session, c)  # not deleted: no event
            await ProjectRepository.hard_delete(uow.session, b)
    names = [(e.name, e.aggregate_id, e.payload.get("soft")) for e in events[3:]]
    assert names == [
        ("project_deleted", str(a.id), True),
        ("project_deleted", str(b.id), True),
        ("project_restored", str(a.id), None),
        ("project_deleted", str(b.id), None),
    ]
    soft = events[3].payload
    assert soft["name"] == "a"
    assert soft["deleted_at"] is not None
    assert events[5].payload["deleted_at"] is None


async def test_audit_rows_record_soft_delete_and_restore(
    session_factory: Factory, audit: AuditLog
) -> None:
    async with UnitOfWork(session_factory, actor="ann") as uow:
        project = await ProjectRepository.create(uow.session, {"name": "audited"})
    async with UnitOfWork(session_factory, actor="bob") as uow:
        await ProjectRepository.delete(uow.session, project)
    async with UnitOfWork(session_factory, actor="cy") as uow:
        await ProjectRepository.restore(uow.session, project)
    async with session_factory() as s:
        history = await audit_history(s, "project", project.id)
    assert [(h.action, h.actor) for h in history] == [
        ("restored", "cy"),
        ("deleted", "bob"),
        ("created", "ann"),
    ]
    assert history[1].changes["soft"] is True


async def test_partial_unique_index_lets_a_deleted_name_be_reused(
    session_factory: Factory,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        first = await ProjectRepository.create(uow.session, {"name": "reused"})
    async with UnitOfWork(session_factory) as uow:
        await ProjectRepository.delete(uow.session, first)
    async with UnitOfWork(session_factory) as uow:
        await ProjectRepository.create(uow.session, {"name": "reused"})
    with pytest.raises(UniqueViolation):
        async with UnitOfWork(session_factory) as uow:
            await ProjectRepository.create(uow.session, {"name": "reused"})
    async with session_factory() as s:
        assert await ProjectRepository.count(s, {"name": "reused"}, include_deleted=True) == 2
    # Restoring the first would make two live "reused": the index refuses it.
    with pytest.raises(UniqueViolation):
        async with UnitOfWork(session_factory) as uow:
            await ProjectRepository.restore(uow.session, first)


async def test_models_without_soft_delete_keep_hard_deleting(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.create(uow.session, {"name": "plain"})
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.delete(uow.session, user)
    async with session_factory() as s:
        assert await UserRepository.count(s) == 0
    with pytest.raises(RepositoryUsageError, match="no soft delete"):
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.restore(uow.session, user)


def test_soft_delete_column_must_exist() -> None:
    with pytest.raises(RepositoryUsageError, match="no such column"):

        class _Broken(CrudRepository[Task]):
            model = Task
            soft_delete_column = "removed_on"


async def test_changes_made_before_a_soft_delete_are_kept(session_factory: Factory) -> None:
    with capture_events() as events:
        async with UnitOfWork(session_factory) as uow:
            project = await ProjectRepository.create(uow.session, {"name": "old"})
            await uow.flush()
            ProjectRepository.update(project, {"name": "new"})
            await ProjectRepository.delete(uow.session, project)
    async with session_factory() as s:
        (stored,) = await ProjectRepository.list(s, include_deleted=True)
        assert stored.name == "new"
        assert stored.deleted_at is not None
    assert [e.name for e in events] == ["project_created", "project_updated", "project_deleted"]
