"""Handlers of the relay subprocesses in these tests (``--import tests.observability.handlers``).

``ok`` appends each event id to ``$OBS_SINK``; ``flaky`` always fails; ``slow`` waits
until the file ``$OBS_RELEASE`` exists (a publish held in flight, for the health and
lease figures). Each is a destination of its own for the in-process publisher.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alchemium.events import DomainEvent, on

_sink = os.environ.get("OBS_SINK")
_release = Path(os.environ.get("OBS_RELEASE") or "/nonexistent/release")


@on("item_*", name="ok")
async def ok(event: DomainEvent) -> None:
    """Deliver: note the event id."""
    if _sink:
        with open(_sink, "a") as out:
            out.write(f"{event.id}\n")


@on("item_*", name="flaky")
async def flaky(event: DomainEvent) -> None:
    """Never deliver (retried, then dead)."""
    raise RuntimeError(f"flaky refuses {event.name}")


@on("slow_*", name="slow")
async def slow(event: DomainEvent) -> None:
    """Deliver once the test creates ``$OBS_RELEASE``."""
    while not _release.exists():
        await asyncio.sleep(0.05)
