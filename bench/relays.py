"""O2 (relay drain) and L1 (commit-to-handler latency): alchemium's relay vs hand-written.

Both sides drain the same rows: O2 seeds alchemium's own outbox tables with
pending deliveries for one destination, then times until N concurrent drainers
(asyncio tasks, one connection each) find nothing left.

- ``orm`` (hand-written): the classic loop, one transaction per batch::

      SELECT ... FOR UPDATE OF d SKIP LOCKED LIMIT 100; handle each; UPDATE ... delivered; COMMIT

  It holds its row locks while the handler runs; alchemium's relay does not
  (claim + commit, publish, record + commit), which costs one more transaction
  per batch and buys safety when a handler does slow I/O.
- ``raw``: the same loop on asyncpg.
- ``alchemium``: ``OutboxRelay(...).drain()``, the relay's own loop (what ``alchemium relay
  --once`` runs): it claims the next batch while it publishes the current one.

L1 commits one event at a time (spaced so the machine is otherwise idle) and
measures from just before the commit to the moment the handler runs, with the
relay woken by LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, text

from alchemium import UnitOfWork
from alchemium.events import SubscriberRegistry
from bench.env import Env
from bench.schema import HandOutbox, Write, WriteRepository, outbox, write_row

__all__ = [
    "DESTINATION",
    "DRAINERS",
    "LATENCY",
    "RELAY_AVAILABLE",
    "seed_outbox",
]

try:
    from alchemium.events.relay import OutboxRelay

    RELAY_AVAILABLE = True
except ImportError:  # the relay issue is not done yet: O2/L1 run without alchemium
    OutboxRelay = None  # type: ignore[assignment,misc]
    RELAY_AVAILABLE = False

DESTINATION = "bench.relay"
BATCH = 100
EVENTS = outbox.events.name
DELIVERIES = outbox.deliveries.name


async def seed_outbox(env: Env, count: int) -> None:
    """Empty the outbox tables and insert ``count`` events pending for DESTINATION."""
    async with env.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {EVENTS}, {DELIVERIES} RESTART IDENTITY CASCADE"))
        await conn.execute(
            text(
                f"INSERT INTO {EVENTS} (id, name, aggregate_type, aggregate_id, payload, "
                "metadata, occurred_at) "
                "SELECT gen_random_uuid(), 'write_created', 'write', g::text, "
                "jsonb_build_object('id', g, 'name', 'seeded-' || g, 'score', g % 1000), "
                "'{}'::jsonb, now() FROM generate_series(1, :n) g"
            ),
            {"n": count},
        )
        await conn.execute(
            text(
                f"INSERT INTO {DELIVERIES} (event_id, destination, aggregate_type, "
                "aggregate_id, status, attempts, next_attempt_at) "
                "SELECT id, :dest, aggregate_type, aggregate_id, 'pending', 0, "
                f"now() - interval '1 second' FROM {EVENTS} ORDER BY sequence"
            ),
            {"dest": DESTINATION},
        )
        await conn.execute(text(f"ANALYZE {EVENTS}"))
        await conn.execute(text(f"ANALYZE {DELIVERIES}"))


@dataclass
class Counter:
    """The handler every drainer calls: counts, so a run can check nothing was lost."""

    seen: int = 0

    def __call__(self, _event: object) -> None:
        self.seen += 1


# -- O2: drainers -----------------------------------------------------------------------------

HAND_CLAIM = (
    f"SELECT d.id, e.id AS event_id, e.name, e.aggregate_type, e.aggregate_id, e.payload, "
    f"e.metadata, e.occurred_at FROM {DELIVERIES} d JOIN {EVENTS} e ON e.id = d.event_id "
    "WHERE d.destination = {dest} AND d.status = 'pending' AND d.next_attempt_at <= now() "
    "ORDER BY d.id LIMIT {limit} FOR UPDATE OF d SKIP LOCKED"
)
HAND_DONE = (
    f"UPDATE {DELIVERIES} SET status = 'delivered', delivered_at = now(), "
    "attempts = attempts + 1 WHERE id = ANY({ids})"
)


async def _drain_orm(env: Env, handler: Counter) -> None:
    claim = text(HAND_CLAIM.format(dest=":dest", limit=":limit"))
    done = text(HAND_DONE.format(ids=":ids"))
    while True:
        async with env.engine.begin() as conn:
            rows = (await conn.execute(claim, {"dest": DESTINATION, "limit": BATCH})).all()
            if not rows:
                return
            for row in rows:
                handler(row)
            await conn.execute(done, {"ids": [r.id for r in rows]})


async def _drain_raw(env: Env, handler: Counter) -> None:
    claim = HAND_CLAIM.format(dest="$1", limit="$2")
    done = HAND_DONE.format(ids="$1::bigint[]")
    async with env.raw.acquire() as conn:
        while True:
            async with conn.transaction():
                rows = await conn.fetch(claim, DESTINATION, BATCH)
                if not rows:
                    return
                for row in rows:
                    handler(row)
                await conn.execute(done, [r["id"] for r in rows])


@dataclass
class CallPublisher:
    """A Publisher for DESTINATION that calls a plain handler."""

    handler: Callable[[Any], None]
    name: str = DESTINATION

    async def publish(self, event: Any, _destination: str) -> None:
        self.handler(event)


async def _drain_alchemium(env: Env, handler: Counter) -> None:
    assert OutboxRelay is not None
    relay = OutboxRelay(
        env.sessions, CallPublisher(handler), batch_size=BATCH, outbox=outbox, listen=False
    )
    await relay.drain()


Drainer = Callable[[Env, Counter], Awaitable[None]]


def _drainers() -> dict[str, Drainer]:
    found: dict[str, Drainer] = {"raw": _drain_raw, "orm": _drain_orm}
    if RELAY_AVAILABLE:
        found["alchemium"] = _drain_alchemium
    return found


DRAINERS = _drainers()


async def drain(env: Env, drainer: Drainer, relays: int, expected: int) -> float:
    """Run ``relays`` drainers to completion; returns events per second."""
    handler = Counter()
    started = time.perf_counter()
    await asyncio.gather(*(drainer(env, handler) for _ in range(relays)))
    elapsed = time.perf_counter() - started
    if handler.seen < expected:
        raise RuntimeError(f"drained {handler.seen} of {expected} events")
    return expected / elapsed


# -- L1: commit-to-handler latency ------------------------------------------------------------


@dataclass
class LatencyProbe:
    """Start times by row name; the handler turns them into latencies (seconds)."""

    started: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def handle(self, name: str) -> None:
        t0 = self.started.pop(name, None)
        if t0 is not None:
            self.latencies.append(time.perf_counter() - t0)
            self.arrived.set()


async def _hand_listener(env: Env, probe: LatencyProbe, ready: asyncio.Event) -> None:
    """A hand-written LISTEN/NOTIFY relay over ``bench_outbox`` (1 s polling fallback)."""
    import asyncpg

    wake = asyncio.Event()
    dsn = env.url.replace("postgresql+asyncpg://", "postgresql://", 1)
    listen = await asyncpg.connect(dsn)
    try:
        await listen.add_listener("bench_outbox", lambda *_a: wake.set())
        ready.set()
        async with env.raw.acquire() as conn:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), 1.0)
                wake.clear()
                while True:
                    async with conn.transaction():
                        rows = await conn.fetch(
                            "SELECT id, payload FROM bench_outbox WHERE status = 'pending' "
                            "ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED"
                        )
                        for row in rows:
                            probe.handle(json.loads(row["payload"])["name"])
                        await conn.execute(
                            "UPDATE bench_outbox SET status = 'delivered' WHERE id = ANY($1)",
                            [r["id"] for r in rows],
                        )
                    if len(rows) < 100:
                        break
    finally:
        await listen.close()


async def _hand_commit(env: Env, probe: LatencyProbe, row: dict[str, Any]) -> None:
    async with env.sessions() as session, session.begin():
        obj = Write(**row)
        session.add(obj)
        await session.flush()
        session.add(
            HandOutbox(
                event_id=uuid.uuid4(),
                name="write_created",
                payload={**row, "id": obj.id},
                status="pending",
                created_at=dt.datetime.now(dt.timezone.utc),
            )
        )
        await session.execute(select(func.pg_notify("bench_outbox", "")))
        probe.started[row["name"]] = time.perf_counter()


async def latency_orm(env: Env, count: int, gap: float) -> list[float]:
    """Hand-written: ORM commit + pg_notify, a LISTEN loop claiming with SKIP LOCKED."""
    probe = LatencyProbe()
    ready = asyncio.Event()
    listener = asyncio.create_task(_hand_listener(env, probe, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await _measure_latency(probe, count, gap, lambda row: _hand_commit(env, probe, row))
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    return probe.latencies


async def latency_alchemium(env: Env, count: int, gap: float) -> list[float]:
    """alchemium: UnitOfWork with the outbox, OutboxRelay.run() woken by LISTEN/NOTIFY."""
    assert OutboxRelay is not None
    probe = LatencyProbe()
    registry = SubscriberRegistry("bench-l1")
    registry.add_destination(DESTINATION, "write_created")
    publisher = CallPublisher(lambda event: probe.handle(event.payload["name"]))
    relay = OutboxRelay(env.sessions, publisher, batch_size=BATCH, outbox=outbox, poll_interval=1.0)
    runner = asyncio.create_task(relay.run())

    async def commit(row: dict[str, Any]) -> None:
        async with UnitOfWork(env.sessions, registry=registry, outbox=outbox) as uow:
            await WriteRepository.create(uow.session, row)
            await uow.flush()
            probe.started[row["name"]] = time.perf_counter()

    try:
        if not await relay.wait_listening(10):
            raise RuntimeError("the relay did not start listening")
        await _measure_latency(probe, count, gap, commit)
    finally:
        relay.stop()
        await runner
    return probe.latencies


async def _measure_latency(
    probe: LatencyProbe,
    count: int,
    gap: float,
    commit: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    tag = f"l1-{uuid.uuid4().hex[:8]}"
    for i in range(count):
        probe.arrived.clear()
        await commit(write_row(tag, i))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(probe.arrived.wait(), 5.0)
        await asyncio.sleep(gap)


LATENCY: dict[str, Callable[[Env, int, float], Awaitable[list[float]]]] = {
    "orm": latency_orm,
}
if RELAY_AVAILABLE:
    LATENCY["alchemium"] = latency_alchemium


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds (nearest-rank p99)."""
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {"p50": statistics.median(ordered) * 1000, "p99": p99 * 1000, "n": len(ordered)}
