"""Fixtures for the integration tests: an empty database per test, without the test models."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


async def empty_database(url: str) -> str:
    """Drop everything in ``url``'s database (PostgreSQL: the public schema); return ``url``.

    SQLite URLs from ``db_url`` already point at a fresh file.
    """
    if url.startswith("postgresql"):
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
                await conn.execute(text("CREATE SCHEMA public"))
        finally:
            await engine.dispose()
    return url
