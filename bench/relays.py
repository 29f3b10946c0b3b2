"""O2 (relay drain): alchemium's relay against the hand-written loop, same tables, same N.

O2 seeds alchemium's own outbox tables with pending deliveries for one
destination, then times until N concurrent drainers (asyncio tasks, one
connection each) find nothing left. D1 (bench/outbox_size.py) uses the same
drainers on a second pair of outbox tables holding millions of delivered rows.

- ``raw``: the classic loop on asyncpg, one transaction per batch::

      SELECT ... FOR UPDATE OF d SKIP LOCKED LIMIT 100; handle each; UPDATE ... delivered; COMMIT

  It holds its row locks while the handler runs; alchemium's relay does not
  (claim + commit, publish, record + commit), which costs one more statement per
  batch and buys safety when a handler does slow I/O. It is O2's baseline: N
  relays are compared with the raw loop run by N workers.
- ``orm``: the same loop through SQLAlchemy's engine (``text()`` statements).
- ``alchemium``: ``OutboxRelay(...).drain()``, the relay's own loop (what ``alchemium relay
  --once`` runs): it claims the next batch while it publishes the current one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from alchemium.events.outbox import Outbox
from bench.env import Env
from bench.impls import DESTINATION

__all__ = [
    "BATCH",
    "DRAINERS",
    "RELAY_AVAILABLE",
    "CallPublisher",
    "Counter",
    "OutboxRelay",
    "drain",
    "seed_pending",
]

try:
    from alchemium.events.relay import OutboxRelay

    RELAY_AVAILABLE = True
except ImportError:  # pragma: no cover - a library without the relay: shown as MISSED
    OutboxRelay = None  # type: ignore[assignment,misc]
    RELAY_AVAILABLE = False

BATCH = 100


async def seed_pending(env: Env, box: Outbox, count: int, *, empty_first: bool = True) -> None:
    """Insert ``count`` events pending for DESTINATION into ``box`` (emptied first if asked)."""
    events, deliveries = box.events.name, box.deliveries.name
    async with env.engine.begin() as conn:
        if empty_first:
            await conn.execute(text(f"TRUNCATE {events}, {deliveries} RESTART IDENTITY CASCADE"))
        # One statement: the deliveries come from the events' RETURNING (the foreign
        # key is checked at its end), so nothing scans the rows already there.
        await conn.execute(
            text(
                f"WITH e AS (INSERT INTO {events} (id, name, aggregate_type, aggregate_id, "
                "payload, metadata, occurred_at) "
                "SELECT gen_random_uuid(), 'write_created', 'write', g::text, "
                "jsonb_build_object('id', g, 'name', 'seeded-' || g, 'score', g % 1000), "
                "'{}'::jsonb, now() FROM generate_series(1, CAST(:n AS bigint)) g "
                "RETURNING id, sequence, aggregate_type, aggregate_id) "
                f"INSERT INTO {deliveries} (event_id, destination, aggregate_type, "
                "aggregate_id, status, attempts, next_attempt_at) "
                "SELECT id, :dest, aggregate_type, aggregate_id, 'pending', 0, "
                "now() - interval '1 second' FROM e ORDER BY sequence"
            ),
            {"n": count, "dest": DESTINATION},
        )
    async with env.engine.connect() as conn:
        await conn.execute(text(f"ANALYZE {events}"))
        await conn.execute(text(f"ANALYZE {deliveries}"))
        await conn.commit()


@dataclass
class Counter:
    """The handler every drainer calls: counts, so a run can check nothing was lost."""

    seen: int = 0

    def __call__(self, _event: object) -> None:
        self.seen += 1


@dataclass
class CallPublisher:
    """A Publisher for DESTINATION that calls a plain handler."""

    handler: Callable[[Any], None]
    name: str = DESTINATION

    async def publish(self, event: Any, _destination: str) -> None:
        self.handler(event)


def _hand_claim(box: Outbox, dest: str, limit: str) -> str:
    return (
        "SELECT d.id, e.id AS event_id, e.name, e.aggregate_type, e.aggregate_id, e.payload, "
        f"e.metadata, e.occurred_at FROM {box.deliveries.name} d "
        f"JOIN {box.events.name} e ON e.id = d.event_id "
        f"WHERE d.destination = {dest} AND d.status = 'pending' AND d.next_attempt_at <= now() "
        f"ORDER BY d.id LIMIT {limit} FOR UPDATE OF d SKIP LOCKED"
    )


def _hand_done(box: Outbox, ids: str) -> str:
    return (
        f"UPDATE {box.deliveries.name} SET status = 'delivered', delivered_at = now(), "
        f"attempts = attempts + 1 WHERE id = ANY({ids})"
    )


async def _drain_orm(env: Env, box: Outbox, handler: Counter) -> None:
    claim = text(_hand_claim(box, ":dest", ":limit"))
    done = text(_hand_done(box, ":ids"))
    while True:
        async with env.engine.begin() as conn:
            rows = (await conn.execute(claim, {"dest": DESTINATION, "limit": BATCH})).all()
            if not rows:
                return
            for row in rows:
                handler(row)
            await conn.execute(done, {"ids": [r.id for r in rows]})


async def _drain_raw(env: Env, box: Outbox, handler: Counter) -> None:
    claim = _hand_claim(box, "$1", "$2")
    done = _hand_done(box, "$1::bigint[]")
    async with env.raw.acquire() as conn:
        while True:
            async with conn.transaction():
                rows = await conn.fetch(claim, DESTINATION, BATCH)
                if not rows:
                    return
                for row in rows:
                    handler(row)
                await conn.execute(done, [r["id"] for r in rows])


async def _drain_alchemium(env: Env, box: Outbox, handler: Counter) -> None:
    assert OutboxRelay is not None
    relay = OutboxRelay(
        env.sessions, CallPublisher(handler), batch_size=BATCH, outbox=box, listen=False
    )
    await relay.drain()


Drainer = Callable[[Env, Outbox, Counter], Awaitable[None]]


def _drainers() -> dict[str, Drainer]:
    found: dict[str, Drainer] = {"raw": _drain_raw, "orm": _drain_orm}
    if RELAY_AVAILABLE:
        found["alchemium"] = _drain_alchemium
    return found


DRAINERS = _drainers()


async def drain(
    env: Env,
    box: Outbox,
    drainer: Drainer,
    relays: int,
    expected: int,
    budget: float | None = None,
) -> float:
    """Run ``relays`` drainers of ``box`` to completion; returns events per second.

    Raises if fewer than ``expected`` events reached the handler: a drainer that
    loses events has no throughput worth reporting. With a ``budget`` (seconds) a
    drainer still running then is cancelled and the rate is what it delivered so
    far over the time taken (its last batch, not committed, is counted).
    """
    handler = Counter()
    started = time.perf_counter()
    work = asyncio.gather(*(drainer(env, box, handler) for _ in range(relays)))
    try:
        await asyncio.wait_for(work, budget)
    except asyncio.TimeoutError:
        return handler.seen / (time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    if handler.seen < expected:
        raise RuntimeError(f"drained {handler.seen} of {expected} events")
    return expected / elapsed
