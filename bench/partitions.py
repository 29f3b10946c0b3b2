"""P1: a day-partitioned outbox against the plain one, on PostgreSQL, in the same run.

::

    python -m bench.partitions                  # 1,000,000 retained rows, 3 rounds: ~3 minutes
    python -m bench.partitions --rows 5000000   # the D1 size: ~10 minutes

Two questions, each answered with paired rounds:

- **Retention**: removing ``--rows`` delivered events (and their delivery rows) of a
  past day. Plain: ``Outbox.purge`` in batches of 10,000 until nothing is left (the
  relay's retention does the same in batches of 1,000). Partitioned:
  ``Outbox.drop_partitions`` (``DETACH ... CONCURRENTLY`` + ``DROP``). Both seeded
  the same way, untimed.
- **Drain**: one relay draining 20,000 pending events of today, from each outbox
  (rotating order), as O2 does; the paired ratio partitioned / plain says what the
  partition key costs the relay (the claim joins events by ``(id, occurred_at)``).
- **Drain during removal**: the same relay draining 20,000 pending events while the
  removal of the retained rows runs; its rate over its rate alone (same round) says
  whether retention stalls a running relay.

Prints a table; writes nothing. The numbers in docs/relay.md "A partitioned
outbox" come from it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from alchemium.events.outbox import Outbox, create_outbox_tables
from bench.env import Env, postgres_url
from bench.impls import DESTINATION
from bench.relays import DRAINERS, drain
from bench.stats import paired, rotated, spread

PENDING = 20_000
_CHUNK = 500_000


def _outboxes() -> dict[str, Outbox]:
    return {
        "plain": Outbox(MetaData(), table_name="p1_plain"),
        "partitioned": Outbox(MetaData(), table_name="p1_parted", partition_by="day"),
    }


async def _seed(env: Env, box: Outbox, rows: int, status: str, age: str) -> None:
    """``rows`` events of ``age`` ago, each with one delivery row in ``status``."""
    e, d = box.events.name, box.deliveries.name
    key = box.partition_by is not None
    if key:  # the periods a drop took away come back (a month, as 30-day retention keeps)
        async with env.sessions() as session:
            await box.ensure_partitions(session, behind=30)
            await session.commit()
    async with env.engine.begin() as conn:
        for low in range(0, rows, _CHUNK):
            high = min(rows, low + _CHUNK)
            await conn.execute(
                text(
                    f"WITH e AS (INSERT INTO {e} (id, name, aggregate_type, aggregate_id, "
                    "payload, metadata, occurred_at) "
                    "SELECT gen_random_uuid(), 'write_created', 'write', g::text, "
                    "jsonb_build_object('id', g, 'name', 'retained-' || g, 'score', g % 1000), "
                    f"'{{}}'::jsonb, now() - interval '{age}' "
                    "FROM generate_series(CAST(:low AS bigint), CAST(:high AS bigint)) g "
                    "RETURNING id, sequence, aggregate_type, aggregate_id, occurred_at) "
                    f"INSERT INTO {d} (event_id, destination, aggregate_type, aggregate_id, "
                    "status, attempts, next_attempt_at, delivered_at"
                    + (", event_occurred_at" if key else "")
                    + ") SELECT id, :dest, aggregate_type, aggregate_id, CAST(:status AS text), 1, "
                    "now() - interval '1 second', "
                    "CASE WHEN CAST(:status AS text) = 'delivered' THEN occurred_at END"
                    + (", occurred_at" if key else "")
                    + " FROM e ORDER BY sequence"
                ),
                {"low": low + 1, "high": high, "dest": DESTINATION, "status": status},
            )
    async with env.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f"VACUUM ANALYZE {e}"))
        await conn.execute(text(f"VACUUM ANALYZE {d}"))


async def _remove(env: Env, box: Outbox) -> float:
    """Seconds to remove every delivered event older than two days."""
    started = time.perf_counter()
    if box.partition_by is not None:
        async with env.sessions() as session:
            report = await box.drop_partitions(session, older_than=2 * 86400)
        assert report.dropped
        assert not report.kept
    else:
        while True:
            async with env.engine.begin() as conn:
                if not await box.purge(conn, older_than=2 * 86400, batch_size=10_000):
                    break
    return time.perf_counter() - started


async def _count(env: Env, box: Outbox) -> int:
    async with env.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {box.events.name}"))).scalar())


async def _empty(env: Env, box: Outbox) -> None:
    async with env.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {box.events.name}, {box.deliveries.name}"))


async def measure(url: str, rows: int, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    engine = create_async_engine(url, pool_size=10, max_overflow=0)
    env = Env(
        backend="postgresql",
        url=url,
        engine=engine,
        sessions=async_sessionmaker(engine, expire_on_commit=False),
        raw=None,
        seeded=0,
    )
    boxes = _outboxes()
    for box in boxes.values():
        await create_outbox_tables(engine, box)
    removal: dict[str, list[float]] = {n: [] for n in boxes}
    rates: dict[str, list[float]] = {n: [] for n in boxes}
    during: dict[str, list[float]] = {n: [] for n in boxes}
    for r in range(rounds):
        for name in rotated(list(boxes), r):
            box = boxes[name]
            await _empty(env, box)
            await _seed(env, box, rows, "delivered", "3 days")
            await _seed(env, box, PENDING, "pending", "0 seconds")
            removing = asyncio.create_task(_remove(env, box))
            rate = await drain(env, box, DRAINERS["alchemium"], 1, PENDING)
            seconds = await removing
            assert await _count(env, box) == PENDING  # the old events gone, the new kept
            removal[name].append(seconds)
            during[name].append(rate)
            say(
                f"P1 round {r + 1}: {name} removed {rows:,} delivered events in {seconds:.2f} s; "
                f"a relay meanwhile drained {PENDING:,} events at {rate:,.0f}/s"
            )
        for name in rotated(list(boxes), r):
            box = boxes[name]
            await _empty(env, box)
            await _seed(env, box, PENDING, "pending", "0 seconds")
            rate = await drain(env, box, DRAINERS["alchemium"], 1, PENDING)
            rates[name].append(rate)
            say(f"P1 round {r + 1}: {name} drained {PENDING:,} events at {rate:,.0f}/s alone")
            await _empty(env, box)
    await engine.dispose()
    return {
        "rows": rows,
        "removal": {n: spread(v) for n, v in removal.items()},
        "removal_ratio": paired(removal["plain"], removal["partitioned"]),
        "drain": {n: spread(v) for n, v in rates.items()},
        "drain_ratio": paired(rates["partitioned"], rates["plain"]),
        "during": {n: spread(v) for n, v in during.items()},
        "during_ratio": {n: paired(during[n], rates[n]) for n in boxes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.partitions", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="retained delivered rows")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds")
    args = parser.parse_args()
    with postgres_url() as url:
        result = asyncio.run(measure(url, args.rows, args.rounds, print))
    removal, drained = result["removal"], result["drain"]
    print()
    print(f"P1, {args.rows:,} retained rows, {args.rounds} rounds (median, min-max)")
    for name in ("plain", "partitioned"):
        print(
            f"  {name:12} removal {removal[name]['median']:8.2f} s "
            f"({removal[name]['min']:.2f}-{removal[name]['max']:.2f})   "
            f"drain {drained[name]['median']:8,.0f} events/s "
            f"({drained[name]['min']:,.0f}-{drained[name]['max']:,.0f})"
        )
    ratio, drain_ratio = result["removal_ratio"], result["drain_ratio"]
    print(
        f"  removal: partitioned is {ratio['median']:.0f}x faster "
        f"({ratio['min']:.0f}-{ratio['max']:.0f}); drain partitioned / plain "
        f"{drain_ratio['median']:.2f} ({drain_ratio['min']:.2f}-{drain_ratio['max']:.2f})"
    )
    for name in ("plain", "partitioned"):
        during = result["during_ratio"][name]
        print(
            f"  {name}: a relay draining during the removal keeps {during['median']:.2f} "
            f"({during['min']:.2f}-{during['max']:.2f}) of its rate alone"
        )


if __name__ == "__main__":
    main()
