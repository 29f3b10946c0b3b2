"""D1: the relay's drain rate as the outbox retains more and more delivered rows.

A second pair of outbox tables (``bench_retained_outbox``) is grown to each size
in turn (100k, 1M, 5M delivered rows by default), seeded in SQL with
``INSERT ... SELECT generate_series`` (secondary indexes dropped meanwhile and
rebuilt after, then VACUUM ANALYZE). At each size, every round drains
``d1_pending`` pending rows twice with one relay, back to back in rotating
order: from the empty outbox (O2's tables, truncated first) and from the large
one. The paired ratio ``rate(large) / rate(empty)`` of each round is what the
target judges; a drain of the large outbox is followed (untimed) by deleting the
rows it added and a VACUUM, so every round sees exactly the nominal size.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Index, MetaData, UniqueConstraint, text

from alchemium.events.outbox import Outbox
from bench.env import Env
from bench.impls import DESTINATION
from bench.relays import DRAINERS, drain, seed_pending
from bench.schema import outbox
from bench.stats import paired, rotated, spread
from bench.workloads import Sizes

__all__ = ["D1_DRAINERS", "RETAINED", "measure_curve", "size_label"]

RETAINED = Outbox(MetaData(), table_name="bench_retained_outbox")
D1_DRAINERS = ("raw", "alchemium")  # raw: how the hand-written loop's cost grows, for reference
_CHUNK = 1_000_000  # delivered rows per seeding statement

Progress = Callable[[str], None]


def size_label(size: int) -> str:
    """100000 -> "100k", 5000000 -> "5M"."""
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    return str(size)


async def _autocommit(env: Env, *statements: str) -> None:
    async with env.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for statement in statements:
            await conn.execute(text(statement))


async def _vacuum(env: Env, box: Outbox) -> None:
    await _autocommit(
        env, f"VACUUM ANALYZE {box.events.name}", f"VACUUM ANALYZE {box.deliveries.name}"
    )


async def _create(env: Env, box: Outbox) -> None:
    async with env.engine.begin() as conn:
        await conn.run_sync(box.metadata.drop_all)
        await conn.run_sync(box.metadata.create_all)


def _drop_index(sync: Connection, index: Index) -> None:
    index.drop(sync)


def _create_index(sync: Connection, index: Index) -> None:
    index.create(sync)


async def _grow(env: Env, box: Outbox, start: int, stop: int, progress: Progress) -> None:
    """Add delivered rows ``start + 1 .. stop`` (events and deliveries), fast.

    The secondary indexes and the (event, destination) unique constraint are dropped
    while the rows go in and rebuilt afterwards (one sort instead of a random insert
    per row); a superuser also skips the per-row foreign key check, which the rows
    satisfy by construction.
    """
    e, d = box.events.name, box.deliveries.name
    indexes = [i for t in (box.events, box.deliveries) for i in t.indexes if not i.unique]
    unique = [c for c in box.deliveries.constraints if isinstance(c, UniqueConstraint) and c.name]
    started = time.perf_counter()
    async with env.engine.begin() as conn:
        superuser = (
            await conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
        ).scalar()
        if superuser:
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
        await conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
        for index in indexes:
            await conn.run_sync(_drop_index, index)
        for constraint in unique:
            await conn.execute(text(f"ALTER TABLE {d} DROP CONSTRAINT {constraint.name}"))
        for low in range(start, stop, _CHUNK):
            high = min(stop, low + _CHUNK)
            await conn.execute(
                text(
                    f"WITH e AS (INSERT INTO {e} (id, name, aggregate_type, aggregate_id, "
                    "payload, metadata, occurred_at) "
                    "SELECT gen_random_uuid(), 'write_created', 'write', g::text, "
                    "jsonb_build_object('id', g, 'name', 'retained-' || g, 'score', g % 1000), "
                    "'{}'::jsonb, now() - interval '1 day' "
                    "FROM generate_series(CAST(:low AS bigint), CAST(:high AS bigint)) g "
                    "RETURNING id, sequence, aggregate_type, aggregate_id, occurred_at) "
                    f"INSERT INTO {d} (event_id, destination, aggregate_type, aggregate_id, "
                    "status, attempts, next_attempt_at, delivered_at) "
                    "SELECT id, :dest, aggregate_type, aggregate_id, 'delivered', 1, "
                    "occurred_at, occurred_at FROM e ORDER BY sequence"
                ),
                {"low": low + 1, "high": high, "dest": DESTINATION},
            )
            progress(f"D1 seeding: {high:,} delivered rows ({time.perf_counter() - started:.0f} s)")
        for index in indexes:
            await conn.run_sync(_create_index, index)
        for constraint in unique:
            columns = ", ".join(c.name for c in constraint.columns)
            await conn.execute(
                text(f"ALTER TABLE {d} ADD CONSTRAINT {constraint.name} UNIQUE ({columns})")
            )
    await _vacuum(env, box)
    progress(f"D1 seeded {stop:,} delivered rows in {time.perf_counter() - started:.0f} s")


async def _max_sequence(env: Env, box: Outbox) -> int:
    async with env.engine.connect() as conn:
        found = await conn.execute(text(f"SELECT max(sequence) FROM {box.events.name}"))
        return int(found.scalar() or 0)


async def _drain_once(
    env: Env, box: Outbox, name: str, pending: int, budget: float, *, empty: bool
) -> float:
    """Seed ``pending`` rows, drain them with one relay (timed), put ``box`` back (untimed).

    A drain still running after ``budget`` seconds is stopped: its rate is what it
    delivered by then (the hand-written loop can take minutes on a large outbox).
    """
    mark = 0 if empty else await _max_sequence(env, box)
    await seed_pending(env, box, pending, empty_first=empty)
    gc.collect()
    rate = await drain(env, box, DRAINERS[name], 1, pending, budget)
    if not empty:
        async with env.engine.begin() as conn:  # the deliveries go with their events (cascade)
            await conn.execute(
                text(f"DELETE FROM {box.events.name} WHERE sequence > :mark"), {"mark": mark}
            )
        await _vacuum(env, box)
    return rate


async def measure_curve(
    env: Env, sizes: Sizes, impls: list[str], progress: Progress
) -> dict[str, Any]:
    """D1's result: per size, each drainer's rates and its paired ratio to the empty outbox."""
    names = [n for n in D1_DRAINERS if n in impls and n in DRAINERS]
    pending, reps, budget = sizes.d1_pending, sizes.d1_reps, sizes.d1_budget
    await _create(env, RETAINED)
    for name in names:  # untimed: the relay's statements prepared, caches warm
        await _drain_once(env, outbox, name, min(pending, 1000), budget, empty=True)
    points: list[dict[str, Any]] = []
    empty_pool: dict[str, list[float]] = {n: [] for n in names}
    retained = 0
    for size in sorted({s for s in sizes.d1_sizes if s > 0}) or [0]:
        if size > retained:
            await _grow(env, RETAINED, retained, size, progress)
            retained = size
        rates: dict[str, list[float]] = {n: [] for n in names}
        empty: dict[str, list[float]] = {n: [] for n in names}
        for r in range(reps):
            for name in rotated(names, r):
                for which in rotated(["empty", "retained"] if size else ["empty"], r):
                    if which == "empty":
                        rate = await _drain_once(env, outbox, name, pending, budget, empty=True)
                        empty[name].append(rate)
                    else:
                        rate = await _drain_once(env, RETAINED, name, pending, budget, empty=False)
                        rates[name].append(rate)
        for name in names:
            empty_pool[name] += empty[name]
        if size:
            points.append(
                {
                    "size": size,
                    "label": size_label(size),
                    "samples": rates,
                    "empty_samples": empty,
                    "median": {n: spread(v)["median"] for n, v in rates.items()},
                    "paired": {n: paired(rates[n], empty[n]) for n in names},
                }
            )
            shown = ", ".join(
                f"{n} {points[-1]['paired'][n]['median']:.2f}x" for n in names if rates[n]
            )
            progress(f"D1 {size_label(size)} retained / empty: {shown}")
    async with env.engine.begin() as conn:  # give the disk back
        await conn.run_sync(RETAINED.metadata.drop_all)
    return {
        "title": f"relay drain of {pending:,} pending events vs delivered rows retained",
        "unit": "events/s",
        "pending": pending,
        "sizes": [p["size"] for p in points],
        "empty": {
            "samples": empty_pool,
            "median": {n: spread(v)["median"] for n, v in empty_pool.items()},
        },
        "points": points,
    }
