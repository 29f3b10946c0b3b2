"""Tenant scoping on SQLite and PostgreSQL, and PostgreSQL Row Level Security via set_config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import (
    NotFoundError,
    TenantMismatchError,
    TenantRequiredError,
    UnitOfWork,
    UnitOfWorkError,
    use_tenant,
)
from alchemium.events import capture_events
from alchemium.events.audit import (
    AuditLog,
    audit_history,
)
from tests.conftest import make_engine
from tests.models import (
    Customer,
    CustomerRepository,
    Ticket,
    TicketRepository,
    UserRepository,
)

Factory = async_sessionmaker[AsyncSession]
postgres_only = pytest.mark.parametrize("backend", ["postgresql"])


async def stored(factory: Factory, model: type[Any] = Customer) -> list[tuple[str, str]]:
    """(tenant_id, name or subject) of every row, bypassing the repository."""
    label = Customer.name if model is Customer else Ticket.subject
    async with factory() as session:
        stmt = select(model.tenant_id, label).order_by(model.id)
        return [(t, n) for t, n in (await session.execute(stmt)).all()]


async def seed(factory: Factory) -> dict[str, int]:
    """Two customers of acme, one of globex."""
    ids = {}
    for tenant, names in (("acme", ["ann", "al"]), ("globex", ["gus"])):
        async with UnitOfWork(factory, tenant=tenant) as uow:
            for name in names:
                customer = await CustomerRepository.create(uow.session, {"name": name})
                await uow.flush()
                ids[name] = customer.id
    return ids


async def test_creates_are_stamped_with_the_tenant(session_factory: Factory) -> None:
    await seed(session_factory)
    async with UnitOfWork(session_factory, tenant="acme") as uow:
        await CustomerRepository.create_many(uow.session, [{"name": "bo"}, {"name": "cy"}])
        await CustomerRepository.upsert(uow.session, {"id": 99, "name": "up"}, conflict=["id"])
        uow.session.add(Customer(name="orm"))  # bypassing the repository is stamped too
    assert sorted(await stored(session_factory)) == [
        ("acme", "al"),
        ("acme", "ann"),
        ("acme", "bo"),
        ("acme", "cy"),
        ("acme", "orm"),
        ("acme", "up"),
        ("globex", "gus"),
    ]


async def test_reads_see_only_the_current_tenant(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with UnitOfWork(session_factory, tenant="acme") as uow:
        s, repo = uow.session, CustomerRepository
        assert await repo.get(s, ids["gus"]) is None
        assert await repo.get(s, ids["ann"]) is not None
        assert await repo.get_one(s, {"name": "gus"}) is None
        with pytest.raises(NotFoundError):
            await repo.get_one_or_raise(s, {"name": "gus"})
        assert [c.name for c in await repo.list(s, order_by="name")] == ["al", "ann"]
        assert await repo.count(s) == 2
        assert await repo.exists(s, {"name": "gus"}) is False
        page = await repo.paginate(s, page_size=1)
        assert page.total == 2
        keyset = await repo.keyset(s, limit=10)
        assert {c.name for c in keyset.items} == {"ann", "al"}
    async with UnitOfWork(session_factory, tenant="globex") as uow:
        assert [c.name for c in await CustomerRepository.list(uow.session)] == ["gus"]


async def test_use_tenant_sets_the_tenant_for_units_of_work_and_sessions(
    session_factory: Factory,
) -> None:
    await seed(session_factory)
    with use_tenant("globex"):
        async with UnitOfWork(session_factory) as uow:
            assert [c.name for c in await CustomerRepository.list(uow.session)] == ["gus"]
            await CustomerRepository.create(uow.session, {"name": "gia"})
        async with session_factory() as session:  # no unit of work: the context variable
            assert await CustomerRepository.count(session) == 2
        # An explicit tenant= wins over the context.
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            assert await CustomerRepository.count(uow.session) == 2


async def test_no_tenant_raises_instead_of_showing_every_row(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with UnitOfWork(session_factory) as uow:
        s = uow.session
        with pytest.raises(TenantRequiredError, match="Customer is tenant-scoped"):
            await CustomerRepository.list(s)
        with pytest.raises(TenantRequiredError):
            await CustomerRepository.get(s, ids["ann"])
        with pytest.raises(TenantRequiredError):
            await CustomerRepository.count(s)
        with pytest.raises(TenantRequiredError):
            await CustomerRepository.create(s, {"name": "nobody"})
        with pytest.raises(TenantRequiredError):
            await CustomerRepository.delete_where(s, None)
        with pytest.raises(TenantRequiredError):
            await CustomerRepository.exists(s, {"tickets__subject": "x"})
        assert await UserRepository.count(s) == 0  # unscoped models need no tenant
    with pytest.raises(TenantRequiredError):
        async with UnitOfWork(session_factory) as uow:
            uow.session.add(Customer(name="sneaky"))
    assert len(await stored(session_factory)) == 3


async def test_writing_another_tenants_row_raises(session_factory: Factory) -> None:
    ids = await seed(session_factory)
    async with UnitOfWork(session_factory, tenant="globex") as uow:
        gus = await CustomerRepository.get(uow.session, ids["gus"])
    assert gus is not None
    with use_tenant("acme"), pytest.raises(TenantMismatchError):
        # With a tenant in the context, update() refuses at once.
        CustomerRepository.update(gus, {"name": "stolen"})
    with pytest.raises(TenantMismatchError, match="belongs to tenant 'globex'"):
        # A detached object names no tenant: the check runs when it is flushed.
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            CustomerRepository.update(gus, {"name": "stolen"})
            uow.session.add(gus)
    with pytest.raises(TenantMismatchError):
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            await CustomerRepository.delete(uow.session, gus)
    with pytest.raises(TenantMismatchError):
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            await CustomerRepository.hard_delete(uow.session, gus)
    with pytest.raises(TenantMismatchError):
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            await CustomerRepository.create(uow.session, {"name": "x", "tenant_id": "globex"})
    with pytest.raises(TenantMismatchError):
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            await CustomerRepository.upsert(
                uow.session, {"id": ids["gus"], "name": "stolen"}, conflict=["id"]
            )
    with pytest.raises(TenantMismatchError):
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            await CustomerRepository.update_where(uow.session, None, {"tenant_id": "globex"})
    with pytest.raises(TenantMismatchError):
        # Bypassing the repository: the flush refuses it.
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            gus.name = "stolen"
            uow.session.add(gus)
    with pytest.raises(TenantMismatchError):
        # Moving one's own row to another tenant is refused as well.
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            ann = await CustomerRepository.get(uow.session, ids["ann"])
            assert ann is not None
            CustomerRepository.update(ann, {"tenant_id": "globex"})
    assert await stored(session_factory) == [("acme", "ann"), ("acme", "al"), ("globex", "gus")]


async def test_bulk_writes_touch_only_the_current_tenant(session_factory: Factory) -> None:
    await seed(session_factory)
    async with UnitOfWork(session_factory, tenant="acme") as uow:
        assert await CustomerRepository.update_where(uow.session, None, {"name": "x"}) == 2
    async with UnitOfWork(session_factory, tenant="globex") as uow:
        assert await CustomerRepository.delete_where(uow.session, {"name": "x"}) == 0
        assert await CustomerRepository.delete_where(uow.session, None) == 1
    assert await stored(session_factory) == [("acme", "x"), ("acme", "x")]


async def test_relationship_filters_and_eager_loads_skip_other_tenants(
    session_factory: Factory,
) -> None:
    ids = await seed(session_factory)
    async with UnitOfWork(session_factory, tenant="acme") as uow:
        await TicketRepository.create(uow.session, {"subject": "mine", "customer_id": ids["ann"]})
    async with session_factory() as session:
        # A cross-tenant link only raw SQL can make: globex's ticket on acme's customer.
        await session.execute(
            text("INSERT INTO tickets (tenant_id, subject, customer_id) VALUES (:t, :s, :c)"),
            {"t": "globex", "s": "leak", "c": ids["ann"]},
        )
        await session.commit()
    async with UnitOfWork(session_factory, tenant="acme") as uow:
        s = uow.session
        assert await CustomerRepository.list(s, {"tickets__subject": "leak"}) == []
        assert await CustomerRepository.count(s, {"tickets__subject": "mine"}) == 1
        (ann,) = await CustomerRepository.list(s, {"id": ids["ann"]}, joins=["tickets"])
        assert [t.subject for t in ann.tickets] == ["mine"]
    async with UnitOfWork(session_factory, tenant="globex") as uow:
        # The same (cached) statement with the other tenant's value: no stale criteria.
        await TicketRepository.create(uow.session, {"subject": "theirs", "customer_id": None})
        (gus,) = await CustomerRepository.list(uow.session, joins=["tickets"])
        assert gus.tickets == []
        tickets = await TicketRepository.list(uow.session, order_by="id")
        assert [t.subject for t in tickets] == ["leak", "theirs"]


async def test_events_carry_the_tenant(session_factory: Factory) -> None:
    with capture_events() as events:
        async with UnitOfWork(session_factory, tenant="acme") as uow:
            await CustomerRepository.create(uow.session, {"name": "ev"})
        with use_tenant("globex"):
            async with UnitOfWork(session_factory) as uow:
                await CustomerRepository.create(uow.session, {"name": "ev2"})
    assert [(e.name, e.metadata.get("tenant"), e.payload["tenant_id"]) for e in events] == [
        ("customer_created", "acme", "acme"),
        ("customer_created", "globex", "globex"),
    ]


async def test_audit_rows_carry_the_tenant(session_factory: Factory, audit: AuditLog) -> None:
    async with UnitOfWork(session_factory, tenant="acme", actor="ann") as uow:
        customer = await CustomerRepository.create(uow.session, {"name": "audited"})
    async with UnitOfWork(session_factory, tenant="acme", actor="bob") as uow:
        await CustomerRepository.delete(uow.session, customer)
    async with session_factory() as session:
        history = await audit_history(session, "customer", customer.id)
    assert [(h.action, h.actor, h.tenant) for h in history] == [
        ("deleted", "bob", "acme"),
        ("created", "ann", "acme"),
    ]


async def test_tenant_setting_needs_postgresql_and_a_tenant(
    session_factory: Factory, backend: str
) -> None:
    with pytest.raises(TenantRequiredError):
        async with UnitOfWork(session_factory, tenant_setting="app.tenant"):
            pass
    if backend == "sqlite":
        with pytest.raises(UnitOfWorkError, match="needs PostgreSQL"):
            async with UnitOfWork(session_factory, tenant="a", tenant_setting="app.tenant") as uow:
                await CustomerRepository.count(uow.session)


# -- PostgreSQL Row Level Security -----------------------------------------------------------

APP_ROLE = "alchemium_rls_app"


@pytest.fixture
async def app_factory(engine: AsyncEngine) -> AsyncIterator[Factory]:
    """Sessions as a non-superuser role, on a one-connection pool, with RLS forced on tickets.

    Superusers bypass Row Level Security, so the policy is only tested as another role.
    The single pooled connection makes every unit of work reuse the previous one's.
    """
    async with engine.begin() as conn:
        for sql in (
            f"DROP OWNED BY {APP_ROLE}",
            f"DROP ROLE {APP_ROLE}",
        ):
            exists = await conn.scalar(
                text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": APP_ROLE}
            )
            if exists:
                await conn.execute(text(sql))
        for sql in (
            f"CREATE ROLE {APP_ROLE} NOSUPERUSER NOBYPASSRLS",
            f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}",
            "ALTER TABLE tickets ENABLE ROW LEVEL SECURITY",
            "ALTER TABLE tickets FORCE ROW LEVEL SECURITY",
            "CREATE POLICY tenant_isolation ON tickets "
            "USING (tenant_id = current_setting('app.tenant', true)) "
            "WITH CHECK (tenant_id = current_setting('app.tenant', true))",
        ):
            await conn.execute(text(sql))
    url = engine.url.render_as_string(hide_password=False)
    app_engine = make_engine(url, pool_size=1, max_overflow=0)

    @event.listens_for(app_engine.sync_engine, "connect")
    def _as_app_role(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"SET ROLE {APP_ROLE}")
        cursor.close()

    try:
        yield async_sessionmaker(app_engine, expire_on_commit=False)
    finally:
        await app_engine.dispose()
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP OWNED BY {APP_ROLE}"))
            await conn.execute(text(f"DROP ROLE {APP_ROLE}"))


async def visible_subjects(session: AsyncSession) -> list[str]:
    """What the database itself lets this connection see: raw SQL, no repository predicate."""
    rows = await session.execute(text("SELECT subject FROM tickets ORDER BY id"))
    return list(rows.scalars().all())


async def backend_pid(session: AsyncSession) -> int:
    return int((await session.execute(select(func.pg_backend_pid()))).scalar_one())


@postgres_only
async def test_row_level_security_sees_the_tenant_of_the_unit_of_work(
    app_factory: Factory,
) -> None:
    for tenant, subject in (("acme", "a1"), ("globex", "g1")):
        async with UnitOfWork(app_factory, tenant=tenant, tenant_setting="app.tenant") as uow:
            await TicketRepository.create(uow.session, {"subject": subject})
    async with UnitOfWork(app_factory, tenant="acme", tenant_setting="app.tenant") as uow:
        assert await visible_subjects(uow.session) == ["a1"]
        await uow.commit()  # the next transaction of the same unit of work sets it again
        assert await visible_subjects(uow.session) == ["a1"]
        # The policy's WITH CHECK refuses another tenant's row, whatever the SQL.
        with pytest.raises(DBAPIError, match="row-level security"):
            await uow.session.execute(
                text("INSERT INTO tickets (tenant_id, subject) VALUES ('globex', 'forged')")
            )
        await uow.rollback()
    with use_tenant("globex"):
        async with UnitOfWork(app_factory, tenant_setting="app.tenant") as uow:
            assert await visible_subjects(uow.session) == ["g1"]


@postgres_only
async def test_the_tenant_setting_does_not_leak_through_the_pool(app_factory: Factory) -> None:
    async with UnitOfWork(app_factory, tenant="acme", tenant_setting="app.tenant") as uow:
        await TicketRepository.create(uow.session, {"subject": "a1"})
        pid = await backend_pid(uow.session)
    # The same pooled connection, in a unit of work that sets nothing: the setting is gone.
    async with UnitOfWork(app_factory, tenant="acme") as uow:
        assert await backend_pid(uow.session) == pid
        setting = await uow.session.scalar(text("SELECT current_setting('app.tenant', true)"))
        assert setting in (None, "")
        assert await visible_subjects(uow.session) == []
        # The repository predicate alone still works (the row is hidden by RLS here).
        assert await TicketRepository.count(uow.session) == 0
    # Also after a unit of work that failed and rolled back.
    with pytest.raises(RuntimeError):
        async with UnitOfWork(app_factory, tenant="acme", tenant_setting="app.tenant") as uow:
            assert await visible_subjects(uow.session) == ["a1"]
            raise RuntimeError("boom")
    async with app_factory() as session:
        assert await backend_pid(session) == pid
        assert await visible_subjects(session) == []
