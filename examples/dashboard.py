"""The operations dashboard on a demo outbox: ``python examples/dashboard.py [--serve]``.

Fills a SQLite outbox in a temporary directory (delivered, pending and dead rows over
the last hour), then either asks the dashboard's JSON API what it sees and requeues
the dead letters (the default, what the test suite runs), or with ``--serve`` serves
the pages on http://127.0.0.1:8000/ until Ctrl-C (token: ``demo-token-0123456789``).
Needs ``pip install 'alchemium[dashboard]'``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
from sqlalchemy import MetaData, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from alchemium.dashboard import create_app
from alchemium.events import DomainEvent, OutboxRelay
from alchemium.events.outbox import Outbox, database_now
from alchemium.events.outbox_actions import OutboxActionLog, create_action_table

TOKEN = "demo-token-0123456789"


class Broker:
    """A stand-in for a broker: refuses invoices for customer 7, accepts the rest."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def publish(self, event: DomainEvent, destination: str) -> None:
        if event.payload.get("customer") == 7:
            raise ConnectionError("broker refused the message: payload too large")


async def fill(engine: AsyncEngine, outbox: Outbox) -> None:
    """Commit 240 events for two destinations; a relay delivers them, a few die."""
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    for minute in range(60, 0, -1):
        events = [
            DomainEvent.create(
                "invoice_sent" if i % 2 else "order_placed",
                aggregate_type="order",
                aggregate_id=str(minute * 10 + i),
                payload={"customer": (minute + i) % 20, "total": 42},
            )
            for i in range(minute % 5 + 1)
        ]
        async with sessions() as session:
            await session.run_sync(
                lambda sync, events=events: outbox.write(
                    sync,
                    events,
                    [(e, d, False) for e in events for d in ("billing", "search")],
                    claim_token=uuid.uuid4(),
                    lease=0,
                    notify=False,
                )
            )
            await session.commit()
        relay = OutboxRelay(
            sessions,
            [Broker("billing"), Broker("search")],
            max_attempts=1,
            listen=False,
            outbox=outbox,
        )
        await relay.drain()
        async with sessions() as session:  # as if delivered `minute` minutes ago
            d = outbox.deliveries
            await session.execute(
                update(d)
                .where(d.c.event_id.in_([e.id for e in events]), d.c.status == "delivered")
                .values(delivered_at=database_now(-60.0 * minute + 30))
            )
            await session.commit()


async def main(serve: bool) -> None:
    directory = Path(tempfile.mkdtemp(prefix="alchemium-dashboard-"))
    engine = create_async_engine(f"sqlite+aiosqlite:///{directory / 'outbox.db'}")
    outbox = Outbox(MetaData())
    actions = OutboxActionLog(MetaData())
    async with engine.begin() as conn:
        await conn.run_sync(outbox.metadata.create_all)
    await create_action_table(engine, actions)
    await fill(engine, outbox)
    app = create_app(engine, actions=True, token=TOKEN, outbox=outbox, action_log=actions)
    if serve:
        import uvicorn

        print(f"http://127.0.0.1:8000/  (token: {TOKEN})")
        await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8000)).serve()
        await engine.dispose()
        return
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Alchemium-Actor": "example"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://dashboard", headers=headers
    ) as client:
        overview = (await client.get("/api/overview")).json()
        for d in overview["destinations"]:
            print(f"{d['destination']}: {d['delivered']} delivered, {d['dead']} dead")
        dead = (await client.get("/api/dead")).json()
        print(f"dead letters: {dead['total']}, first error: {dead['items'][0]['last_error']}")
        done = await client.post(
            "/api/dead/requeue", json={"selection": {}, "expected": dead["total"]}
        )
        print(f"requeued {done.json()['rows']}")
        again = await client.post(
            "/api/dead/requeue", json={"selection": {}, "expected": dead["total"]}
        )
        print(f"requeue again: {again.status_code} {again.json()['error']['code']}")
        assert again.status_code == 409  # they are pending now: nothing changed
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main("--serve" in sys.argv[1:]))
