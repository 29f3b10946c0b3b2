"""Audit log: one row per entity change, written in the transaction that makes the change.

``enable_audit(Base.metadata)`` is the one line that turns it on: it adds the
``alchemium_audit_log`` table to your metadata (so ``create_all`` and Alembic
autogenerate include it) and plugs :class:`AuditWriter` into every unit of work.
Its ``before_commit`` hook inserts one row per entity change event
(``<entity>_created``, ``_updated``, ``_deleted``, ``_upserted``, ``_restored``)
of the transaction, in the same pass as COMMIT: the rows exist if and only if the
change was committed.

The actor and tenant come from the events' metadata, i.e. from
``UnitOfWork(actor=..., tenant=...)`` or, failing that, from
:func:`alchemium.use_actor` / :func:`alchemium.use_tenant` (set by web middleware).

It runs after the last flush and after every asynchronous before-commit hook
(``uow.before_commit``, ``add_before_commit_hook``), so rows those hooks write
through the ORM are audited too.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    Uuid,
    insert,
    select,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from alchemium.domain_event import DomainEvent
from alchemium.errors import EventError
from alchemium.events.recording import change_action
from alchemium.events.tables import BigId, JsonDocument, create_tables, existing_table
from alchemium.uow import Commit, UnitOfWork, UnitOfWorkHooks, add_hooks, remove_hooks

__all__ = [
    "AuditEntry",
    "AuditLog",
    "AuditWriter",
    "audit_history",
    "create_audit_table",
    "default_audit_log",
    "disable_audit",
    "enable_audit",
]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited change. ``changes`` is the event payload: the column values for
    created/upserted/deleted, ``{column: {"old": ..., "new": ...}}`` for updated."""

    id: int
    event_id: uuid.UUID
    entity: str
    entity_id: str
    action: str
    changes: Mapping[str, Any]
    actor: str | None
    tenant: str | None
    occurred_at: dt.datetime


class AuditLog:
    """The audit table in ``metadata`` and the statements that write and read it."""

    def __init__(
        self,
        metadata: MetaData,
        *,
        table_name: str = "alchemium_audit_log",
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
            Column("event_id", Uuid(), nullable=False, unique=True),
            Column("entity", String(100), nullable=False),
            Column("entity_id", String(200), nullable=False),
            Column("action", String(32), nullable=False),
            Column("changes", JsonDocument, nullable=False),
            Column("actor", String(200), nullable=True),
            Column("tenant", String(200), nullable=True),
            Column("occurred_at", DateTime(timezone=True), nullable=False),
            schema=schema,
        )
        Index(
            f"ix_{table_name}_entity",
            self.table.c.entity,
            self.table.c.entity_id,
            self.table.c.occurred_at,
        )

    def rows_for(self, events: Sequence[DomainEvent]) -> list[dict[str, Any]]:
        """The audit rows for the entity change events among ``events`` (others are skipped)."""
        rows = []
        for event in events:
            action = change_action(event)
            if action is None:
                continue
            payload = event.to_dict()["payload"]
            changes = payload.get("changes", {}) if action == "updated" else payload
            rows.append(
                {
                    "event_id": event.id,
                    "entity": event.aggregate_type,
                    "entity_id": event.aggregate_id,
                    "action": action,
                    "changes": changes,
                    "actor": _str_or_none(event.metadata.get("actor")),
                    "tenant": _str_or_none(event.metadata.get("tenant")),
                    "occurred_at": event.occurred_at,
                }
            )
        return rows

    def write(self, session: Session, events: Sequence[DomainEvent]) -> int:
        """Insert the rows for the change events among ``events`` (one INSERT); returns how many.

        Synchronous: it runs in the unit of work's commit pass (see :class:`AuditWriter`),
        or through ``AsyncSession.run_sync``.
        """
        rows = self.rows_for(events)
        if rows:
            session.execute(insert(self.table), rows)
        return len(rows)

    async def history(
        self,
        conn: AsyncSession | AsyncConnection,
        entity: str,
        entity_id: object,
        *,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """The committed changes of one entity, newest first (one SELECT)."""
        t = self.table
        stmt = (
            select(t)
            .where(t.c.entity == entity, t.c.entity_id == str(entity_id))
            .order_by(t.c.occurred_at.desc(), t.c.id.desc())
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        result = await conn.execute(stmt)
        return [_entry(row._mapping) for row in result]


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _entry(row: RowMapping) -> AuditEntry:
    occurred: dt.datetime = row["occurred_at"]
    if occurred.tzinfo is None:  # SQLite returns naive datetimes; they are UTC
        occurred = occurred.replace(tzinfo=dt.timezone.utc)
    return AuditEntry(
        id=int(row["id"]),
        event_id=row["event_id"],
        entity=row["entity"],
        entity_id=row["entity_id"],
        action=row["action"],
        changes=dict(row["changes"]),
        actor=row["actor"],
        tenant=row["tenant"],
        occurred_at=occurred,
    )


_default: list[AuditLog] = []


class AuditWriter(UnitOfWorkHooks):
    """The unit of work hook that writes the default audit log's rows before COMMIT."""

    def wants_event(self, uow: UnitOfWork, name: str) -> bool:
        """Entity change events are audited while an audit log is enabled."""
        return bool(_default)

    def before_commit(self, uow: UnitOfWork, session: Session, commit: Commit) -> None:
        """Insert one audit row per change event of the committing transaction."""
        if _default:
            _default[0].write(session, commit.all_events())


_writer = AuditWriter()


def enable_audit(metadata: MetaData, **options: Any) -> AuditLog:
    """Add ``alchemium_audit_log`` to ``metadata`` and audit every unit of work from now on.

    Call it before ``metadata.create_all`` (or Alembic autogenerate), or create the
    table later with :func:`create_audit_table`. Calling it again replaces the log.
    """
    log = AuditLog(metadata, **options)
    _default[:] = [log]
    add_hooks(_writer)
    return log


def disable_audit() -> None:
    """Stop auditing (the table stays in the metadata and the database)."""
    _default.clear()
    remove_hooks(_writer)


def default_audit_log() -> AuditLog | None:
    """The audit log set by :func:`enable_audit`, if any."""
    return _default[0] if _default else None


def _resolve(audit: AuditLog | None) -> AuditLog:
    log = audit or default_audit_log()
    if log is None:
        raise EventError("no audit log enabled; call enable_audit(metadata) first")
    return log


async def create_audit_table(engine: AsyncEngine, audit: AuditLog | None = None) -> None:
    """Create the audit table (and its index) if it does not exist; nothing else."""
    log = _resolve(audit)
    await create_tables(engine, log.metadata, [log.table])


async def audit_history(
    session: AsyncSession | AsyncConnection,
    entity: str,
    entity_id: object,
    *,
    limit: int | None = None,
    audit: AuditLog | None = None,
) -> list[AuditEntry]:
    """The audited changes of ``entity`` ``entity_id`` (e.g. ``"user", 42``), newest first."""
    return await _resolve(audit).history(session, entity, entity_id, limit=limit)
