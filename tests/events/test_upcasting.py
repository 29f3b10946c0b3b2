"""Events outlive the code that wrote them: schema versions and upcasters.

Events are written by "old code" (no declaration: ``user_created`` at version 1);
then the "new code" declares version 2 (``name`` split into ``first_name`` and
``last_name``) with an upcaster, and every reader sees version 2: the relay (in
this process and as a real ``alchemium relay`` process), the after-commit dispatch
and the audit history. Stored rows are never rewritten.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import EventConfigurationError, UnitOfWork, UpcastError
from alchemium.events import (
    AuditLog,
    DomainEvent,
    OutboxRelay,
    SubscriberRegistry,
    UpcasterRegistry,
    audit_history,
    default_upcasters,
)
from alchemium.events.outbox import Outbox
from tests.events.relay_support import Sink, by_status, delivery_rows, run_cli
from tests.models import UserRepository

Factory = async_sessionmaker[AsyncSession]


def split_name(payload: dict[str, Any]) -> dict[str, Any]:
    first, _, last = payload.pop("name").partition(" ")
    return {**payload, "first_name": first, "last_name": last}


def broken(payload: dict[str, Any]) -> dict[str, Any]:
    raise KeyError("full_name")


@pytest.fixture
def upcasters() -> Iterator[UpcasterRegistry]:
    """The default registry; what a test declares in it is undone afterwards."""
    with default_upcasters.scoped() as registry:
        yield registry


def new_code(upcasters: UpcasterRegistry, function: Any = split_name) -> None:
    """The new code: ``user_created`` at version 2, ``function`` its upcaster from 1."""
    upcasters.declare("user_created", 2)
    upcasters.register("user_created", function, from_version=1)


async def write_users(factory: Factory, registry: SubscriberRegistry, *names: str) -> None:
    """Old code: commit one ``user_created`` (version 1) per name, pending for ``upcast_sink``."""
    registry.add_destination("upcast_sink", "user_created")
    async with UnitOfWork(factory, registry=registry) as uow:
        for name in names:
            await UserRepository.create(uow.session, {"name": name})


async def deliver(factory: Factory, sink: Sink) -> int:
    """One relay pass (what ``alchemium relay --once`` does) with ``sink``."""
    return await OutboxRelay(factory, sink, listen=False).drain()


# -- the registry ----------------------------------------------------------------------------


def test_new_events_get_the_declared_version_and_to_dict_carries_it(
    upcasters: UpcasterRegistry,
) -> None:
    assert (
        DomainEvent.create("user_created", aggregate_type="user", aggregate_id=1).schema_version
        == 1
    )
    upcasters.declare("user_created", 2)
    event = DomainEvent.create("user_created", aggregate_type="user", aggregate_id=1)
    assert event.schema_version == 2
    assert event.to_dict()["schema_version"] == 2
    assert DomainEvent.from_dict(event.to_dict()) == event
    old = {k: v for k, v in event.to_dict().items() if k != "schema_version"}
    assert DomainEvent.from_dict(old).schema_version == 1  # JSON of older versions


def test_a_gap_in_a_chain_fails_at_first_use_naming_the_event(upcasters: UpcasterRegistry) -> None:
    upcasters.declare("order_placed", 4)
    upcasters.register("order_placed", split_name, from_version=1)
    upcasters.register("order_placed", split_name, from_version=3)
    with pytest.raises(EventConfigurationError, match=r"'order_placed'.*gap.*version 2"):
        DomainEvent.create("order_placed", aggregate_type="order", aggregate_id=1)
    upcasters.register("order_placed", split_name, from_version=2)
    upcasters.validate()
    assert upcasters.current_version("order_placed") == 4


def test_a_cycle_or_a_version_newer_than_the_current_one_is_refused(
    upcasters: UpcasterRegistry,
) -> None:
    with pytest.raises(EventConfigurationError, match=r"'order_placed'.*backwards.*cycle"):
        upcasters.register("order_placed", split_name, from_version=2, to_version=1)
    upcasters.declare("order_placed", 2)
    upcasters.register("order_placed", split_name, from_version=1, to_version=3)
    with pytest.raises(EventConfigurationError, match=r"'order_placed'.*version 3, newer than"):
        upcasters.validate()


def test_a_second_upcaster_from_one_version_or_a_second_declaration_is_refused(
    upcasters: UpcasterRegistry,
) -> None:
    upcasters.register("order_placed", split_name, from_version=1)
    with pytest.raises(EventConfigurationError, match="already has an upcaster from version 1"):
        upcasters.register("order_placed", broken, from_version=1)
    upcasters.declare("order_placed", 2)
    with pytest.raises(EventConfigurationError, match="already declared at schema version 2"):
        upcasters.declare("order_placed", 3)


def test_an_event_stored_by_newer_code_raises_naming_it(upcasters: UpcasterRegistry) -> None:
    newer = DomainEvent.create(
        "user_created", aggregate_type="user", aggregate_id=1, schema_version=3
    )
    with pytest.raises(UpcastError, match=r"'user_created'.*stored at schema version 3.*newer"):
        upcasters.upcast(newer)


# -- readers of stored events ----------------------------------------------------------------


async def test_relay_delivers_events_written_at_v1_as_v2(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    upcasters: UpcasterRegistry,
) -> None:
    await write_users(session_factory, registry, "Ada Lovelace", "Alan Turing")

    # The new code: version 2 and its upcaster, then a relay.
    new_code(upcasters)
    sink = Sink("upcast_sink")
    assert await deliver(session_factory, sink) == 2

    assert {e.schema_version for e in sink.received} == {2}
    assert [(e.payload["first_name"], e.payload["last_name"]) for e in sink.received] == [
        ("Ada", "Lovelace"),
        ("Alan", "Turing"),
    ]
    assert all("name" not in e.payload for e in sink.received)
    async with engine.connect() as conn:  # the history itself is never rewritten
        stored = (
            await conn.execute(select(outbox.events.c.schema_version, outbox.events.c.payload))
        ).all()
    assert {(version, payload["name"]) for version, payload in stored} == {
        (1, "Ada Lovelace"),
        (1, "Alan Turing"),
    }


async def test_a_relay_process_with_the_new_code_delivers_v2_payloads(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    db_url: str,
    tmp_path: Path,
) -> None:
    await write_users(session_factory, registry, "Grace Hopper")
    sink = tmp_path / "sink"
    done = await asyncio.to_thread(
        run_cli,
        "relay",
        "--url",
        db_url,
        "--import",
        "tests.events.upcast_handlers",
        "--once",
        env={"ALCHEMIUM_SINK": str(sink)},
    )
    assert done.returncode == 0, done.stderr
    lines = [
        json.loads(line)
        for p in tmp_path.glob("sink.*")
        for line in p.read_text().split("\n")
        if line
    ]
    assert lines == [
        {
            "version": 2,
            "payload": {**lines[0]["payload"], "first_name": "Grace", "last_name": "Hopper"},
        }
    ]
    assert "name" not in lines[0]["payload"]
    assert await by_status(engine, outbox) == {"delivered": 1}


async def test_a_failing_upcaster_loses_nothing_dead_then_delivered_after_fix_and_requeue(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    upcasters: UpcasterRegistry,
) -> None:
    await write_users(session_factory, registry, "Ada Lovelace", "Alan Turing")
    upcasters.declare("user_created", 2)
    sink = Sink("upcast_sink")
    with upcasters.scoped():
        upcasters.register("user_created", broken, from_version=1)
        relay = OutboxRelay(session_factory, sink, listen=False, max_attempts=2, backoff_base=0.001)
        await relay.run_once()
        assert await by_status(engine, outbox) == {"pending": 2}  # retried, not lost
        await asyncio.sleep(0.05)
        await relay.run_once()
    assert sink.received == []
    rows = await delivery_rows(engine, outbox)
    assert {r["status"] for r in rows} == {"dead"}
    assert all("UpcastError" in r["last_error"] for r in rows)
    assert all("stored at schema version 1" in r["last_error"] for r in rows)
    assert all("KeyError" in r["last_error"] for r in rows)

    upcasters.register("user_created", split_name, from_version=1)  # the fix
    async with session_factory() as session:
        assert await outbox.requeue(session) == 2
        await session.commit()
    assert await deliver(session_factory, sink) == 2
    assert sorted(e.payload["first_name"] for e in sink.received) == ["Ada", "Alan"]


async def test_after_commit_dispatch_upcasts_an_event_recorded_at_an_older_version(
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    upcasters: UpcasterRegistry,
    engine: AsyncEngine,
) -> None:
    new_code(upcasters)
    seen: list[DomainEvent] = []
    registry.subscribe("user_created", seen.append, name="seen")
    old = DomainEvent.create(
        "user_created", aggregate_type="user", aggregate_id=7, payload={"name": "Grace Hopper"},
        schema_version=1,
    )  # fmt: skip
    async with UnitOfWork(session_factory, registry=registry) as uow:
        uow.add_event(old)
    assert [(e.schema_version, e.payload["first_name"]) for e in seen] == [(2, "Grace")]
    assert await by_status(engine, outbox) == {"delivered": 1}


async def test_after_commit_dispatch_leaves_an_event_it_cannot_upcast_to_the_relay(
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    upcasters: UpcasterRegistry,
    engine: AsyncEngine,
) -> None:
    new_code(upcasters, broken)
    seen: list[DomainEvent] = []
    registry.subscribe("user_created", seen.append, name="seen")
    async with UnitOfWork(session_factory, registry=registry) as uow:
        uow.add_event(
            DomainEvent.create(
                "user_created", aggregate_type="user", aggregate_id=7, schema_version=1
            )
        )
    assert seen == []
    [row] = await delivery_rows(engine, outbox)
    assert row["status"] == "pending"
    assert "stored at schema version 1" in row["last_error"]


async def test_audit_history_shows_old_changes_at_the_current_version(
    session_factory: Factory,
    audit: AuditLog,
    upcasters: UpcasterRegistry,
) -> None:
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.create(uow.session, {"name": "Ada Lovelace"})
    new_code(upcasters)
    async with session_factory() as session:
        [entry] = await audit_history(session, "user", user.id)
        [stored] = await audit_history(session, "user", user.id, upcast=False)
    assert (entry.schema_version, entry.changes["first_name"]) == (2, "Ada")
    assert (stored.schema_version, stored.changes["name"]) == (1, "Ada Lovelace")


async def test_every_write_path_stores_the_version_events_are_created_at(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    audit: AuditLog,
    registry: SubscriberRegistry,
    upcasters: UpcasterRegistry,
) -> None:
    # One event (on PostgreSQL: events and deliveries in one statement), then a bulk
    # create of more events than that statement takes (the two-statement write).
    new_code(upcasters)
    registry.add_destination("upcast_sink", "user_created")
    async with UnitOfWork(session_factory, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "Ada Lovelace"})
    async with UnitOfWork(session_factory, registry=registry) as uow:
        await UserRepository.create_many(uow.session, [{"name": f"u{i}"} for i in range(150)])
    async with engine.connect() as conn:
        in_outbox = (await conn.execute(select(outbox.events.c.schema_version))).scalars()
        in_audit = (await conn.execute(select(audit.table.c.schema_version))).scalars()
        assert sorted(in_outbox) == sorted(in_audit) == [2] * 151


async def test_a_row_written_before_schema_versions_existed_reads_as_version_1(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    upcasters: UpcasterRegistry,
) -> None:
    await write_users(session_factory, registry, "Ada Lovelace")
    async with session_factory() as session:  # what a migrated database holds: NULL
        await session.execute(update(outbox.events).values(schema_version=None))
        await session.commit()
    new_code(upcasters)
    sink = Sink("upcast_sink")
    assert await deliver(session_factory, sink) == 1
    assert (sink.received[0].schema_version, sink.received[0].payload["first_name"]) == (2, "Ada")
