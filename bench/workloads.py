"""What each workload does per measurement, and how big it is.

A measurement runs one implementation through one batch of a workload and
returns units per second (operations, rows or events, see ``Workload.unit``).
The runner interleaves implementations: A B C D A B C D ...
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.env import Env
from bench.impls import Implementation
from bench.schema import CATEGORIES, write_row

__all__ = ["FULL", "QUICK", "WORKLOADS", "Sizes", "Workload"]


@dataclass(frozen=True)
class Sizes:
    """How much work one measurement does, and how many measurements."""

    reps: int
    seed: int  # rows in bench_items
    w1: int
    reads: int  # W2 and W4 operations
    w3: int
    w5_rows: int
    w6_per_task: int
    o1: int
    o2_events: int
    o2_reps: int
    l1_events: int
    l1_gap: float  # seconds between L1 commits


FULL = Sizes(
    reps=7,
    seed=10_000,
    w1=400,
    reads=600,
    w3=300,
    w5_rows=10_000,
    w6_per_task=25,
    o1=300,
    o2_events=20_000,
    o2_reps=3,
    l1_events=200,
    l1_gap=0.02,
)
QUICK = Sizes(
    reps=2,
    seed=1_000,
    w1=30,
    reads=40,
    w3=20,
    w5_rows=500,
    w6_per_task=2,
    o1=20,
    o2_events=1_000,
    o2_reps=1,
    l1_events=15,
    l1_gap=0.01,
)

Body = Callable[[Implementation, Env, Sizes, str], Awaitable[int]]


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    method: str  # the Implementation method it needs
    unit: str
    body: Body
    backends: tuple[str, ...] = ("postgresql", "sqlite")
    truncate: tuple[str, ...] = ()  # emptied before every measurement (untimed)


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
    rows = [write_row(tag, i) for i in range(sizes.w5_rows)]
    await impl.w5(rows)  # type: ignore[attr-defined]
    return sizes.w5_rows


async def _w6(impl: Implementation, _env: Env, sizes: Sizes, tag: str) -> int:
    async def task(t: int) -> None:
        for i in range(sizes.w6_per_task):
            await impl.w1(write_row(f"{tag}-{t}", i))  # type: ignore[attr-defined]

    await asyncio.gather(*(task(t) for t in range(32)))
    return 32 * sizes.w6_per_task


async def _o1(impl: Implementation, _env: Env, sizes: Sizes, tag: str) -> int:
    for i in range(sizes.o1):
        await impl.o1(write_row(tag, i))  # type: ignore[attr-defined]
    return sizes.o1


WORKLOADS = [
    Workload("W1", "create + commit, one row per transaction", "w1", "ops/s", _w1),
    Workload("W2", "get_one by a unique field", "w2", "ops/s", _w2),
    Workload("W3", "list a page of 50, filter + order", "w3", "ops/s", _w3),
    Workload("W4", "load + update + commit", "w4", "ops/s", _w4),
    Workload(
        "W5",
        "bulk create in one transaction (10,000 rows)",
        "w5",
        "rows/s",
        _w5,
        truncate=("bench_writes",),
    ),
    Workload(
        "W6",
        "32 concurrent tasks doing W1, pool of 10",
        "w1",
        "ops/s",
        _w6,
        backends=("postgresql",),
    ),
    Workload("O1", "W1 + one event in the outbox, dispatched after commit", "o1", "ops/s", _o1),
]
