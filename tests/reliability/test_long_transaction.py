"""A transaction left open on another connection while relays drain a steady stream.

An application that forgets a transaction (an idle-in-transaction session, a long
report) holds back the oldest snapshot: PostgreSQL cannot vacuum the dead tuples
the relays leave behind (every delivery row is updated twice), SQLite cannot
checkpoint its WAL past the reader. The relays must keep delivering regardless.

A producer commits ``RATE`` events per second for ``seconds`` while relays run (two
on PostgreSQL, one on SQLite) and a transaction stays open on another connection:
a snapshot holding the oldest xmin, and on PostgreSQL also one uncommitted event
(the commit-order gap at its widest). Every two seconds the test samples delivered
events, throughput and the delivery table (live rows, bytes, dead tuples / WAL
size) and prints the series. Then:

* a final burst of ``BURST`` events, committed while the transaction is still open,
  measures how fast the relays drain a backlog (printed);
* every produced event, and the long transaction's own event once it commits, is
  delivered, within a bounded loop (no wall-clock assertion);
* throughput floor, counted: by the end of production the relays had delivered at
  least a quarter of what was produced (at ``RATE`` = 200/s they keep up easily).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import DomainEvent, OutboxRelay
from alchemium.events.outbox import Outbox
from tests.events.relay_support import Sink, eventually, insert_events, make_events, write_pending

RATE = 200  # events per second: 10 commits of 20
SAMPLE = 2.0  # seconds between samples
BURST = 2000  # events committed at once at the end, to measure the drain rate


async def _table_size(engine: AsyncEngine, outbox: Outbox, db_url: str) -> dict[str, Any]:
    table = outbox.deliveries
    async with engine.connect() as conn:
        rows = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
        if engine.dialect.name == "postgresql":
            size, dead = (
                await conn.execute(
                    text(
                        "SELECT pg_total_relation_size(relid), n_dead_tup "
                        "FROM pg_stat_user_tables WHERE relname = :t"
                    ),
                    {"t": table.name},
                )
            ).one()
            return {"rows": rows, "bytes": int(size), "dead": int(dead)}
    path = db_url.split("///", 1)[1]
    wal = Path(path + "-wal")
    return {
        "rows": rows,
        "bytes": os.path.getsize(path),
        "wal": wal.stat().st_size if wal.exists() else 0,
    }


async def _hold_snapshot(conn: AsyncConnection, outbox: Outbox) -> list[DomainEvent]:
    """Open the long transaction: a snapshot, and on PostgreSQL one uncommitted event."""
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql("BEGIN")  # the driver would not begin before a SELECT
        await conn.execute(select(func.count()).select_from(outbox.events))
        return []
    await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
    await conn.execute(select(func.count()).select_from(outbox.events))
    held = make_events(1, name="held_back")
    session = AsyncSession(bind=conn)  # joins the connection's transaction
    await write_pending(session, outbox, held, ["sink"])
    await session.flush()
    await session.close()  # leaves the joined transaction open
    return held


async def _run(
    engine: AsyncEngine,
    outbox: Outbox,
    db_url: str,
    new_engine: Any,
    seconds: float,
    stats: Counter[str],
) -> None:
    pg = engine.dialect.name == "postgresql"
    sink = Sink()
    relays = [
        OutboxRelay(
            async_sessionmaker(new_engine(), expire_on_commit=False),
            sink,
            batch_size=100,
            poll_interval=0.2,
            lease=10,
            retention=5,
        )
        for _ in range(2 if pg else 1)  # SQLite: one relay at a time
    ]
    producer_factory = async_sessionmaker(new_engine(), expire_on_commit=False)
    produced = 0
    expected: set[uuid.UUID] = set()
    samples: list[tuple[float, int, int, dict[str, Any]]] = []
    started = time.monotonic()

    async def sample_forever() -> None:
        while True:
            size = await _table_size(engine, outbox, db_url)
            samples.append((time.monotonic() - started, produced, len(sink.received), size))
            await asyncio.sleep(SAMPLE)

    holder = await engine.connect()
    tasks = [asyncio.create_task(r.run()) for r in relays]
    sampler = asyncio.create_task(sample_forever())
    try:
        await holder.begin()
        held = await _hold_snapshot(holder, outbox)
        while time.monotonic() - started < seconds:
            made = await insert_events(producer_factory, outbox, RATE // 10, chunk=RATE // 10)
            expected.update(e.id for e in made)
            produced += len(made)
            await asyncio.sleep(0.1)
        delivered_by_end, produced_by_end = len(sink.received), produced
        await eventually(lambda: len(sink.received) >= produced, timeout=60, interval=0.2)
        # A burst, transaction still open: how fast do the relays drain a backlog now?
        burst_start = time.monotonic()
        made = await insert_events(producer_factory, outbox, BURST, chunk=BURST)
        expected.update(e.id for e in made)
        produced += len(made)
        await eventually(lambda: len(sink.received) >= produced, timeout=60, interval=0.05)
        burst_rate = BURST / (time.monotonic() - burst_start)
        await holder.commit()  # the long transaction ends: its event must go out too
        await eventually(
            lambda: len(sink.received) >= produced + len(held), timeout=30, interval=0.2
        )
    finally:
        sampler.cancel()
        for relay in relays:
            relay.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        await holder.close()
    elapsed = time.monotonic() - started
    final = await _table_size(engine, outbox, db_url)
    samples.append((elapsed, produced, len(sink.received), final))

    ids = sink.ids()
    duplicates = len(ids) - len(set(ids))
    stats["events_committed"] += produced + len(held)
    stats["events_delivered"] += len(set(ids))
    stats["events_duplicated"] += duplicates
    stats["long_tx_seconds"] += int(seconds)
    lines = [
        f"\n{engine.dialect.name}: transaction open for {seconds:.0f}s while "
        f"{len(relays)} relay(s) drained {produced} events ({RATE}/s produced); "
        f"{duplicates} duplicate(s); a burst of {BURST} drained at {burst_rate:.0f} events/s",
        "   t(s)  produced  delivered  events/s  table",
    ]
    previous = (0.0, 0)
    for at, made, done, size in samples:
        rate = (done - previous[1]) / (at - previous[0]) if at > previous[0] else 0.0
        previous = (at, done)
        lines.append(f"{at:7.1f} {made:9d} {done:10d} {rate:9.0f}  {size}")
    print("\n".join(lines))
    assert set(ids) == expected | {e.id for e in held}  # none lost
    assert delivered_by_end >= produced_by_end // 4, (delivered_by_end, produced_by_end)
    assert all(r.stats.dead == 0 for r in relays)


async def test_relays_keep_delivering_past_a_long_open_transaction(
    engine: AsyncEngine, outbox: Outbox, db_url: str, new_engine: Any, stats: Counter[str]
) -> None:
    await _run(engine, outbox, db_url, new_engine, 20, stats)


@pytest.mark.soak
async def test_long_open_transaction_soak(
    engine: AsyncEngine, outbox: Outbox, db_url: str, new_engine: Any, stats: Counter[str]
) -> None:
    await _run(engine, outbox, db_url, new_engine, 300, stats)
