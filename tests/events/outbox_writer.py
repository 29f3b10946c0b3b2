"""A writer process for the clock-skew tests: ``python -m tests.events.outbox_writer URL``.

Commits one event the way a unit of work does: a row claimed for the after-commit
dispatch of subscriber ``local`` (leased for ``DISPATCH_LEASE``) and a row pending
for the relay's destination ``sink``. Prints the event id. Run under ``faketime``
it is a writer whose clock is off.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from alchemium.events.dispatch import DISPATCH_LEASE
from alchemium.events.outbox import Outbox
from tests.events.relay_support import make_events


async def write_one(url: str) -> uuid.UUID:
    """Commit one event with a claimed ``local`` row and a pending ``sink`` row."""
    outbox = Outbox(MetaData())
    engine = create_async_engine(url)
    try:
        [event] = make_events(1)
        async with async_sessionmaker(engine)() as session:
            await session.run_sync(
                lambda sync: outbox.write(
                    sync,
                    [event],
                    [(event, "local", True), (event, "sink", False)],
                    claim_token=uuid.uuid4(),
                    lease=DISPATCH_LEASE,
                    notify=False,
                )
            )
            await session.commit()
        return event.id
    finally:
        await engine.dispose()


if __name__ == "__main__":
    print(asyncio.run(write_one(sys.argv[1])))
