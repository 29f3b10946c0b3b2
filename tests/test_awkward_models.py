"""Repositories and events on awkward models: self-referential, viewonly and lazy="raise".

Nothing in alchemium may lazy-load (that raises in async code, and these models
forbid it anyway): filters go through EXISTS, eager loads are explicit, and event
payloads come from the flush, never from attribute access after commit.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column, relationship

from alchemium import CrudRepository, UnitOfWork
from alchemium.events import SubscriberRegistry, capture_events
from tests.models import Base


class Category(Base):
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"))
    parent: Mapped[Category | None] = relationship(
        back_populates="children", remote_side="Category.id", lazy="raise"
    )
    children: Mapped[list[Category]] = relationship(back_populates="parent", lazy="raise")
    # Read-only view of the same rows: usable in filters and eager loads, never written.
    named_children: Mapped[list[Category]] = relationship(
        viewonly=True, lazy="raise", overlaps="children,parent"
    )


class CategoryRepository(CrudRepository[Category]):
    model = Category


Factory = async_sessionmaker[AsyncSession]


async def _tree(factory: Factory) -> None:
    async with UnitOfWork(factory) as uow:
        root = await CategoryRepository.create(uow.session, {"name": "root"})
        other = await CategoryRepository.create(uow.session, {"name": "other"})
        await uow.flush()
        await CategoryRepository.create_many(
            uow.session,
            [
                {"name": "a", "parent_id": root.id},
                {"name": "b", "parent_id": root.id},
                {"name": "c", "parent_id": other.id},
            ],
        )


async def test_self_referential_filters_use_exists_both_ways(session_factory: Factory) -> None:
    await _tree(session_factory)
    async with UnitOfWork(session_factory) as uow:
        s = uow.session
        under_root = await CategoryRepository.list(s, {"parent__name": "root"}, order_by="name")
        assert [c.name for c in under_root] == ["a", "b"]
        with_kids = await CategoryRepository.list(s, {"children__name__in": ["a", "b", "c"]})
        assert sorted(c.name for c in with_kids) == ["other", "root"]
        assert await CategoryRepository.count(s, {"children__name__in": ["a", "b"]}) == 1
        via_view = await CategoryRepository.list(s, {"named_children__name": "c"})
        assert [c.name for c in via_view] == ["other"]


async def test_eager_loads_of_self_and_viewonly_relationships(session_factory: Factory) -> None:
    await _tree(session_factory)
    async with UnitOfWork(session_factory) as uow:
        roots = await CategoryRepository.list(
            uow.session,
            {"parent_id__is_null": True},
            order_by="name",
            joins=["children", "named_children"],
        )
        # loaded up front: no lazy load (which lazy="raise" would refuse)
        assert [(c.name, sorted(k.name for k in c.children)) for c in roots] == [
            ("other", ["c"]),
            ("root", ["a", "b"]),
        ]
        assert sorted(k.name for k in roots[1].named_children) == ["a", "b"]
        kids = await CategoryRepository.list(uow.session, {"name": "a"}, joins=["parent"])
        assert kids[0].parent is not None
        assert kids[0].parent.name == "root"


async def test_events_of_awkward_models_come_from_the_flush(
    session_factory: Factory, registry: SubscriberRegistry
) -> None:
    await _tree(session_factory)
    with capture_events() as events:
        async with UnitOfWork(session_factory, registry=registry) as uow:
            child = await CategoryRepository.get_one_or_raise(uow.session, {"name": "a"})
            CategoryRepository.update(child, {"name": "a2"})
            await CategoryRepository.delete(
                uow.session, await CategoryRepository.get_one_or_raise(uow.session, {"name": "c"})
            )
    assert [e.name for e in events] == ["category_updated", "category_deleted"]
    assert events[0].payload["changes"] == {"name": {"old": "a", "new": "a2"}}
    assert events[1].payload["name"] == "c"
