"""A time-partitioned outbox (PostgreSQL): writes, relays and replays as the plain one does;
partitions are made without waiting for writers and old periods are dropped whole,
never with an undelivered row in them.

Events of past periods are written with the writer's clock moved back
(``time_machine``): ``occurred_at`` is the writer's clock, the partition key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
import time_machine
from sqlalchemy import MetaData, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import OutboxError, UnitOfWork
from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    SubscriberRegistry,
    create_outbox_tables,
    flush_delivery_marks,
)
from alchemium.events.outbox import Outbox
from alchemium.events.outbox_partitions import (
    OutboxPartition,
    PartitionDrop,
    period_start,
    shift_period,
)
from tests.events.relay_support import Sink, database_time, eventually, run_cli, write_pending

Factory = async_sessionmaker[AsyncSession]

DAY = dt.timedelta(days=1)


@pytest.fixture
def backend() -> str:
    """Partitioning is PostgreSQL's: these tests run there only (SQLite's refusal is below)."""
    return "postgresql"


@pytest.fixture
async def box(engine: AsyncEngine) -> Outbox:
    """A day-partitioned outbox, its tables and first partitions made by create_outbox_tables."""
    outbox = Outbox(MetaData(), table_name="parted", partition_by="day")
    await create_outbox_tables(engine, outbox)
    return outbox


@pytest.fixture
def sessions(engine: AsyncEngine) -> Factory:
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def seen(registry: SubscriberRegistry) -> list[Any]:
    """Events the in-process subscriber ``seen`` received (after commit or from a relay)."""
    got: list[Any] = []
    registry.subscribe("probe", got.append, name="seen")
    return got


async def record(
    sessions: Factory, box: Outbox, registry: SubscriberRegistry, at: dt.datetime | None = None
) -> None:
    """Commit one ``probe`` event, written by a writer whose clock says ``at``."""
    if at is None:
        async with UnitOfWork(sessions, registry=registry, outbox=box) as uow:
            uow.record("probe", aggregate_type="probe", aggregate_id=1)
        return
    with time_machine.travel(at, tick=True):
        async with UnitOfWork(sessions, registry=registry, outbox=box) as uow:
            uow.record("probe", aggregate_type="probe", aggregate_id=1)


async def rows_of(engine: AsyncEngine, table: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(text(f"SELECT * FROM {table}"))]


async def table_exists(engine: AsyncEngine, name: str) -> bool:
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT to_regclass(:n)"), {"n": name})
        return found.scalar_one() is not None


async def drop_old(sessions: Factory, box: Outbox) -> PartitionDrop:
    """Drop the periods that ended more than a day ago (and hold nothing undelivered)."""
    async with sessions() as session:
        return await box.drop_partitions(session, older_than=DAY.total_seconds())


async def partitions(sessions: Factory, box: Outbox) -> list[OutboxPartition]:
    async with sessions() as session:
        return await box.partitions(session)


async def test_create_makes_the_periods_around_the_database_clock(
    engine: AsyncEngine, sessions: Factory, box: Outbox
) -> None:
    today = period_start(await database_time(engine), "day")
    parts = await partitions(sessions, box)
    assert [p.start for p in parts] == [today + k * DAY for k in range(-1, 4)]
    assert all(p.end == p.start + DAY for p in parts)
    assert parts[1].events == f"parted_p{today:%Y%m%d}"
    assert parts[1].deliveries == f"parted_delivery_p{today:%Y%m%d}"

    async with sessions() as session:
        assert await box.ensure_partitions(session) == []  # all there: nothing made
        made = await box.ensure_partitions(session, ahead=5, behind=2)
        await session.commit()
    assert [p.start for p in made] == [today - 2 * DAY, today + 4 * DAY, today + 5 * DAY]
    assert len(await partitions(sessions, box)) == 8


async def test_a_partitioned_outbox_dispatches_relays_and_replays(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
) -> None:
    for _ in range(3):
        await record(sessions, box, registry)
    await flush_delivery_marks()
    assert len(seen) == 3  # after-commit dispatch, marks written in batches
    today = period_start(await database_time(engine), "day")
    rows = await rows_of(engine, f"parted_delivery_p{today:%Y%m%d}")
    assert [r["status"] for r in rows] == ["delivered"] * 3  # in today's period

    report = await box.replay(
        sessions, "seen", since=today - DAY, registry=registry, batch_size=2, pause=0
    )
    assert (report.matched, report.redelivered) == (3, 3)
    relay = OutboxRelay(sessions, InProcessPublisher(registry), outbox=box, listen=False)
    assert await relay.drain() == 3
    assert [e.metadata.get("replay") for e in seen[3:]] == [True] * 3

    registry.subscribe("probe", lambda e: None, name="late")
    async with sessions() as session:
        assert await box.backfill(session, "late", since=today - DAY, registry=registry) == 3
        await session.commit()
    assert await relay.drain() == 3
    async with sessions() as session:
        assert (await box.status(session)).delivered == 6  # seen's rows (redelivered) + late's


async def test_making_partitions_never_waits_for_a_writer(sessions: Factory, box: Outbox) -> None:
    """CREATE TABLE ... PARTITION OF would queue an ACCESS EXCLUSIVE lock behind this writer."""
    event = DomainEvent.create("probe", aggregate_type="probe", aggregate_id="1", payload={})
    async with sessions() as writer:  # written, not committed: holds its locks meanwhile
        await write_pending(writer, box, [event], ["seen"])
        async with sessions() as maker:
            await maker.execute(text("SET LOCAL lock_timeout = '2s'"))
            made = await box.ensure_partitions(maker, ahead=6)
            await maker.commit()
        assert len(made) == 3
        await writer.commit()


async def old_periods(
    engine: AsyncEngine, sessions: Factory, box: Outbox, registry: SubscriberRegistry
) -> dt.datetime:
    """Events 3 and 2 days back (one each); returns today's period start."""
    today = period_start(await database_time(engine), "day")
    async with sessions() as session:
        await box.ensure_partitions(session, behind=4)
        await session.commit()
    for back in (3, 2):
        await record(sessions, box, registry, at=today - back * DAY + dt.timedelta(hours=12))
    await flush_delivery_marks()
    return today


async def test_old_periods_are_dropped_whole_and_undelivered_ones_kept(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
) -> None:
    today = await old_periods(engine, sessions, box, registry)
    three, two = today - 3 * DAY, today - 2 * DAY
    async with sessions() as session:  # the event of 2 days back is pending again (requeued)
        await session.execute(
            update(box.deliveries)
            .where(box.deliveries.c.event_occurred_at >= two)
            .values(status="pending")
        )
        await session.commit()
    await record(sessions, box, registry)  # today's

    report = await drop_old(sessions, box)
    dropped = [p.start for p in report.dropped]
    assert dropped == [today - 4 * DAY, three]  # an empty period goes too
    assert [(p.start, n) for p, n in report.kept] == [(two, 1)]
    assert not await table_exists(engine, f"parted_p{three:%Y%m%d}")
    assert not await table_exists(engine, f"parted_delivery_p{three:%Y%m%d}")
    async with sessions() as session:
        status = await box.status(session)
    assert (status.pending, status.delivered) == (1, 1)  # today's and the kept one

    relay = OutboxRelay(sessions, InProcessPublisher(registry), outbox=box, listen=False)
    assert await relay.drain() == 1
    report = await drop_old(sessions, box)
    assert [p.start for p in report.dropped] == [two]
    assert next(p.start for p in await partitions(sessions, box)) == today - DAY


async def test_a_replay_between_the_count_and_the_detach_keeps_the_period(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row a replay made pending just before the detach is not dropped with it."""
    today = await old_periods(engine, sessions, box, registry)
    detach = box._detach
    replayed: list[Any] = []

    async def replay_first(*args: Any) -> None:
        # A replay commits after the count found nothing undelivered in 3 days back.
        if args[2] == f"parted_delivery_p{today - 3 * DAY:%Y%m%d}" and not replayed:
            replayed.append(
                await box.replay(
                    sessions, "seen", since=today - 4 * DAY, registry=registry, pause=0
                )
            )
        await detach(*args)

    monkeypatch.setattr(box, "_detach", replay_first)
    report = await drop_old(sessions, box)
    assert replayed[0].redelivered == 2
    # 3 days back was detached, counted again, and put back; 2 days back was counted
    # before the detach like any period with undelivered rows; 4 days back is empty.
    assert [p.start for p in report.dropped] == [today - 4 * DAY]
    assert [n for _, n in report.kept] == [1, 1]
    assert [p.start for p in await partitions(sessions, box)][:2] == [
        today - 3 * DAY,
        today - 2 * DAY,
    ]
    relay = OutboxRelay(sessions, InProcessPublisher(registry), outbox=box, listen=False)
    before = len(seen)
    assert await relay.drain() == 2
    assert len(seen) == before + 2


async def test_a_drop_waits_for_running_transactions_but_no_relay_waits_for_it(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
) -> None:
    today = await old_periods(engine, sessions, box, registry)
    async with sessions() as reader:  # a long transaction that read the outbox
        await reader.execute(select(box.deliveries.c.id).limit(1))

        dropping = asyncio.create_task(drop_old(sessions, box))
        await asyncio.sleep(0.5)
        assert not dropping.done()  # DETACH ... CONCURRENTLY waits for the reader

        # Meanwhile writers, replays and relays go on (bounded: a wait would hang here).
        await asyncio.wait_for(record(sessions, box, registry), 10)
        registry.subscribe("probe", lambda e: None, name="late")
        async with sessions() as session:
            await asyncio.wait_for(
                box.backfill(session, "late", since=today, registry=registry), 10
            )
            await session.commit()
        relay = OutboxRelay(sessions, InProcessPublisher(registry), outbox=box, listen=False)
        assert await asyncio.wait_for(relay.drain(), 10) == 1
        assert not dropping.done()
        await reader.commit()
    report = await asyncio.wait_for(dropping, 30)
    assert [p.start for p in report.dropped] == [today - 4 * DAY, today - 3 * DAY, today - 2 * DAY]


async def test_a_cancelled_drop_is_finished_by_the_next_one(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
) -> None:
    today = await old_periods(engine, sessions, box, registry)
    async with sessions() as reader:
        await reader.execute(select(box.deliveries.c.id).limit(1))

        dropping = asyncio.create_task(drop_old(sessions, box))
        await eventually(lambda: _detach_pending(engine), timeout=10)
        dropping.cancel()  # the operator's Ctrl-C, a deploy: the DETACH is interrupted
        with pytest.raises(asyncio.CancelledError):
            await dropping
        await reader.commit()
    parts = await partitions(sessions, box)
    assert parts[0].detach_pending
    report = await drop_old(sessions, box)
    assert [p.start for p in report.dropped] == [today - 4 * DAY, today - 3 * DAY, today - 2 * DAY]
    assert not any(p.detach_pending for p in await partitions(sessions, box))


async def _detach_pending(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT count(*) FROM pg_inherits WHERE inhdetachpending"))
        return bool(found.scalar_one())


async def test_a_write_in_no_period_is_refused_saying_what_to_do(
    engine: AsyncEngine, sessions: Factory, box: Outbox, registry: SubscriberRegistry
) -> None:
    month_ago = await database_time(engine) - 30 * DAY
    with pytest.raises(OutboxError, match=r"no partition for events that occurred at") as caught:
        await record(sessions, box, registry, at=month_ago)
    assert "probe" in str(caught.value)
    assert "writer's clock" in str(caught.value)
    assert "no partition of relation" in str(caught.value.__cause__)
    async with sessions() as session:
        status = await box.status(session)
    assert (status.pending, status.delivered) == (0, 0)  # nothing written anywhere
    assert await rows_of(engine, "parted") == []


async def test_a_default_partition_is_named_and_refused(
    engine: AsyncEngine, sessions: Factory, box: Outbox
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE parted_delivery_rest PARTITION OF parted_delivery DEFAULT")
        )
    async with sessions() as session:
        with pytest.raises(OutboxError, match=r"parted_delivery_rest.*DEFAULT.*CONCURRENTLY"):
            await box.drop_partitions(session, older_than=0)


async def test_a_drop_in_a_session_that_began_a_transaction_is_refused(
    engine: AsyncEngine, sessions: Factory, box: Outbox
) -> None:
    async with sessions() as session:
        await session.execute(text("SELECT 1"))
        with pytest.raises(OutboxError, match=r"fresh session.*has begun a transaction"):
            await box.drop_partitions(session, older_than=0)
    async with engine.connect() as conn:
        await conn.begin()
        bound = AsyncSession(bind=conn)
        with pytest.raises(OutboxError, match="fresh session") as caught:
            await box.drop_partitions(bound, older_than=0)
        assert caught.value.__cause__ is not None
        await bound.close()


async def test_a_relay_makes_partitions_and_drops_old_periods_with_its_retention(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
) -> None:
    today = await old_periods(engine, sessions, box, registry)
    async with engine.begin() as conn:  # the coming periods are missing
        await conn.execute(text(f"DROP TABLE parted_p{today + 3 * DAY:%Y%m%d}"))
        await conn.execute(text(f"DROP TABLE parted_delivery_p{today + 3 * DAY:%Y%m%d}"))
    relay = OutboxRelay(
        sessions,
        InProcessPublisher(registry),
        outbox=box,
        listen=False,
        retention=DAY.total_seconds(),
    )
    await relay.drain()
    starts = [p.start for p in await partitions(sessions, box)]
    assert starts == [today + k * DAY for k in range(-1, 4)]


async def test_a_relay_keeps_delivering_while_its_retention_drop_waits(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
) -> None:
    """The drop waits for a transaction left open elsewhere; the relay running it does not."""
    today = await old_periods(engine, sessions, box, registry)
    sink = Sink()
    relay = OutboxRelay(
        sessions, sink, outbox=box, listen=False, poll_interval=0.05, retention=DAY.total_seconds()
    )
    async with sessions() as reader:  # a transaction left open on the outbox
        await reader.execute(select(box.deliveries.c.id).limit(1))
        running = asyncio.create_task(relay.run())
        await eventually(lambda: _detach_pending(engine), timeout=10)  # the drop is waiting
        event = DomainEvent.create("probe", aggregate_type="probe", aggregate_id="9", payload={})
        async with sessions() as writer:
            await write_pending(writer, box, [event], ["sink"])
            await writer.commit()
        await eventually(lambda: sink.ids() == [event.id], timeout=10)
        assert await _detach_pending(engine)  # delivered while the drop still waits
        await reader.commit()
    await eventually(
        lambda: _starts(sessions, box, lambda starts: starts[0] == today - DAY), timeout=30
    )
    relay.stop()
    await asyncio.wait_for(running, 30)


async def _starts(sessions: Factory, box: Outbox, check: Any) -> bool:
    return bool(check([p.start for p in await partitions(sessions, box)]))


async def test_partitioning_is_refused_where_it_cannot_work(tmp_path: Any) -> None:
    with pytest.raises(OutboxError, match="expected one of day, week, month"):
        Outbox(MetaData(), partition_by="hour")
    with pytest.raises(OutboxError, match="alchemium's shape only"):
        Outbox(MetaData(), shape="debezium", partition_by="day")
    with pytest.raises(OutboxError, match="longer than PostgreSQL's 63"):
        Outbox(MetaData(), table_name="x" * 50, partition_by="day")
    from sqlalchemy.ext.asyncio import create_async_engine

    sqlite = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(OutboxError, match="PostgreSQL only; cannot create 'parted' on sqlite"):
        await create_outbox_tables(
            sqlite, Outbox(MetaData(), table_name="parted", partition_by="day")
        )
    await sqlite.dispose()


def test_periods_start_where_date_trunc_starts_them() -> None:
    at = dt.datetime(2026, 12, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert period_start(at, "day") == dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)
    assert period_start(at, "week") == dt.datetime(2026, 12, 28, tzinfo=dt.timezone.utc)
    assert period_start(at, "month") == dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)
    december = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    assert shift_period(december, "month", 1) == dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)
    assert shift_period(december, "month", -12) == dt.datetime(2025, 12, 1, tzinfo=dt.timezone.utc)


async def test_the_command_line_makes_lists_and_drops_periods(
    engine: AsyncEngine,
    sessions: Factory,
    box: Outbox,
    registry: SubscriberRegistry,
    seen: list[Any],
    db_url: str,
) -> None:
    today = await old_periods(engine, sessions, box, registry)
    common = ("--url", db_url, "--table", "parted")
    done = await asyncio.to_thread(run_cli, "outbox", "status", *common)
    assert done.returncode == 2, done.stderr  # the tables say they are partitioned
    assert "is partitioned: pass --partition-by day|week|month" in done.stderr

    done = await asyncio.to_thread(
        run_cli,
        "outbox",
        "partitions",
        *common,
        "--partition-by",
        "day",
        "--ahead",
        "5",
        "--drop-older-than",
        "1d",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        f"made parted_p{today + k * DAY:%Y%m%d} and parted_delivery_p{today + k * DAY:%Y%m%d} "
        f"({today + k * DAY:%Y-%m-%d} 00:00Z ..)"
        for k in (4, 5)
    ]
    assert lines[2:5] == [f"dropped the period {today - k * DAY:%Y-%m-%d}" for k in (4, 3, 2)]
    assert lines[5] == "7 period(s) of a day:"
    assert lines[6] == f"  {today - DAY:%Y-%m-%d} 00:00Z .. {today:%Y-%m-%d} 00:00Z"
