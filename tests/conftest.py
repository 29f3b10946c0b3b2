"""Shared fixtures: the database matrix (SQLite + a real PostgreSQL), engines and sessions.

Every database test takes ``engine`` (or ``session_factory``) and so runs twice,
once per backend. Each test gets a clean schema with the tables of
``tests.models`` and the outbox; the pool must have no checked-out connection
when the test ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from alchemium import register_encoder, unregister_encoder
from alchemium.events import SubscriberRegistry, disable_outbox, enable_outbox, flush_delivery_marks
from alchemium.events.outbox import Outbox
from tests.models import Base, Money, money_text, parse_money
from tests.rig import PostgresServer, postgres_server

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL to an empty database of ``backend``."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.url("postgres")


def sqlite_pragmas(engine: AsyncEngine) -> None:
    """Foreign keys on, WAL and a busy timeout: what a real SQLite app configures."""

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        sqlite_pragmas(engine)
    return engine


async def reset_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
        await conn.run_sync(Base.metadata.create_all)


@pytest.fixture
def outbox() -> Iterator[Outbox]:
    """The outbox of the test models' metadata, enabled as the default for the test."""
    box = enable_outbox(Base.metadata)
    yield box
    disable_outbox()


def _forget_outbox_tables(box: Outbox) -> None:
    for table in (box.deliveries, box.events):
        Base.metadata.remove(table)


@contextlib.contextmanager
def outbox_of_shape(shape: str) -> Iterator[Outbox]:
    """The test models' outbox with its events table in ``shape`` (``debezium``), enabled.

    The tables of the default shape are taken out of ``Base.metadata`` meanwhile and put
    back afterwards, so the other tests see alchemium's shape.
    """
    _forget_outbox_tables(enable_outbox(Base.metadata))
    box = enable_outbox(Base.metadata, shape=shape)
    try:
        yield box
    finally:
        disable_outbox()
        _forget_outbox_tables(box)
        enable_outbox(Base.metadata)
        disable_outbox()


@pytest.fixture(params=["alchemium", "debezium"])
def shaped_outbox(request: pytest.FixtureRequest) -> Iterator[Outbox]:
    """The outbox in both shapes: alchemium's columns and Debezium's outbox event router's."""
    with outbox_of_shape(str(request.param)) as box:
        yield box


@pytest.fixture(params=["outbox", "no_outbox"])
def both_commit_paths(request: pytest.FixtureRequest, outbox: Outbox) -> str:
    """Run a test on both commit paths of UnitOfWork.

    ``outbox``: the default outbox is enabled, so every commit flushes, writes the
    outbox rows and then commits. ``no_outbox``: nothing runs between the last flush
    and COMMIT, so both go through SQLAlchemy's greenlet bridge in one pass.
    """
    if request.param == "no_outbox":
        disable_outbox()
    return str(request.param)


@pytest.fixture
async def engine(db_url: str, outbox: Outbox) -> AsyncIterator[AsyncEngine]:
    eng = (
        make_engine(db_url, pool_size=10, max_overflow=0)
        if "postgresql" in db_url
        else make_engine(db_url)
    )
    await reset_schema(eng)
    yield eng
    await flush_delivery_marks()  # marks in flight hold a connection
    checked_out = eng.pool.checkedout() if hasattr(eng.pool, "checkedout") else 0
    await eng.dispose()
    assert checked_out == 0, f"{checked_out} connection(s) still checked out at test end"


@pytest.fixture(params=[False, True], ids=["keep", "expire"])
def expire_on_commit(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def money_encoder() -> Iterator[None]:
    """``tests.models.Money`` encoded as ``"1250 EUR"`` for the test (an application's type)."""
    register_encoder(Money, money_text, parse_money)
    yield
    unregister_encoder(Money)


@pytest.fixture
def registry() -> SubscriberRegistry:
    """A fresh subscriber registry, so tests never see each other's handlers."""
    return SubscriberRegistry("test")


def pytest_report_header() -> list[str]:
    url = os.environ.get("ALCHEMIUM_TEST_POSTGRES_URL")
    return [f"postgres: {'external ' + url if url else 'throwaway server from the rig'}"]
