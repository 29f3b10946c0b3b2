"""Shared pieces of the tables alchemium adds to a user's metadata (outbox, audit, inbox).

Each of them lives in the user's own ``MetaData`` so ``create_all`` and Alembic
autogenerate see it; declaring one twice on the same metadata reuses the table.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Integer, MetaData, Table
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["BigId", "JsonDocument", "create_tables", "existing_table"]

# BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL, JSON (text) on SQLite.
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


def existing_table(metadata: MetaData, name: str, schema: str | None = None) -> Table | None:
    """The table ``name`` (in ``schema``) already declared on ``metadata``, if any."""
    return metadata.tables.get(f"{schema}.{name}" if schema else name)


async def create_tables(engine: AsyncEngine, metadata: MetaData, tables: list[Table]) -> None:
    """Create ``tables`` (with their indexes) if they do not exist; nothing else."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: metadata.create_all(sync, tables=tables))
