"""Behind PgBouncer in transaction pooling mode (PostgreSQL only).

Transaction pooling hands each transaction to whichever server connection is
free, so server-side prepared statements cannot be reused by name. The engine
settings documented in docs/pgbouncer.md (no asyncpg statement cache, unique
prepared statement names) make repositories and units of work work unchanged.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from alchemium import UniqueViolation, UnitOfWork
from tests.conftest import reset_schema, skip_without_server
from tests.models import User, UserRepository
from tests.rig import PostgresServer, free_port, wait_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def pgbouncer_engine(url: str) -> AsyncEngine:
    """The documented engine settings for asyncpg behind transaction pooling."""
    return create_async_engine(
        url + "?prepared_statement_cache_size=0",
        pool_size=5,
        max_overflow=0,
        connect_args={
            "statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        },
    )


@pytest.fixture(scope="module")
def pgbouncer(pg_server: PostgresServer) -> Iterator[str]:
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
pool_mode = transaction
default_pool_size = 4
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
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def bouncer_factory(pgbouncer: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = pgbouncer_engine(pgbouncer)
    await reset_schema(engine)
    yield async_sessionmaker(engine, expire_on_commit=False)
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
    bouncer_factory: async_sessionmaker[AsyncSession],
) -> None:
    async def work(i: int) -> None:
        for j in range(5):
            async with UnitOfWork(bouncer_factory) as uow:
                await UserRepository.create(uow.session, {"name": f"t{i}-{j}"})
                await uow.flush()
                found = await UserRepository.get_one(uow.session, {"name": f"t{i}-{j}"})
                assert isinstance(found, User)

    await asyncio.gather(*(work(i) for i in range(10)))
    async with UnitOfWork(bouncer_factory) as uow:
        assert await UserRepository.count(uow.session) == 50


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
