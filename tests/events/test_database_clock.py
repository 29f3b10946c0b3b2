"""Leases, due times and delivery times come from the database's clock, not the process's.

Two ways to put a clock off:

- in-process, ``time_machine`` moves Python's clock (``datetime.now``, ``time.time``)
  while the database keeps its own: both backends;
- a relay or writer **subprocess** under ``faketime`` (libfaketime moves every clock
  call of that process): PostgreSQL only, since an embedded SQLite database reads
  the clock of whichever process runs the statement (one host by construction).

Each test fails when the outbox goes back to ``datetime.now()``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import time_machine
from sqlalchemy import String, select, type_coerce
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import OutboxRelay
from alchemium.events.dispatch import DISPATCH_LEASE
from alchemium.events.outbox import Outbox, database_now
from tests.events.relay_support import (
    Sink,
    StalledSink,
    delivery_rows,
    eventually,
    faketime,
    insert_events,
    run_cli,
    sink_lines,
)

Factory = async_sessionmaker[AsyncSession]

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
postgres_only = pytest.mark.parametrize("backend", ["postgresql"])


async def relay_once_with_clock_off_by(
    offset: str, db_url: str, sink: Path
) -> subprocess.CompletedProcess[str]:
    """``alchemium relay --once`` with the file sink, its clock off by ``offset`` (faketime)."""
    return await asyncio.to_thread(
        run_cli,
        *("relay", "--url", db_url, "--import", "tests.events.sink_handlers"),
        *("--once", "--no-listen"),
        prefix=faketime(offset),
        env={"ALCHEMIUM_SINK": str(sink)},
    )


@contextmanager
def python_clock_off_by(seconds: float) -> Iterator[None]:
    """Python's wall clock runs ``seconds`` ahead (or behind) of the database's."""
    start = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    with time_machine.travel(start, tick=True):
        yield


async def database_time(engine: AsyncEngine) -> dt.datetime:
    """The database's now, as an aware datetime."""
    async with engine.connect() as conn:
        now = (await conn.execute(select(database_now()))).scalar_one()
    return now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)


def aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


# -- the expression --------------------------------------------------------------------------


async def test_offsets_are_added_in_sql_to_one_now(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        now, later, earlier, tiny, week = (
            await conn.execute(
                select(
                    database_now(),
                    database_now(30),
                    database_now(-1.5),
                    database_now(1e-7),
                    database_now(7 * 86400),
                )
            )
        ).one()
    assert later - now == dt.timedelta(seconds=30)
    assert earlier - now == dt.timedelta(seconds=-1.5)
    assert tiny - now < dt.timedelta(milliseconds=1)  # no "1e-07 seconds" modifier
    assert week - now == dt.timedelta(days=7)


@sqlite_only
async def test_sqlite_times_are_stored_in_sqlalchemys_text_format(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    # SQLite compares these columns as text: the database's "now" must be written
    # exactly as SQLAlchemy writes a datetime, or equal times would not compare equal.
    await insert_events(session_factory, outbox, 1)
    d = outbox.deliveries
    async with engine.connect() as conn:
        raw = (await conn.execute(select(type_coerce(d.c.next_attempt_at, String)))).scalar_one()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}000", raw), raw
        same_instant = dt.datetime.strptime(raw, "%Y-%m-%d %H:%M:%S.%f")
        assert (await conn.execute(select(d.c.next_attempt_at))).scalar_one() == same_instant
        one_microsecond = dt.timedelta(microseconds=1)
        compares = select(
            d.c.next_attempt_at <= same_instant,
            d.c.next_attempt_at >= same_instant,
            d.c.next_attempt_at < same_instant + one_microsecond,
            d.c.next_attempt_at > same_instant - one_microsecond,
        )
        assert tuple((await conn.execute(compares)).one()) == (True, True, True, True)


# -- in-process: Python's clock off, the database's right ------------------------------------


async def test_a_relay_whose_clock_runs_ahead_claims_only_what_the_database_says_is_due(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 3)
    async with session_factory() as session:  # another relay holds one row for 30 s
        [held] = await outbox.claim(
            session, ["sink"], limit=1, lease=30, token=uuid.uuid4(), claimed_by="other"
        )
        retry = uuid.uuid4()  # and one failed: it is due again in 30 s
        [failed] = await outbox.claim(
            session, ["sink"], limit=1, lease=30, token=retry, claimed_by="other"
        )
        await outbox.mark_failed(session, retry, error="boom", retry_in=30, row_id=failed.id)
        await session.commit()

    sink = Sink()
    with python_clock_off_by(+60):
        relay = OutboxRelay(session_factory, sink, listen=False)
        assert await relay.run_once() == 1
    assert held.event.id not in sink.ids()
    assert failed.event.id not in sink.ids()
    rows = {r["id"]: r for r in await delivery_rows(engine, outbox)}
    assert (rows[held.id]["status"], rows[held.id]["claimed_by"]) == ("claimed", "other")
    assert (rows[failed.id]["status"], rows[failed.id]["attempts"]) == ("pending", 1)
    [delivered] = [r for r in rows.values() if r["status"] == "delivered"]
    assert aware(delivered["delivered_at"]) <= await database_time(engine)  # not 60 s ahead


async def test_a_relay_whose_clock_runs_behind_delivers_at_once_and_keeps_its_lease(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    committed = await database_time(engine)
    await insert_events(session_factory, outbox, 2)
    token = uuid.uuid4()
    with python_clock_off_by(-60):
        relay = OutboxRelay(session_factory, Sink(), batch_size=1, listen=False)
        assert await relay.run_once() == 1  # due now, not in 60 s
        async with session_factory() as session:
            await outbox.claim(
                session, ["sink"], limit=1, lease=30, token=token, claimed_by="behind"
            )
            await session.commit()
        async with session_factory() as session:  # its heartbeat
            assert await outbox.renew(session, token, 30) == 1
            await session.commit()

    # A relay with the right clock must leave the slow relay's live lease alone.
    assert await OutboxRelay(session_factory, Sink(), listen=False).run_once() == 0
    rows = await delivery_rows(engine, outbox)
    [claimed] = [r for r in rows if r["status"] == "claimed"]
    [delivered] = [r for r in rows if r["status"] == "delivered"]
    assert aware(claimed["claimed_until"]) - await database_time(engine) > dt.timedelta(seconds=20)
    assert aware(delivered["delivered_at"]) >= committed  # not 60 s in the past


# -- subprocesses under faketime against PostgreSQL ------------------------------------------


@postgres_only
async def test_a_relay_60s_ahead_does_not_take_a_claim_kept_alive_by_heartbeats(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    [held] = await insert_events(session_factory, outbox, 1)
    stalled = StalledSink()
    holder = OutboxRelay(session_factory, stalled, lease=15, listen=False)  # renews every 5 s
    holding = asyncio.create_task(holder.run_once())
    try:
        await asyncio.wait_for(stalled.started.wait(), 10)
        [first] = await delivery_rows(engine, outbox)

        async def renewed() -> bool:
            [row] = await delivery_rows(engine, outbox)
            return bool(row["claimed_until"] > first["claimed_until"])

        await eventually(renewed, timeout=30)  # a heartbeat has renewed the lease
        [fresh] = await insert_events(session_factory, outbox, 1)
        sink = tmp_path / "sink"
        done = await relay_once_with_clock_off_by("+60s", db_url, sink)
    finally:
        stalled.release.set()
    assert done.returncode == 0, done.stderr
    assert "delivered=1 " in done.stderr
    assert sink_lines(sink) == [str(fresh.id)]  # not the held one
    assert await asyncio.wait_for(holding, 10) == 1
    assert holder.stats.lost_leases == 0
    assert stalled.ids() == [held.id]
    now = await database_time(engine)
    assert all(aware(r["delivered_at"]) <= now for r in await delivery_rows(engine, outbox))


@postgres_only
async def test_a_relay_60s_behind_delivers_committed_events_at_once(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    events = await insert_events(session_factory, outbox, 3)
    sink = tmp_path / "sink"
    done = await relay_once_with_clock_off_by("-60s", db_url, sink)
    assert done.returncode == 0, done.stderr
    assert "delivered=3 " in done.stderr
    assert sorted(sink_lines(sink)) == sorted(str(e.id) for e in events)
    for row in await delivery_rows(engine, outbox):
        assert row["delivered_at"] >= row["next_attempt_at"]  # not 60 s in the past


@postgres_only
async def test_an_event_committed_by_a_writer_20s_ahead_is_delivered_at_once(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str
) -> None:
    done = await asyncio.to_thread(
        run_cli, db_url, module="tests.events.outbox_writer", prefix=faketime("+20s")
    )
    assert done.returncode == 0, done.stderr
    event_id = uuid.UUID(done.stdout.strip())

    sink = Sink()
    assert await OutboxRelay(session_factory, sink, listen=False).run_once() == 1
    assert sink.ids() == [event_id]
    rows = {r["destination"]: r for r in await delivery_rows(engine, outbox)}
    # The dispatch claim written at commit lasts DISPATCH_LEASE on the database clock.
    lease_left = rows["local"]["claimed_until"] - await database_time(engine)
    assert (
        dt.timedelta(seconds=DISPATCH_LEASE - 60)
        < lease_left
        <= dt.timedelta(seconds=DISPATCH_LEASE)
    )
