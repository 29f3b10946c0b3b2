"""The ``alchemium`` command line, run as a real subprocess."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.cli import parse_duration
from alchemium.events import OutboxRelay
from alchemium.events.outbox import Outbox
from tests.events.relay_support import LONG_AGO, Sink, by_status, insert_events, run_cli
from tests.rig import free_port

Factory = async_sessionmaker[AsyncSession]

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def test_durations_parse() -> None:
    assert [parse_duration(v) for v in ("90", "30s", "15m", "12h", "7d")] == [
        90,
        30,
        900,
        43200,
        604800,
    ]


async def cli(*args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_cli, *args)
    return done.returncode, done.stdout, done.stderr


@sqlite_only
async def test_status_requeue_and_purge(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str
) -> None:
    events = await insert_events(session_factory, outbox, 4)
    relay = OutboxRelay(
        session_factory, Sink(fail=lambda e: e.id == events[0].id), max_attempts=1, listen=False
    )
    assert await relay.run_once() == 3

    code, out, err = await cli("outbox", "status", "--url", db_url)
    assert code == 0, err
    assert "pending:   0" in out
    assert "dead:      1" in out
    assert "delivered: 3" in out
    assert str(events[0].id) in out
    assert "sink refused" in out

    code, out, err = await cli("outbox", "requeue", "--url", db_url)
    assert (code, out.strip()) == (0, "requeued 1 dead delivery"), err
    assert await by_status(engine, outbox) == {"pending": 1, "delivered": 3}

    code, out, _ = await cli("outbox", "purge", "--url", db_url, "--older-than", "7d")
    assert (code, out.split()[:2]) == (0, ["purged", "0"])
    async with session_factory() as session:
        await session.execute(update(outbox.deliveries).values(delivered_at=LONG_AGO))
        await session.commit()
    code, out, _ = await cli("outbox", "purge", "--url", db_url, "--older-than", "7d")
    assert (code, out.split()[:2]) == (0, ["purged", "3"])
    assert await by_status(engine, outbox) == {"pending": 1}  # the requeued row stays


@sqlite_only
async def test_relay_with_a_module_that_does_not_exist_exits_2(
    engine: AsyncEngine, db_url: str
) -> None:
    code, _, err = await cli("relay", "--url", db_url, "--import", "myapp.nope")
    assert code == 2
    assert "cannot import module 'myapp.nope'" in err


async def test_wrong_urls_give_clear_errors(tmp_path: object) -> None:
    code, _, err = await cli("outbox", "status", "--url", "nosuchdb://x/y")
    assert code == 2
    assert "invalid database URL" in err

    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    code, _, err = await cli("outbox", "status", "--url", url)
    assert code == 3
    assert "cannot connect to" in err


async def test_status_without_outbox_tables_says_so(tmp_path: object) -> None:
    code, _, err = await cli("outbox", "status", "--url", f"sqlite+aiosqlite:///{tmp_path}/e.db")
    assert code == 3
    assert "no outbox tables" in err


async def test_unknown_publisher_exits_2(tmp_path: object) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/e.db"
    code, _, err = await cli("relay", "--url", url, "--publisher", "kafka://x")
    assert code == 2
    assert "unknown publisher 'kafka://x'" in err
