"""Delivery marks in batches: one UPDATE for many commits, and nothing lost while they wait."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import (
    DomainEvent,
    InProcessPublisher,
    OutboxRelay,
    SubscriberRegistry,
    flush_delivery_marks,
)
from alchemium.events.outbox import Outbox
from tests.events.conftest import deliveries
from tests.events.relay_support import REPO, by_status, eventually

Factory = async_sessionmaker[AsyncSession]


def count_mark_updates(engine: AsyncEngine) -> list[str]:
    """Every UPDATE of the delivery table the engine sends, from now on."""
    sent: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE") and "delivery" in statement:
            sent.append(statement)

    return sent


async def test_the_marks_of_many_commits_are_one_update_written_after_the_commits(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    outbox.mark_window = 30.0  # nothing but the flush below writes them
    handled: list[DomainEvent] = []
    registry.subscribe("probe", handled.append, name="probe_handler")
    updates = count_mark_updates(engine)
    for i in range(20):
        async with UnitOfWork(session_factory, registry=registry) as uow:
            uow.record("probe", aggregate_type="probe", aggregate_id=i)
    assert len(handled) == 20  # handlers ran before each block returned
    assert updates == []  # and no commit waited for its mark
    assert await by_status_unflushed(engine, outbox) == {"claimed": 20}
    await flush_delivery_marks()
    assert len(updates) == 1
    assert (await deliveries(engine, outbox))["probe_handler"]["status"] == "delivered"
    assert await by_status(engine, outbox) == {"delivered": 20}


async def by_status_unflushed(engine: AsyncEngine, outbox: Outbox) -> dict[str, int]:
    """Delivery rows per status as they are, marks still queued not written."""
    from sqlalchemy import func, select

    d = outbox.deliveries
    async with engine.connect() as conn:
        rows = await conn.execute(select(d.c.status, func.count()).group_by(d.c.status))
        return {status: int(n) for status, n in rows}


async def test_a_window_of_zero_marks_each_commit_before_its_block_returns(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, registry: SubscriberRegistry
) -> None:
    outbox.mark_window = 0
    registry.subscribe("probe", lambda _e: None, name="probe_handler")
    async with UnitOfWork(session_factory, registry=registry) as uow:
        uow.record("probe", aggregate_type="probe", aggregate_id=1)
    assert await by_status_unflushed(engine, outbox) == {"delivered": 1}


def run_writer(db_url: str, journal: Path, n: int, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MARKS_JOURNAL": str(journal), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "tests.events.marks_writer", db_url, str(n), mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_a_process_killed_with_marks_queued_loses_nothing(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    """The rows stay claimed under their lease; then the relay delivers them again."""
    journal = tmp_path / "handled"
    done = await asyncio.to_thread(run_writer, db_url, journal, 25, "kill")
    assert done.returncode == -9, done.stderr
    handled_by_writer = journal.read_text().split()
    assert len(handled_by_writer) == 25
    assert await by_status_unflushed(engine, outbox) == {"claimed": 25}  # no mark written

    relayed: list[str] = []
    consumers = SubscriberRegistry("after the crash")
    consumers.subscribe("marked", lambda e: relayed.append(str(e.id)), name="marks.sink")
    relay = OutboxRelay(session_factory, InProcessPublisher(consumers), listen=False)

    async def drained() -> bool:
        await relay.run_once()
        return len(relayed) == 25

    await eventually(drained, timeout=30, interval=0.2)  # once the 1 s lease has passed
    assert sorted(relayed) == sorted(handled_by_writer)  # every event again: duplicates, no loss
    assert await by_status(engine, outbox) == {"delivered": 25}


async def test_marks_still_queued_when_the_loop_shuts_down_are_written(
    engine: AsyncEngine, outbox: Outbox, db_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "handled"
    done = await asyncio.to_thread(run_writer, db_url, journal, 10, "exit")
    assert done.returncode == 0, done.stderr
    assert len(journal.read_text().split()) == 10
    assert await by_status_unflushed(engine, outbox) == {"delivered": 10}


async def test_a_commit_with_an_event_sends_one_outbox_statement_and_no_mark(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    backend: str,
) -> None:
    """The statements of a unit of work with one event and one subscriber, in its task.

    PostgreSQL: the events and their delivery rows in one statement (a data-modifying
    CTE); SQLite, where a statement is no round trip: one INSERT per table. The
    "delivered" mark is not sent by the committing unit of work at all.
    """
    registry.subscribe("probe", lambda _e: None, name="probe_handler")
    outbox.mark_window = 30.0
    sent: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        sent.append(" ".join(statement.split())[:60])

    async with UnitOfWork(session_factory, registry=registry) as uow:
        uow.record("probe", aggregate_type="probe", aggregate_id=1)
    event.remove(engine.sync_engine, "before_cursor_execute", _seen)
    if backend == "postgresql":
        assert len(sent) == 1
        assert sent[0].startswith("WITH written_events AS (INSERT INTO alchemium_outbox ")
    else:
        assert [s.split(" (")[0] for s in sent] == [
            "INSERT INTO alchemium_outbox",
            "INSERT INTO alchemium_outbox_delivery",
        ]
    await flush_delivery_marks()
    assert await by_status(engine, outbox) == {"delivered": 1}


async def test_a_status_read_waits_for_a_mark_being_written_at_that_moment(
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    registry: SubscriberRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The background task has taken the tokens out of the queue and its UPDATE is on
    its way: a status read in this process still shows the delivery delivered."""
    registry.subscribe("probe", lambda _e: None, name="probe_handler")
    writing, release = asyncio.Event(), asyncio.Event()
    mark = outbox.mark_delivered_tokens

    async def slow_mark(conn: Any, tokens: Any) -> int:
        writing.set()
        await release.wait()
        return await mark(conn, tokens)

    monkeypatch.setattr(outbox, "mark_delivered_tokens", slow_mark)
    async with UnitOfWork(session_factory, registry=registry) as uow:
        uow.record("probe", aggregate_type="probe", aggregate_id=1)
    await asyncio.wait_for(writing.wait(), 10)  # the window closed; the write started

    async def status() -> Any:
        async with session_factory() as session:
            return await outbox.status(session)

    reading = asyncio.create_task(status())
    await asyncio.sleep(0.2)
    assert not reading.done()  # it waits for the write in flight
    release.set()
    assert (await asyncio.wait_for(reading, 10)).delivered == 1
