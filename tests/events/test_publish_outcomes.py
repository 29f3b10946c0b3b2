"""Outcomes beyond "raise = retry": dead at once, retry when the broker says, start checks,
one outcome per event of a batch (``publish_many``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import (
    DomainEvent,
    OutboxRelay,
    PermanentPublishError,
    PublisherConfigurationError,
    RetryLater,
)
from alchemium.events.outbox import Outbox
from alchemium.events.outbox_schema import aware
from tests.events.relay_support import Sink, database_time, delivery_rows, insert_events

Factory = async_sessionmaker[AsyncSession]


@dataclass
class Raising(Sink):
    """A publisher that raises ``error`` for every event."""

    error: Exception = field(default_factory=lambda: RuntimeError("down"))

    async def publish(self, event: DomainEvent, destination: str) -> None:
        raise self.error


async def test_permanent_failure_is_dead_at_the_first_attempt(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 2)
    publisher = Raising(error=PermanentPublishError("receiver answered 400: not retried"))
    relay = OutboxRelay(session_factory, publisher, max_attempts=10, listen=False)
    assert await relay.run_once() == 0
    rows = await delivery_rows(engine, outbox)
    assert [(r["status"], r["attempts"]) for r in rows] == [("dead", 1), ("dead", 1)]
    assert "answered 400" in rows[0]["last_error"]
    assert (relay.stats.dead, relay.stats.retried) == (2, 0)


async def test_retry_later_sets_the_next_attempt_from_the_database_clock(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 1)
    publisher = Raising(error=RetryLater("429, Retry-After 600", 600))
    relay = OutboxRelay(
        session_factory, publisher, backoff_base=0.01, backoff_cap=1.0, listen=False
    )
    before = await database_time(engine)
    assert await relay.run_once() == 0
    (row,) = await delivery_rows(engine, outbox)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    # The receiver's 600 s, not the relay's backoff (at most 1 s here).
    assert aware(row["next_attempt_at"]) >= before + dt.timedelta(seconds=599)
    assert relay.stats.retried == 1


async def test_retry_later_still_counts_toward_max_attempts(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 1)
    relay = OutboxRelay(
        session_factory, Raising(error=RetryLater("throttled", 0)), max_attempts=2, listen=False
    )
    await relay.run_once()
    await relay.run_once()
    (row,) = await delivery_rows(engine, outbox)
    assert (row["status"], row["attempts"]) == ("dead", 2)


@dataclass
class Checked(Sink):
    """A publisher with a ``start`` check that fails, or counts its calls."""

    refuse: bool = False
    starts: int = 0

    async def start(self) -> None:
        self.starts += 1
        if self.refuse:
            raise PublisherConfigurationError("stream 'ORDERS' does not exist")


async def test_failing_start_stops_the_relay_before_it_claims_anything(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 3)
    for run in ("run_once", "drain", "run"):
        relay = OutboxRelay(session_factory, Checked(refuse=True), listen=False)
        with pytest.raises(PublisherConfigurationError, match="ORDERS"):
            await getattr(relay, run)()
    rows = await delivery_rows(engine, outbox)
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 0)}


async def test_start_runs_once_before_the_first_claim(
    session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 2)
    publisher = Checked()
    relay = OutboxRelay(session_factory, publisher, batch_size=1, listen=False)
    assert await relay.run_once() == 1
    assert await relay.run_once() == 1
    assert publisher.starts == 1


async def test_publisher_without_start_still_works(
    session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 1)
    assert not hasattr(Sink(), "start")  # written before the hook existed
    assert await OutboxRelay(session_factory, Sink(), listen=False).run_once() == 1


# -- publish_many: a batch at once, one outcome per event --------------------------------------


@dataclass
class Batched(Sink):
    """A batch publisher answering the events of each call with ``script`` (cycled)."""

    script: list[BaseException | None] = field(default_factory=lambda: [None])
    calls: list[int] = field(default_factory=list)
    answer_count: int | None = None  # a broken publisher: this many outcomes per call

    async def publish(self, event: DomainEvent, destination: str) -> None:
        raise AssertionError("the relay must use publish_many")

    async def publish_many(
        self, items: Sequence[tuple[DomainEvent, str]]
    ) -> list[BaseException | None]:
        self.calls.append(len(items))
        outcomes = [self.script[i % len(self.script)] for i in range(len(items))]
        self.received += [e for (e, _d), o in zip(items, outcomes, strict=True) if o is None]
        return outcomes[: self.answer_count]


async def test_batch_publisher_gets_the_claimed_batch_in_one_call(
    session_factory: Factory, outbox: Outbox
) -> None:
    events = await insert_events(session_factory, outbox, 25)
    publisher = Batched()
    relay = OutboxRelay(session_factory, publisher, batch_size=10, listen=False)
    assert await relay.drain() == 25
    assert publisher.calls == [10, 10, 5]
    assert publisher.ids() == [e.id for e in events]  # claim order kept


async def test_batch_outcomes_are_recorded_per_event(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 4)
    script: list[BaseException | None] = [
        None,
        PermanentPublishError("refused: too large"),
        RuntimeError("broker busy"),
        RetryLater("throttled", 600),
    ]
    relay = OutboxRelay(session_factory, Batched(script=script), backoff_cap=1.0, listen=False)
    before = await database_time(engine)
    assert await relay.run_once() == 1
    rows = await delivery_rows(engine, outbox)
    assert [(r["status"], r["attempts"]) for r in rows] == [
        ("delivered", 1),
        ("dead", 1),
        ("pending", 1),
        ("pending", 1),
    ]
    assert "broker busy" in rows[2]["last_error"]
    assert aware(rows[3]["next_attempt_at"]) >= before + dt.timedelta(seconds=599)
    assert (relay.stats.delivered, relay.stats.dead, relay.stats.retried) == (1, 1, 2)


async def test_batch_with_the_wrong_number_of_outcomes_fails_every_event(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 3)
    relay = OutboxRelay(session_factory, Batched(answer_count=2), listen=False)
    assert await relay.run_once() == 0
    rows = await delivery_rows(engine, outbox)
    assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 1)}
    assert all("2 outcome(s) for 3 event(s)" in r["last_error"] for r in rows)
