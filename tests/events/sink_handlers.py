"""Handlers imported by relay subprocesses in the tests (``--import tests.events.sink_handlers``).

``sink`` appends each event id to ``$ALCHEMIUM_SINK.<pid>`` with an unbuffered
write, so a SIGKILLed process leaves exactly what it delivered on disk.
"""

from __future__ import annotations

import asyncio
import os

from alchemium.events import DomainEvent, on

_path = os.environ.get("ALCHEMIUM_SINK")
_fd = os.open(f"{_path}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND) if _path else -1
_delay = float(os.environ.get("ALCHEMIUM_SINK_DELAY") or 0)


@on("*", name="sink")
async def sink(event: DomainEvent) -> None:
    """Record ``event.id``; sleep ``$ALCHEMIUM_SINK_DELAY`` seconds first."""
    if _delay:
        await asyncio.sleep(_delay)
    os.write(_fd, f"{event.id}\n".encode())
