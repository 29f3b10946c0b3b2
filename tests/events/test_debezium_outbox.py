"""The Debezium-shaped outbox: the table a CDC reader expects, written by the same code.

Read back as Debezium's outbox event router would read it: by its column names, and
on PostgreSQL through a logical-decoding slot (``test_decoding``) on a server started
with ``wal_level=logical``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import SubscriberRegistry
from alchemium.events.outbox import Outbox
from alchemium.events.upcasting import default_upcasters
from tests.conftest import make_engine, outbox_of_shape, reset_schema
from tests.events.relay_support import Sink
from tests.models import UserRepository
from tests.rig import PostgresServer, postgres_server

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ROUTER_COLUMNS = {"id", "aggregatetype", "aggregateid", "type", "payload"}


@pytest.fixture(autouse=True)
def user_created_at_version_2() -> Iterator[None]:
    """The code of these tests declares ``user_created`` at schema version 2."""
    with default_upcasters.scoped() as upcasters:
        upcasters.declare("user_created", 2)
        yield


@pytest.fixture
def outbox() -> Iterator[Outbox]:
    with outbox_of_shape("debezium") as box:
        yield box


async def _create_user(engine: AsyncEngine, registry: SubscriberRegistry) -> None:
    registry.add_destination("cdc", "user_*")
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with UnitOfWork(
        sessions, registry=registry, metadata={"traceparent": TRACEPARENT}
    ) as uow:
        await UserRepository.create(uow.session, {"name": "ada", "email": "ada@example.com"})


async def test_events_table_has_the_router_columns_and_values(
    engine: AsyncEngine, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    async with engine.connect() as conn:
        columns = await conn.run_sync(
            lambda sync: {c["name"] for c in inspect(sync).get_columns(outbox.events.name)}
        )
    assert columns >= ROUTER_COLUMNS | {"tracingspancontext", "schemaversion"}
    assert not {"name", "aggregate_type", "aggregate_id"} & columns
    await _create_user(engine, registry)
    async with engine.connect() as conn:  # plain SQL, as a CDC connector sees the row
        row = (
            await conn.execute(
                text(
                    "SELECT id, aggregatetype, aggregateid, type, payload, tracingspancontext,"
                    f" schemaversion FROM {outbox.events.name}"
                )
            )
        ).one()
    payload = row.payload if isinstance(row.payload, dict) else json.loads(row.payload)
    assert (row.aggregatetype, row.type) == ("user", "user_created")
    assert payload["name"] == "ada"
    assert row.aggregateid == str(payload["id"])
    assert row.tracingspancontext == f"traceparent={TRACEPARENT}"
    assert row.schemaversion == "2"


async def test_relay_delivers_from_the_debezium_shape(
    engine: AsyncEngine, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    from alchemium.events import OutboxRelay

    await _create_user(engine, registry)
    sink = Sink(name="cdc")
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    assert await OutboxRelay(sessions, sink, listen=False).run_once() == 1
    (event,) = sink.received
    assert (event.name, event.aggregate_type, event.payload["name"]) == (
        "user_created",
        "user",
        "ada",
    )


@pytest.fixture(scope="module")
def logical_server() -> Iterator[PostgresServer]:
    # synchronous_commit on: logical decoding reads only WAL already flushed, and the
    # rig's servers commit asynchronously (the change would show up a moment later).
    settings = ("wal_level=logical", "max_replication_slots=4", "synchronous_commit=on")
    with postgres_server(settings=settings) as server:
        yield server


@pytest.fixture
async def logical_engine(
    logical_server: PostgresServer, outbox: Outbox
) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(logical_server.url("postgres"))
    await reset_schema(engine)
    yield engine
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = 'alchemium_cdc'"
            )
        )
    await engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_logical_decoding_slot_reads_the_outbox_insert(
    backend: str, logical_engine: AsyncEngine, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    async with logical_engine.connect() as conn:  # a slot is made outside a transaction
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(
            text("SELECT pg_create_logical_replication_slot('alchemium_cdc', 'test_decoding')")
        )
    await _create_user(logical_engine, registry)
    async with logical_engine.begin() as conn:
        changes = (
            await conn.execute(
                text("SELECT data FROM pg_logical_slot_get_changes('alchemium_cdc', NULL, NULL)")
            )
        ).scalars()
        inserts = [c for c in changes if c.startswith(f"table public.{outbox.events.name}: INSERT")]
    (change,) = inserts
    # test_decoding writes "column[type]:value" for each column of the new row.
    fields = dict(re.findall(r"(\w+)\[[^\]]+\]:('(?:[^']|'')*'|\S+)", change))
    assert set(fields) >= ROUTER_COLUMNS
    assert fields["aggregatetype"] == "'user'"
    assert fields["type"] == "'user_created'"
    assert json.loads(fields["payload"][1:-1].replace("''", "'"))["name"] == "ada"
    assert fields["tracingspancontext"] == f"'traceparent={TRACEPARENT}'"
