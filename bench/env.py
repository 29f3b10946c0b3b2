"""The servers a run measures: a throwaway PostgreSQL and a SQLite file set up alike, Redis.

An :class:`Env` holds everything the implementations share for one backend: the
SQLAlchemy engine (pool of 10, no overflow) and session factory, and the raw
driver handle (an asyncpg pool of 10, or one aiosqlite connection). L2 also
needs a Redis server: :func:`redis_url` starts a throwaway one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from alchemium.events.relay import asyncpg_dsn
from bench.schema import Base, Item, item_row

__all__ = ["POOL_SIZE", "Env", "open_env", "postgres_url", "redis_url", "sqlite_path"]

POOL_SIZE = 10

# The same settings for SQLAlchemy's connections and the raw aiosqlite one. WAL with
# synchronous=NORMAL is what a production SQLite app runs (fsync at checkpoints only);
# with FULL every commit would wait for the disk and hide the library's own cost.
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


@dataclass
class Env:
    """One backend, ready: schema created, ``bench_items`` seeded."""

    backend: str  # "postgresql" or "sqlite"
    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    raw: Any  # asyncpg.Pool or aiosqlite.Connection
    seeded: int

    @property
    def is_pg(self) -> bool:
        return self.backend == "postgresql"

    async def truncate(self, *tables: str) -> None:
        """Empty ``tables`` (untimed housekeeping between measurements)."""
        async with self.engine.begin() as conn:
            for table in tables:
                if self.is_pg:
                    await conn.execute(text(f"TRUNCATE {table} RESTART IDENTITY CASCADE"))
                else:
                    await conn.execute(text(f"DELETE FROM {table}"))


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """A throwaway server from the test rig; yields its asyncpg SQLAlchemy URL."""
    from tests.rig import postgres_server

    with postgres_server() as server:
        yield server.url("postgres")


@contextlib.contextmanager
def redis_url() -> Iterator[str | None]:
    """A throwaway ``redis-server`` without persistence; yields its URL, None if not installed.

    ``ALCHEMIUM_BENCH_REDIS_URL`` points at an existing server instead.
    """
    external = os.environ.get("ALCHEMIUM_BENCH_REDIS_URL")
    if external:
        yield external
        return
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        yield None
        return
    from tests.rig import free_port, wait_port

    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def sqlite_path() -> Iterator[str]:
    """A SQLite file in a temporary directory; yields its aiosqlite SQLAlchemy URL."""
    with tempfile.TemporaryDirectory(prefix="alchemium-bench-") as tmp:
        yield f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()


async def _reset_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
        else:
            await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


async def _open_raw(backend: str, url: str) -> Any:
    if backend == "postgresql":
        import asyncpg

        dsn = asyncpg_dsn(url)
        return await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
    import aiosqlite

    conn = await aiosqlite.connect(url.split(":///", 1)[1])
    for pragma in SQLITE_PRAGMAS:
        await conn.execute(pragma)
    return conn


@contextlib.asynccontextmanager
async def open_env(backend: str, url: str, *, seed: int) -> AsyncIterator[Env]:
    """Create the schema, seed ``seed`` items, open the engine and the raw handle."""
    engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=0)
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    await _reset_schema(engine)
    async with engine.begin() as conn:
        for start in range(0, seed, 5000):
            rows = [item_row(i) for i in range(start, min(seed, start + 5000))]
            await conn.execute(insert(Item), rows)
        if engine.dialect.name == "postgresql":
            await conn.execute(text("ANALYZE"))
    raw = await _open_raw(backend, url)
    try:
        yield Env(
            backend=backend,
            url=url,
            engine=engine,
            sessions=async_sessionmaker(engine, expire_on_commit=False),
            raw=raw,
            seeded=seed,
        )
    finally:
        await raw.close()
        await engine.dispose()
