"""Personal data: sensitive columns redacted or hashed, and erasure by crypto-shredding."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import JSON, LargeBinary, String, Text, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemium import CrudRepository, EventConfigurationError, UnitOfWork
from alchemium.events import (
    ERASED,
    REDACTED,
    AuditLog,
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    SubjectKeys,
    SubscriberRegistry,
    audit_history,
    capture_events,
    decode_payload,
    disable_erasure,
    enable_erasure,
    erase_subject,
    reveal_event,
    reveal_payload,
    set_sensitive_hash_key,
    subject_id,
)
from alchemium.events.outbox import Outbox
from tests.events.relay_support import by_status
from tests.models import (
    Base,
    Contact,
    ContactRepository,
    Patient,
    PatientRepository,
    Shopper,
    ShopperRepository,
    subject_keys,
)

Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
def erasure() -> Iterator[SubjectKeys]:
    keys = enable_erasure(Base.metadata)
    assert keys.table is subject_keys.table
    yield keys
    disable_erasure()


@pytest.fixture
def hash_key() -> Iterator[None]:
    set_sensitive_hash_key(b"0123456789abcdef-test")
    yield
    set_sensitive_hash_key(None)


async def every_stored_text(engine: AsyncEngine) -> str:
    """Every text, JSON and binary value of every table of the schema, as one string."""
    found: list[str] = []
    async with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            columns = [
                c for c in table.columns if isinstance(c.type, (String, Text, JSON, LargeBinary))
            ]
            if not columns:
                continue
            for row in await conn.execute(select(*columns)):
                for value in row:
                    if isinstance(value, bytes):
                        found.append(value.decode("latin-1"))
                    elif value is not None:
                        found.append(value if isinstance(value, str) else json.dumps(value))
    return "\n".join(found)


# -- declarations ------------------------------------------------------------------------------


def test_a_sensitive_declaration_that_cannot_work_is_refused_at_definition() -> None:
    class Local(DeclarativeBase):
        pass

    class Nope(Local):
        __tablename__ = "nope"
        __alchemium__ = {"sensitive": ["mail"]}
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(50))

    class Odd(Local):
        __tablename__ = "odd"
        __alchemium__ = {"sensitive": ["email"], "sensitive_mode": "rot13"}
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(50))

    with pytest.raises(EventConfigurationError, match=r"Nope: .*'mail', which is not a column"):

        class NopeRepository(CrudRepository[Nope]):
            model = Nope

    with pytest.raises(EventConfigurationError, match=r"Odd: sensitive_mode must be one of"):

        class OddRepository(CrudRepository[Odd]):
            model = Odd

    class Masked(Local):
        __tablename__ = "masked"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(50), info={"sensitive": True})

    with pytest.raises(EventConfigurationError, match=r"Masked: email is sensitive and in event_"):

        class MaskedRepository(CrudRepository[Masked]):
            model = Masked
            event_transform = {"email": len}


# -- redact and hash -----------------------------------------------------------------------


async def test_redacted_columns_never_reach_events_audit_rows_or_logs(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    audit: AuditLog,
    registry: SubscriberRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fails(event: DomainEvent) -> None:
        raise RuntimeError("handler down")

    registry.subscribe("shopper_*", fails, name="crm")
    caplog.set_level(logging.DEBUG, logger="alchemium")
    with capture_events() as events:
        async with UnitOfWork(session_factory, registry=registry) as uow:
            shopper = await ShopperRepository.create(
                uow.session, {"name": "Ann", "email": "ann@example.com", "phone": "+33 6 12"}
            )
        async with UnitOfWork(session_factory, registry=registry) as uow:
            ShopperRepository.update(
                await ShopperRepository.get(uow.session, shopper.id),
                {"email": "ann@example.org", "name": "Anne"},
            )
    await OutboxRelay(session_factory, InProcessPublisher(registry), listen=False).run_once()

    assert events[0].payload == {
        "id": shopper.id,
        "name": "Ann",
        "email": REDACTED,
        "phone": REDACTED,
    }
    assert events[1].payload["changes"] == {
        "email": {"old": REDACTED, "new": REDACTED},
        "name": {"old": "Ann", "new": "Anne"},
    }
    async with session_factory() as session:
        history = await audit_history(session, "shopper", shopper.id)
    assert history[0].changes["email"] == {"old": REDACTED, "new": REDACTED}
    assert decode_payload(Shopper, events[0].to_dict()["payload"])["email"] == REDACTED
    stored = await every_stored_text(engine)
    # alchemium's own log records (a driver's DEBUG log of the INSERT into the
    # application's table carries its parameters: that is the driver's, not ours).
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if r.name.startswith("alchemium")
    )
    assert "handler down" in logged  # the failures were logged...
    for secret in ("ann@example.com", "ann@example.org", "+33 6 12"):
        assert secret not in logged  # ...never the values
        assert stored.count(secret) == (1 if secret != "ann@example.com" else 0)  # the row only


async def test_hashed_columns_are_equal_for_equal_values_and_need_a_key(
    session_factory: Factory, outbox: Outbox, hash_key: None
) -> None:
    with capture_events() as events:
        async with UnitOfWork(session_factory) as uow:
            for email in ("a@example.com", "a@example.com", "b@example.com"):
                await ContactRepository.create(uow.session, {"email": email})
    hashes = [e.payload["email"] for e in events]
    assert hashes[0] == hashes[1] != hashes[2]
    assert all(h.startswith("hmac-sha256:") and "example" not in h for h in hashes)

    set_sensitive_hash_key(None)
    with pytest.raises(EventConfigurationError, match=r"Contact.email .* no hash key"):
        async with UnitOfWork(session_factory) as uow:
            await ContactRepository.create(uow.session, {"email": "c@example.com"})
    async with session_factory() as session:
        assert len((await session.execute(select(Contact))).all()) == 3  # nothing committed


# -- crypto-shredding ----------------------------------------------------------------------


async def test_encrypt_mode_without_erasure_enabled_commits_nothing(
    session_factory: Factory, outbox: Outbox
) -> None:
    with pytest.raises(EventConfigurationError, match=r"Patient has .*enable_erasure"):
        async with UnitOfWork(session_factory) as uow:
            await PatientRepository.create(uow.session, {"name": "Pat", "email": "p@example.com"})
    async with session_factory() as session:
        assert (await session.execute(select(Patient))).first() is None


@pytest.fixture
async def patients(
    session_factory: Factory, outbox: Outbox, audit: AuditLog, erasure: SubjectKeys
) -> AsyncIterator[dict[str, int]]:
    """Two patients, created and updated through units of work: history for both."""
    ids: dict[str, int] = {}
    async with UnitOfWork(session_factory) as uow:
        for name in ("alice", "bob"):
            patient = await PatientRepository.create(
                uow.session,
                {
                    "name": name,
                    "email": f"{name}@clinic.example",
                    "phone": f"+1-555-{name}",
                    "born": dt.date(1990, 1, 2),
                },
            )
            await uow.flush()
            ids[name] = patient.id
    async with UnitOfWork(session_factory) as uow:
        for name, key in ids.items():
            PatientRepository.update(
                await PatientRepository.get(uow.session, key),
                {"email": f"{name}.new@clinic.example"},
            )
    return ids


async def test_sealed_values_are_stored_encrypted_and_readers_reveal_them(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, patients: dict[str, int]
) -> None:
    stored = await every_stored_text(engine)
    for name in patients:  # only the application's own row holds them in clear
        assert stored.count(f"{name}.new@clinic.example") == 1
        assert stored.count(f"{name}@clinic.example") == 0
        assert stored.count(f"+1-555-{name}") == 1

    async with session_factory() as session:
        [updated, created] = await audit_history(session, "patient", patients["alice"])
        rows = (
            await session.execute(select(outbox.events).order_by(outbox.events.c.sequence))
        ).all()
        first = await reveal_event(session, DomainEvent.from_dict(dict(rows[0]._mapping)))
    assert created.changes["email"] == "alice@clinic.example"
    assert updated.changes["email"] == {
        "old": "alice@clinic.example",
        "new": "alice.new@clinic.example",
    }
    assert first.payload["phone"] == "+1-555-alice"
    assert decode_payload(Patient, first.payload)["born"] == dt.date(1990, 1, 2)
    assert created.changes["name"] == "alice"  # not sensitive: never sealed


async def test_erasing_a_subject_leaves_no_plaintext_of_it_and_keeps_the_others(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, patients: dict[str, int]
) -> None:
    alice = patients["alice"]
    before = {(r["id"], json.dumps(r["payload"])) for r in (await _rows(engine, outbox.events))}
    async with UnitOfWork(session_factory) as uow:  # the application deletes its own row
        await PatientRepository.delete(uow.session, await PatientRepository.get(uow.session, alice))
    async with session_factory() as session:
        assert await erase_subject(session, subject_id(Patient, alice)) is True
        await session.commit()

    stored = await every_stored_text(engine)
    for secret in ("alice@clinic.example", "alice.new@clinic.example", "+1-555-alice"):
        assert secret not in stored
    assert stored.count("bob.new@clinic.example") == 1  # bob's own row

    after = {(r["id"], json.dumps(r["payload"])) for r in await _rows(engine, outbox.events)}
    assert before <= after  # no history row was rewritten
    async with session_factory() as session:
        gone = await audit_history(session, "patient", alice)
        kept = await audit_history(session, "patient", patients["bob"])
        assert await erase_subject(session, subject_id(Patient, alice)) is False  # twice: harmless
    assert [e.action for e in gone] == ["deleted", "updated", "created"]
    assert {
        e.changes["email"] == ERASED or e.changes["email"] == {"old": ERASED, "new": ERASED}
        for e in gone
    } == {True}
    assert gone[-1].changes["phone"] == ERASED
    assert gone[-1].changes["name"] == "alice"
    assert kept[-1].changes["email"] == "bob@clinic.example"
    assert decode_payload(Patient, gone[-1].changes)["email"] == ERASED


async def test_values_recorded_after_erasure_are_stored_as_erased(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, patients: dict[str, int]
) -> None:
    bob = patients["bob"]
    async with session_factory() as session:
        await erase_subject(session, subject_id(Patient, bob))
        await session.commit()
    with capture_events() as events:
        async with UnitOfWork(session_factory) as uow:
            PatientRepository.update(
                await PatientRepository.get(uow.session, bob), {"phone": "+1-555-again"}
            )
    assert events[0].payload == {"changes": {"phone": {"old": ERASED, "new": ERASED}}}
    async with session_factory() as session:
        revealed = await reveal_payload(session, events[0].payload)
    assert revealed == {"changes": {"phone": {"old": ERASED, "new": ERASED}}}


async def test_subscribers_and_relays_get_sealed_values_they_can_reveal(
    session_factory: Factory,
    outbox: Outbox,
    erasure: SubjectKeys,
    registry: SubscriberRegistry,
    engine: AsyncEngine,
) -> None:
    revealed: list[Any] = []

    async def welcome(event: DomainEvent) -> None:
        assert "carol@" not in json.dumps(event.to_dict())
        async with session_factory() as session:
            revealed.append((await reveal_event(session, event)).payload["email"])

    registry.subscribe("patient_created", welcome, name="welcome")
    async with UnitOfWork(session_factory, registry=registry) as uow:
        await PatientRepository.create(uow.session, {"name": "carol", "email": "carol@x.example"})
    assert revealed == ["carol@x.example"]
    assert await by_status(engine, outbox) == {"delivered": 1}


async def _rows(engine: AsyncEngine, table: Any) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(table))]
