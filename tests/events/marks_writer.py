"""A writer process for the delivery-mark tests: ``python -m tests.events.marks_writer URL N MODE``.

Commits ``N`` units of work, each with one event that subscriber ``marks.sink`` handles
after commit (it appends the event id to the file named by ``MARKS_JOURNAL``). The
outbox batches its "delivered" marks over a 60 s window, so they are still queued
when the units of work are done. Then, by ``MODE``:

- ``kill``: the process SIGKILLs itself: the queued marks are never written.
- ``exit``: ``main`` returns and ``asyncio.run`` shuts the loop down, which must
  write the queued marks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from alchemium import UnitOfWork
from alchemium.events import DomainEvent, Outbox, SubscriberRegistry

WINDOW = 60.0  # longer than the test: only the shutdown (or nothing) writes the marks
LEASE = 1.0  # the relay may take over rows whose mark never came after this


def journal(event: DomainEvent) -> None:
    with open(os.environ["MARKS_JOURNAL"], "a", encoding="utf-8") as out:
        out.write(f"{event.id}\n")


async def main(url: str, n: int, mode: str) -> None:
    outbox = Outbox(MetaData(), dispatch_lease=LEASE, mark_window=WINDOW)
    registry = SubscriberRegistry("marks-writer")
    registry.subscribe("marked", journal, name="marks.sink")
    engine = create_async_engine(url)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    for i in range(n):
        async with UnitOfWork(factory, registry=registry, outbox=outbox) as uow:
            uow.record("marked", aggregate_type="probe", aggregate_id=i)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
