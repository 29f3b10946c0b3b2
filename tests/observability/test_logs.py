"""Log records of the dispatch and the relay carry the delivery in ``extra=``, never payloads."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import DomainEvent, OutboxRelay, SubscriberRegistry
from alchemium.events.outbox import Outbox
from tests.events.relay_support import Sink, write_pending
from tests.models import UserRepository

Factory = async_sessionmaker[AsyncSession]

SECRET = "ann@example.com"  # personal data in a payload


def fields(record: logging.LogRecord) -> dict[str, object]:
    names = ("event_id", "event_name", "destination", "attempt", "claim_token", "relay_id")
    return {n: getattr(record, n) for n in names if hasattr(record, n)}


def assert_no_payload(records: list[logging.LogRecord]) -> None:
    for record in records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.__dict__)


async def test_relay_records_name_event_destination_attempt_and_claim(
    caplog: pytest.LogCaptureFixture, session_factory: Factory, outbox: Outbox
) -> None:
    events = [
        DomainEvent.create(n, aggregate_type="user", aggregate_id="1", payload={"email": SECRET})
        for n in ("user_created", "user_updated")
    ]
    async with session_factory() as session:
        await write_pending(session, outbox, events, ["sink"])
        await session.commit()
    relay = OutboxRelay(
        session_factory,
        Sink(fail=lambda e: e.name == "user_updated"),
        listen=False,
        max_attempts=2,
        backoff_base=0.001,
        relay_id="relay-1",
    )
    caplog.set_level(logging.DEBUG, logger="alchemium.relay")

    await relay.run_once()  # created delivered, updated failed (attempt 1)
    failed = next(r for r in caplog.records if r.levelno == logging.WARNING)
    delivered = next(r for r in caplog.records if r.getMessage().startswith("delivered event"))
    claimed = next(r for r in caplog.records if "claimed 2 row(s)" in r.getMessage())
    token = claimed.__dict__["claim_token"]
    assert fields(delivered) == {
        "event_id": str(events[0].id),
        "event_name": "user_created",
        "destination": "sink",
        "attempt": 1,
        "claim_token": token,
        "relay_id": "relay-1",
    }
    assert fields(failed) == {**fields(delivered), "event_id": str(events[1].id),
                              "event_name": "user_updated"}  # fmt: skip

    caplog.clear()
    while not caplog.records:  # the retry, once its backoff elapsed: dead
        await relay.run_once()
    (dead,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert fields(dead)["attempt"] == 2
    assert fields(dead)["event_id"] == str(events[1].id)
    assert_no_payload(caplog.records)


async def test_a_failing_subscriber_is_logged_with_its_event_and_claim(
    caplog: pytest.LogCaptureFixture, session_factory: Factory, registry: SubscriberRegistry
) -> None:
    @registry.on("user_created", name="mailer")
    def mailer(event: DomainEvent) -> None:
        raise RuntimeError("smtp down")

    with caplog.at_level(logging.ERROR, logger="alchemium.events"):
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "ann", "email": SECRET})

    (record,) = caplog.records
    logged = fields(record)
    assert logged["destination"] == "mailer"
    assert logged["event_name"] == "user_created"
    assert logged["attempt"] == 1
    assert set(logged) == {"event_id", "event_name", "destination", "attempt", "claim_token"}
    assert_no_payload(caplog.records)
