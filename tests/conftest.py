"""Shared fixtures: the database matrix (SQLite + a real PostgreSQL), engines and sessions.

Every database test takes ``engine`` (or ``session_factory``) and so runs twice,
once per backend. Each test gets a clean schema with the tables of
``tests.models`` and the outbox; the pool must have no checked-out connection
when the test ends.

Two checks on the whole run:

* A test that cannot run because a server the rig starts (PostgreSQL, Redis,
  RabbitMQ, PgBouncer) is missing skips with the reason (:func:`skip_without_server`);
  with ``CI`` set (as ``.ci/run`` runs) that skip is a failure instead.
* An asyncio "Future/Task exception was never retrieved" logged during the run fails it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from alchemium import register_encoder, unregister_encoder
from alchemium.events import (
    AuditLog,
    SubscriberRegistry,
    create_audit_table,
    disable_audit,
    disable_outbox,
    enable_audit,
    enable_outbox,
    flush_delivery_marks,
)
from alchemium.events.outbox import Outbox
from tests.models import Base, Money, money_text, parse_money
from tests.rig import PostgresServer, postgres_bindir, postgres_server

BACKENDS = ["sqlite", "postgresql"]


SERVER_MISSING = "needs a server the test rig starts, "


def skip_without_server(server: str, why: str) -> NoReturn:
    """Skip the test: ``server``, which the rig should start, is not available (why).

    Under CI (``CI`` set) the skip is turned into a failure: there the rig must run
    every test.
    """
    pytest.skip(f"{SERVER_MISSING}{server}: {why}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
    if SERVER_MISSING in reason and os.environ.get("CI"):
        report.outcome = "failed"
        why = reason.removeprefix("Skipped: ")
        report.longrepr = f"CI is set, so the rig must provide every server; this test {why}"


class _UnretrievedExceptions(logging.Handler):
    """Collects asyncio's "Future/Task exception was never retrieved" reports."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "exception was never retrieved" in message:
            self.reports.append(message)


_unretrieved = _UnretrievedExceptions()


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("asyncio").addHandler(_unretrieved)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()  # futures dropped by the last tests report when they are collected
    if not _unretrieved.reports:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.section("asyncio exceptions never retrieved", red=True)
        for message in _unretrieved.reports:
            reporter.write_line(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    # Reports after the session (at interpreter exit) reach stderr again: scripts/test.sh
    # looks for them in the output.
    logging.getLogger("asyncio").removeHandler(_unretrieved)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    if not os.environ.get("ALCHEMIUM_TEST_POSTGRES_URL"):
        try:
            postgres_bindir()
        except RuntimeError as err:
            skip_without_server("PostgreSQL", str(err))
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


@contextlib.contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Collect the SQL statements sent through ``engine`` inside the block, in order.

    Counted at SQLAlchemy's ``before_cursor_execute``: what reached the driver.
    """
    seen: list[str] = []

    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", listener)


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
            # A transaction an earlier test leaked would hold its locks forever: fail, not hang.
            await conn.execute(text("SET LOCAL lock_timeout = '20s'"))
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
async def audit(engine: AsyncEngine) -> AsyncIterator[AuditLog]:
    """Audit enabled for one test only: the hook and the table leave with it."""
    log = enable_audit(Base.metadata)
    try:
        await create_audit_table(engine, log)
        yield log
    finally:
        disable_audit()
        Base.metadata.remove(log.table)


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
