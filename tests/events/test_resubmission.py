"""Resubmission and giving up: filtered requeue, the abandoned state, fallback handlers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import DomainEvent, GivenUpDelivery, OutboxRelay
from alchemium.events.outbox import Outbox, database_now
from alchemium.events.policies import DeliveryPolicies, DeliveryPolicy, default_policies
from tests.events.relay_support import (
    LONG_AGO,
    Sink,
    by_status,
    delivery_rows,
    run_cli,
    write_pending,
)

Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
def policies() -> Iterator[DeliveryPolicies]:
    with default_policies.scoped() as scoped:
        yield scoped


def events(n: int, name: str = "user_created", **options: object) -> list[DomainEvent]:
    return [
        DomainEvent.create(name, aggregate_type="user", aggregate_id=i, payload={"n": i}, **options)  # type: ignore[arg-type]
        for i in range(n)
    ]


async def commit(factory: Factory, outbox: Outbox, batch: list[DomainEvent], *dest: str) -> None:
    async with factory() as session:
        await write_pending(session, outbox, batch, dest)
        await session.commit()


async def fail_until_given_up(factory: Factory, relay: OutboxRelay) -> None:
    """Run rounds (waiting out the tiny backoff) until nothing is claimed."""
    while await relay.run_once() or await _due_soon(relay):
        pass


async def _due_soon(relay: OutboxRelay) -> bool:
    await asyncio.sleep(0.05)
    async with relay.session_factory() as session:
        return bool(await relay.outbox.undelivered(session, relay._destinations()))


def failing_relay(factory: Factory, sink: Sink, **options: object) -> OutboxRelay:
    return OutboxRelay(factory, sink, listen=False, backoff_base=0.001, **options)  # type: ignore[arg-type]


async def test_requeue_chooses_dead_rows_by_filter_with_a_dry_run(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    users, orders = events(3), events(2, "order_placed")
    await commit(session_factory, outbox, users + orders, "crm", "mail")
    crm = Sink("crm", fail=lambda e: e.name == "order_placed" or e.payload["n"] == 0)
    mail_error = Sink("mail", fail=lambda e: True)
    await fail_until_given_up(session_factory, failing_relay(session_factory, crm, max_attempts=1))
    await fail_until_given_up(
        session_factory, failing_relay(session_factory, mail_error, max_attempts=1)
    )
    assert await by_status(engine, outbox) == {"dead": 8, "delivered": 2}
    d = outbox.deliveries
    async with session_factory() as session:  # the mail rows failed with a timeout, an hour ago
        await session.execute(
            update(d)
            .where(d.c.destination == "mail")
            .values(last_error="TimeoutError: SMTP timed out", next_attempt_at=database_now(-3600))
        )
        await session.commit()

    async def requeue(**filters: object) -> int:
        async with session_factory() as session:
            return await outbox.requeue_matching(session, dry_run=True, **filters)  # type: ignore[arg-type]

    assert await requeue() == 8
    assert await requeue(destination="crm") == 3
    assert await requeue(event_type="order_*") == 4
    assert await requeue(event_type="order_placed", destination="crm") == 2
    assert await requeue(error_contains="smtp TIMED") == 5
    assert await requeue(min_age=1800) == 5
    assert await requeue(min_age=1800, limit=2) == 2
    assert await by_status(engine, outbox) == {"dead": 8, "delivered": 2}  # dry runs only

    async with session_factory() as session:
        assert await outbox.requeue_matching(session, destination="crm", event_type="order_*") == 2
        await session.commit()
    assert await by_status(engine, outbox) == {"dead": 6, "pending": 2, "delivered": 2}
    assert await OutboxRelay(session_factory, Sink("crm"), listen=False).drain() == 2


async def test_requeue_from_the_command_line_with_a_dry_run(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str
) -> None:
    await commit(session_factory, outbox, events(2), "crm")
    await fail_until_given_up(
        session_factory,
        failing_relay(session_factory, Sink("crm", fail=lambda e: True), max_attempts=1),
    )
    args = ("outbox", "requeue", "--url", db_url, "--error", "REFUSED", "--event-type", "user_*")
    dry = await asyncio.to_thread(run_cli, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "would requeue 2 dead deliveries (dry run: nothing changed)"
    assert await by_status(engine, outbox) == {"dead": 2}
    done = await asyncio.to_thread(run_cli, *args, "--limit", "1")
    assert done.stdout.strip() == "requeued 1 dead delivery"
    assert await by_status(engine, outbox) == {"dead": 1, "pending": 1}


async def test_a_destination_policy_abandons_after_its_attempts_and_requeue_all_leaves_them(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, policies: DeliveryPolicies
) -> None:
    await commit(session_factory, outbox, events(2), "push", "crm")
    policies.set("push", DeliveryPolicy(abandon_after_attempts=2))
    relay = failing_relay(
        session_factory,
        [Sink("push", fail=lambda e: True), Sink("crm", fail=lambda e: True)],
        max_attempts=3,
    )  # type: ignore[arg-type]
    await fail_until_given_up(session_factory, relay)
    rows = await delivery_rows(engine, outbox)
    assert {(r["destination"], r["status"], r["attempts"]) for r in rows} == {
        ("push", "abandoned", 2),
        ("crm", "dead", 3),
    }
    assert (relay.stats.abandoned, relay.stats.dead, relay.stats.lost_leases) == (2, 2, 0)
    async with session_factory() as session:
        [push] = [s for s in await outbox.destination_status(session) if s.destination == "push"]
        assert (push.abandoned, push.dead) == (2, 0)
        assert await outbox.requeue(session) == 2  # every dead row: not the abandoned ones
        assert await outbox.requeue_matching(session, include_abandoned=True) == 2
        await session.commit()
    assert await by_status(engine, outbox) == {"pending": 4}


async def test_abandoned_rows_block_their_aggregate_until_discarded(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, policies: DeliveryPolicies
) -> None:
    await commit(session_factory, outbox, events(2), "push")
    policies.set("push", DeliveryPolicy(abandon_after_attempts=1))
    relay = failing_relay(session_factory, Sink("push", fail=lambda e: True), ordered=True)
    await fail_until_given_up(session_factory, relay)
    rows = await delivery_rows(engine, outbox)
    assert {r["status"] for r in rows} == {"abandoned"}
    async with session_factory() as session:
        assert await outbox.blocked_aggregates(session) == [
            ("push", "user", "0"),
            ("push", "user", "1"),
        ]
        assert await outbox.discard(session, [r["id"] for r in rows]) == 2
        await session.commit()
    async with session_factory() as session:
        assert await outbox.blocked_aggregates(session) == []
        assert await outbox.purge(session, older_than=0) == 2  # nothing keeps them now
        await session.commit()


async def test_a_destination_policy_abandons_events_older_than_its_age(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, policies: DeliveryPolicies
) -> None:
    await commit(session_factory, outbox, events(1, occurred_at=LONG_AGO) + events(1), "push")
    policies.set("push", DeliveryPolicy(abandon_after=3600))
    await failing_relay(session_factory, Sink("push", fail=lambda e: True)).run_once()
    rows = await delivery_rows(engine, outbox)
    assert sorted(r["status"] for r in rows) == ["abandoned", "pending"]  # the old one gave up


async def test_the_fallback_handler_runs_once_when_a_delivery_goes_dead(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, policies: DeliveryPolicies
) -> None:
    [event] = events(1)
    await commit(session_factory, outbox, [event], "crm", "push")
    parked: list[GivenUpDelivery] = []
    policies.set("crm", DeliveryPolicy(on_dead=parked.append))
    policies.set("push", DeliveryPolicy(abandon_after_attempts=1, on_dead=parked.append))
    relay = failing_relay(
        session_factory,
        [Sink("crm", fail=lambda e: True), Sink("push", fail=lambda e: True)],  # type: ignore[list-item]
        max_attempts=2,
    )
    await fail_until_given_up(session_factory, relay)
    assert sorted((p.destination, p.status, p.attempts) for p in parked) == [
        ("crm", "dead", 2),
        ("push", "abandoned", 1),
    ]
    assert {p.event.id for p in parked} == {event.id}
    assert all("RuntimeError: sink refused" in (p.error or "") for p in parked)
    await relay.drain()  # nothing owed any more: not run again
    assert len(parked) == 2
    rows = await delivery_rows(engine, outbox)
    assert {r["fallback_pending"] for r in rows} == {None}


async def test_a_failing_fallback_keeps_the_dead_state_and_runs_again_later(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, policies: DeliveryPolicies
) -> None:
    await commit(session_factory, outbox, events(1), "crm")
    calls: list[int] = []

    async def alert(delivery: GivenUpDelivery) -> None:
        calls.append(delivery.id)
        if len(calls) == 1:
            raise ConnectionError("pager unreachable")

    policies.set("crm", DeliveryPolicy(on_dead=alert))
    relay = failing_relay(session_factory, Sink("crm", fail=lambda e: True), max_attempts=1)
    await relay.run_once()
    [row] = await delivery_rows(engine, outbox)
    assert (row["status"], row["fallback_pending"], len(calls)) == ("dead", True, 1)

    # A relay that died before running it, or one that failed: owed once its lease lapses.
    d = outbox.deliveries
    async with session_factory() as session:
        await session.execute(update(d).values(claimed_until=database_now(-1)))
        await session.commit()
    await OutboxRelay(session_factory, Sink("crm"), listen=False).drain()
    [row] = await delivery_rows(engine, outbox)
    assert (row["status"], row["fallback_pending"], len(calls)) == ("dead", None, 2)


async def test_requeue_cancels_an_owed_fallback(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, policies: DeliveryPolicies
) -> None:
    await commit(session_factory, outbox, events(1), "crm")
    token = uuid.uuid4()
    async with session_factory() as session:  # dead with its fallback owed, as after a crash
        [row] = await outbox.claim(session, ["crm"], limit=1, lease=30, token=token, claimed_by="t")
        await outbox.mark_given_up(
            session, token, row_id=row.id, status="dead", error="boom", fallback=True
        )
        assert await outbox.requeue(session) == 1
        await session.commit()
    calls: list[GivenUpDelivery] = []
    policies.set("crm", DeliveryPolicy(on_dead=calls.append))
    assert await OutboxRelay(session_factory, Sink("crm"), listen=False).drain() == 1
    assert calls == []
