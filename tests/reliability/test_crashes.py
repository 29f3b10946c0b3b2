"""Process crashes: a writer SIGKILLed while committing loses no committed event.

A writer subprocess (``tests/reliability/crash_writer.py``) commits units of work
(a user, its ``user_created`` event and a custom ``probe`` event) three at a time,
with an in-process subscriber ``sink`` and an external destination ``broker``. It is
SIGKILLed at a random moment, several times, each time with some units of work
mid-commit; the last time while its after-commit handler runs (it blocks on purpose),
so deliveries it claimed for in-process dispatch are held by a dead process. Afterwards
a relay drains the outbox, publishing ``broker`` rows to a real Redis stream
(``RedisStreamPublisher`` against the ``redis-server`` the rig starts). Then:

* every event in the outbox belongs to a change that exists (no event without its
  row, no row without its events), and every commit the writer saw acknowledged is
  there;
* every committed event reached both destinations at least once (lost = 0), the
  events of the handler that hung included; duplicates (the subscriber ran, the
  process died before recording it) are counted.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    RedisStreamPublisher,
    SubscriberRegistry,
)
from alchemium.events.outbox import Outbox
from tests.events.relay_support import (
    REPO,
    RedisServer,
    by_status,
    eventually,
    subprocess_env,
)
from tests.models import User

KILLS = 5


def _journal(journal: Path) -> list[tuple[str, str]]:
    """Every ``(kind, value)`` line the writer processes wrote before they died."""
    lines: list[tuple[str, str]] = []
    for path in sorted(journal.parent.glob(journal.name + ".*")):
        for line in path.read_text().splitlines():
            kind, _, value = line.partition(" ")
            if value:  # a line cut short by the SIGKILL has no value yet
                lines.append((kind, value))
    return lines


def _writer(url: str, journal: Path, tag: str, *hang_at: int) -> subprocess.Popen[bytes]:
    args = [url, str(journal), tag, *map(str, hang_at)]
    with (journal.parent / f"writer-{tag}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.crash_writer", *args],
            cwd=REPO,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _kill_writers(url: str, journal: Path, rng: random.Random) -> int:
    """Start and SIGKILL a writer ``KILLS`` times; returns the units caught mid-commit.

    The last writer is killed while its after-commit handler hangs (an ``H`` line).
    """
    in_flight = 0
    for run in range(KILLS):
        last = run == KILLS - 1
        units = rng.randint(5, 60)
        proc = _writer(url, journal, f"w{run}", *([units] if last else []))
        # Wait for that many more acknowledged units, or for the hung handler's line.
        awaited = "H" if last else "A"
        target = sum(kind == awaited for kind, _ in _journal(journal)) + (1 if last else units)
        log = journal.parent / f"writer-w{run}.log"

        def enough(
            proc: subprocess.Popen[bytes] = proc,
            awaited: str = awaited,
            target: int = target,
            log: Path = log,
        ) -> bool:
            assert proc.poll() is None, log.read_text()
            return sum(kind == awaited for kind, _ in _journal(journal)) >= target

        await eventually(enough, timeout=30, interval=0.01)
        if not last:
            await asyncio.sleep(rng.uniform(0, 0.03))
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
        begun = {v for k, v in _journal(journal) if k == "B" and v.startswith(f"w{run}-")}
        acked = {v for k, v in _journal(journal) if k == "A" and v.startswith(f"w{run}-")}
        in_flight += len(begun - acked)
    return in_flight


async def _stream_event_ids(url: str, stream: str) -> list[str]:
    """The ``event_id`` of every entry of the Redis ``stream``, in order."""
    import redis.asyncio as redis_asyncio

    consumer = redis_asyncio.from_url(url, decode_responses=True)
    try:
        return [fields["event_id"] for _id, fields in await consumer.xrange(stream)]
    finally:
        await consumer.aclose()


async def test_sigkilled_writer_loses_no_committed_event(
    engine: AsyncEngine,
    session_factory: async_sessionmaker[AsyncSession],
    outbox: Outbox,
    db_url: str,
    tmp_path: Path,
    redis_server: RedisServer,
    stats: Counter[str],
) -> None:
    journal = tmp_path / "journal"
    in_flight = await _kill_writers(db_url, journal, random.Random(20261125))

    relayed: list[DomainEvent] = []
    registry = SubscriberRegistry("crash-relay")
    registry.subscribe("*", relayed.append, name="sink")  # the same subscriber name
    broker = RedisStreamPublisher(redis_server.url, stream="crash-test", name="broker")
    relay = OutboxRelay(
        session_factory,
        [InProcessPublisher(registry), broker],
        batch_size=200,
        poll_interval=0.2,
        listen=False,
    )
    task = asyncio.create_task(relay.run())
    try:

        async def drained() -> bool:
            return set(await by_status(engine, outbox)) == {"delivered"}

        # The dead writers' in-process claims expire after their 1 s lease.
        await eventually(drained, timeout=40, interval=0.2)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
        await broker.close()

    async with session_factory() as session:
        users = {u.name: u.id for u in (await session.scalars(select(User))).all()}
        rows = (
            await session.execute(
                select(outbox.events.c.id, outbox.events.c.name, outbox.events.c.aggregate_id)
            )
        ).all()
    created = Counter(r.aggregate_id for r in rows if r.name == "user_created")
    probes = Counter(r.aggregate_id for r in rows if r.name == "probe")
    assert set(created) == {str(i) for i in users.values()}, "user_created iff the user exists"
    assert set(probes) == set(users), "probe iff its unit of work committed"
    assert set(created.values()) | set(probes.values()) == {1}
    lines = _journal(journal)
    acked = {v for k, v in lines if k == "A"}
    assert acked <= set(users), "an acknowledged commit is missing"
    committed_in_flight = len(({v for k, v in lines if k == "B"} - acked) & set(users))

    committed = {str(r.id) for r in rows}
    sink = [v for k, v in lines if k == "S"] + [str(e.id) for e in relayed]
    broker_ids = await _stream_event_ids(redis_server.url, "crash-test")
    hung = {v for k, v in lines if k == "H"}  # the handler blocked: the relay's to deliver
    lost = len(committed - set(sink)) + len(committed - set(broker_ids))
    duplicates = len(sink) - len(set(sink)) + len(broker_ids) - len(set(broker_ids))
    stats["units_of_work"] += len({v for k, v in lines if k == "B"})
    stats["faults_injected"] += KILLS
    stats["events_committed"] += len(committed)
    stats["events_delivered"] += len(committed & set(sink) & set(broker_ids))  # to both
    stats["events_duplicated"] += duplicates
    stats["events_lost"] += lost
    print(
        f"\n{engine.dialect.name}: {KILLS} writers SIGKILLed, {len(users)} units committed "
        f"({len(acked)} acknowledged, {in_flight} caught mid-commit of which "
        f"{committed_in_flight} had committed), {len(committed)} events x 2 destinations, "
        f"{len(sink) + len(broker_ids)} deliveries: {duplicates} duplicate(s), {lost} lost; "
        f"relay {relay.stats}"
    )
    assert in_flight > 0  # the kills did land while units of work were committing
    assert hung, "the last writer was not killed inside its after-commit handler"
    assert hung <= {str(e.id) for e in relayed}, "the hung handler's event was not redelivered"
    assert lost == 0
    assert set(sink) == committed
    assert set(broker_ids) == committed
