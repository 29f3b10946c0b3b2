"""L1 and L2: how long an event takes from its commit to where it is delivered, under load.

- **L1**, commit to an in-process handler through LISTEN/NOTIFY: ``alchemium``
  (``OutboxRelay.run()`` woken by the outbox's NOTIFY, its publisher calls the
  handler) against ``orm`` (a hand-written LISTEN loop over ``bench_outbox``,
  ``SELECT ... FOR UPDATE SKIP LOCKED``, 1 s polling fallback).
- **L2**, commit to a consumer of the Redis stream: ``OutboxRelay.run()`` with
  ``RedisStreamPublisher``; a consumer in this process reads the stream with
  ``XREAD BLOCK`` and measures when each entry reaches it.

Events are committed by bench/loadgen.py in a separate process at a fixed rate
(open loop, several committers; it reports the rate it achieved and how late it
ran). Each event carries the wall-clock time read just before its commit; the
receiving side measures from there. Events that never arrive within
``GRACE`` seconds of the last commit are counted as missing and treated as
infinitely late in the percentiles, so they cannot improve a p99.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alchemium.events.relay import asyncpg_dsn
from bench.env import Env
from bench.impls import DESTINATION
from bench.relays import BATCH, RELAY_AVAILABLE, CallPublisher, OutboxRelay
from bench.schema import outbox
from bench.stats import latency_summary

__all__ = ["GRACE", "SINKS", "committers_for", "measure"]

ROOT = Path(__file__).resolve().parent.parent
GRACE = 5.0  # seconds after the last commit an event may still arrive
HAND_CHANNEL = "bench_outbox"
STREAM = "bench:events"


@dataclass
class Probe:
    """Latency (seconds) of each measured event by name; warm-up events are ignored."""

    expected: int
    latencies: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def seen(self, payload: Mapping[str, Any]) -> None:
        """Record the arrival of the event whose payload is ``payload``."""
        now = time.time()
        if payload.get("warm"):
            return
        name = str(payload["name"])
        if name in self.latencies:
            self.duplicates += 1  # at-least-once: counted, measured once
            return
        self.latencies[name] = now - float(payload["t"])
        if len(self.latencies) >= self.expected:
            self.complete.set()


def committers_for(rate: float) -> int:
    """Connections the load generator commits on: one per 50 events/s, 2 to 32.

    Enough that a commit taking 20 ms under load does not hold the next ones back.
    """
    return min(32, max(2, math.ceil(rate / 50)))


# -- the receiving sides ----------------------------------------------------------------------

Sink = Callable[[Env, Probe, "str | None"], contextlib.AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def _hand_sink(env: Env, probe: Probe, _redis: str | None) -> AsyncIterator[None]:
    """A hand-written LISTEN/NOTIFY relay over ``bench_outbox`` (1 s polling fallback)."""
    import asyncpg

    wake = asyncio.Event()
    ready = asyncio.Event()
    dsn = asyncpg_dsn(env.url)

    async def loop() -> None:
        listen = await asyncpg.connect(dsn)
        try:
            await listen.add_listener(HAND_CHANNEL, lambda *_a: wake.set())
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
                                f"ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
                            )
                            for row in rows:
                                probe.seen(json.loads(row["payload"]))
                            await conn.execute(
                                "UPDATE bench_outbox SET status = 'delivered' WHERE id = ANY($1)",
                                [r["id"] for r in rows],
                            )
                        if len(rows) < BATCH:
                            break
        finally:
            await listen.close()

    task = asyncio.create_task(loop())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def _run_relay(env: Env, publisher: Any) -> AsyncIterator[None]:
    assert OutboxRelay is not None
    relay = OutboxRelay(env.sessions, publisher, batch_size=BATCH, outbox=outbox, poll_interval=1.0)
    runner = asyncio.create_task(relay.run())
    try:
        if not await relay.wait_listening(10):
            raise RuntimeError("the relay did not start listening")
        yield
    finally:
        relay.stop()
        await runner


@contextlib.asynccontextmanager
async def _alchemium_sink(env: Env, probe: Probe, _redis: str | None) -> AsyncIterator[None]:
    async with _run_relay(env, CallPublisher(lambda event: probe.seen(event.payload))):
        yield


@contextlib.asynccontextmanager
async def _redis_sink(env: Env, probe: Probe, redis_url: str | None) -> AsyncIterator[None]:
    """The relay publishing to a Redis stream, and a consumer reading it (XREAD BLOCK)."""
    import redis.asyncio as redis_asyncio

    from alchemium.events.publishers import RedisStreamPublisher

    if redis_url is None:
        raise RuntimeError("no Redis server (redis-server not installed?)")
    consumer = redis_asyncio.from_url(redis_url, decode_responses=True)
    await consumer.delete(STREAM)
    publisher = RedisStreamPublisher(redis_url, stream=STREAM, name=DESTINATION)

    async def read() -> None:
        last = "0-0"
        while True:
            found: Any = await consumer.xread({STREAM: last}, block=1000, count=1000)
            for _stream, entries in found:
                for entry_id, fields in entries:
                    last = entry_id
                    probe.seen(json.loads(fields["event"])["payload"])

    reader = asyncio.create_task(read())
    try:
        async with _run_relay(env, publisher):
            yield
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await publisher.close()
        await consumer.aclose()


# L1 and L2 sinks by implementation name; alchemium's need the relay.
SINKS: dict[str, dict[str, Sink]] = {"L1": {"orm": _hand_sink}, "L2": {}}
if RELAY_AVAILABLE:
    SINKS["L1"]["alchemium"] = _alchemium_sink
    SINKS["L2"]["alchemium"] = _redis_sink


# -- one measurement --------------------------------------------------------------------------


async def _generate(env: Env, kind: str, rate: float, count: int, warmup: int) -> dict[str, Any]:
    """Run bench/loadgen.py to completion; its JSON report."""
    dsn = asyncpg_dsn(env.url)
    args = [
        "--dsn",
        dsn,
        "--kind",
        kind,
        "--events",
        outbox.events.name,
        "--deliveries",
        outbox.deliveries.name,
        "--destination",
        DESTINATION,
        "--channel",
        outbox.channel if kind == "alchemium" else HAND_CHANNEL,
        "--rate",
        str(rate),
        "--count",
        str(count),
        "--warmup",
        str(warmup),
        "--committers",
        str(committers_for(rate)),
    ]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.loadgen exited with {proc.returncode}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def measure(
    env: Env,
    key: str,
    impl: str,
    rate: float,
    seconds: float,
    warmup_seconds: float,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """One latency run of ``impl`` for ``key`` (L1 or L2) at ``rate`` events per second."""
    count = max(1, round(rate * seconds))
    warmup = round(rate * warmup_seconds)
    await env.truncate("bench_outbox", outbox.deliveries.name, outbox.events.name)
    probe = Probe(count)
    async with SINKS[key][impl](env, probe, redis_url):
        generated = await _generate(
            env, "alchemium" if impl == "alchemium" else "hand", rate, count, warmup
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(probe.complete.wait(), GRACE)
    return {
        **latency_summary(list(probe.latencies.values()), count),
        "rate": rate,
        "achieved": generated["achieved"],
        "committers": generated["committers"],
        "commit_errors": generated["errors"],
        "late_p99_ms": generated["late_p99_ms"],
        "late_max_ms": generated["late_max_ms"],
        "duplicates": probe.duplicates,
    }
