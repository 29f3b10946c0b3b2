"""The audit log: rows exist iff the change committed, newest-first history, actor captured."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import EventError, IntegrityViolation, UnitOfWork, use_actor, use_tenant
from alchemium.events import (
    AuditLog,
    SubscriberRegistry,
    audit_history,
    disable_audit,
    disable_outbox,
)
from alchemium.events.audit import default_audit_log
from alchemium.events.recording import global_before_commit_hooks
from tests.events.conftest import count
from tests.models import Base, MembershipRepository, ScratchRepository, UserRepository

Sessions = async_sessionmaker[AsyncSession]


async def test_each_committed_change_gets_one_audit_row(
    sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    async with UnitOfWork(sessions, registry=registry, actor="alice") as uow:
        user = await UserRepository.create(uow.session, {"name": "Ann", "position": "Eng"})
        await uow.flush()
        user_id = user.id
    async with UnitOfWork(sessions, registry=registry, actor="bob") as uow:
        loaded = await UserRepository.get(uow.session, user_id)
        assert loaded is not None
        UserRepository.update(loaded, {"position": "CTO"})
    async with UnitOfWork(sessions, registry=registry, actor="carol") as uow:
        loaded = await UserRepository.get(uow.session, user_id)
        assert loaded is not None
        await UserRepository.delete(uow.session, loaded)

    async with sessions() as session:
        history = await audit_history(session, "user", user_id)
    assert [(h.action, h.actor) for h in history] == [
        ("deleted", "carol"),
        ("updated", "bob"),
        ("created", "alice"),
    ]
    deleted, updated, created = history
    assert {h.entity for h in history} == {"user"}
    assert {h.entity_id for h in history} == {str(user_id)}
    assert created.changes["name"] == "Ann"
    assert created.changes["position"] == "Eng"
    assert updated.changes == {"position": {"old": "Eng", "new": "CTO"}}
    assert deleted.changes["position"] == "CTO"
    assert created.occurred_at <= updated.occurred_at <= deleted.occurred_at
    assert created.occurred_at.tzinfo is not None
    assert len({h.event_id for h in history}) == 3


async def test_audit_event_id_matches_the_dispatched_event(
    sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    ids = []
    registry.subscribe("user_created", lambda e: ids.append(e.id), name="ids")
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Ann"})
        await uow.flush()
        user_id = user.id
    async with sessions() as session:
        (entry,) = await audit_history(session, "user", str(user_id))
    assert [entry.event_id] == ids
    assert entry.actor is None


async def test_actor_and_tenant_from_context_variables(
    sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    with use_actor("middleware-user"), use_tenant("acme"):
        async with UnitOfWork(sessions, registry=registry) as uow:
            user = await UserRepository.create(uow.session, {"name": "Ann"})
            await uow.flush()
            user_id = user.id
    with use_actor("ignored"):
        async with UnitOfWork(sessions, registry=registry, actor="explicit") as uow:
            loaded = await UserRepository.get(uow.session, user_id)
            assert loaded is not None
            UserRepository.update(loaded, {"name": "Anne"})
    async with sessions() as session:
        history = await audit_history(session, "user", user_id)
    assert [(h.actor, h.tenant) for h in history] == [
        ("explicit", None),
        ("middleware-user", "acme"),
    ]


@pytest.mark.parametrize("failure", ["exception", "failed_commit"])
async def test_no_audit_row_when_the_change_is_rolled_back(
    engine: AsyncEngine,
    sessions: Sessions,
    registry: SubscriberRegistry,
    audit: AuditLog,
    failure: str,
) -> None:
    with pytest.raises((RuntimeError, IntegrityViolation)):
        async with UnitOfWork(sessions, registry=registry, actor="alice") as uow:
            await UserRepository.create(uow.session, {"name": "Ann"})
            await uow.flush()
            if failure == "exception":
                raise RuntimeError("rolled back")
            await MembershipRepository.create(uow.session, {"user_id": 999_999})
    assert await count(engine, audit.table) == 0
    assert await count(engine, UserRepository.model.__table__) == 0  # type: ignore[attr-defined]


async def test_no_audit_row_for_a_rolled_back_savepoint(
    sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        kept = await UserRepository.create(uow.session, {"name": "Kept"})
        with pytest.raises(RuntimeError):
            async with uow.savepoint():
                await UserRepository.create(uow.session, {"name": "Gone"})
                await uow.flush()
                raise RuntimeError
        await uow.flush()
        kept_id = kept.id
    async with sessions() as session:
        rows = await audit.history(session, "user", kept_id)
        assert [r.changes["name"] for r in rows] == ["Kept"]
        assert await UserRepository.count(session) == 1


async def test_bulk_operations_are_audited_per_row(
    sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    async with UnitOfWork(sessions, registry=registry, actor="batch") as uow:
        users = await UserRepository.create_many(uow.session, [{"name": "A"}, {"name": "B"}])
        ids = [u.id for u in users]
    async with UnitOfWork(sessions, registry=registry, actor="batch") as uow:
        await UserRepository.update_where(uow.session, {}, {"position": "X"})
        await UserRepository.delete_where(uow.session, {"name": "B"})
    async with sessions() as session:
        a = await audit_history(session, "user", ids[0])
        b = await audit_history(session, "user", ids[1])
    assert [h.action for h in a] == ["updated", "created"]
    assert [h.action for h in b] == ["deleted", "updated", "created"]
    assert a[0].changes == {"position": {"old": None, "new": "X"}}


async def test_custom_and_switched_off_events_are_not_audited(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        uow.record("user_greeted", aggregate_type="user", aggregate_id=1)
        uow.record("parcel_created", aggregate_type="parcel", aggregate_id=1)  # no such entity
        await ScratchRepository.create(uow.session, {"text": "x"})
    assert await count(engine, audit.table) == 0


async def test_audit_works_without_the_outbox(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    disable_outbox()
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Ann"})
    assert await count(engine, audit.table) == 1


async def test_history_limit_and_unknown_entities(
    sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    async with UnitOfWork(sessions, registry=registry) as uow:
        user = await UserRepository.create(uow.session, {"name": "Ann", "age": 1})
        for age in (2, 3, 4):
            await uow.flush()
            UserRepository.update(user, {"age": age})
        await uow.flush()
        user_id = user.id
    async with sessions() as session:
        latest = await audit_history(session, "user", user_id, limit=2)
        assert [h.changes["age"]["new"] for h in latest] == [4, 3]
        assert await audit_history(session, "user", 424242) == []
        assert await audit_history(session, "order", user_id) == []


async def test_disable_audit_stops_writing(
    engine: AsyncEngine, sessions: Sessions, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    disable_audit()
    async with UnitOfWork(sessions, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Ann"})
    assert await count(engine, audit.table) == 0
    with pytest.raises(EventError, match="enable_audit"):
        async with sessions() as session:
            await audit_history(session, "user", 1)


def test_audit_does_not_leak_out_of_its_fixture() -> None:
    # Runs after the tests above: their fixture must have switched audit off.
    assert default_audit_log() is None
    assert global_before_commit_hooks() == []
    assert "alchemium_audit_log" not in Base.metadata.tables
