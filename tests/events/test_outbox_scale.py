"""An outbox that keeps many delivered rows: the relay's statements use indexes, never scans.

The relay claims, checks its lag and stranded destinations, counts what is left and
purges retention many times a minute. With delivered rows kept for retention, a
statement that scans the delivery or event table costs more as they grow; each must
reach the undelivered rows (or the oldest events) through an index. PostgreSQL's
plans are checked with EXPLAIN on a table large enough for the planner to care.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alchemium.events.outbox import Outbox

DELIVERED = 200_000
PENDING = 1_000


@pytest.fixture
async def big_outbox(engine: AsyncEngine, outbox: Outbox, backend: str) -> Outbox:
    if backend != "postgresql":
        pytest.skip("query plans (EXPLAIN) are PostgreSQL's; SQLite's planner is not checked")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f"INSERT INTO {outbox.events.name} (id, name, aggregate_type, aggregate_id, "
                "payload, metadata, occurred_at) SELECT gen_random_uuid(), 'user_created', "
                "'user', g::text, '{}'::jsonb, '{}'::jsonb, "
                "now() - interval '30 days' + g * interval '10 ms' "
                "FROM generate_series(1, :n) g"
            ),
            {"n": DELIVERED + PENDING},
        )
        await conn.execute(
            text(
                f"INSERT INTO {outbox.deliveries.name} (event_id, destination, aggregate_type, "
                "aggregate_id, status, attempts, next_attempt_at, delivered_at) "
                "SELECT id, 'sink', aggregate_type, aggregate_id, "
                "CASE WHEN sequence > :delivered THEN 'pending' ELSE 'delivered' END, 0, now(), "
                "CASE WHEN sequence > :delivered THEN NULL ELSE occurred_at END "
                f"FROM {outbox.events.name}"
            ),
            {"delivered": DELIVERED},
        )
        await conn.execute(text(f"ANALYZE {outbox.events.name}"))
        await conn.execute(text(f"ANALYZE {outbox.deliveries.name}"))
    return outbox


async def plans(
    engine: AsyncEngine,
    run: Callable[[AsyncConnection], Awaitable[Any]],
    *,
    generic: bool = False,
    analyze: bool = False,
) -> list[str]:
    """The EXPLAIN of every statement ``run`` sends, with its parameters (then rolled back).

    ``generic``: the plan PostgreSQL caches for a prepared statement run many times (a
    relay's), made without looking at the parameters' values. ``analyze``: run each
    statement (in a transaction rolled back) and show how many rows each step read.
    """
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def capture(_c: object, _cur: object, statement: str, params: Any, *_a: object) -> None:
        sent.append((statement, tuple(params or ())))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with engine.connect() as conn:
            await run(conn)
            await conn.rollback()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    explained = []
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        if generic:
            await driver.execute("SET plan_cache_mode = force_generic_plan")
        for i, (statement, params) in enumerate(sent):
            if generic:
                await driver.execute(f"PREPARE explained_{i} AS {statement}")
                values = ", ".join(sql_literal(p) for p in params)
                query, params = f"EXPLAIN EXECUTE explained_{i}({values})", ()
            else:
                query = ("EXPLAIN ANALYZE " if analyze else "EXPLAIN ") + statement
            rolled_back = driver.transaction()  # ANALYZE runs the statement
            await rolled_back.start()
            try:
                rows = await driver.fetch(query, *params)
            finally:
                await rolled_back.rollback()
            explained.append("\n".join(r[0] for r in rows))

        if generic:
            await driver.execute("DEALLOCATE ALL; RESET plan_cache_mode")
    return explained


def sql_literal(value: Any) -> str:
    """``value`` written as an SQL literal (EXECUTE takes no protocol parameters)."""
    if value is None:
        return "NULL"
    if isinstance(value, (list, tuple)):
        return "ARRAY[" + ", ".join(sql_literal(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def assert_no_scan(plan: str, outbox: Outbox) -> None:
    for table in (outbox.events.name, outbox.deliveries.name):
        assert f"Seq Scan on {table}" not in plan, plan


def relay_statements(box: Outbox) -> Callable[[AsyncConnection], Awaitable[None]]:
    """What a relay sends, round after round: the claim, the lag, the overdue check and
    the count of what is left."""

    async def run(conn: AsyncConnection) -> None:
        await box.claim(conn, ["sink"], limit=100, lease=30, token=uuid.uuid4(), claimed_by="relay")
        await box.lag(conn, ["sink"])
        await box.overdue(conn, older_than=60)
        await box.undelivered(conn, ["sink"])

    return run


async def test_the_claim_and_the_relays_checks_read_undelivered_rows_only(
    engine: AsyncEngine, big_outbox: Outbox
) -> None:
    claim, *checks = await plans(engine, relay_statements(big_outbox))
    assert f"ix_{big_outbox.events.name}_delivery_due" in claim
    assert len(checks) == 3
    for plan in (claim, *checks):
        assert_no_scan(plan, big_outbox)


async def test_a_relay_of_several_destinations_reads_a_batch_per_destination(
    engine: AsyncEngine, big_outbox: Outbox
) -> None:
    """A relay serving several destinations (an in-process registry of subscribers):
    its claim reads at most ``limit`` due rows of each destination, by the index, not
    every due row of them all sorted (1,000 here; a backlog of millions in production)."""

    async def claim(conn: AsyncConnection) -> None:
        rows = await big_outbox.claim(
            conn, ["other", "sink"], limit=100, lease=30, token=uuid.uuid4(), claimed_by="relay"
        )
        assert len(rows) == 100

    [plan] = await plans(engine, claim, analyze=True)
    scans = [line for line in plan.splitlines() if "_delivery_due" in line]
    assert scans, plan
    for scan in scans:
        found = re.search(r"actual time=\S+ rows=(\d+) loops=(\d+)", scan)
        assert found is not None, plan
        assert int(found[1]) <= 100, plan  # rows per destination (per loop)
    assert_no_scan(plan, big_outbox)


async def test_the_plans_postgres_caches_for_the_relays_statements_read_undelivered_rows_only(
    engine: AsyncEngine, big_outbox: Outbox
) -> None:
    """A relay sends the same prepared statements again and again (its claim every
    round), and after five runs PostgreSQL may keep a generic plan for one, made without
    the parameters' values. Those plans must still walk the partial "due" index, so its
    predicate (the statuses) must be provable from the SQL text alone."""

    explained = await plans(engine, relay_statements(big_outbox), generic=True)
    assert len(explained) == 4
    for plan in explained:
        assert "$" in plan, plan  # generic: made without the parameters' values
        assert f"ix_{big_outbox.events.name}_delivery_due" in plan, plan
        assert_no_scan(plan, big_outbox)


async def test_the_purge_finds_old_events_by_index_whether_or_not_any_is_left(
    engine: AsyncEngine, big_outbox: Outbox
) -> None:
    """Nothing older than a year: the purge must not scan 200,000 rows to find that out."""
    [select_plan] = await plans(engine, lambda conn: big_outbox.purge(conn, older_than=365 * 86400))
    assert f"ix_{big_outbox.events.name}_occurred" in select_plan
    assert_no_scan(select_plan, big_outbox)
    async with engine.begin() as conn:
        assert await big_outbox.purge(conn, older_than=365 * 86400) == 0
        removed = await big_outbox.purge(conn, older_than=86400, batch_size=1000)
    assert removed == 1000
