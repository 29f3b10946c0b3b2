"""Load: 1,000 concurrent units of work over a pool of 10 with random cancellation.

Afterwards no connection is checked out, the pool emitted no "non-checked-in
connection" warning (warnings are errors in this suite), every unit of work that
returned normally committed, and memory stays flat: measured with ``tracemalloc``
after ``gc.collect()`` at the end of each round, what the rounds after the first
(which warms the caches) retain is under ``LEAK_BOUND`` bytes per unit of work.
A leak of 8 KiB per unit of work fails that bound many times over.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
from collections import Counter

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import AlchemiumError, UnitOfWork
from alchemium.events import flush_delivery_marks
from tests.conftest import make_engine, reset_schema
from tests.models import UserRepository

LEAK_BOUND = 1024  # bytes retained per unit of work, at most (measured: about 100 or less)


async def _round(
    factory: async_sessionmaker[AsyncSession], rng: random.Random, base: int, n: int
) -> tuple[set[str], int, list[AsyncSession]]:
    """``n`` concurrent units of work, a quarter cancelled: (committed, cancelled, sessions).

    Half the cancellations hit units of work that hold a connection in an open
    transaction (flushed, not committed), the others random ones (waiting for the pool,
    flushing, committing). The caller gets every session the round opened, still
    referenced: a connection one of them kept would still be checked out, not quietly
    returned by the garbage collector.
    """
    opened: list[AsyncSession] = []
    holding: set[int] = set()  # units between their flush and their commit

    def session() -> AsyncSession:
        opened.append(factory())
        return opened[-1]

    async def unit(i: int) -> str:
        async with UnitOfWork(session) as uow:
            await UserRepository.create(uow.session, {"name": f"load-{base + i}"})
            await asyncio.sleep(rng.uniform(0, 0.005))
            await uow.flush()
            holding.add(i)
            try:
                await asyncio.sleep(rng.uniform(0, 0.005))
            finally:
                holding.discard(i)
        return f"load-{base + i}"

    tasks = [asyncio.ensure_future(unit(i)) for i in range(n)]
    cancelled = 0
    while cancelled < n // 4 and not all(t.done() for t in tasks):
        await asyncio.sleep(rng.uniform(0, 0.002))
        victims = sorted(holding) if cancelled % 2 and holding else range(n)
        if tasks[rng.choice(victims)].cancel():
            cancelled += 1
    # A generous deadline: a round takes seconds; a leaked connection (or a SQLite write
    # lock held by a leaked transaction) would make the others wait for the pool instead.
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    committed = {r for r in results if isinstance(r, str)}
    errors = [r for r in results if isinstance(r, BaseException)]
    starved = sum(isinstance(e, sa_exc.TimeoutError) for e in errors)
    assert not starved, f"{starved} unit(s) waited 30 s for a pooled connection: a leak"
    assert all(isinstance(e, (asyncio.CancelledError, AlchemiumError)) for e in errors), errors
    return committed, cancelled, opened


async def _load(db_url: str, rounds: int, per_round: int, stats: Counter[str]) -> list[int]:
    """Run ``rounds`` rounds; returns the bytes traced after each (after gc)."""
    engine: AsyncEngine = make_engine(db_url, pool_size=10, max_overflow=0, pool_timeout=30)
    await reset_schema(engine)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    rng = random.Random(1000)
    committed: set[str] = set()
    sizes = []
    tracemalloc.start()
    try:
        for r in range(rounds):
            done, cancelled, opened = await _round(factory, rng, r * per_round, per_round)
            committed |= done
            stats["units_of_work"] += per_round
            stats["faults_injected"] += cancelled
            await flush_delivery_marks()  # marks in flight hold a connection
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            # Emptied, not just dropped: a pooled connection's socket callbacks keep the
            # context it was opened in (a unit of work, its factory, this list) alive.
            opened.clear()
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
        async with UnitOfWork(factory) as uow:
            names = {u.name for u in await UserRepository.list(uow.session)}
        # Everything that returned normally is committed; cancelled work may or may not be
        # (a cancel that lands during COMMIT lets the commit finish), but nothing else is.
        assert committed <= names
    finally:
        tracemalloc.stop()
        await flush_delivery_marks()  # marks in flight hold a connection
        leaked = engine.pool.checkedout()  # type: ignore[attr-defined]
        stats["connections_leaked"] += leaked
        await engine.dispose()
    assert leaked == 0
    return sizes


async def test_thousand_concurrent_units_with_cancellation(
    db_url: str, stats: Counter[str]
) -> None:
    await _load(db_url, rounds=1, per_round=1000, stats=stats)


async def test_memory_per_unit_of_work_stays_flat(db_url: str, stats: Counter[str]) -> None:
    rounds, per_round = 4, 250
    sizes = await _load(db_url, rounds=rounds, per_round=per_round, stats=stats)
    units = per_round * (rounds - 1)  # the first round warms the caches: not counted
    retained = (sizes[-1] - sizes[0]) / units
    print(
        f"\ntraced KiB after each round {[s // 1024 for s in sizes]}: {retained:.0f} bytes "
        f"retained per unit of work (bound {LEAK_BOUND})"
    )
    assert retained < LEAK_BOUND, sizes


@pytest.mark.soak
async def test_load_soak(db_url: str, stats: Counter[str]) -> None:
    await _load(db_url, rounds=20, per_round=1000, stats=stats)
