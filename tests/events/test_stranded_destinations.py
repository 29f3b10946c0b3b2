"""Stranded destinations: rows nobody drains are never silent.

A handler in a script run as ``python shop.py`` is named ``__main__.notify`` by
default, while a relay started with ``--import shop`` serves ``shop.notify``: the
``__main__`` rows would wait forever. Subscribing such a handler warns; the status
shows every destination with how overdue it is; a relay warns about overdue
destinations it does not serve.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium.events import (
    DestinationStatus,
    DomainEvent,
    MainModuleNameWarning,
    OutboxRelay,
    OutboxStatus,
    SubscriberRegistry,
    on,
)
from alchemium.events.outbox import Outbox, database_now
from alchemium.events.subscribers import Handler
from tests.events.relay_support import REPO, Sink, eventually, insert_events

Factory = async_sessionmaker[AsyncSession]


def importable_handler(event: DomainEvent) -> None:
    pass


def script_handler() -> Handler:
    """A handler as if defined in a script run as ``python shop.py``."""

    def notify(event: DomainEvent) -> None:
        pass

    notify.__module__ = "__main__"
    return notify


# -- subscribing ---------------------------------------------------------------------------


SUBSCRIBE_FORMS = {
    "subscribe": lambda registry, handler: registry.subscribe("order_placed", handler),
    "registry.on": lambda registry, handler: registry.on("order_placed")(handler),
    "on": lambda registry, handler: on("order_placed", registry=registry)(handler),
}


@pytest.mark.parametrize("form", SUBSCRIBE_FORMS)
def test_a_handler_from_a_script_warns_that_its_default_name_cannot_be_served(
    registry: SubscriberRegistry, form: str
) -> None:
    with pytest.warns(MainModuleNameWarning) as caught:
        SUBSCRIBE_FORMS[form](registry, script_handler())
    [subscriber] = registry.subscribers
    assert subscriber.name == "__main__.script_handler.<locals>.notify"
    [warning] = caught
    message = str(warning.message)
    assert f"{subscriber.name!r}" in message
    assert "pass name='...'" in message
    assert "move the handler into a module" in message
    assert warning.filename == __file__  # points at the line that subscribed


def test_a_named_or_importable_handler_does_not_warn(registry: SubscriberRegistry) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.subscribe("order_placed", script_handler(), name="notify")
        registry.subscribe("order_placed", importable_handler)


def test_a_script_shows_the_warning_at_its_decorator(tmp_path: Path) -> None:
    script = tmp_path / "shop.py"
    script.write_text(
        "from alchemium.events import on\n"
        "\n"
        "@on('order_placed')\n"
        "async def notify(event):\n"
        "    pass\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{script}:3: MainModuleNameWarning" in done.stderr
    assert "'__main__.notify'" in done.stderr


# -- status per destination ----------------------------------------------------------------


async def test_status_shows_each_destination_with_its_lag_and_how_overdue_it_is(
    session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 2, destinations=["shop.notify", "__main__.notify"])
    assert await OutboxRelay(session_factory, Sink(name="shop.notify"), listen=False).run_once()
    await insert_events(session_factory, outbox, 1, destinations=["mailer", "crm"])
    failing = Sink(name=("mailer", "crm"), fail=lambda _e: True)
    relay = OutboxRelay(session_factory, failing, max_attempts=1, listen=False)
    assert await relay.run_once() == 0  # both dead
    async with session_factory() as session:  # crm gets another chance in an hour
        await outbox.requeue(session, destination="crm")
        d = outbox.deliveries
        await session.execute(
            update(d).where(d.c.destination == "crm").values(next_attempt_at=database_now(3600))
        )
        await session.commit()

    async with session_factory() as session:
        per = await outbox.destination_status(session)
        total = await outbox.status(session)
    by_name = {s.destination: s for s in per}
    assert [s.destination for s in per] == ["__main__.notify", "crm", "mailer", "shop.notify"]
    stranded = by_name["__main__.notify"]
    assert (stranded.pending, stranded.delivered) == (2, 0)
    assert stranded.overdue is not None  # due, and nobody took it
    assert stranded.oldest_pending_age is not None
    assert (by_name["crm"].pending, by_name["crm"].overdue) == (1, None)  # waiting, not late
    assert by_name["crm"].oldest_pending_age is not None
    assert by_name["mailer"] == DestinationStatus("mailer", 0, 0, 1, 0, None, None)
    assert by_name["shop.notify"] == DestinationStatus("shop.notify", 0, 0, 0, 2, None, None)
    for totals in (total, OutboxStatus.total(per)):
        assert (totals.pending, totals.claimed, totals.dead, totals.delivered) == (3, 0, 1, 2)
        assert totals.oldest_pending_age is not None


# -- the relay's warning -------------------------------------------------------------------


def stranded_warnings(caplog: pytest.LogCaptureFixture, destination: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "alchemium.relay" and f"for destination {destination!r}" in r.getMessage()
    ]


async def make_overdue(session_factory: Factory, outbox: Outbox, *destinations: str) -> None:
    """Rows of ``destinations`` became due two minutes ago (pending or with a lost lease)."""
    d = outbox.deliveries
    async with session_factory() as session:
        await session.execute(
            update(d)
            .where(d.c.destination.in_(destinations), d.c.status == "pending")
            .values(next_attempt_at=database_now(-120))
        )
        await session.execute(
            update(d)
            .where(d.c.destination.in_(destinations), d.c.status == "claimed")
            .values(claimed_until=database_now(-120))
        )
        await session.commit()


async def test_a_relay_warns_at_start_about_overdue_destinations_it_does_not_serve(
    session_factory: Factory, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["sink", "__main__.notify", "elsewhere", "recent", "abandoned"]
    await insert_events(session_factory, outbox, 2, destinations=names)
    async with session_factory() as session:  # a relay claimed "abandoned" and died
        await outbox.claim(
            session, ["abandoned"], limit=10, lease=30, token=uuid.uuid4(), claimed_by="gone"
        )
        await session.commit()
    await make_overdue(session_factory, outbox, "sink", "__main__.notify", "elsewhere", "abandoned")

    relay = OutboxRelay(session_factory, Sink(), listen=False, stranded_after=60)
    with caplog.at_level(logging.WARNING, logger="alchemium.relay"):
        assert await relay.drain() == 2

    [script] = stranded_warnings(caplog, "__main__.notify")
    assert "2 row(s)" in script
    assert "this relay does not serve it" in script
    assert "pass name='...'" in script
    [elsewhere] = stranded_warnings(caplog, "elsewhere")
    assert "2 row(s)" in elsewhere
    assert "the oldest by 120s" in elsewhere
    assert "name=" not in elsewhere
    assert len(stranded_warnings(caplog, "abandoned")) == 1  # lease expired long ago
    assert stranded_warnings(caplog, "recent") == []  # due, but not for 60 s yet
    assert stranded_warnings(caplog, "sink") == []  # served by this relay


async def test_a_running_relay_warns_once_a_destination_is_stranded_not_at_every_check(
    session_factory: Factory, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    await insert_events(session_factory, outbox, 1, destinations=["sink", "elsewhere"])
    relay = OutboxRelay(
        session_factory, Sink(), listen=False, poll_interval=0.01, lag_interval=0, stranded_after=60
    )
    with caplog.at_level(logging.WARNING, logger="alchemium.relay"):
        running = asyncio.create_task(relay.run())
        try:
            await eventually(lambda: relay.stats.rounds >= 3, timeout=30)
            assert stranded_warnings(caplog, "elsewhere") == []  # not overdue yet

            await make_overdue(session_factory, outbox, "elsewhere")
            await eventually(lambda: stranded_warnings(caplog, "elsewhere"), timeout=30)
            rounds = relay.stats.rounds
            await eventually(lambda: relay.stats.rounds >= rounds + 10, timeout=30)
        finally:
            relay.stop()
            await asyncio.wait_for(running, 30)
    assert len(stranded_warnings(caplog, "elsewhere")) == 1  # again after 60 s, not per check
