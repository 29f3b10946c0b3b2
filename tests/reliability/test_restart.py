"""Database restart under load (PostgreSQL): in-flight work fails cleanly, nothing is lost.

Eight tasks commit units of work (a user, its ``user_created`` event and a ``probe``
event, routed to the external destination ``sink``) while a relay delivers them.
The server is crash-stopped (``pg_ctl stop -m immediate``) and started again. Three
units of work are placed so that each kind of failure happens for certain:

* *in flight*: flushed, waiting inside its block when the server dies; it goes on
  while the server is down;
* *connecting while down*: started on a fresh engine while the server is down;
* *dead pooled connection*: started after the restart on an engine whose one pooled
  connection was opened before it (no pre-ping); the next unit on it succeeds.

Then:

* each of the three, and every unit of work of the writers that failed, failed with
  a mapped, transient :class:`TransactionError` with the driver error as ``__cause__``
  (a refused connection for the one connecting while down, a lost one for the
  others), never with a raw driver or socket error;
* once the pool has replaced its dead connections, units of work succeed again;
* the relay reconnects (LISTEN included) and every committed event is delivered
  at least once (duplicates counted, lost = 0); an event exists iff its change does.

The rig runs the server with ``synchronous_commit=off``, so a crash-stop may drop
commits it already acknowledged. These engines ask for ``synchronous_commit=on``
(what a production server does): then an acknowledged commit must survive.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import AlchemiumError, TransactionError, UnitOfWork
from alchemium.errors import is_disconnect
from alchemium.events import OutboxRelay, SubscriberRegistry
from alchemium.events.outbox import Outbox
from tests.conftest import make_engine
from tests.events.relay_support import Sink, by_status, eventually
from tests.models import User, UserRepository
from tests.rig import PostgresServer

WRITERS = 8


def _durable_engine(url: str, pool_size: int = WRITERS) -> AsyncEngine:
    return make_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=30,
        connect_args={"server_settings": {"synchronous_commit": "on"}},
    )


async def _one_unit(
    factory: async_sessionmaker[AsyncSession], name: str, registry: SubscriberRegistry
) -> None:
    """What each writer commits: a user and its ``probe`` event."""
    async with UnitOfWork(factory, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": name})
        uow.record("probe", aggregate_type="probe", aggregate_id=name)


async def _unit_held_open(
    url: str, engines: list[AsyncEngine], inside: asyncio.Event, resume: asyncio.Event
) -> None:
    """A unit of work that flushes, then waits for ``resume`` before its last write."""
    engine = _durable_engine(url, pool_size=1)
    engines.append(engine)
    async with UnitOfWork(async_sessionmaker(engine, expire_on_commit=False)) as uow:
        await UserRepository.create(uow.session, {"name": "probe-in-flight"})
        await uow.flush()
        inside.set()
        await resume.wait()
        await UserRepository.create(uow.session, {"name": "probe-in-flight-2"})


async def _failure(work: Awaitable[None]) -> BaseException:
    """The exception ``work`` raises (AssertionError if it succeeds)."""
    try:
        await work
    except Exception as err:
        return err
    raise AssertionError("expected this unit of work to fail")


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_restart_under_load_fails_in_flight_work_cleanly_and_loses_nothing(
    engine: AsyncEngine,
    outbox: Outbox,
    db_url: str,
    pg_server: PostgresServer,
    registry: SubscriberRegistry,
    stats: Counter[str],
) -> None:
    registry.add_destination("sink")
    writer_engine, relay_engine = _durable_engine(db_url), _durable_engine(db_url)
    factory = async_sessionmaker(writer_engine, expire_on_commit=False)
    sink = Sink()
    relay = OutboxRelay(
        async_sessionmaker(relay_engine, expire_on_commit=False),
        sink,
        batch_size=50,
        poll_interval=0.5,
        lease=5,
    )
    restarted = asyncio.Event()
    stop = asyncio.Event()
    acked: list[str] = []
    after_restart: list[str] = []
    errors: list[BaseException] = []
    numbers = iter(range(10**9))
    failed_after = 0

    async def writer() -> None:
        nonlocal failed_after
        while not stop.is_set():
            name = f"r-{next(numbers)}"
            started_after = restarted.is_set()
            try:
                await _one_unit(factory, name, registry)
            except Exception as err:
                errors.append(err)
                if started_after:
                    failed_after += 1
                await asyncio.sleep(0.05)  # the server is down: do not spin
                continue
            acked.append(name)
            if started_after:
                after_restart.append(name)
            await asyncio.sleep(0.002)

    relay_task = asyncio.create_task(relay.run())
    writers: list[asyncio.Task[None]] = []
    engines: list[AsyncEngine] = []
    kinds: dict[str, BaseException] = {}
    try:
        assert await relay.wait_listening(10)
        writers = [asyncio.create_task(writer()) for _ in range(WRITERS)]
        await eventually(lambda: len(acked) >= 200 and len(sink.received) >= 100, timeout=30)

        idle_engine = _durable_engine(db_url, pool_size=1)
        engines.append(idle_engine)
        idle = async_sessionmaker(idle_engine, expire_on_commit=False)
        await _one_unit(idle, "probe-idle", registry)  # its connection waits in the pool
        inside, resume = asyncio.Event(), asyncio.Event()
        in_flight = asyncio.create_task(_unit_held_open(db_url, engines, inside, resume))
        await asyncio.wait_for(inside.wait(), 10)

        await engine.dispose()  # the fixture's engine holds no connection across the crash
        started = time.monotonic()
        await asyncio.to_thread(pg_server.stop, "immediate")
        down_engine = _durable_engine(db_url)
        engines.append(down_engine)
        kinds["connecting while down"] = await _failure(
            _one_unit(async_sessionmaker(down_engine), "probe-down", registry)
        )
        resume.set()
        kinds["in flight"] = await _failure(in_flight)
        await asyncio.to_thread(pg_server.start)
        downtime = time.monotonic() - started
        restarted.set()
        kinds["dead pooled connection"] = await _failure(_one_unit(idle, "probe-pooled", registry))
        await _one_unit(idle, "probe-pooled-again", registry)  # a new connection now
        await eventually(lambda: len(after_restart) >= 200, timeout=30, interval=0.1)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writers), 30)

        async def drained() -> bool:
            return set(await by_status(engine, outbox)) == {"delivered"}

        await eventually(drained, timeout=30, interval=0.2)
        assert await relay.wait_listening(15)  # LISTEN came back by itself
    finally:
        stop.set()
        relay.stop()
        await asyncio.wait_for(asyncio.gather(relay_task, *writers, return_exceptions=True), 30)
        for extra in (writer_engine, relay_engine, *engines):
            await extra.dispose()

    for what, err in kinds.items():
        assert isinstance(err, TransactionError), f"{what}: {err!r}"
        assert err.__cause__ is not None, f"{what}: {err!r}"
        assert err.transient, f"{what}: {err!r}"
        assert is_disconnect(err), f"{what}: not a lost or refused connection: {err!r}"
    assert isinstance(kinds["connecting while down"].__cause__, OSError)  # refused
    assert not isinstance(kinds["in flight"].__cause__, OSError)  # lost, mid-transaction
    raw = [e for e in errors if not isinstance(e, TransactionError)]
    assert not raw, f"unmapped errors: {[repr(e) for e in raw[:5]]}"
    assert errors, "the restart did not interrupt any unit of work"
    assert all(isinstance(e, AlchemiumError) and e.__cause__ is not None for e in errors)

    async with engine.connect() as conn:
        users = {u.name: u.id for u in (await conn.execute(select(User.name, User.id))).all()}
        rows = (
            await conn.execute(
                select(outbox.events.c.id, outbox.events.c.name, outbox.events.c.aggregate_id)
            )
        ).all()
    created = Counter(r.aggregate_id for r in rows if r.name == "user_created")
    probes = Counter(r.aggregate_id for r in rows if r.name == "probe")
    assert set(created) == {str(i) for i in users.values()}, "user_created iff the user exists"
    assert set(probes) == set(users), "probe iff its unit of work committed"
    assert set(acked) <= set(users), "an acknowledged commit was lost in the crash"

    committed = {r.id for r in rows}
    delivered = sink.ids()
    lost = len(committed - set(delivered))
    duplicates = len(delivered) - len(set(delivered))
    writer_kinds: Counter[str] = Counter(_kind(e) for e in errors)
    stats["units_of_work"] += len(acked) + len(errors)
    stats["faults_injected"] += 1
    stats["events_committed"] += len(committed)
    stats["events_delivered"] += len(set(delivered))
    stats["events_duplicated"] += duplicates
    stats["events_lost"] += lost
    print(
        f"\nrestart ({downtime:.1f}s down) under {WRITERS} writers: {len(acked)} units "
        f"acknowledged ({len(after_restart)} after the restart), {len(errors)} failed "
        f"({failed_after} of them started once the server was back, on dead pooled "
        f"connections) {dict(writer_kinds)}; probes { ({k: _kind(e) for k, e in kinds.items()}) }; "
        f"{len(committed)} events, {len(delivered)} deliveries, "
        f"{duplicates} duplicate(s), {lost} lost; relay {relay.stats}"
    )
    assert lost == 0


def _kind(err: BaseException) -> str:
    inner: Any = err.__cause__
    while inner is not None and (inner.__cause__ is not None or getattr(inner, "orig", None)):
        inner = getattr(inner, "orig", None) or inner.__cause__
    return f"{type(err).__name__}<{type(inner).__name__}>"
