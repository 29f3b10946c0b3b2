"""A running relay's /metrics under real traffic: the figures match the outbox tables.

The relay is a real ``alchemium relay --metrics-port`` process draining three
destinations: ``ok`` (delivers), ``flaky`` (fails: retried once, then dead) and
``slow`` (held in flight); ``stranded`` has rows no relay serves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium.events import OutboxRelay
from alchemium.events.outbox import Outbox
from tests.events.relay_support import by_status, eventually, make_events, write_pending
from tests.observability.conftest import Spans
from tests.observability.relay_process import Metrics, running_relay

Factory = async_sessionmaker[AsyncSession]

RELAY_ARGS = ("--max-attempts", "2", "--backoff-base", "0.05", "--poll-interval", "0.2")


async def commit_batch(factory: Factory, outbox: Outbox, n: int, destinations: list[str]) -> None:
    async with factory() as session:
        await write_pending(session, outbox, make_events(n, name="item_created"), destinations)
        await session.commit()


def rows(metrics: Metrics, destination: str) -> dict[str, float | None]:
    return {
        status: metrics.get("alchemium_outbox_rows", destination=destination, status=status)
        for status in ("pending", "claimed", "delivered", "dead")
    }


async def test_scraped_figures_match_the_outbox_tables(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    async with running_relay(db_url, tmp_path, *RELAY_ARGS) as relay:
        for _ in range(5):  # traffic while scraping
            await commit_batch(session_factory, outbox, 10, ["ok", "flaky", "stranded"])
            await relay.scrape()
            await asyncio.sleep(0.1)

        async def drained() -> bool:
            async with session_factory() as session:
                per = await outbox.destination_status(session, ["ok", "flaky"])
            return all(s.pending == s.claimed == 0 for s in per)

        await eventually(drained, 60)

        async def gauges_match() -> Metrics | None:
            async with session_factory() as session:
                before = {s.destination: s for s in await outbox.destination_status(session)}
            metrics = await relay.scrape()
            for name, status in before.items():
                expected = {
                    "pending": status.pending,
                    "claimed": status.claimed,
                    "delivered": status.delivered,
                    "dead": status.dead,
                }
                if rows(metrics, name) != expected:
                    return None
            return metrics

        metrics = await eventually(gauges_match, 30, interval=0.5)

    assert rows(metrics, "ok") == {"pending": 0, "claimed": 0, "delivered": 50, "dead": 0}
    assert rows(metrics, "flaky") == {"pending": 0, "claimed": 0, "delivered": 0, "dead": 50}
    assert rows(metrics, "stranded") == {"pending": 50, "claimed": 0, "delivered": 0, "dead": 0}
    counts = await by_status(engine, outbox)
    assert counts == {"delivered": 50, "dead": 50, "pending": 50}
    # the relay's counters: every row it recorded, by outcome
    deliveries = "alchemium_relay_deliveries_total"
    assert metrics.get(deliveries, destination="ok", outcome="delivered") == 50
    assert metrics.get(deliveries, destination="flaky", outcome="retried") == 50
    assert metrics.get(deliveries, destination="flaky", outcome="dead") == 50
    assert metrics.get("alchemium_relay_lost_leases_total") == 0
    duration = "alchemium_relay_publish_duration_seconds_count"
    assert metrics.get(duration, destination="ok", outcome="ok") == 50
    assert metrics.get(duration, destination="flaky", outcome="error") == 100
    latency = "alchemium_relay_commit_to_delivered_seconds"
    assert metrics.get(f"{latency}_count", destination="ok") == 50
    assert metrics.get(f"{latency}_bucket", destination="ok", le="+Inf") == 50
    assert 0 < (metrics.get(f"{latency}_sum", destination="ok") or 0) < 50 * 60
    # the lag: nothing left for ok and flaky; stranded rows age
    assert metrics.get("alchemium_outbox_lag_seconds", destination="ok") == 0
    assert (metrics.get("alchemium_outbox_lag_seconds", destination="stranded") or 0) > 0
    assert metrics.get("alchemium_outbox_relays_holding_leases") == 0
    assert metrics.get("alchemium_relay_running") == 1


async def test_a_publish_in_flight_shows_a_claimed_row_and_a_relay_holding_its_lease(
    session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    async with running_relay(db_url, tmp_path, *RELAY_ARGS) as relay:
        async with session_factory() as session:
            await write_pending(session, outbox, make_events(1, name="slow_created"), ["slow"])
            await session.commit()

        async def held() -> Metrics | None:
            metrics = await relay.scrape()
            claimed = metrics.get("alchemium_outbox_rows", destination="slow", status="claimed")
            return metrics if claimed == 1 else None

        metrics = await eventually(held, 30, interval=0.3)
        assert metrics.get("alchemium_outbox_relays_holding_leases") == 1
        (tmp_path / "release").touch()

        async def delivered() -> bool:
            metrics = await relay.scrape()
            return (
                metrics.get(
                    "alchemium_relay_deliveries_total", destination="slow", outcome="delivered"
                )
                == 1
                and metrics.get("alchemium_outbox_relays_holding_leases") == 0
            )

        await eventually(delivered, 30, interval=0.3)


async def test_relay_figures_reach_the_opentelemetry_metrics_sdk(
    spans: Spans, session_factory: Factory, outbox: Outbox
) -> None:
    from tests.events.relay_support import Sink

    await commit_batch(session_factory, outbox, 3, ["sink"])
    relay = OutboxRelay(session_factory, Sink(), listen=False)
    assert await relay.run_once() == 3

    data = spans.metrics.get_metrics_data()
    assert data is not None
    found = {
        m.name: m
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for m in scope.metrics
    }
    (deliveries,) = found["alchemium.relay.deliveries"].data.data_points
    assert deliveries.value == 3
    assert dict(deliveries.attributes or {}) == {"destination": "sink", "outcome": "delivered"}
    (duration,) = found["alchemium.relay.publish.duration"].data.data_points
    assert duration.count == 3
    assert found["alchemium.relay.publish.duration"].unit == "s"
    (latency,) = found["alchemium.relay.commit_to_delivered"].data.data_points
    assert latency.count == 3


async def test_outbox_gauges_reach_the_opentelemetry_metrics_sdk(
    spans: Spans, session_factory: Factory, outbox: Outbox
) -> None:
    from alchemium.events.metrics import OutboxGauges

    await commit_batch(session_factory, outbox, 2, ["ok", "stranded"])
    gauges = OutboxGauges(session_factory, outbox)
    assert gauges.observe()
    await gauges.read()

    data = spans.metrics.get_metrics_data()
    assert data is not None
    points = {
        (m.name, tuple(sorted((p.attributes or {}).items()))): p.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for m in scope.metrics
        for p in m.data.data_points
    }
    assert points[("alchemium.outbox.rows", (("destination", "ok"), ("status", "pending")))] == 2
    assert points[("alchemium.outbox.rows", (("destination", "ok"), ("status", "dead")))] == 0
    assert points[("alchemium.outbox.lag", (("destination", "stranded"),))] >= 0
    assert points[("alchemium.outbox.relays_holding_leases", ())] == 0


def test_abandoned_rows_have_their_own_status_in_the_rows_gauge() -> None:
    from alchemium.events import DestinationStatus
    from alchemium.events.metrics import OutboxSnapshot, prometheus_text

    status = DestinationStatus(
        "crm", 1, 0, dead=2, delivered=3, oldest_pending_age=5.0, overdue=None, abandoned=4
    )
    text = prometheus_text(None, OutboxSnapshot((status,), relays_holding_leases=0, read_at=0.0))
    assert 'alchemium_outbox_rows{destination="crm",status="abandoned"} 4' in text
    assert 'alchemium_outbox_rows{destination="crm",status="dead"} 2' in text
