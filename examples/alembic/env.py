"""Alembic environment for an async application (asyncpg or aiosqlite).

The database URL comes from ``DATABASE_URL`` when set, otherwise from ``alembic.ini``.
``target_metadata`` is the application's metadata, which also holds the outbox tables
(``enable_outbox(Base.metadata)`` in models.py), so autogenerate sees them.
"""

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from alembic.autogenerate.api import AutogenContext
from models import Base
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config
from sqlalchemy.types import TypeEngine

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)
if os.environ.get("DATABASE_URL"):
    config.set_main_option("sqlalchemy.url", os.environ["DATABASE_URL"])

target_metadata = Base.metadata


def render_item(kind: str, obj: object, autogen_context: AutogenContext) -> bool:
    """Add the import autogenerate forgets for the outbox's JSON/JSONB variant column.

    Alembic renders ``JSON().with_variant(JSONB(), "postgresql")`` with a bare
    ``Text()`` inside (``JSONB(astext_type=Text())``); import it so the file runs.
    Returning False keeps Alembic's own rendering.
    """
    if kind == "type" and isinstance(obj, TypeEngine):
        variants = getattr(obj, "_variant_mapping", {}).values()
        if any("JSONB" in type(v).__name__ for v in variants):
            autogen_context.imports.add("from sqlalchemy import Text")
    return False


def configure(**options: object) -> None:
    url = config.get_main_option("sqlalchemy.url") or ""
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=url.startswith("sqlite"),
        render_item=render_item,
        **options,
    )


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
