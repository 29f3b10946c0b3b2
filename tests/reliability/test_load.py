"""Load: 1,000 concurrent units of work over a pool of 10 with random cancellation.

Afterwards no connection is checked out, the pool emitted no "non-checked-in
connection" warning (warnings are errors in this suite), every unit of work that
returned normally committed, and memory stays flat across repeated rounds.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
from collections import Counter

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import AlchemiumError, UnitOfWork
from alchemium.events import flush_delivery_marks
from tests.conftest import make_engine, reset_schema
from tests.models import UserRepository


async def _round(
    factory: async_sessionmaker[AsyncSession], rng: random.Random, base: int, n: int
) -> tuple[set[str], int]:
    async def unit(i: int) -> str:
        async with UnitOfWork(factory) as uow:
            await UserRepository.create(uow.session, {"name": f"load-{base + i}"})
            await asyncio.sleep(rng.uniform(0, 0.005))
            await uow.flush()
            await asyncio.sleep(rng.uniform(0, 0.005))
        return f"load-{base + i}"

    tasks = [asyncio.ensure_future(unit(i)) for i in range(n)]
    await asyncio.sleep(0.01)
    cancelled = 0
    for task in rng.sample(tasks, n // 4):
        if task.cancel():
            cancelled += 1
    results = await asyncio.gather(*tasks, return_exceptions=True)
    committed = {r for r in results if isinstance(r, str)}
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, (asyncio.CancelledError, AlchemiumError)) for e in errors), errors
    return committed, cancelled


async def _load(db_url: str, rounds: int, per_round: int, stats: Counter[str]) -> None:
    engine: AsyncEngine = make_engine(db_url, pool_size=10, max_overflow=0, pool_timeout=60)
    await reset_schema(engine)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    rng = random.Random(1000)
    committed: set[str] = set()
    sizes = []
    tracemalloc.start()
    try:
        for r in range(rounds):
            done, cancelled = await _round(factory, rng, r * per_round, per_round)
            committed |= done
            stats["units_of_work"] += per_round
            stats["faults_injected"] += cancelled
            await flush_delivery_marks()  # marks in flight hold a connection
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
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
    # Memory is flat: the last round holds no more than the second plus a small margin.
    if len(sizes) >= 3:
        assert sizes[-1] < sizes[1] * 1.5 + 2_000_000, sizes


async def test_thousand_concurrent_units_with_cancellation(
    db_url: str, stats: Counter[str]
) -> None:
    await _load(db_url, rounds=1, per_round=1000, stats=stats)


async def test_memory_stable_across_rounds(db_url: str, stats: Counter[str]) -> None:
    await _load(db_url, rounds=4, per_round=250, stats=stats)


@pytest.mark.soak
async def test_load_soak(db_url: str, stats: Counter[str]) -> None:
    await _load(db_url, rounds=20, per_round=1000, stats=stats)
