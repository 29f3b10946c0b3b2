"""All-or-nothing under injected faults: outbox events and audit rows iff the change committed.

Hundreds of randomized units of work each create a user, maybe update another
and record a custom event; a fault is injected at a random point (the user's own
exception, a unique violation at flush or at commit, cancellation, a failing
before-commit hook, and on PostgreSQL the connection killed with
pg_terminate_backend). Afterwards every committed user has exactly its
``user_created`` and ``probe`` events in the outbox and no event exists for a
change that did not commit.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import AlchemiumError, UnitOfWork
from alchemium.events import create_audit_table, disable_audit, enable_audit
from alchemium.events.outbox import Outbox
from tests.models import Base, User, UserRepository

FAULTS = [
    "none",
    "user_error",
    "unique_at_flush",
    "unique_at_commit",
    "cancel",
    "hook_error",
    "kill",
]


class Boom(Exception):
    pass


async def _one_unit(
    i: int,
    fault: str,
    factory: async_sessionmaker[AsyncSession],
    killer: AsyncEngine | None,
) -> None:
    async with UnitOfWork(factory) as uow:
        await UserRepository.create(uow.session, {"name": f"u{i}", "position": "p"})
        uow.record("probe", aggregate_type="probe", aggregate_id=i, payload={"i": i})
        if fault == "unique_at_flush":
            await UserRepository.create(uow.session, {"name": "seed-0"})
            await uow.flush()
        if fault == "unique_at_commit":
            await UserRepository.create(uow.session, {"name": "seed-1"})
        if fault == "user_error":
            await uow.flush()
            raise Boom(i)
        if fault == "hook_error":

            async def failing_hook(_uow: UnitOfWork) -> None:
                raise Boom(i)

            uow.before_commit(failing_hook)
        if fault == "cancel":
            await uow.flush()
            await asyncio.sleep(10)  # cancelled by the driver below
        if fault == "kill" and killer is not None:
            await uow.flush()
            pid = (await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            async with killer.connect() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


async def _run(
    engine: AsyncEngine, outbox: Outbox, units: int, stats: Counter[str], seed: int
) -> None:
    rng = random.Random(seed)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    audit = enable_audit(Base.metadata)
    await create_audit_table(engine, audit)
    try:
        await _faulted_units(engine, factory, outbox, audit.table, units, stats, rng)
    finally:
        disable_audit()


async def _faulted_units(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    outbox: Outbox,
    audit: Any,
    units: int,
    stats: Counter[str],
    rng: random.Random,
) -> None:
    async with UnitOfWork(factory) as uow:
        await UserRepository.create_many(uow.session, [{"name": "seed-0"}, {"name": "seed-1"}])
    pg = engine.dialect.name == "postgresql"
    faults = FAULTS if pg else [f for f in FAULTS if f != "kill"]
    expected_ok: set[int] = set()
    for i in range(units):
        fault = rng.choice(faults)
        stats["units_of_work"] += 1
        task = asyncio.ensure_future(_one_unit(i, fault, factory, engine if pg else None))
        if fault == "cancel":
            await asyncio.sleep(rng.uniform(0, 0.01))
            task.cancel()
        try:
            await task
        except (Boom, AlchemiumError, asyncio.CancelledError):
            stats["faults_injected"] += 1
        else:
            if fault == "cancel":  # finished before the cancel landed
                expected_ok.add(i)
            else:
                assert fault == "none", f"fault {fault} did not surface"
                expected_ok.add(i)
    async with UnitOfWork(factory) as uow:
        users = {
            int(n[1:])
            for n in (await uow.session.scalars(select(User.name))).all()
            if n.startswith("u")
        }
        ev = outbox.events
        created = Counter(
            (
                await uow.session.execute(
                    select(ev.c.aggregate_id).where(ev.c.name == "user_created")
                )
            ).scalars()
        )
        probes = Counter(
            int(a)
            for a in (
                await uow.session.execute(select(ev.c.aggregate_id).where(ev.c.name == "probe"))
            ).scalars()
        )
        rows = await uow.session.execute(select(User.name, User.id))
        ids = {row.name: row.id for row in rows}
        total = (await uow.session.execute(select(func.count()).select_from(ev))).scalar_one()
        audited = Counter(
            (
                await uow.session.execute(
                    select(audit.c.entity_id).where(
                        audit.c.entity == "user", audit.c.action == "created"
                    )
                )
            ).scalars()
        )
        audit_total = (
            await uow.session.execute(select(func.count()).select_from(audit))
        ).scalar_one()
    assert users == expected_ok
    assert set(probes) == users, "a probe event exists iff its unit of work committed"
    assert all(count == 1 for count in probes.values())
    assert set(created) == {str(id_) for id_ in ids.values()}, "user_created iff the user exists"
    assert all(count == 1 for count in created.values())
    # seed rows: 2 created events; each committed unit: one user_created + one probe.
    assert total == 2 + 2 * len(users)
    # audit rows likewise: one per committed user change, none for rolled-back work
    assert audited == created, "an audit row exists iff the user change committed"
    assert audit_total == len(ids)
    stats["events_committed"] += total


@pytest.mark.parametrize("units", [120])
async def test_outbox_holds_an_event_iff_its_change_committed(
    engine: AsyncEngine, outbox: Outbox, units: int, stats: Counter[str]
) -> None:
    await _run(engine, outbox, units, stats, seed=20261125)


@pytest.mark.soak
async def test_atomicity_soak(engine: AsyncEngine, outbox: Outbox, stats: Counter[str]) -> None:
    await _run(engine, outbox, 3000, stats, seed=7)
