"""examples/alembic: ``upgrade head`` builds the app's tables and the outbox, indexes included.

Alembic runs as the user runs it, ``alembic -c examples/alembic/alembic.ini ...`` in a
subprocess from the repository root, against a fresh database of each backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parents[2]
INI = "examples/alembic/alembic.ini"

APP_TABLES = {"users", "posts"}
OUTBOX_TABLES = {"alchemium_outbox", "alchemium_outbox_delivery"}
PARTIAL_INDEXES = {"ix_alchemium_outbox_delivery_due", "ix_alchemium_outbox_delivery_aggregate"}


@pytest.fixture
async def fresh_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A URL to a database that does not exist yet (SQLite) or is newly created (PostgreSQL)."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrated.db'}"
        return
    server = request.getfixturevalue("pg_server")
    name = f"alembic_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(server.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.url(name)
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


def alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", INI, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"alembic {' '.join(args)} failed:\n{result.stderr}"
    return result


async def schema(url: str) -> dict[str, Any]:
    """Tables, index names per table, and the SQL text of the partial indexes."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def read(sync_conn: Any) -> dict[str, Any]:
                insp = inspect(sync_conn)
                tables = set(insp.get_table_names())
                return {
                    "tables": tables,
                    "indexes": {t: {i["name"] for i in insp.get_indexes(t)} for t in tables},
                    "unique": {
                        t: {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)}
                        for t in tables
                    },
                }

            found = await conn.run_sync(read)
            if engine.dialect.name == "postgresql":
                query = text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t")
            else:
                query = text(
                    "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name=:t"
                )
            rows = await conn.execute(query, {"t": "alchemium_outbox_delivery"})
            found["index_sql"] = {name: sql or "" for name, sql in rows}
            return found
    finally:
        await engine.dispose()


async def test_upgrade_head_creates_app_and_outbox_tables_with_indexes(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "head")
    found = await schema(fresh_url)

    assert found["tables"] == APP_TABLES | OUTBOX_TABLES | {"alembic_version"}
    assert found["indexes"]["users"] >= {"ix_users_email"}
    assert found["indexes"]["posts"] >= {"ix_posts_author_id"}
    assert found["indexes"]["alchemium_outbox"] >= {"ix_alchemium_outbox_occurred"}
    assert found["indexes"]["alchemium_outbox_delivery"] >= PARTIAL_INDEXES | {
        "ix_alchemium_outbox_delivery_token"
    }
    assert ("event_id", "destination") in found["unique"]["alchemium_outbox_delivery"]
    assert ("id",) in found["unique"]["alchemium_outbox"]
    # The relay's "what is due" index is partial: it only covers undelivered rows.
    due = found["index_sql"]["ix_alchemium_outbox_delivery_due"]
    assert "WHERE" in due.upper()
    assert "pending" in due


async def test_migrated_schema_matches_the_models(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "head")
    result = alembic(fresh_url, "check")
    assert "No new upgrade operations detected" in result.stdout + result.stderr


async def test_downgrade_base_removes_everything(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "head")
    alembic(fresh_url, "downgrade", "base")
    assert (await schema(fresh_url))["tables"] == {"alembic_version"}
