"""The inbox: exactly-once effects for handlers that only write to the same database.

The relay delivers at least once, so a handler can see the same event twice (a
relay died after publishing, before recording it). A handler whose effects are
rows in the application's own database can make the redelivery harmless: it
writes an inbox row ``(subscriber, event_id)`` in the same transaction as its
effects. The row is the proof the effects committed; a second delivery finds it
and skips the handler::

    inbox = enable_inbox(Base.metadata)

    @on("user_created")
    @inbox.idempotent(session_factory)
    async def grant_welcome_credit(uow: UnitOfWork, event: DomainEvent) -> None:
        await CreditRepository.create(uow.session, {"user_id": event.aggregate_id, ...})

If the handler fails, its unit of work rolls back, inbox row included, and the
next delivery runs it again. Two deliveries running at the same moment are
serialized by the primary key: the second ``INSERT`` waits for the first
transaction and then skips (PostgreSQL ``ON CONFLICT DO NOTHING``, SQLite
``INSERT OR IGNORE``); under REPEATABLE READ or SERIALIZABLE PostgreSQL raises
:class:`~alchemium.errors.SerializationFailure` instead, the relay retries, and the
retry skips.

Effects outside the database (an e-mail, an HTTP call) get no such guarantee:
make them idempotent on the receiving side with ``event.id``.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Uuid,
    delete,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from alchemium.domain_event import DomainEvent
from alchemium.errors import EventError, db_errors
from alchemium.events.outbox import database_now
from alchemium.events.tables import existing_table

if TYPE_CHECKING:
    from alchemium.uow import SessionFactory, UnitOfWork

__all__ = ["Inbox", "InboxHandler", "enable_inbox"]

logger = logging.getLogger("alchemium.events")

InboxHandler = Callable[["UnitOfWork", DomainEvent], Awaitable[None]]

_INSERTS: dict[str, Any] = {"postgresql": pg_insert, "sqlite": sqlite_insert}


class Inbox:
    """The inbox table in ``metadata`` and the statements that use it.

    Add it to the metadata your migrations and ``create_all`` use (see
    :func:`enable_inbox`). Rows are ``(subscriber, event_id, processed_at)`` with the
    primary key ``(subscriber, event_id)``.
    """

    def __init__(
        self, metadata: MetaData, *, table_name: str = "alchemium_inbox", schema: str | None = None
    ) -> None:
        self.metadata = metadata
        table = existing_table(metadata, table_name, schema)
        if table is not None:
            self.table = table
            return
        self.table = Table(
            table_name,
            metadata,
            Column("subscriber", String(200), primary_key=True),
            Column("event_id", Uuid, primary_key=True),
            Column("processed_at", DateTime(timezone=True), nullable=False, index=True),
            schema=schema,
        )

    async def mark(
        self,
        target: UnitOfWork | AsyncSession,
        subscriber: str,
        event: DomainEvent | uuid.UUID,
    ) -> bool:
        """Record that ``subscriber`` processed ``event``, in ``target``'s transaction.

        Returns True the first time: go on with the effects, they commit (or roll
        back) together with the row. Returns False when the row already exists: the
        effects are committed already, skip them. Executes one INSERT; it waits for
        a concurrent transaction holding the same row to finish.
        """
        session = target if isinstance(target, AsyncSession) else target.session
        event_id = event.id if isinstance(event, DomainEvent) else event
        values = {"subscriber": subscriber, "event_id": event_id, "processed_at": database_now()}
        dialect = session.get_bind().dialect.name
        if dialect not in _INSERTS:
            raise EventError(f"the inbox supports PostgreSQL and SQLite, not {dialect}")
        stmt = _INSERTS[dialect](self.table).values(values).on_conflict_do_nothing()
        with db_errors(session):
            result: Any = await session.execute(stmt)
        return bool(result.rowcount == 1)

    async def processed(
        self, conn: AsyncSession | AsyncConnection, subscriber: str
    ) -> set[uuid.UUID]:
        """The ids of the events ``subscriber`` has processed (for tests and inspection)."""
        rows = await conn.execute(
            select(self.table.c.event_id).where(self.table.c.subscriber == subscriber)
        )
        return set(rows.scalars())

    async def purge(
        self, conn: AsyncSession | AsyncConnection, *, older_than: float, batch_size: int = 1000
    ) -> int:
        """Delete up to ``batch_size`` rows older than ``older_than`` seconds; returns how many.

        Keep rows at least as long as an event can be redelivered: longer than the
        outbox retention and than any requeue of dead events you might do. Ages are
        on the database's clock (``processed_at`` is written from it too).
        """
        cutoff = database_now(-older_than)
        t = self.table
        oldest = (
            select(t.c.subscriber, t.c.event_id).where(t.c.processed_at < cutoff).limit(batch_size)
        )
        result: Any = await conn.execute(
            delete(t).where(tuple_(t.c.subscriber, t.c.event_id).in_(oldest))
        )
        return int(result.rowcount or 0)

    def idempotent(
        self,
        session_factory: SessionFactory,
        *,
        name: str | None = None,
        **uow_options: Any,
    ) -> Callable[[InboxHandler], Callable[[DomainEvent], Awaitable[None]]]:
        """Turn ``handler(uow, event)`` into a subscriber ``handler(event)`` run at most once.

        Each call opens a :class:`~alchemium.UnitOfWork` (``uow_options`` are passed to
        it), marks the event in the inbox under ``name`` and, the first time only,
        awaits the handler inside that unit of work. ``name`` defaults to the
        handler's ``module.qualname``, the same default name ``on`` gives it; keep it
        stable, it is the key of the inbox rows.
        """

        def decorate(handler: InboxHandler) -> Callable[[DomainEvent], Awaitable[None]]:
            key = name or f"{handler.__module__}.{handler.__qualname__}"

            @functools.wraps(handler)
            async def once(event: DomainEvent) -> None:
                from alchemium.uow import UnitOfWork

                async with UnitOfWork(session_factory, **uow_options) as uow:
                    if await self.mark(uow, key, event):
                        await handler(uow, event)
                        return
                logger.info(
                    "event %s (%s) already processed by %s, skipped", event.id, event.name, key
                )

            return once

        return decorate

    def __repr__(self) -> str:
        return f"Inbox({self.table.fullname!r})"


def enable_inbox(metadata: MetaData, **options: Any) -> Inbox:
    """Add the inbox table (``alchemium_inbox``) to ``metadata`` and return the inbox.

    Call it before ``metadata.create_all`` (or Alembic autogenerate). Calling it
    again with the same metadata returns an inbox on the same table.
    """
    return Inbox(metadata, **options)
