"""Relay liveness: its LISTEN connection is killed while it idles (PostgreSQL).

The server (or a proxy, or an admin) can drop the relay's dedicated LISTEN
connection at any time; nothing tells the relay unless it notices by itself.
The test kills that backend with ``pg_terminate_backend`` while the relay has
nothing to do, commits events while it is (maybe) deaf, and checks that:

* those events are delivered anyway (polling covers the gap);
* the relay opens a new LISTEN connection by itself;
* the new connection works: with polling pushed out of reach, a NOTIFY alone
  gets the next event delivered.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import OutboxRelay, SubscriberRegistry
from alchemium.events.outbox import Outbox
from tests.events.relay_support import Sink, eventually
from tests.models import UserRepository
from tests.rig import libpq_dsn

# The LISTEN connection is the only one whose last statement is the LISTEN itself or
# the relay's health check (SQLAlchemy's pooled connections never send either).
_LISTENERS = text(
    "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
    "AND (query LIKE 'LISTEN %' OR query = 'SELECT 1') ORDER BY pid"
)


async def _listener_pids(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return [int(pid) for pid in (await conn.execute(_LISTENERS)).scalars()]


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_relay_reconnects_after_its_listen_connection_is_killed(
    engine: AsyncEngine,
    session_factory: async_sessionmaker[AsyncSession],
    outbox: Outbox,
    registry: SubscriberRegistry,
) -> None:
    registry.add_destination("sink")
    sink = Sink()
    relay = OutboxRelay(session_factory, sink, poll_interval=0.5)

    async def commit_user(name: str) -> None:
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": name})

    task = asyncio.create_task(relay.run())
    try:
        assert await relay.wait_listening(10)
        await commit_user("before")
        await eventually(lambda: len(sink.received) == 1, timeout=10)
        [old_pid] = await eventually(lambda: _listener_pids(engine), timeout=10)

        await asyncio.sleep(0.3)  # idle: nothing claimed, nothing to deliver
        async with engine.connect() as conn:
            killed = await conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": old_pid})
            assert killed.scalar_one() is True
        killed_at = time.monotonic()
        for i in range(5):  # committed while the relay may not be listening
            await commit_user(f"gap-{i}")
        await eventually(lambda: len(sink.received) == 6, timeout=15)

        async def listening_again() -> list[int]:
            pids = await _listener_pids(engine)
            return pids if relay.listening and pids and old_pid not in pids else []

        [new_pid] = await eventually(listening_again, timeout=20, interval=0.1)
        reconnected_in = time.monotonic() - killed_at

        # Polling out of reach: only a notification on the new connection can wake it.
        relay.poll_interval = 3600
        await asyncio.sleep(1.0)  # the relay is now in its long sleep
        await commit_user("after")
        await eventually(lambda: len(sink.received) == 7, timeout=10)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
    assert new_pid != old_pid
    assert len({e.id for e in sink.received}) == 7
    print(
        f"\nLISTEN backend {old_pid} killed; relay listening again as {new_pid} "
        f"{reconnected_in:.1f}s later (gap covered by polling), stats {relay.stats}"
    )


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_one_notify_without_payload_per_committing_unit_of_work(
    db_url: str,
    session_factory: async_sessionmaker[AsyncSession],
    outbox: Outbox,
    registry: SubscriberRegistry,
) -> None:
    import asyncpg

    registry.add_destination("sink")
    received: list[str] = []
    conn = await asyncpg.connect(libpq_dsn(db_url))
    try:
        await conn.add_listener(outbox.channel, lambda *args: received.append(args[3]))
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create_many(uow.session, [{"name": f"n{i}"} for i in range(25)])
            uow.record("custom", aggregate_type="x", aggregate_id=1)
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.count(uow.session)  # no events: no NOTIFY
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "last"})
        await eventually(lambda: len(received) >= 2, timeout=5)
        await asyncio.sleep(0.3)  # would-be extra notifications arrive by now
    finally:
        await conn.close()
    # 26 events in one commit, 0 in the next, 1 in the last: one NOTIFY each, empty payload.
    assert received == ["", ""]
