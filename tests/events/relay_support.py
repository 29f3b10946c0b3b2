"""Helpers and fixtures of the relay, publisher and CLI tests (real servers, no mocks).

The fixtures are re-exported by ``tests/events/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import DomainEvent, flush_delivery_marks
from alchemium.events.outbox import Outbox
from tests.conftest import skip_without_server
from tests.rig import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]

LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)  # older than any retention


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of every Python process the tests start: this checkout comes first.

    ``PYTHONPATH`` is the repository root, so the process imports the code under test
    even where another copy of alchemium is installed (``scripts/mutations.py`` runs
    the tests on mutated copies of the repository).
    """
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


# -- outbox helpers ---------------------------------------------------------------------------


def make_events(
    n: int, *, aggregates: int | None = None, name: str = "user_created"
) -> list[DomainEvent]:
    """``n`` events; with ``aggregates``, event i belongs to aggregate ``i % aggregates``."""
    return [
        DomainEvent.create(
            name,
            aggregate_type="user",
            aggregate_id=str(i % aggregates if aggregates else i),
            payload={"n": i},
        )
        for i in range(n)
    ]


async def write_pending(
    session: AsyncSession,
    outbox: Outbox,
    events: Sequence[DomainEvent],
    destinations: Sequence[str],
) -> None:
    """Write ``events`` with one pending delivery row per destination (no commit)."""
    await session.run_sync(
        lambda sync: outbox.write(
            sync,
            events,
            [(e, d, False) for e in events for d in destinations],
            claim_token=uuid.uuid4(),
            lease=0,
            notify=True,
        )
    )


async def insert_events(
    factory: async_sessionmaker[AsyncSession],
    outbox: Outbox,
    n: int,
    *,
    destinations: Sequence[str] = ("sink",),
    aggregates: int | None = None,
    chunk: int = 1000,
) -> list[DomainEvent]:
    """Commit ``n`` events pending for ``destinations``, ``chunk`` per transaction."""
    events = make_events(n, aggregates=aggregates)
    for start in range(0, n, chunk):
        async with factory() as session:
            await write_pending(session, outbox, events[start : start + chunk], destinations)
            await session.commit()
    return events


async def delivery_rows(engine: AsyncEngine, outbox: Outbox) -> list[dict[str, Any]]:
    """Every delivery row, in id order."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(outbox.deliveries).order_by(outbox.deliveries.c.id))
        return [dict(r._mapping) for r in rows]


async def by_status(engine: AsyncEngine, outbox: Outbox) -> dict[str, int]:
    """Count of delivery rows per status (after-commit marks still queued written first)."""
    await flush_delivery_marks()
    counts: dict[str, int] = {}
    for row in await delivery_rows(engine, outbox):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


async def database_time(engine: AsyncEngine) -> dt.datetime:
    """The database's now (the clock every relay time is reckoned on)."""
    from alchemium.events.outbox import database_now
    from alchemium.events.outbox_schema import aware

    async with engine.connect() as conn:
        now = aware((await conn.execute(select(database_now()))).scalar_one())
    assert now is not None
    return now


async def eventually(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Await ``check()`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@dataclass
class Sink:
    """A real publisher for tests: records what it was given; can fail or be slow."""

    name: str | tuple[str, ...] = "sink"
    fail: Callable[[DomainEvent], bool] = lambda _e: False
    delay: float = 0.0
    received: list[DomainEvent] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, event: DomainEvent, destination: str) -> None:
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail(event):
            raise RuntimeError(f"sink refused {event.id}")
        self.received.append(event)

    def ids(self) -> list[uuid.UUID]:
        return [e.id for e in self.received]


@dataclass
class StalledSink(Sink):
    """A Sink whose publishes wait for ``release``: a relay paused (GC, network) mid-batch."""

    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, event: DomainEvent, destination: str) -> None:
        self.started.set()
        await self.release.wait()
        self.received.append(event)


# -- relay subprocesses -----------------------------------------------------------------------


def relay_process(url: str, sink: Path, *args: str, delay: float = 0.0) -> subprocess.Popen[bytes]:
    """Start ``alchemium relay`` in a subprocess with the file-sink handler of sink_handlers."""
    env = subprocess_env(ALCHEMIUM_SINK=str(sink), ALCHEMIUM_SINK_DELAY=str(delay))
    log = sink.parent / f"relay-{uuid.uuid4().hex[:8]}.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alchemium",
                "relay",
                "--url",
                url,
                "--import",
                "tests.events.sink_handlers",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def relay_logs(sink: Path) -> str:
    """The output of every relay process started with this sink."""
    return "\n".join(p.read_text() for p in sorted(sink.parent.glob("relay-*.log")))


def sink_lines(sink: Path) -> list[str]:
    """Every event id written by the sink handlers of all relay processes."""
    lines: list[str] = []
    for path in sink.parent.glob(sink.name + ".*"):
        lines.extend(path.read_text().split())
    return lines


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def run_cli(
    *args: str,
    timeout: float = 60.0,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    module: str = "alchemium",
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m MODULE ARGS`` (the command line) to completion, after ``prefix``.

    ``prefix`` is a command that runs it (faketime); ``env`` adds to (or, with value
    "", removes from) this process's environment.
    """
    environment = subprocess_env()
    for key, value in (env or {}).items():
        if value:
            environment[key] = value
        else:
            environment.pop(key, None)
    return subprocess.run(
        [*prefix, sys.executable, "-m", module, *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def faketime(offset: str) -> list[str]:
    """The command prefix that runs a process with its wall clock off by ``offset``.

    ``offset`` is libfaketime's relative form (``"+60s"``, ``"-60s"``). Only the wall
    clock moves (``FAKETIME_DONT_FAKE_MONOTONIC``), as with a host whose clock is off.
    """
    binary = shutil.which("faketime")
    if binary is None:
        skip_without_server(
            "faketime", "not installed (apt-get install faketime; scripts/system-deps.sh)"
        )
    return ["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", binary, "-f", offset]


# -- brokers ------------------------------------------------------------------------------------


def _binary(name: str, *extra_dirs: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/bin", *extra_dirs):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return None


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on loopback without persistence."""

    binary: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    async def entries(self, stream: str) -> list[tuple[str, dict[str, str]]]:
        """Every entry of ``stream`` as a consumer reads it (``XRANGE``): (id, fields)."""
        import redis.asyncio as redis_asyncio

        consumer = redis_asyncio.from_url(self.url, decode_responses=True)
        try:
            return list(await consumer.xrange(stream))
        finally:
            await consumer.aclose()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = _binary("redis-server")
    if binary is None:
        skip_without_server("Redis", "redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RabbitServer:
    """A throwaway RabbitMQ node on loopback (default guest user, no plugins).

    ``stop()`` shuts the node down (SIGTERM: durable queues and confirmed persistent
    messages survive); ``start()`` brings it back on the same port with the same data.
    """

    binary: str
    base: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        (self.base / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(self.base),
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_NODENAME": f"alchemium{self.port}@localhost",
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
        }
        with (self.base / "server.out").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_port(self.port, 90)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.asynccontextmanager
async def rabbitmq_consumer(
    url: str, exchange: str, routing_key: str
) -> AsyncIterator[Callable[[int], Awaitable[list[Any]]]]:
    """A consumer's exclusive queue bound to topic ``exchange`` for ``routing_key``.

    Yields ``take(n)``, which gets (and acks) the next ``n`` messages, 5 s each at most.
    """
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        topic = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(topic, routing_key=routing_key)

        async def take(n: int) -> list[Any]:
            received = []
            for _ in range(n):
                message = await queue.get(timeout=5)
                await message.ack()
                received.append(message)
            return received

        yield take
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitServer]:
    binary = _binary("rabbitmq-server", "/usr/lib/rabbitmq/bin")
    if binary is None:
        skip_without_server(
            "RabbitMQ", "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
        )
    # The /usr/sbin wrapper switches to the rabbitmq user; the real script runs as us.
    direct = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if direct.exists():
        binary = str(direct)
    server = RabbitServer(binary, Path(tempfile.mkdtemp(prefix="alchemium-rabbit-")))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
async def new_engine(db_url: str) -> AsyncIterator[Callable[[], AsyncEngine]]:
    """Make extra engines on the test database (one per relay); all disposed at the end."""
    from tests.conftest import make_engine

    created: list[AsyncEngine] = []

    def new() -> AsyncEngine:
        created.append(make_engine(db_url))
        return created[-1]

    yield new
    for eng in created:
        await eng.dispose()
