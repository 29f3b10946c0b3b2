"""The outbox relay against real databases: delivery, retries, fencing, leases, crashes.

Every test is bounded by timeouts. Tests marked with ``backend`` = postgresql need
row locking (``SKIP LOCKED``), LISTEN/NOTIFY or concurrent transactions.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    SubscriberRegistry,
)
from alchemium.events.outbox import Outbox, database_now
from tests.events.relay_support import (
    LONG_AGO,
    Sink,
    StalledSink,
    by_status,
    delivery_rows,
    eventually,
    insert_events,
    make_events,
    relay_logs,
    relay_process,
    sink_lines,
    stop_process,
    write_pending,
)
from tests.models import UserRepository

postgres_only = pytest.mark.parametrize("backend", ["postgresql"])

Factory = async_sessionmaker[AsyncSession]


async def test_run_once_delivers_and_marks_delivered(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    events = await insert_events(session_factory, outbox, 10)
    sink = Sink()
    relay = OutboxRelay(session_factory, sink, listen=False)

    assert await relay.run_once() == 10
    assert await relay.run_once() == 0

    assert sink.ids() == [e.id for e in events]  # claim order = sequence order
    rows = await delivery_rows(engine, outbox)
    assert {r["status"] for r in rows} == {"delivered"}
    assert all(r["delivered_at"] is not None and r["claim_token"] is None for r in rows)
    assert all(r["attempts"] == 1 and r["claimed_by"] == relay.relay_id for r in rows)
    assert relay.stats.delivered == 10


async def test_run_once_claims_at_most_a_batch(session_factory: Factory, outbox: Outbox) -> None:
    await insert_events(session_factory, outbox, 25)
    relay = OutboxRelay(session_factory, Sink(), batch_size=10, listen=False)
    assert [await relay.run_once() for _ in range(4)] == [10, 10, 5, 0]


async def test_drain_delivers_what_is_due_now_then_returns(
    session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 6, aggregates=2)
    relay = OutboxRelay(session_factory, Sink(), ordered=True, listen=False)
    assert await relay.drain() == 6  # each delivery made the next event of its aggregate due

    class Busy(Sink):
        async def publish(self, event: DomainEvent, destination: str) -> None:
            await super().publish(event, destination)
            await insert_events(session_factory, outbox, 1)  # a steady stream of new events

    await insert_events(session_factory, outbox, 3)
    relay = OutboxRelay(session_factory, Busy(), batch_size=1, listen=False)
    assert await relay.drain() == 3  # as many as were undelivered when it started


async def test_a_prefetched_batch_keeps_its_lease_while_the_one_before_it_publishes(
    session_factory: Factory, outbox: Outbox
) -> None:
    # Each batch takes longer to publish than a lease: the batch claimed meanwhile
    # (prefetched) must not expire and be claimed a second time by the next prefetch.
    events = await insert_events(session_factory, outbox, 6)
    publisher = Sink(delay=0.4)
    relay = OutboxRelay(session_factory, publisher, batch_size=2, lease=0.6, listen=False)
    assert await relay.drain() == 6
    assert relay.stats.lost_leases == 0
    assert publisher.ids() == [e.id for e in events]  # each once


async def test_stats_report_the_lag_of_the_oldest_pending_event(
    session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 3, destinations=["elsewhere", "sink"])
    relay = OutboxRelay(session_factory, Sink(name="elsewhere"), listen=False)
    assert relay.stats.oldest_pending_age is None
    await relay._housekeeping(idle=True)
    assert relay.stats.oldest_pending_age is not None
    assert 0 <= relay.stats.oldest_pending_age < 60


async def test_inprocess_publisher_retries_only_the_failed_subscriber(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    calls: Counter[str] = Counter()
    broken = True

    @registry.on("user_created", name="welcome")
    def welcome(event: DomainEvent) -> None:
        calls["welcome"] += 1

    @registry.on("user_created", name="crm")
    async def crm(event: DomainEvent) -> None:
        calls["crm"] += 1
        if broken:
            raise ConnectionError("crm is down")

    async with UnitOfWork(session_factory, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": "alice"})
    assert calls == {"welcome": 1, "crm": 1}
    assert {r["destination"]: r["status"] for r in await delivery_rows(engine, outbox)} == {
        "welcome": "delivered",
        "crm": "pending",
    }

    broken = False
    relay = OutboxRelay(session_factory, InProcessPublisher(registry), listen=False)
    # The after-commit dispatch scheduled the retry about a second ahead.
    await eventually(relay.run_once, timeout=5, interval=0.1)
    assert calls == {"welcome": 1, "crm": 2}
    assert {r["status"] for r in await delivery_rows(engine, outbox)} == {"delivered"}


async def test_failing_delivery_is_retried_then_dead_and_others_unaffected(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    events = await insert_events(session_factory, outbox, 5)
    poison = events[2].id
    sink = Sink(fail=lambda e: e.id == poison)
    relay = OutboxRelay(
        session_factory, sink, max_attempts=3, backoff_base=0.01, backoff_cap=0.02, listen=False
    )

    async def poison_is_dead() -> bool:
        await relay.run_once()
        return relay.stats.dead == 1

    await eventually(poison_is_dead, timeout=10, interval=0.03)

    assert sorted(map(str, sink.ids())) == sorted(str(e.id) for e in events if e.id != poison)
    assert relay.stats.delivered == 4
    assert relay.stats.retried == 2
    rows = {r["event_id"]: r for r in await delivery_rows(engine, outbox)}
    assert rows[poison]["status"] == "dead"
    assert rows[poison]["attempts"] == 3
    assert "sink refused" in rows[poison]["last_error"]
    async with session_factory() as session:
        dead = await outbox.dead(session)
    assert [d["event_id"] for d in dead] == [poison]

    # Requeue after the fix: delivered on the next round.
    sink.fail = lambda _e: False
    async with session_factory() as session:
        assert await outbox.requeue(session) == 1
        await session.commit()
    assert await relay.run_once() == 1
    assert sink.ids().count(poison) == 1
    assert await by_status(engine, outbox) == {"delivered": 5}


class Gated(Sink):
    """A sink whose publish waits until ``gate`` is set (a relay paused mid-batch)."""

    def __init__(self, gate: asyncio.Event, **options: Any) -> None:
        super().__init__(**options)
        self.gate = gate

    async def publish(self, event: DomainEvent, destination: str) -> None:
        self.started.set()
        await self.gate.wait()
        await super().publish(event, destination)


async def stalled_relay(
    factory: Factory, gate: asyncio.Event
) -> tuple[OutboxRelay, Gated, asyncio.Task[int]]:
    """A relay whose round has claimed its rows and waits for ``gate`` to publish them."""
    sink = Gated(gate)
    relay = OutboxRelay(factory, sink, lease=30, listen=False)
    round_ = asyncio.create_task(relay.run_once())
    await asyncio.wait_for(sink.started.wait(), 5)
    return relay, sink, round_


async def expire_leases(factory: Factory, outbox: Outbox) -> None:
    """Every claim's lease runs out now, as if its relay had paused past it."""
    async with factory() as session:
        await session.execute(update(outbox.deliveries).values(claimed_until=database_now()))
        await session.commit()
    await asyncio.sleep(0.01)


async def test_stale_relay_cannot_overwrite_the_outcome_of_the_reclaiming_relay(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    [event] = await insert_events(session_factory, outbox, 1)
    release = asyncio.Event()  # relay A paused (GC, network) past its lease
    relay_a, stalled, a_round = await stalled_relay(session_factory, release)

    # A's lease runs out while it is stalled; B reclaims the row and fails on it.
    await expire_leases(session_factory, outbox)
    relay_b = OutboxRelay(
        session_factory, Sink(fail=lambda _e: True), lease=30, backoff_base=60, listen=False
    )
    assert await relay_b.run_once() == 0
    [row] = await delivery_rows(engine, outbox)
    assert (row["status"], row["attempts"]) == ("pending", 2)

    # A wakes up and reports success: fenced out, B's state stands.
    release.set()
    assert await asyncio.wait_for(a_round, 5) == 0
    assert stalled.ids() == [event.id]
    assert relay_a.stats.lost_leases == 1
    [after] = await delivery_rows(engine, outbox)
    assert after["status"] == "pending"
    assert "sink refused" in after["last_error"]
    assert after["next_attempt_at"] == row["next_attempt_at"]


async def test_stale_relay_cannot_complete_rows_the_reclaiming_relay_still_holds(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    [event] = await insert_events(session_factory, outbox, 1)
    release_a, release_b = asyncio.Event(), asyncio.Event()
    relay_a, stalled_a, a_round = await stalled_relay(session_factory, release_a)

    # A's lease runs out while it is stalled; B reclaims the row and stalls in turn.
    await expire_leases(session_factory, outbox)
    relay_b, stalled_b, b_round = await stalled_relay(session_factory, release_b)
    [held] = await delivery_rows(engine, outbox)
    assert (held["status"], held["claimed_by"]) == ("claimed", relay_b.relay_id)

    # A wakes up and reports success: fenced out, the row is still B's.
    release_a.set()
    assert await asyncio.wait_for(a_round, 5) == 0
    assert relay_a.stats.lost_leases == 1
    [row] = await delivery_rows(engine, outbox)
    assert (row["status"], row["claim_token"], row["claimed_by"]) == (
        "claimed",
        held["claim_token"],
        relay_b.relay_id,
    )

    # B finishes and records its own outcome (the event went out twice: at least once).
    release_b.set()
    assert await asyncio.wait_for(b_round, 5) == 1
    [done] = await delivery_rows(engine, outbox)
    assert done["status"] == "delivered"
    assert stalled_a.ids() == stalled_b.ids() == [event.id]


async def test_expired_lease_is_claimed_again(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 3)
    async with session_factory() as session:  # a relay that claimed, then died
        import uuid

        dead_relay = await outbox.claim(
            session, ["sink"], limit=10, lease=0.3, token=uuid.uuid4(), claimed_by="dead"
        )
        await session.commit()
    assert len(dead_relay) == 3

    relay = OutboxRelay(session_factory, Sink(), listen=False)
    assert await relay.run_once() == 0  # still leased
    await asyncio.sleep(0.4)
    assert await relay.run_once() == 3
    rows = await delivery_rows(engine, outbox)
    assert {(r["status"], r["attempts"], r["claimed_by"]) for r in rows} == {
        ("delivered", 2, relay.relay_id)
    }


async def test_heartbeat_keeps_the_lease_of_a_slow_batch(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 4)
    slow = OutboxRelay(session_factory, Sink(delay=0.15), lease=0.3, listen=False)
    other = Sink()
    rival = OutboxRelay(session_factory, other, lease=0.3, listen=False)
    round_ = asyncio.create_task(slow.run_once())
    # The batch takes 0.6s, twice the lease: without renewal the rival would steal it.
    for _ in range(6):
        await asyncio.sleep(0.1)
        assert await rival.run_once() == 0
    assert await asyncio.wait_for(round_, 5) == 4
    assert other.received == []
    assert slow.stats.lost_leases == 0


async def test_stop_finishes_the_batch_in_flight(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 30)
    sink = Sink(delay=0.01)
    relay = OutboxRelay(session_factory, sink, batch_size=10, listen=False, poll_interval=0.05)
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(sink.started.wait(), 5)
    relay.stop()
    await asyncio.wait_for(task, 10)
    counts = await by_status(engine, outbox)
    assert "claimed" not in counts
    assert counts["delivered"] == len(sink.received) >= 10


async def test_stop_during_a_publish_claims_nothing_more(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    """stop() also wakes the relay: that wake-up must not count as events committed
    meanwhile, or the relay would claim and deliver another batch before returning."""
    first = await insert_events(session_factory, outbox, 5)
    sink = StalledSink()
    relay = OutboxRelay(session_factory, sink, batch_size=10, listen=False, poll_interval=30)
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(sink.started.wait(), 5)
    await insert_events(session_factory, outbox, 5)  # committed while the batch publishes
    relay.stop()
    sink.release.set()
    await asyncio.wait_for(task, 10)
    assert sink.ids() == [e.id for e in first]
    assert await by_status(engine, outbox) == {"delivered": 5, "pending": 5}


async def test_ordered_mode_holds_an_aggregate_behind_its_dead_event(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    events = make_events(6, aggregates=2)  # aggregate 0: events 0,2,4; aggregate 1: 1,3,5
    async with session_factory() as session:
        await write_pending(session, outbox, events, ["sink"])
        await session.commit()
    sink = Sink(fail=lambda e: e.id == events[0].id)
    relay = OutboxRelay(
        session_factory, sink, ordered=True, max_attempts=2, backoff_base=0.01, listen=False
    )

    async def poison_is_dead() -> bool:
        await relay.run_once()
        return relay.stats.dead == 1

    await eventually(poison_is_dead, timeout=10, interval=0.03)
    for _ in range(3):
        await relay.run_once()
    assert sink.ids() == [events[1].id, events[3].id, events[5].id]
    async with session_factory() as session:
        assert await outbox.blocked_aggregates(session) == [("sink", "user", "0")]
        dead_ids = [d["id"] for d in await outbox.dead(session)]
        assert await outbox.discard(session, dead_ids) == 1
        await session.commit()
    while await relay.run_once():
        pass
    assert sink.ids()[3:] == [events[2].id, events[4].id]


async def test_per_aggregate_order_holds_under_random_failures(
    session_factory: Factory, outbox: Outbox, new_engine: object, backend: str
) -> None:
    """Four relays on PostgreSQL; on SQLite, which runs one relay at a time, one."""
    aggregates, per_aggregate = 25, 8
    events = await insert_events(session_factory, outbox, aggregates * per_aggregate, aggregates=25)
    position = {e.id: i for i, e in enumerate(events)}
    rng = random.Random(7)
    delivered: list[DomainEvent] = []

    class Flaky(Sink):
        async def publish(self, event: DomainEvent, destination: str) -> None:
            await asyncio.sleep(rng.random() * 0.002)
            if rng.random() < 0.3:
                raise RuntimeError("random failure")
            delivered.append(event)

    relays = [
        OutboxRelay(
            async_sessionmaker(new_engine(), expire_on_commit=False),  # type: ignore[operator]
            Flaky(),
            ordered=True,
            batch_size=10,
            max_attempts=100,
            backoff_base=0.005,
            backoff_cap=0.02,
            poll_interval=0.02,
            listen=False,
        )
        for _ in range(4 if backend == "postgresql" else 1)
    ]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        await eventually(lambda: len(delivered) >= len(events), timeout=60, interval=0.1)
    finally:
        for r in relays:
            r.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert len(delivered) == len(events)
    assert len({e.id for e in delivered}) == len(events)
    seen: dict[str, list[int]] = defaultdict(list)
    for event in delivered:
        seen[event.aggregate_id].append(position[event.id])
    assert all(order == sorted(order) for order in seen.values())
    assert sum(r.stats.retried for r in relays) > 0  # the failures did happen
    assert all(r.stats.delivered > 0 for r in relays)  # and every relay took part


@postgres_only
@pytest.mark.parametrize("relays", [1, 4])
async def test_relay_processes_deliver_every_event_exactly_once(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    db_url: str,
    tmp_path: Path,
    relays: int,
) -> None:
    total = 20_000
    sink = tmp_path / "sink"
    procs = [
        relay_process(db_url, sink, "--batch-size", "200", "--poll-interval", "0.5")
        for _ in range(relays)
    ]
    try:
        await eventually(
            lambda: relay_logs(sink).count("listening on channel") == relays, timeout=30
        )
        events = make_events(total)
        async with session_factory() as session:  # one commit: all relays start together
            for start in range(0, total, 2000):
                await write_pending(session, outbox, events[start : start + 2000], ["sink"])
            await session.commit()
        committed = time.monotonic()
        await eventually(lambda: len(sink_lines(sink)) >= total, timeout=90, interval=0.05)
        elapsed = time.monotonic() - committed
        await asyncio.sleep(0.3)  # a late duplicate would show up now
    finally:
        codes = [stop_process(p) for p in procs]
    lines = sink_lines(sink)
    per_process = sorted(len(p.read_text().split()) for p in tmp_path.glob("sink.*"))
    print(
        f"\n{relays} relay process(es): {total} events delivered {elapsed:.2f}s after commit "
        f"({total / elapsed:.0f} events/s), per process {per_process}"
    )
    assert codes == [0] * relays, relay_logs(sink)
    assert len(lines) == total  # none twice
    assert set(lines) == {str(e.id) for e in events}  # none missing
    assert len(per_process) == relays  # every process took part
    assert await by_status(engine, outbox) == {"delivered": total}


async def test_sigkilled_relay_then_second_relay_delivers_everything_at_least_once(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    db_url: str,
    tmp_path: Path,
) -> None:
    total = 600
    events = await insert_events(session_factory, outbox, total)
    sink = tmp_path / "sink"
    first = relay_process(
        db_url, sink, "--batch-size", "50", "--lease", "1", "--poll-interval", "0.2", delay=0.002
    )
    try:
        await eventually(lambda: len(sink_lines(sink)) >= 120, timeout=30)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    killed_after = len(sink_lines(sink))
    assert killed_after < total
    counts = await by_status(engine, outbox)
    assert counts.get("claimed", 0) > 0  # it died holding a batch

    second = relay_process(
        db_url, sink, "--batch-size", "50", "--lease", "1", "--poll-interval", "0.2"
    )
    try:
        await eventually(
            lambda: {str(e.id) for e in events} <= set(sink_lines(sink)), timeout=60, interval=0.1
        )
    finally:
        assert stop_process(second) == 0
    lines = sink_lines(sink)
    duplicates = len(lines) - len(set(lines))
    print(
        f"\nSIGKILL after {killed_after} deliveries; {len(lines)} deliveries for {total} "
        f"events: {duplicates} duplicate(s)"
    )
    assert set(lines) == {str(e.id) for e in events}
    assert duplicates <= 50  # at most the batch in flight when it died
    assert await by_status(engine, outbox) == {"delivered": total}


async def test_polling_delivers_with_listen_disabled(
    session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    registry.add_destination("sink")
    sink = Sink()
    relay = OutboxRelay(session_factory, sink, listen=False, poll_interval=0.2)
    task = asyncio.create_task(relay.run())
    try:
        # The relay has found nothing and sleeps: only its polling can find the event.
        await eventually(lambda: relay.stats.rounds >= 1, timeout=5)
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "bob"})
        await eventually(lambda: len(sink.received) == 1, timeout=5)
        assert not relay.listening
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
    assert sink.received[0].name == "user_created"


@postgres_only
async def test_notify_wakes_a_listening_relay_at_once(
    session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    registry.add_destination("sink")
    sink = Sink()
    relay = OutboxRelay(session_factory, sink, poll_interval=60)
    task = asyncio.create_task(relay.run())
    try:
        assert await relay.wait_listening(10)
        await asyncio.sleep(0.2)  # the round triggered by connecting is over
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "carol"})
        committed = time.monotonic()
        await eventually(lambda: len(sink.received) == 1, timeout=3, interval=0.005)
        latency = time.monotonic() - committed
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
    print(f"\nNOTIFY -> delivered in {latency * 1000:.0f} ms (poll interval 60 s)")
    assert latency < 1.0


@dataclass
class CommittingSink(Sink):
    """A Sink that, while publishing the first event it is given, commits one more event
    (one of the same aggregate if ``same_aggregate``) and wakes the relay, as the NOTIFY
    of that commit would. ``before_commit`` runs first (a test takes a lock there)."""

    session_factory: Factory | None = None
    outbox: Outbox | None = None
    same_aggregate: bool = False
    before_commit: Callable[[DomainEvent], Awaitable[None]] | None = None
    relay: OutboxRelay | None = None
    committed: list[DomainEvent] = field(default_factory=list)

    async def publish(self, event: DomainEvent, destination: str) -> None:
        if not self.committed:
            assert self.session_factory is not None
            assert self.outbox is not None
            assert self.relay is not None
            if self.before_commit is not None:
                await self.before_commit(event)
            later = DomainEvent.create(
                "user_created",
                aggregate_type=event.aggregate_type,
                aggregate_id=event.aggregate_id if self.same_aggregate else "another",
                payload={"n": 1},
            )
            async with self.session_factory() as session:
                await write_pending(session, self.outbox, [later], ["sink"])
                await session.commit()
            self.committed.append(later)
            self.relay.wake()
        await super().publish(event, destination)


@postgres_only
async def test_events_committed_while_a_batch_publishes_are_claimed_while_it_is_recorded(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    """A notification during a publish: the relay claims the new events while it records
    the batch before them, so the round trip of the outcomes does not delay them (L1).

    The first event's delivery row is locked from outside once it is claimed: its
    outcome cannot be written until the test lets go. The event committed meanwhile must
    be claimed all the same; a relay that claims only after recording never gets to it.
    """
    [first] = await insert_events(session_factory, outbox, 1)
    d = outbox.deliveries
    holder = await engine.connect()

    async def lock_first_row(event: DomainEvent) -> None:
        await holder.execute(select(d.c.id).where(d.c.event_id == event.id).with_for_update())

    sink = CommittingSink(
        session_factory=session_factory, outbox=outbox, before_commit=lock_first_row
    )
    relay = sink.relay = OutboxRelay(session_factory, sink, listen=False, poll_interval=30)
    task = asyncio.create_task(relay.run())

    async def status_of(event: DomainEvent) -> str:
        rows = await delivery_rows(engine, outbox)
        return next(r["status"] for r in rows if r["event_id"] == event.id)

    try:
        await eventually(lambda: sink.committed, timeout=10)
        [later] = sink.committed
        await eventually(lambda: _is(status_of(later), "claimed"), timeout=10)
        assert await status_of(first) == "claimed"  # its outcome still waits for the lock
        await holder.rollback()
        await eventually(lambda: len(sink.received) == 2, timeout=10)
        assert sink.ids() == [first.id, later.id]
        await eventually(lambda: _is(status_of(later), "delivered"), timeout=5)
        assert await status_of(first) == "delivered"
    finally:
        await holder.close()
        relay.stop()
        await asyncio.wait_for(task, 10)


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


@postgres_only
async def test_an_ordered_relay_claims_early_only_what_it_may_deliver(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    """Ordered: an event committed while the one before it in its aggregate publishes
    can only be claimed once that one is recorded. The relay must claim it then, at once,
    not at its next poll (30 s away): the notification is not spent on an early claim.

    The first event's outcome is held back for a second by a lock, as a slow UPDATE
    would be, so an early claim would certainly come before it and skip the later event.
    """
    [first] = await insert_events(session_factory, outbox, 1)
    d = outbox.deliveries
    holder = await engine.connect()

    async def release_later() -> None:
        await asyncio.sleep(1.0)
        await holder.rollback()

    releasing: list[asyncio.Task[None]] = []

    async def lock_for_a_second(event: DomainEvent) -> None:
        await holder.execute(select(d.c.id).where(d.c.event_id == event.id).with_for_update())
        releasing.append(asyncio.create_task(release_later()))

    sink = CommittingSink(
        session_factory=session_factory,
        outbox=outbox,
        same_aggregate=True,
        before_commit=lock_for_a_second,
    )
    relay = sink.relay = OutboxRelay(
        session_factory, sink, ordered=True, listen=False, poll_interval=30
    )
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: len(sink.received) == 2, timeout=8)
    finally:
        for release in releasing:
            await release
        await holder.close()
        relay.stop()
        await asyncio.wait_for(task, 10)
    assert sink.ids() == [first.id, sink.committed[0].id]


@postgres_only
async def test_relay_resumes_after_postgres_restart(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, pg_server: object
) -> None:
    sink = Sink()
    relay = OutboxRelay(session_factory, sink, poll_interval=0.5, lease=5)
    task = asyncio.create_task(relay.run())
    try:
        assert await relay.wait_listening(10)
        before = await insert_events(session_factory, outbox, 50)

        async def first_half_recorded() -> bool:
            return await by_status(engine, outbox) == {"delivered": 50}

        await eventually(first_half_recorded, timeout=10)
        # The rig runs with synchronous_commit=off: give the WAL writer time to write the
        # last commits, or the crash-stop below loses them (and they get redelivered).
        await asyncio.sleep(0.5)

        # No engine.dispose() here: the relay shares this engine, and connections it has
        # checked out at that moment would go back to the discarded pool unclosed. The pool
        # invalidates its dead connections itself on the first disconnect error.
        await asyncio.to_thread(pg_server.restart)  # type: ignore[attr-defined]

        after: list[DomainEvent] = []

        async def insert_after() -> bool:
            try:
                after.extend(await insert_events(session_factory, outbox, 50))
            except Exception:
                return False
            return True

        await eventually(insert_after, timeout=30, interval=0.2)

        async def all_delivered() -> bool:
            return await by_status(engine, outbox) == {"delivered": 100}

        await eventually(all_delivered, timeout=30, interval=0.1)
        assert await relay.wait_listening(15)  # LISTEN came back by itself
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
    assert {e.id for e in before + after} == set(sink.ids())
    assert relay.stats.delivered == 100  # outcomes recorded across the restart, no redelivery
    print(f"\nafter restart: {len(sink.ids())} deliveries for 100 events, stats {relay.stats}")


@postgres_only
async def test_event_committed_after_a_later_transaction_is_still_delivered(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    sink = Sink()
    relay = OutboxRelay(session_factory, sink, listen=False)
    slow_events = make_events(3)
    async with session_factory() as slow:  # transaction A: inserts first, commits last
        await write_pending(slow, outbox, slow_events, ["sink"])
        fast = await insert_events(session_factory, outbox, 3)  # transaction B commits
        assert await relay.run_once() == 3
        assert sink.ids() == [e.id for e in fast]
        await slow.commit()
    assert await relay.run_once() == 3
    assert sink.ids()[3:] == [e.id for e in slow_events]


async def test_purge_never_touches_undelivered_rows(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    import uuid

    await insert_events(session_factory, outbox, 4, destinations=["sink"])
    await insert_events(session_factory, outbox, 2, destinations=["later"])  # stays pending
    relay = OutboxRelay(session_factory, Sink(), listen=False)
    assert await relay.run_once() == 4
    async with session_factory() as session:  # two more, claimed by a relay right now
        await insert_events(session_factory, outbox, 2, destinations=["busy"])
        claimed = await outbox.claim(
            session, ["busy"], limit=5, lease=60, token=uuid.uuid4(), claimed_by="x"
        )
        await session.commit()
    assert len(claimed) == 2
    async with session_factory() as session:  # everything is "old"
        await session.execute(update(outbox.events).values(occurred_at=LONG_AGO))
        await session.execute(
            update(outbox.deliveries)
            .where(outbox.deliveries.c.status == "delivered")
            .values(delivered_at=LONG_AGO)
        )
        await session.commit()

    purged = 0
    while True:
        async with session_factory() as session:
            removed = await outbox.purge(session, older_than=3600, batch_size=3)
            await session.commit()
        if not removed:
            break
        purged += removed
    assert purged == 4
    rows = await delivery_rows(engine, outbox)
    assert sorted(r["status"] for r in rows) == ["claimed", "claimed", "pending", "pending"]
    from tests.events.conftest import count

    assert await count(engine, outbox.events) == 4  # the events of those rows are kept


async def test_a_relayed_event_is_read_only_all_the_way_down(
    session_factory: Factory, outbox: Outbox
) -> None:
    """The relay builds events from the rows it claims; nested JSON comes back frozen."""
    event = DomainEvent.create(
        "user_created",
        aggregate_type="user",
        aggregate_id="1",
        payload={"a": {"b": [1, {"c": 2}]}},
        metadata={"actor": "ann"},
    )
    async with session_factory() as session:
        await write_pending(session, outbox, [event], ["sink"])
        await session.commit()
    sink = Sink()
    assert await OutboxRelay(session_factory, sink, listen=False).drain() == 1
    [got] = sink.received
    assert got == event
    assert got.payload["a"]["b"] == (1, {"c": 2})
    with pytest.raises(TypeError):
        got.payload["a"]["b"][1]["c"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        got.payload["a"]["x"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        got.metadata["actor"] = "bob"  # type: ignore[index]
