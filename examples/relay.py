"""The outbox relay on SQLite, no setup: python examples/relay.py

A committing app and a relay in one script. Each sign-up writes the user and its
``user_created`` event in one transaction. Two subscribers react: ``welcome``
succeeds right after commit; ``crm`` talks to a flaky "CRM" that refuses the
first two calls, so after-commit dispatch leaves its delivery pending and the
relay, running next to the app, retries it with backoff until it goes through.
A third event, for a "poison" user, never succeeds and ends up dead; it is then
requeued by hand (what ``alchemium outbox requeue`` does) and delivered.

It exits with status 1 if, in the end, any of the six deliveries (two subscribers,
three users) was not made.
"""

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from sqlalchemy import String
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemium import CrudRepository, UnitOfWork
from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    SubscriberRegistry,
    enable_outbox,
)
from alchemium.events.outbox import OutboxStatus


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class UserRepository(CrudRepository[User]):
    model = User


outbox = enable_outbox(Base.metadata)  # the one line that turns the outbox on
registry = SubscriberRegistry("demo")
crm_calls: dict[str, int] = {}
fixed = False


@registry.on("user_created", name="welcome")
def welcome(event: DomainEvent) -> None:
    print(f"  [welcome] mail sent to {event.payload['name']} (event {event.id})")


@registry.on("user_created", name="crm")
async def crm(event: DomainEvent) -> None:
    name = event.payload["name"]
    crm_calls[name] = crm_calls.get(name, 0) + 1
    if (crm_calls[name] <= 2 or name == "Mallory") and not fixed:
        raise ConnectionError(f"CRM unavailable (call {crm_calls[name]} for {name})")
    print(f"  [crm] {name} pushed to the CRM on call {crm_calls[name]}")


EXPECTED = 6  # welcome and crm, for each of the three users


async def settled(
    sessions: async_sessionmaker[AsyncSession], seconds: float = 20.0
) -> OutboxStatus:
    """The outbox status once nothing is pending or claimed (or ``seconds`` have passed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        async with sessions() as session:
            status = await outbox.status(session)
        if status.pending == status.claimed == 0 or loop.time() > deadline:
            return status
        await asyncio.sleep(0.1)


async def main() -> None:
    global fixed
    logging.basicConfig(level=logging.ERROR, format="  [log] %(message)s")
    # The after-commit dispatch logs each crm failure with a traceback; the demo prints its own.
    logging.getLogger("alchemium.events").setLevel(logging.CRITICAL)
    path = Path(tempfile.mkdtemp()) / "relay-demo.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    # SQLite: one relay, polling (no LISTEN). Short backoff so the demo is quick.
    relay = OutboxRelay(
        sessions,
        InProcessPublisher(registry),
        poll_interval=0.2,
        max_attempts=4,
        backoff_base=0.2,
        lag_interval=0.0,
    )
    relay_task = asyncio.create_task(relay.run())

    for name in ("Alice", "Bob", "Mallory"):
        print(f"app: signing up {name}")
        async with UnitOfWork(sessions, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": name})
        print(f"app: {name} committed")

    print("app: waiting for the relay ...")
    status = await settled(sessions)
    print(
        f"outbox: delivered={status.delivered} dead={status.dead} pending={status.pending}; "
        f"relay stats: {relay.stats}"
    )

    async with sessions() as session:
        for row in await outbox.dead(session):
            print(
                f"dead letter: event {row['event_id']} -> {row['destination']}: {row['last_error']}"
            )
        fixed = True
        print("ops: CRM fixed, requeueing the dead letters")
        await outbox.requeue(session)
        await session.commit()
    relay.wake()
    status = await settled(sessions)
    relay.stop()
    await relay_task
    print(f"outbox: delivered={status.delivered} dead={status.dead} pending={status.pending}")
    await engine.dispose()
    if status.delivered < EXPECTED or status.dead or status.pending or status.claimed:
        print(f"FAILED: {status.delivered} of {EXPECTED} deliveries made")
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
