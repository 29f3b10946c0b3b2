"""Behind PgBouncer in transaction pooling mode (PostgreSQL only).

Transaction pooling hands each transaction to whichever server connection is
free, so server-side prepared statements cannot be reused by name. The engine
settings documented in docs/pgbouncer.md (no asyncpg statement cache, unique
prepared statement names) make repositories and units of work work unchanged.
Server connections are counted on PgBouncer's admin console (``SHOW SERVERS``,
``SHOW CLIENTS``, through ``psql``: the console speaks only the simple protocol).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from alchemium import UniqueViolation, UnitOfWork
from alchemium.events import flush_delivery_marks
from tests.conftest import reset_schema, skip_without_server
from tests.models import User, UserRepository
from tests.rig import PostgresServer, free_port, wait_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def pgbouncer_engine(url: str, pool_size: int = 5) -> AsyncEngine:
    """The documented engine settings for asyncpg behind transaction pooling."""
    return create_async_engine(
        url + "&prepared_statement_cache_size=0",
        pool_size=pool_size,
        max_overflow=0,
        connect_args={
            "statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        },
    )


POOL_SIZE = 4  # PgBouncer's default_pool_size: server connections per database and user


@dataclass
class PgBouncer:
    """A running PgBouncer in transaction pooling mode in front of the rig's server."""

    port: int
    psql: Path

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres?ssl=disable"

    def show(self, what: str) -> list[dict[str, str]]:
        """The rows of ``SHOW <what>`` on the admin console."""
        out = subprocess.run(
            [
                *(str(self.psql), "-X", "-A", "-F", "\t", "-P", "footer=off"),
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "pgbouncer"),
                *("-c", f"SHOW {what}"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
        header = out[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=True)) for line in out[1:]]

    def connections(self, what: str) -> int:
        """How many ``SERVERS`` or ``CLIENTS`` belong to the ``postgres`` database's pool."""
        return sum(row["database"] == "postgres" for row in self.show(what))


@pytest.fixture(scope="module")
def pgbouncer(pg_server: PostgresServer) -> Iterator[PgBouncer]:
    if pg_server.external_url:
        skip_without_server(
            "PgBouncer",
            "it fronts the rig's own PostgreSQL (its port, trust authentication), and "
            "ALCHEMIUM_TEST_POSTGRES_URL points the suite at another server",
        )
    if not os.path.exists(PGBOUNCER):
        skip_without_server("PgBouncer", "pgbouncer is not installed (apt-get install pgbouncer)")
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="alchemium-pgb-"))
    (tmp / "userlist.txt").write_text('"postgres" ""\n')
    (tmp / "pgbouncer.ini").write_text(
        f"""[databases]
* = host=127.0.0.1 port={pg_server.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {tmp}/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 100
ignore_startup_parameters = extra_float_digits
logfile = {tmp}/pgbouncer.log
"""
    )
    cmd = [PGBOUNCER, str(tmp / "pgbouncer.ini")]
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        for f in tmp.iterdir():
            shutil.chown(f, "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        assert pg_server.bindir is not None
        yield PgBouncer(port, pg_server.bindir / "psql")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def bouncer_factory(pgbouncer: PgBouncer) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = pgbouncer_engine(pgbouncer.url)
    await reset_schema(engine)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await flush_delivery_marks()  # marks in flight hold a connection
    checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
    await engine.dispose()
    assert checked_out == 0


async def test_repository_operations_through_transaction_pooling(
    bouncer_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with UnitOfWork(bouncer_factory) as uow:
        await UserRepository.create_many(
            uow.session, [{"name": f"n{i}", "age": i} for i in range(20)]
        )
    async with UnitOfWork(bouncer_factory) as uow:
        assert await UserRepository.count(uow.session, {"age__gte": 10}) == 10
        assert (
            await UserRepository.update_where(uow.session, {"age__lt": 5}, {"position": "x"}) == 5
        )
    async with UnitOfWork(bouncer_factory) as uow:
        page = await UserRepository.paginate(uow.session, {"position": "x"}, "name", page_size=3)
        assert page.total == 5
        assert [u.name for u in page.items] == ["n0", "n1", "n2"]
        assert await UserRepository.delete_where(uow.session, {"position": "x"}) == 5


async def test_concurrent_units_of_work_share_few_server_connections(
    pgbouncer: PgBouncer, bouncer_factory: async_sessionmaker[AsyncSession]
) -> None:
    """Ten tasks, each with its own client connection, share at most four server ones."""
    engine = pgbouncer_engine(pgbouncer.url, pool_size=10)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    servers: list[int] = []
    working = True

    async def count_servers() -> None:
        while working:
            servers.append(await asyncio.to_thread(pgbouncer.connections, "SERVERS"))
            await asyncio.sleep(0.02)

    async def work(i: int) -> None:
        for j in range(10):
            async with UnitOfWork(factory) as uow:
                await UserRepository.create(uow.session, {"name": f"t{i}-{j}"})
                await uow.flush()
                found = await UserRepository.get_one(uow.session, {"name": f"t{i}-{j}"})
                assert isinstance(found, User)

    sampler = asyncio.create_task(count_servers())
    try:
        await asyncio.gather(*(work(i) for i in range(10)))
        clients = await asyncio.to_thread(pgbouncer.connections, "CLIENTS")
    finally:
        working = False
        await sampler
        await engine.dispose()
    async with UnitOfWork(bouncer_factory) as uow:
        assert await UserRepository.count(uow.session) == 100
    servers.append(await asyncio.to_thread(pgbouncer.connections, "SERVERS"))
    print(f"\n{clients} client connections, server connections sampled: {sorted(set(servers))}")
    assert clients >= 10  # one per task (and the fixture's engine may hold one more)
    assert 0 < max(servers) <= POOL_SIZE


async def test_errors_map_the_same_behind_pgbouncer(
    bouncer_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with UnitOfWork(bouncer_factory) as uow:
        await UserRepository.create(uow.session, {"name": "dup"})
    with pytest.raises(UniqueViolation):
        async with UnitOfWork(bouncer_factory) as uow:
            await UserRepository.create(uow.session, {"name": "dup"})
    async with UnitOfWork(bouncer_factory) as uow:
        assert await UserRepository.count(uow.session, {"name": "dup"}) == 1


async def test_relay_delivers_through_pgbouncer_even_when_listen_cannot_work(
    bouncer_factory: async_sessionmaker[AsyncSession],
) -> None:
    from alchemium.events import (
        OutboxRelay,
        SubscriberRegistry,
        create_outbox_tables,
        disable_outbox,
        enable_outbox,
    )
    from tests.events.relay_support import Sink, eventually
    from tests.models import Base

    outbox = enable_outbox(Base.metadata)
    await create_outbox_tables(bouncer_factory.kw["bind"], outbox)
    registry = SubscriberRegistry("pgbouncer")
    registry.add_destination("sink")
    sink = Sink()
    # LISTEN through transaction pooling is accepted but notifications never arrive:
    # polling must deliver everything anyway.
    relay = OutboxRelay(bouncer_factory, sink, outbox=outbox, poll_interval=0.2)
    task = asyncio.create_task(relay.run())
    try:
        for i in range(3):
            async with UnitOfWork(bouncer_factory, registry=registry, outbox=outbox) as uow:
                await UserRepository.create_many(
                    uow.session, [{"name": f"r{i}-{j}"} for j in range(10)]
                )
        await eventually(lambda: len(sink.received) == 30, timeout=20)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 20)
        disable_outbox()
    assert len(set(sink.ids())) == 30
