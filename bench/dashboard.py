"""How long the dashboard's overview takes on a large outbox (PostgreSQL).

``python -m bench.dashboard [--rows 1000000] [--repeat 10] [--url URL]`` fills a
throwaway PostgreSQL (or ``--url``, whose outbox tables are dropped and refilled)
with ``--rows`` delivery rows, almost all delivered and kept for retention, as an
outbox looks after weeks of traffic: two destinations, 0.5 % pending or claimed,
a few hundred dead, events spread evenly over the last ``--days`` days (7: a week of
retention, so about 6,000 deliveries in the last hour). Then, after
ANALYZE (what autovacuum does on its own), it times in one run:

- ``GET /`` (the whole overview page: counts, chart, HTML) through the ASGI app,
- ``GET /api/overview`` (the same document as JSON),
- the overview's two halves on their own: the counts (``OutboxAdministration.overview``)
  and the deliveries-per-minute chart (``throughput``),
- for comparison, exact counts by destination and state, the full scan the
  overview avoids (ratio to the estimated counts, same run).

Medians of ``--repeat`` runs after one warm-up; nothing is asserted (see
docs/dashboard.md for a measured run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
from sqlalchemy import MetaData, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from alchemium.dashboard import create_app
from alchemium.events.outbox import Outbox

__all__ = ["fill", "main", "measure"]


async def fill(engine: AsyncEngine, outbox: Outbox, rows: int, days: float = 7.0) -> None:
    """Drop and create the outbox tables, insert ``rows`` delivery rows over ``days``, ANALYZE."""
    events = max(rows // 2, 1)
    e, d = outbox.events.name, outbox.deliveries.name
    async with engine.begin() as conn:
        await conn.run_sync(outbox.metadata.drop_all)
        await conn.run_sync(outbox.metadata.create_all)
        await conn.execute(
            text(
                f"INSERT INTO {e} (id, name, aggregate_type, aggregate_id, payload, metadata, "
                "occurred_at) SELECT md5(i::text)::uuid, 'order_placed', 'order', "
                "(i % 50000)::text, jsonb_build_object('n', i), '{}'::jsonb, "
                "statement_timestamp() "
                "- make_interval(secs => (:n - i) * CAST(:span AS float8) / :n) "
                "FROM generate_series(1, :n) AS i"
            ),
            {"n": events, "span": days * 86400.0},
        )
        # Per event, one row for 'billing' and one for 'search': the newest 2,500 events
        # pending, 100 before them claimed by a relay (billing), every 5,000th dead.
        await conn.execute(
            text(
                f"INSERT INTO {d} (event_id, destination, aggregate_type, aggregate_id, status, "
                "attempts, next_attempt_at, claim_token, claimed_until, claimed_by, last_error, "
                "delivered_at) "
                "SELECT e.id, t.destination, e.aggregate_type, e.aggregate_id, s.status, "
                "CASE s.status WHEN 'pending' THEN 0 WHEN 'dead' THEN 10 ELSE 1 END, "
                "e.occurred_at, "
                "CASE WHEN s.status = 'claimed' THEN md5('c')::uuid END, "
                "CASE WHEN s.status = 'claimed' THEN statement_timestamp() "
                "+ interval '30 seconds' END, "
                "CASE WHEN s.status = 'claimed' THEN 'relay-1' END, "
                "CASE WHEN s.status = 'dead' THEN 'TimeoutError: broker did not confirm' END, "
                "CASE WHEN s.status = 'delivered' THEN e.occurred_at + interval '1 second' END "
                f"FROM {e} e CROSS JOIN (VALUES ('billing'), ('search')) AS t(destination) "
                "CROSS JOIN LATERAL (SELECT CASE "
                "WHEN e.sequence > :n - 2500 THEN 'pending' "
                "WHEN e.sequence > :n - 2600 AND t.destination = 'billing' THEN 'claimed' "
                "WHEN e.sequence % 5000 = 0 THEN 'dead' "
                "ELSE 'delivered' END AS status) AS s"
            ),
            {"n": events},
        )
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.exec_driver_sql(f"VACUUM ANALYZE {e}")
        await autocommit.exec_driver_sql(f"VACUUM ANALYZE {d}")


async def _median(repeat: int, call: Callable[[], Awaitable[Any]]) -> float:
    await call()  # warm-up: connections, statement caches
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


async def measure(url: str, rows: int, repeat: int, days: float = 7.0) -> dict[str, float]:
    """Fill the database at ``url`` and time the overview; milliseconds, medians."""
    engine = create_async_engine(url, pool_size=2)
    outbox = Outbox(MetaData())
    try:
        await fill(engine, outbox, rows, days)
        app = create_app(engine, outbox=outbox, audit=False)
        d = outbox.deliveries
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        ) as client:

            async def page() -> None:
                response = await client.get("/")
                assert response.status_code == 200, response.text[:500]

            async def api() -> None:
                response = await client.get("/api/overview")
                assert response.json()["delivered_exact"] is (rows < 100_000)

            async def counts() -> None:
                async with engine.connect() as conn:
                    await outbox.overview(conn)

            async def chart() -> None:
                async with engine.connect() as conn:
                    await outbox.throughput(conn)

            async def exact() -> None:
                async with engine.connect() as conn:
                    stmt = select(d.c.destination, d.c.status, func.count()).group_by(
                        d.c.destination, d.c.status
                    )
                    (await conn.execute(stmt)).all()

            return {
                "overview page (GET /)": await _median(repeat, page),
                "overview JSON (GET /api/overview)": await _median(repeat, api),
                "counts (estimated delivered)": await _median(repeat, counts),
                "throughput chart (60 minutes)": await _median(repeat, chart),
                "exact counts (full scan, not used)": await _median(repeat, exact),
            }
    finally:
        await engine.dispose()


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from bench.env import postgres_url

    with postgres_url() as throwaway:
        yield throwaway


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="delivery rows (1000000)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measure (10)")
    parser.add_argument("--days", type=float, default=7.0, help="days the rows span (7)")
    parser.add_argument("--url", default=None, help="PostgreSQL URL (default: a throwaway one)")
    args = parser.parse_args(argv)
    with _database(args.url) as url:
        start = time.perf_counter()
        results = asyncio.run(measure(url, args.rows, args.repeat, args.days))
    print(f"{args.rows:,} delivery rows over {args.days:g} days, median of {args.repeat} runs")
    for name, ms in results.items():
        print(f"  {name:<40} {ms:9.1f} ms")
    ratio = results["exact counts (full scan, not used)"] / results["counts (estimated delivered)"]
    took = time.perf_counter() - start
    print(f"  exact counts / estimated counts: {ratio:.1f}x  (whole run {took:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
