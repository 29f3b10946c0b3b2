"""The relay's health: ``alchemium relay --health`` exit codes, and ``/health`` in an ASGI app.

Exit codes of ``--health`` (docs/observability.md): 0 healthy, 4 unhealthy (one line
per failed check on stderr), 5 no relay answered, 2 wrong usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from alchemium.events import OutboxRelay
from alchemium.events.monitoring import monitoring_app, relay_health
from alchemium.events.outbox import Outbox, create_outbox_tables
from tests.events.relay_support import Sink, eventually, make_events, run_cli, write_pending
from tests.observability.relay_process import parse_metrics, running_relay
from tests.rig import PostgresServer, free_port

Factory = async_sessionmaker[AsyncSession]


async def test_health_exits_0_while_the_relay_runs_and_5_once_it_is_gone(
    session_factory: Factory, db_url: str, tmp_path: Path
) -> None:
    async with running_relay(db_url, tmp_path) as relay:
        code, out, err = await relay.health()
        assert (code, err) == (0, "")
        assert out.startswith("relay ")
        assert out.strip().endswith("healthy")
        code, _, err = await relay.health("--max-lag", "1h", "--max-listen-down", "5m")
        assert code == 0, err
    code, _, err = await relay.health()
    assert code == 5
    assert f"no relay answered on 127.0.0.1:{relay.port}" in err
    assert len(err.strip().splitlines()) == 1


def test_health_without_a_port_is_a_usage_error() -> None:
    done = run_cli("relay", "--health")
    assert done.returncode == 2
    assert "--health needs --metrics-port" in done.stderr


async def test_a_stalled_round_and_a_lagging_destination_are_unhealthy(
    session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    async with running_relay(db_url, tmp_path, "--poll-interval", "0.2") as relay:
        async with session_factory() as session:
            await write_pending(session, outbox, make_events(1, name="slow_created"), ["slow"])
            await session.commit()

        async def unhealthy() -> str | None:
            # the lag is read from the database at most every 5 s: it shows up later
            code, _, err = await relay.health("--max-stall", "1s", "--max-lag", "1s")
            return err if code == 4 and "lag" in err else None

        err = await eventually(unhealthy, 30, interval=0.5)
        assert "a round has made no progress" in err
        assert "destination 'slow': lag" in err
        assert all(line.startswith("alchemium: unhealthy: relay ") for line in err.splitlines())

        (tmp_path / "release").touch()

        async def healthy() -> bool:
            code, _, _ = await relay.health("--max-stall", "1s", "--max-lag", "1h")
            return code == 0

        await eventually(healthy, 30, interval=0.5)


@pytest.fixture
async def listen_database(pg_server: PostgresServer) -> AsyncIterator[str]:
    """A database of its own, so refusing connections to it disturbs no other test."""
    admin = create_async_engine(pg_server.url(), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text("DROP DATABASE IF EXISTS listen_health WITH (FORCE)"))
            await conn.execute(text("CREATE DATABASE listen_health"))
        yield pg_server.url("listen_health")
        async with admin.connect() as conn:
            await conn.execute(text("ALTER DATABASE listen_health ALLOW_CONNECTIONS true"))
            await conn.execute(text("DROP DATABASE listen_health WITH (FORCE)"))
    finally:
        await admin.dispose()


async def test_a_listen_connection_that_stays_down_is_unhealthy(
    listen_database: str, outbox: Outbox, pg_server: PostgresServer
) -> None:
    engine = create_async_engine(listen_database, pool_size=3)
    admin = create_async_engine(pg_server.url(), isolation_level="AUTOCOMMIT")
    await create_outbox_tables(engine, outbox)
    relay = OutboxRelay(async_sessionmaker(engine), Sink(), poll_interval=0.2)
    app = FastAPI()
    app.mount("/relay", monitoring_app(relay))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
    running = asyncio.create_task(relay.run())
    try:
        assert await relay.wait_listening(30)
        assert (await relay_health(relay, max_listen_down=0)).healthy
        async with admin.connect() as conn:
            await conn.execute(text("ALTER DATABASE listen_health ALLOW_CONNECTIONS false"))
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = 'listen_health' AND query LIKE 'LISTEN%'"
                )
            )
        await eventually(lambda: not relay.listening, 30)

        health = await relay_health(relay, max_listen_down=0)
        assert not health.healthy
        assert health.listening is False
        assert "the LISTEN connection has been down" in health.problems[0]
        response = await client.get("/relay/health", params={"max_listen_down": "0"})
        assert response.status_code == 503
        assert "the LISTEN connection has been down" in response.json()["problems"][0]
        metrics = parse_metrics((await client.get("/relay/metrics")).text)
        assert metrics[("alchemium_relay_listening", frozenset())] == 0

        async with admin.connect() as conn:
            await conn.execute(text("ALTER DATABASE listen_health ALLOW_CONNECTIONS true"))
        assert await relay.wait_listening(60)
        response = await client.get("/relay/health", params={"max_listen_down": "0"})
        assert (response.status_code, response.json()["listening"]) == (200, True)
    finally:
        relay.stop()
        await running
        await client.aclose()
        await engine.dispose()
        await admin.dispose()


async def test_the_metrics_port_is_refused_when_taken(db_url: str, engine: object) -> None:
    port = free_port()
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", port)
    try:
        done = await asyncio.to_thread(
            run_cli, "relay", "--url", db_url, "--metrics-port", str(port), "--once"
        )
    finally:
        server.close()
    assert done.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
