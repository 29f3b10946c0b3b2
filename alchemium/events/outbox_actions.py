"""The record of what operators did to the outbox: who, what, when, which rows.

``alchemium_outbox_action`` holds one row per operator action (a requeue or a
discard of dead deliveries, from the operations dashboard or a script). Write the
row with :meth:`OutboxActionLog.record` in the *same transaction* as the action, so
a record exists if and only if the action was committed.

It is a table of its own rather than the audit log (``alchemium_audit_log``):
the audit log records changes of *entities* made through units of work, keyed by
entity and id, and may not be enabled at all; an operator action touches
infrastructure rows (deliveries), possibly thousands at once, and must be recorded
whenever actions are allowed. Like the audit table, it is declared on the
application's ``MetaData`` (so ``create_all`` and Alembic autogenerate see it) or
created with :func:`create_action_table`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, insert, inspect, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from alchemium.events.outbox_schema import Executor, aware, database_now
from alchemium.events.tables import BigId, JsonDocument, create_tables, existing_table

__all__ = ["OutboxAction", "OutboxActionLog", "create_action_table"]


@dataclass(frozen=True, slots=True)
class OutboxAction:
    """One recorded operator action.

    ``delivery_ids`` are the delivery rows it changed; ``selection`` the filter the
    operator acted on (``None`` when rows were picked one by one); ``occurred_at``
    is the database's clock.
    """

    id: int
    occurred_at: dt.datetime
    actor: str
    client: str | None
    action: str
    rows: int
    delivery_ids: list[int]
    selection: Mapping[str, Any] | None


class OutboxActionLog:
    """The action table in ``metadata`` (declared, or reused if already there)."""

    def __init__(
        self,
        metadata: MetaData,
        *,
        table_name: str = "alchemium_outbox_action",
        schema: str | None = None,
    ) -> None:
        self.metadata = metadata
        table = existing_table(metadata, table_name, schema)
        if table is not None:
            self.table = table
            return
        self.table = Table(
            table_name,
            metadata,
            Column("id", BigId, primary_key=True, autoincrement=True),
            Column("occurred_at", DateTime(timezone=True), nullable=False, index=True),
            Column("actor", String(200), nullable=False),
            Column("client", String(200), nullable=True),
            Column("action", String(32), nullable=False),
            Column("rows", Integer, nullable=False),
            Column("delivery_ids", JsonDocument, nullable=False),
            Column("selection", JsonDocument, nullable=True),
            schema=schema,
        )

    async def record(
        self,
        conn: Executor,
        *,
        actor: str,
        action: str,
        delivery_ids: Sequence[int],
        selection: Mapping[str, Any] | None = None,
        client: str | None = None,
    ) -> None:
        """Insert one action row (time: the database's now). Run it in the action's transaction."""
        await conn.execute(
            insert(self.table).values(
                occurred_at=database_now(),
                actor=actor[:200],
                client=None if client is None else client[:200],
                action=action,
                rows=len(delivery_ids),
                delivery_ids=list(delivery_ids),
                selection=None if selection is None else dict(selection),
            )
        )

    async def recent(
        self, conn: Executor, *, offset: int = 0, limit: int = 50
    ) -> list[OutboxAction]:
        """Recorded actions, newest first (one SELECT)."""
        t = self.table
        stmt = select(t).order_by(t.c.id.desc()).offset(offset).limit(limit)
        return [_action(r._mapping) for r in await conn.execute(stmt)]

    async def table_exists(self, conn: AsyncConnection) -> bool:
        """Whether the action table exists in the database ``conn`` is connected to."""
        t = self.table
        return bool(
            await conn.run_sync(lambda sync: inspect(sync).has_table(t.name, schema=t.schema))
        )


def _action(row: RowMapping) -> OutboxAction:
    occurred = aware(row["occurred_at"])
    assert occurred is not None
    return OutboxAction(
        id=int(row["id"]),
        occurred_at=occurred,
        actor=row["actor"],
        client=row["client"],
        action=row["action"],
        rows=int(row["rows"]),
        delivery_ids=[int(i) for i in row["delivery_ids"]],
        selection=row["selection"],
    )


async def create_action_table(engine: AsyncEngine, log: OutboxActionLog) -> None:
    """Create the action table (and its index) if it does not exist; nothing else."""
    await create_tables(engine, log.metadata, [log.table])
