"""Delivery marks in batches: "delivered" for many commits in one UPDATE.

After a unit of work commits, its in-process subscribers run and their delivery
rows, inserted already claimed under the commit's token, must be marked
delivered. One UPDATE per unit of work is a round trip after every commit; here
the tokens of the commits of a short window (``Outbox.mark_window`` seconds, 50 ms
by default) are marked by a single UPDATE, run by a background task of the event
loop on a connection of its own, so the committing task returns without waiting.

Nothing can be lost by waiting. Until its mark is written a row stays claimed
under its token with a lease (``Outbox.dispatch_lease``); if the process dies
first, the relay claims the row once the lease has expired and delivers it again:
a duplicate, which at-least-once delivery allows, never a loss. A failed UPDATE
(the database unreachable) is logged and has the same outcome.

Marks still queued are written when :func:`flush_delivery_marks` is awaited (call
it before disposing of the engine, e.g. at the end of an app's lifespan), when the
window closes, and when the loop cancels the background task at shutdown
(``asyncio.run`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alchemium.shielding import uncancellable

__all__ = ["flush_delivery_marks", "flush_marks_before_reading", "queue_delivery_mark"]


class MarkedOutbox(Protocol):
    """What marking needs of an outbox (:class:`alchemium.events.Outbox` provides it).

    A protocol rather than the class: the outbox's reads flush queued marks first
    (:func:`flush_marks_before_reading`), so the outbox modules import this one.
    """

    @property
    def mark_window(self) -> float: ...

    async def mark_delivered_tokens(
        self, conn: AsyncConnection, tokens: Sequence[uuid.UUID]
    ) -> int: ...


logger = logging.getLogger("alchemium.events")

_MAX_BATCH = 1000  # tokens per UPDATE; more are marked by the next one at once


@dataclass(eq=False)
class _Batch:
    """The queued tokens of one outbox and engine on one event loop, and the task writing them."""

    outbox: MarkedOutbox
    engine: AsyncEngine
    tokens: list[uuid.UUID] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    full: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Write marks a window after the first is queued, until none is left."""
        try:
            while self.tokens:
                if len(self.tokens) < _MAX_BATCH:
                    self.full.clear()
                    with contextlib.suppress(asyncio.TimeoutError):  # the window closed
                        await asyncio.wait_for(self.full.wait(), self.outbox.mark_window)
                await uncancellable(self.write())
        except asyncio.CancelledError:
            # The loop is shutting down (or the app cancelled us): write what is queued.
            await uncancellable(self.write())
            raise
        finally:
            self.task = None

    async def write(self) -> None:
        """One UPDATE for the queued tokens (a failure is logged: the relay redelivers)."""
        tokens, self.tokens = self.tokens[:_MAX_BATCH], self.tokens[_MAX_BATCH:]
        if not tokens:
            return
        try:
            async with self.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await self.outbox.mark_delivered_tokens(conn, tokens)
                await conn.commit()
        except Exception:
            logger.warning(
                "could not mark %d after-commit dispatch(es) delivered; the relay will "
                "deliver their rows again once their lease expires",
                len(tokens),
                exc_info=True,
            )


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, int], _Batch]] = (
    weakref.WeakKeyDictionary()
)


def queue_delivery_mark(outbox: MarkedOutbox, engine: AsyncEngine, token: uuid.UUID) -> None:
    """Queue "delivered" for the rows claimed under ``token``; written within the window."""
    loop = asyncio.get_running_loop()
    batches = _batches.setdefault(loop, {})
    key = (id(outbox), id(engine))
    batch = batches.get(key)
    if batch is None or batch.outbox is not outbox or batch.engine is not engine:
        batch = batches[key] = _Batch(outbox, engine)
    batch.tokens.append(token)
    if len(batch.tokens) >= _MAX_BATCH:
        batch.full.set()
    if batch.task is None:
        batch.task = loop.create_task(batch.run(), name="alchemium delivery marks")


async def flush_delivery_marks(outbox: object | None = None) -> None:
    """Write the delivery marks queued on this event loop now, and wait until they are written.

    All of them, or those of ``outbox``. Call it before disposing of an engine whose
    units of work dispatched events (an app's shutdown, a test's teardown):
    afterwards no mark is waiting for it.
    """
    batches = _batches.get(asyncio.get_running_loop(), {})
    for batch in list(batches.values()):
        if outbox is not None and batch.outbox is not outbox:
            continue
        while batch.tokens:
            await batch.write()
        task = batch.task
        if task is not None and not task.done():
            batch.full.set()
            await asyncio.wait([task])


def _queued(outbox: object) -> bool:
    try:
        batches = _batches.get(asyncio.get_running_loop(), {})
    except RuntimeError:  # no running loop: nothing can be queued
        return False
    # A running task may hold tokens it took out of the queue and is writing now.
    return any(
        batch.outbox is outbox and (batch.tokens or batch.task is not None)
        for batch in batches.values()
    )


async def flush_marks_before_reading(outbox: object, in_transaction: bool, dialect: str) -> None:
    """Write ``outbox``'s queued marks before a read of its state, in this process.

    So a status read right after a commit shows its after-commit deliveries
    delivered, as it would without batching. Skipped when the reader already holds
    a SQLite transaction: the marks' UPDATE would wait for the reader's lock, so the
    read shows the rows claimed (other processes may see them claimed for up to
    ``mark_window`` seconds in any case).
    """
    if not _queued(outbox) or (in_transaction and dialect == "sqlite"):
        return
    await flush_delivery_marks(outbox)
