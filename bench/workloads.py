"""What each workload does per measurement, how big it is, and what it is compared with.

A measurement runs one implementation through one batch of a workload and
returns units per second (operations, rows or events, see ``Workload.unit``).
The runner interleaves implementations within a round (A B C D, then B C D A,
...), and judges each implementation by its per-round ratio to the workload's
``baseline``: ``orm`` for the one-row workloads, ``core`` for the bulk ones.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from sqlalchemy import insert, text

from bench.env import Env
from bench.impls import Implementation
from bench.schema import BULK_CATEGORY, CATEGORIES, Write, bulk_row, outbox, write_row

__all__ = [
    "FULL",
    "QUICK",
    "RELAY_KEYS",
    "WORKLOADS",
    "Sizes",
    "Workload",
    "warmup_sizes",
    "workload",
]


@dataclass(frozen=True)
class Sizes:
    """How much work one measurement does, and how many measurements."""

    reps: int
    seed: int  # rows in bench_items
    w1: int
    reads: int  # W2 and W4 operations
    w3: int
    bulk_rows: int  # W5 rows created, W7 rows updated, W8 rows deleted
    w6_per_task: int
    o1: int
    o2_events: int
    o2_reps: int
    o2_relays: tuple[int, ...]  # O2 runs once per relay count: O2x1, O2x4
    d1_sizes: tuple[int, ...]  # D1: delivered rows retained (0 is the baseline)
    d1_pending: int  # D1: pending rows drained at each size
    d1_reps: int
    d1_budget: float  # D1: seconds a drain may take before it is stopped and rated
    latency_rates: tuple[int, ...]  # L1/L2: events per second offered
    latency_seconds: float  # L1/L2: measured seconds per rate (after a warm-up)
    latency_warmup: float  # L1/L2: seconds of untimed events first


FULL = Sizes(
    reps=7,
    seed=10_000,
    w1=400,
    reads=600,
    w3=300,
    bulk_rows=10_000,
    w6_per_task=25,
    o1=300,
    o2_events=20_000,
    o2_reps=3,
    o2_relays=(1, 4),
    d1_sizes=(0, 100_000, 1_000_000, 5_000_000),
    d1_pending=20_000,
    d1_reps=3,
    d1_budget=15.0,
    latency_rates=(50, 1000),
    latency_seconds=10.0,
    latency_warmup=1.0,
)
QUICK = Sizes(
    reps=2,
    seed=1_000,
    w1=30,
    reads=40,
    w3=20,
    bulk_rows=500,
    w6_per_task=2,
    o1=20,
    o2_events=1_000,
    o2_reps=1,
    o2_relays=(1, 2),
    d1_sizes=(0, 5_000),
    d1_pending=500,
    d1_reps=1,
    d1_budget=10.0,
    latency_rates=(50, 1000),
    latency_seconds=1.0,
    latency_warmup=0.2,
)

Body = Callable[[Implementation, Env, Sizes, str], Awaitable[int]]
Prepare = Callable[[Env, Sizes], Awaitable[None]]


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    method: str  # the Implementation method it needs
    unit: str
    body: Body
    baseline: str = "orm"  # the implementation the paired ratios divide by
    backends: tuple[str, ...] = ("postgresql", "sqlite")
    prepare: Prepare | None = None  # untimed, before every measurement
    reference: str | None = None  # a workload measured just before, same round and impl


async def _w1(impl: Implementation, _env: Env, sizes: Sizes, tag: str) -> int:
    for i in range(sizes.w1):
        await impl.w1(write_row(tag, i))  # type: ignore[attr-defined]
    return sizes.w1


async def _w2(impl: Implementation, env: Env, sizes: Sizes, tag: str) -> int:
    offset = zlib.crc32(tag.encode()) % env.seeded
    for i in range(sizes.reads):
        await impl.w2(f"item-{(offset + i * 7919) % env.seeded}")  # type: ignore[attr-defined]
    return sizes.reads


async def _w3(impl: Implementation, _env: Env, sizes: Sizes, _tag: str) -> int:
    for i in range(sizes.w3):
        await impl.w3(f"c{i % CATEGORIES}")  # type: ignore[attr-defined]
    return sizes.w3


async def _w4(impl: Implementation, env: Env, sizes: Sizes, tag: str) -> int:
    offset = zlib.crc32(tag.encode()) % env.seeded
    for i in range(sizes.reads):
        await impl.w4((offset + i * 37) % env.seeded + 1)  # type: ignore[attr-defined]
    return sizes.reads


async def _w5(impl: Implementation, _env: Env, sizes: Sizes, tag: str) -> int:
    rows = [write_row(tag, i) for i in range(sizes.bulk_rows)]
    await impl.w5(rows)  # type: ignore[attr-defined]
    return sizes.bulk_rows


async def _w6(impl: Implementation, _env: Env, sizes: Sizes, tag: str) -> int:
    async def task(t: int) -> None:
        for i in range(sizes.w6_per_task):
            await impl.w1(write_row(f"{tag}-{t}", i))  # type: ignore[attr-defined]

    await asyncio.gather(*(task(t) for t in range(32)))
    return 32 * sizes.w6_per_task


async def _w7(impl: Implementation, _env: Env, sizes: Sizes, _tag: str) -> int:
    await impl.w7(BULK_CATEGORY)  # type: ignore[attr-defined]
    return sizes.bulk_rows


async def _w8(impl: Implementation, _env: Env, sizes: Sizes, _tag: str) -> int:
    await impl.w8(BULK_CATEGORY)  # type: ignore[attr-defined]
    return sizes.bulk_rows


async def _o1(impl: Implementation, _env: Env, sizes: Sizes, tag: str) -> int:
    for i in range(sizes.o1):
        await impl.o1(write_row(tag, i))  # type: ignore[attr-defined]
    await impl.settle()
    return sizes.o1


async def _empty_writes(env: Env, _sizes: Sizes) -> None:
    """No rows in bench_writes and in alchemium's outbox (the bulk workloads write both)."""
    await env.truncate("bench_writes", outbox.deliveries.name, outbox.events.name)


async def _bulk_rows(env: Env, sizes: Sizes) -> None:
    """Exactly ``bulk_rows`` rows for W7 / W8 to change, statistics fresh, outbox empty."""
    await _empty_writes(env, sizes)
    async with env.engine.begin() as conn:
        await conn.execute(insert(Write), [bulk_row(i) for i in range(sizes.bulk_rows)])
    if env.is_pg:
        async with env.engine.connect() as conn:
            await conn.execute(text("ANALYZE bench_writes"))
            await conn.commit()


WORKLOADS = [
    Workload("W1", "create + commit, one row per transaction", "w1", "ops/s", _w1),
    Workload("W2", "get_one by a unique field", "w2", "ops/s", _w2),
    Workload("W3", "list a page of 50, filter + order", "w3", "ops/s", _w3),
    Workload("W4", "load + update + commit", "w4", "ops/s", _w4),
    Workload(
        "W5",
        "bulk create in one transaction (create_many)",
        "w5",
        "rows/s",
        _w5,
        baseline="core",
        prepare=_empty_writes,
    ),
    Workload(
        "W6",
        "32 concurrent tasks doing W1, pool of 10",
        "w1",
        "ops/s",
        _w6,
        backends=("postgresql",),
    ),
    Workload(
        "W7",
        "bulk update by filter in one transaction (update_where)",
        "w7",
        "rows/s",
        _w7,
        baseline="core",
        prepare=_bulk_rows,
    ),
    Workload(
        "W8",
        "bulk delete by filter in one transaction (delete_where)",
        "w8",
        "rows/s",
        _w8,
        baseline="core",
        prepare=_bulk_rows,
    ),
    Workload(
        "O1",
        "W1 + one event in the outbox, dispatched after commit, delivery marked",
        "o1",
        "ops/s",
        _o1,
        reference="W1",
    ),
]
# Workloads measured by bench/relays.py, bench/outbox_size.py and bench/latency.py.
RELAY_KEYS = ("O2", "D1", "L1", "L2")


def workload(key: str) -> Workload:
    """The workload called ``key`` (W1..W8, O1)."""
    return next(w for w in WORKLOADS if w.key == key)


def warmup_sizes(sizes: Sizes) -> Sizes:
    """A tenth of ``sizes``: the untimed round that opens connections and fills caches."""
    return replace(
        sizes,
        w1=max(5, sizes.w1 // 10),
        reads=max(5, sizes.reads // 10),
        w3=max(5, sizes.w3 // 10),
        bulk_rows=max(100, sizes.bulk_rows // 10),
        w6_per_task=1,
        o1=max(5, sizes.o1 // 10),
    )
