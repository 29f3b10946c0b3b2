"""A writer process for the crash tests: commits units of work until it is SIGKILLed.

Run as ``python -m tests.reliability.crash_writer URL JOURNAL TAG [HANG_AT]``. Each
unit of work creates a user ``TAG-i`` and records a ``probe`` event for it, with the
outbox enabled, an in-process subscriber ``sink`` (a durable destination whose rows
the after-commit dispatch claims) and an external destination ``broker`` (rows left
pending for a relay). Three units run concurrently.

With ``HANG_AT``, once that many units are acknowledged the subscriber, called after
the next commit, writes ``H event_id`` and blocks the process until it is killed: a
writer dying while a handler runs, its in-process deliveries claimed by a dead process.

Everything is written to disk with unbuffered ``os.write`` calls, so a SIGKILL
leaves exactly what happened before it:

* ``JOURNAL.<pid>``: ``B name`` before a unit of work starts committing, ``A name``
  once its commit returned (acknowledged), ``S event_id`` each time the in-process
  subscriber ran, ``H event_id`` when it hangs instead.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time

from sqlalchemy.ext.asyncio import async_sessionmaker

from alchemium import AlchemiumError, UnitOfWork
from alchemium.events import DomainEvent, SubscriberRegistry, enable_outbox
from tests.conftest import make_engine
from tests.models import Base, UserRepository

CONCURRENCY = 3
# The after-commit dispatch claims its rows for 5 minutes: the relay takes over the rows of
# a writer that died only after that. Shorten it so the test need not wait that long.
DISPATCH_LEASE = 1.0


async def main(url: str, journal: str, tag: str, hang_at: int | None = None) -> None:
    enable_outbox(Base.metadata, dispatch_lease=DISPATCH_LEASE)
    fd = os.open(f"{journal}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    acknowledged = 0

    def log(line: str) -> None:
        os.write(fd, f"{line}\n".encode())

    def sink(event: DomainEvent) -> None:
        if hang_at is not None and acknowledged >= hang_at:
            log(f"H {event.id}")
            time.sleep(3600)  # blocks the whole process until the test kills it
        log(f"S {event.id}")

    registry = SubscriberRegistry("crash-writer")
    registry.subscribe("*", sink, name="sink")
    registry.add_destination("broker")

    engine = make_engine(url)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    numbers = itertools.count()

    async def unit(name: str) -> None:
        async with UnitOfWork(factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": name})
            uow.record("probe", aggregate_type="probe", aggregate_id=name, payload={"by": tag})
            log(f"B {name}")
        log(f"A {name}")
        nonlocal acknowledged
        acknowledged += 1

    async def loop() -> None:
        while True:
            try:
                await unit(f"{tag}-{next(numbers)}")
            except AlchemiumError:  # SQLite: another writer held the lock too long
                await asyncio.sleep(0.01)

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))


if __name__ == "__main__":
    url, journal, tag, *hang = sys.argv[1:]
    asyncio.run(main(url, journal, tag, int(hang[0]) if hang else None))
