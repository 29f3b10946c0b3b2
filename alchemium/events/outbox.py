"""The transactional outbox: its two tables and every statement that reads or writes them.

``alchemium_outbox`` holds one row per committed event (the retained event log).
``alchemium_outbox_delivery`` holds one row per event *and destination* (a named
in-process subscriber or an external publisher), with its delivery state::

    pending --claim--> claimed --success--> delivered
       ^                  |
       +----failure-------+  (attempts < max_attempts, next_attempt_at = backoff)
                          +----failure----> dead  (attempts >= max_attempts; requeue -> pending)

A claim sets a fresh ``claim_token`` and a lease (``claimed_until``). Outcomes are
written only ``WHERE claim_token = :mine``, so whoever lost its lease can never
overwrite the state written by the one that reclaimed the row. Rows are claimed
by state, never by position: a sequence is assigned at insert, not at commit.

All SQL of the outbox lives in this module; the relay and the after-commit
dispatch only decide what to do with the results.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.tables import BigId, JsonDocument, create_tables, existing_table

__all__ = [
    "DeliveryRow",
    "Outbox",
    "OutboxStatus",
    "create_outbox_tables",
    "default_outbox",
    "enable_outbox",
]

PENDING, CLAIMED, DELIVERED, DEAD = "pending", "claimed", "delivered", "dead"


Executor = AsyncSession | AsyncConnection


def utcnow() -> dt.datetime:
    """The current time in UTC (all outbox times are UTC)."""
    return dt.datetime.now(dt.timezone.utc)


def _dialect(conn: Executor) -> str:
    bind = conn.bind if isinstance(conn, AsyncSession) else conn.engine
    return bind.dialect.name if bind is not None else ""


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite gives naive datetimes back; every time stored here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def _event_of(row: Mapping[Any, Any], prefix: str = "") -> DomainEvent:
    """The DomainEvent of an outbox event row (its columns named ``prefix + column``)."""
    fields = ("id", "name", "aggregate_type", "aggregate_id", "payload", "metadata")
    data = {f: row[prefix + f] for f in fields}
    data["occurred_at"] = _aware(row[prefix + "occurred_at"])
    return DomainEvent.from_dict(data)


async def autocommit(session: AsyncSession) -> Executor:
    """Where to run one statement that needs no transaction: one round trip, not three.

    On PostgreSQL, with a session that checks out its own pooled connection, that
    connection switched to autocommit (no BEGIN, no COMMIT; SQLAlchemy restores its
    isolation level when it goes back to the pool). Otherwise the session itself: a
    session bound to an outside Connection must stay in its transaction, and SQLite's
    driver sends no BEGIN of its own anyway. Call it first in a fresh session
    transaction, and still ``await session.commit()`` afterwards.
    """
    bind = session.get_bind()
    if isinstance(bind, Engine) and bind.dialect.name == "postgresql":
        return await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    return session


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """A claimed delivery: the event, where it goes, and which attempt this is."""

    id: int
    destination: str
    attempts: int
    event: DomainEvent


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """Counts of delivery rows by state and the age of the oldest undelivered one."""

    pending: int
    claimed: int
    dead: int
    delivered: int
    oldest_pending_age: float | None  # seconds


class Outbox:
    """The outbox tables in ``metadata`` and the statements that use them.

    Add it to the metadata your migrations and ``create_all`` use::

        outbox = enable_outbox(Base.metadata)   # also makes it the default outbox
    """

    def __init__(
        self,
        metadata: MetaData,
        *,
        table_name: str = "alchemium_outbox",
        channel: str = "alchemium_outbox",
        schema: str | None = None,
    ) -> None:
        self.metadata = metadata
        self.channel = channel
        # Built claim statements by (destinations, ordered): a relay claims with the same
        # statement every round; only its parameters change.
        self._claims: dict[tuple[tuple[str, ...], bool], Any] = {}
        events = existing_table(metadata, table_name, schema)
        deliveries = existing_table(metadata, f"{table_name}_delivery", schema)
        if events is not None and deliveries is not None:
            self.events, self.deliveries = events, deliveries
            return
        self.events = Table(
            table_name,
            metadata,
            Column("sequence", BigId, primary_key=True, autoincrement=True),
            Column("id", Uuid(), nullable=False, unique=True),
            Column("name", String(200), nullable=False),
            Column("aggregate_type", String(100), nullable=False),
            Column("aggregate_id", String(200), nullable=False),
            Column("payload", JsonDocument, nullable=False),
            Column("metadata", JsonDocument, nullable=False),
            Column("occurred_at", DateTime(timezone=True), nullable=False),
            schema=schema,
        )
        self.deliveries = Table(
            f"{table_name}_delivery",
            metadata,
            Column("id", BigId, primary_key=True, autoincrement=True),
            Column(
                "event_id",
                Uuid(),
                ForeignKey(self.events.c.id, ondelete="CASCADE"),
                nullable=False,
            ),
            Column("destination", String(200), nullable=False),
            Column("aggregate_type", String(100), nullable=False),
            Column("aggregate_id", String(200), nullable=False),
            Column("status", String(16), nullable=False),
            Column("attempts", Integer, nullable=False, default=0),
            Column("next_attempt_at", DateTime(timezone=True), nullable=False),
            Column("claim_token", Uuid(), nullable=True),
            Column("claimed_until", DateTime(timezone=True), nullable=True),
            Column("claimed_by", String(100), nullable=True),
            Column("last_error", Text, nullable=True),
            Column("delivered_at", DateTime(timezone=True), nullable=True),
            UniqueConstraint("event_id", "destination", name=f"uq_{table_name}_delivery_event"),
            schema=schema,
        )
        undelivered = text("status IN ('pending', 'claimed')")
        Index(
            f"ix_{table_name}_delivery_due",
            self.deliveries.c.destination,
            self.deliveries.c.next_attempt_at,
            postgresql_where=undelivered,
            sqlite_where=undelivered,
        )
        open_rows = text("status <> 'delivered'")
        Index(
            f"ix_{table_name}_delivery_aggregate",
            self.deliveries.c.destination,
            self.deliveries.c.aggregate_type,
            self.deliveries.c.aggregate_id,
            self.deliveries.c.id,
            postgresql_where=open_rows,
            sqlite_where=open_rows,
        )
        Index(f"ix_{table_name}_delivery_token", self.deliveries.c.claim_token)
        Index(f"ix_{table_name}_occurred", self.events.c.occurred_at)

    def tables_exist(self, bind: Engine | Connection) -> bool:
        """Whether both outbox tables exist (asked on a connection of its own).

        Synchronous: call it inside ``run_sync`` (or through ``AsyncConnection.run_sync``).
        """
        engine = bind if isinstance(bind, Engine) else bind.engine
        with engine.connect() as conn:
            inspector = inspect(conn)
            return all(
                inspector.has_table(t.name, schema=t.schema) for t in (self.events, self.deliveries)
            )

    # -- writing (inside the committing transaction) ----------------------------------------

    def write(
        self,
        session: Session,
        events: Sequence[DomainEvent],
        deliveries: Iterable[tuple[DomainEvent, str, bool]],
        *,
        claim_token: uuid.UUID,
        lease: float,
        notify: bool,
    ) -> int:
        """Insert ``events`` and their delivery rows; returns the number of delivery rows.

        ``deliveries`` yields ``(event, destination, claim_now)``: rows with ``claim_now``
        are inserted already claimed under ``claim_token`` for the after-commit dispatch
        (no extra round trip); the rest are pending for the relay. ``notify`` issues one
        ``pg_notify`` on PostgreSQL, last, so a listening relay wakes at commit.

        Synchronous: it runs inside the unit of work's commit pass (see
        ``UnitOfWorkHooks.before_commit``), or through ``AsyncSession.run_sync``.
        """
        now = utcnow()
        session.execute(
            insert(self.events),
            [
                {
                    "id": e.id,
                    "name": e.name,
                    "aggregate_type": e.aggregate_type,
                    "aggregate_id": e.aggregate_id,
                    "payload": e.to_dict()["payload"],
                    "metadata": e.to_dict()["metadata"],
                    "occurred_at": e.occurred_at,
                }
                for e in events
            ],
        )
        until = now + dt.timedelta(seconds=lease)
        rows = [
            {
                "event_id": e.id,
                "destination": destination,
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "status": CLAIMED if claim_now else PENDING,
                "attempts": 1 if claim_now else 0,
                "next_attempt_at": now,
                "claim_token": claim_token if claim_now else None,
                "claimed_until": until if claim_now else None,
            }
            for e, destination, claim_now in deliveries
        ]
        if rows:
            session.execute(insert(self.deliveries), rows)
        if notify and rows and session.get_bind().dialect.name == "postgresql":
            session.execute(select(func.pg_notify(self.channel, "")))
        return len(rows)

    # -- claiming and completing ------------------------------------------------------------

    def _due(self, destinations: Sequence[str], now: Any, ordered: bool) -> Any:
        d = self.deliveries
        condition = and_(
            d.c.destination.in_(destinations),
            # Implied by the OR below; spelled out so the planner can prove it and walk
            # the partial "due" index instead of the primary key past delivered rows.
            d.c.status.in_((PENDING, CLAIMED)),
            or_(
                and_(d.c.status == PENDING, d.c.next_attempt_at <= now),
                and_(d.c.status == CLAIMED, d.c.claimed_until < now),
            ),
        )
        if ordered:
            earlier = d.alias("earlier")
            condition = and_(
                condition,
                ~exists().where(
                    earlier.c.destination == d.c.destination,
                    earlier.c.aggregate_type == d.c.aggregate_type,
                    earlier.c.aggregate_id == d.c.aggregate_id,
                    earlier.c.id < d.c.id,
                    earlier.c.status != DELIVERED,
                ),
            )
        return condition

    def _claim_statement(self, destinations: Sequence[str], ordered: bool) -> Any:
        """PostgreSQL's claim, one statement: lock the due rows, claim them, read their events.

        A materialized CTE runs the locking SELECT exactly once; as a plain ``IN
        (subquery)`` the planner may re-run it and claim more than ``limit``. Parameters:
        ``now``, ``limit``, ``token``, ``until``, ``claimed_by``.
        """
        d, e = self.deliveries, self.events
        picked = (
            select(d.c.id)
            .where(
                self._due(destinations, bindparam("now", type_=d.c.next_attempt_at.type), ordered)
            )
            # Due order, in the order of the "due" index: claiming costs the same with
            # millions of delivered rows kept for retention as with none.
            .order_by(d.c.next_attempt_at)
            .limit(bindparam("limit", type_=Integer()))
            .with_for_update(skip_locked=True)
            .cte("picked")
            .prefix_with("MATERIALIZED")
        )
        claimed = (
            update(d)
            .where(d.c.id.in_(select(picked.c.id)))
            .values(
                status=CLAIMED,
                claim_token=bindparam("token", type_=d.c.claim_token.type),
                claimed_until=bindparam("until", type_=d.c.claimed_until.type),
                claimed_by=bindparam("claimed_by", type_=d.c.claimed_by.type),
                attempts=d.c.attempts + 1,
            )
            .returning(d.c.id, d.c.event_id, d.c.destination, d.c.attempts)
            .cte("claimed")
        )
        return (
            select(
                claimed.c.id,
                claimed.c.destination,
                claimed.c.attempts,
                *(c.label(f"event_{c.name}") for c in e.c),
            )
            .join(e, e.c.id == claimed.c.event_id)
            .order_by(claimed.c.id)
        )

    async def claim(
        self,
        conn: Executor,
        destinations: Sequence[str],
        *,
        limit: int,
        lease: float,
        token: uuid.UUID,
        claimed_by: str,
        ordered: bool = False,
    ) -> list[DeliveryRow]:
        """Claim up to ``limit`` due rows for ``destinations`` under ``token``; returns them.

        On PostgreSQL concurrent claimers skip each other's rows (``FOR UPDATE SKIP
        LOCKED``). Rows whose lease expired are due again. Run it in a short
        transaction of its own and commit before publishing.
        """
        if not destinations:
            return []
        d = self.deliveries
        now = utcnow()
        if _dialect(conn) == "postgresql":
            stmt = self._claims.get((tuple(destinations), ordered))
            if stmt is None:
                stmt = self._claim_statement(destinations, ordered)
                self._claims[(tuple(destinations), ordered)] = stmt
            params = {
                "now": now,
                "limit": limit,
                "token": token,
                "until": now + dt.timedelta(seconds=lease),
                "claimed_by": claimed_by,
            }
            return [
                DeliveryRow(r.id, r.destination, r.attempts, _event_of(r._mapping, "event_"))
                for r in (await conn.execute(stmt, params)).all()
            ]
        due = (
            select(d.c.id)
            .where(self._due(destinations, now, ordered))
            # Due order, in the order of the "due" index: claiming costs the same with
            # millions of delivered rows kept for retention as with none.
            .order_by(d.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        values = {
            "status": CLAIMED,
            "claim_token": token,
            "claimed_until": now + dt.timedelta(seconds=lease),
            "claimed_by": claimed_by,
            "attempts": d.c.attempts + 1,
        }
        returned = (d.c.id, d.c.event_id, d.c.destination, d.c.attempts)
        e = self.events
        stmt = update(d).where(d.c.id.in_(due.scalar_subquery())).values(**values)
        claimed = (await conn.execute(stmt.returning(*returned))).all()
        if not claimed:
            return []
        events = {
            row.id: row
            for row in (
                await conn.execute(select(e).where(e.c.id.in_({c.event_id for c in claimed})))
            ).all()
        }
        return [
            DeliveryRow(c.id, c.destination, c.attempts, _event_of(events[c.event_id]._mapping))
            for c in sorted(claimed, key=lambda r: r.id)
        ]

    async def renew(self, conn: Executor, token: uuid.UUID, lease: float) -> int:
        """Extend the lease of rows still claimed under ``token``; returns how many."""
        d = self.deliveries
        stmt = (
            update(d)
            .where(d.c.claim_token == token, d.c.status == CLAIMED)
            .values(claimed_until=utcnow() + dt.timedelta(seconds=lease))
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def mark_delivered(
        self, conn: Executor, token: uuid.UUID, ids: Sequence[int] | None = None
    ) -> int:
        """Mark rows claimed under ``token`` delivered (only those in ``ids`` if given)."""
        d = self.deliveries
        stmt = update(d).where(d.c.claim_token == token, d.c.status == CLAIMED)
        if ids is not None:
            if not ids:
                return 0
            if _dialect(conn) == "postgresql":  # one array parameter, not one per id
                stmt = stmt.where(d.c.id == any_(bindparam("ids", list(ids), ARRAY(BigInteger))))
            else:
                stmt = stmt.where(d.c.id.in_(ids))
        stmt = stmt.values(
            status=DELIVERED, delivered_at=utcnow(), claim_token=None, claimed_until=None
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def mark_delivered_by_destination(
        self, conn: Executor, token: uuid.UUID, pairs: Sequence[tuple[uuid.UUID, str]]
    ) -> int:
        """Mark the (event id, destination) rows claimed under ``token`` delivered."""
        if not pairs:
            return 0
        d = self.deliveries
        stmt = (
            update(d)
            .where(
                d.c.claim_token == token,
                d.c.status == CLAIMED,
                tuple_(d.c.event_id, d.c.destination).in_(list(pairs)),
            )
            .values(status=DELIVERED, delivered_at=utcnow(), claim_token=None, claimed_until=None)
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def mark_failed(
        self,
        conn: Executor,
        token: uuid.UUID,
        *,
        error: str,
        retry_at: dt.datetime | None,
        row_id: int | None = None,
        event_id: uuid.UUID | None = None,
        destination: str | None = None,
    ) -> int:
        """Record a failed attempt: back to pending until ``retry_at``, or dead if None.

        The row is named by ``row_id`` or by ``event_id`` + ``destination``; it is only
        touched while still claimed under ``token``.
        """
        d = self.deliveries
        stmt = update(d).where(d.c.claim_token == token, d.c.status == CLAIMED)
        if row_id is not None:
            stmt = stmt.where(d.c.id == row_id)
        else:
            stmt = stmt.where(d.c.event_id == event_id, d.c.destination == destination)
        values: dict[str, Any] = {
            "last_error": error[:2000],
            "claim_token": None,
            "claimed_until": None,
        }
        if retry_at is None:
            values["status"] = DEAD
        else:
            values["status"] = PENDING
            values["next_attempt_at"] = retry_at
        return int(getattr(await conn.execute(stmt.values(**values)), "rowcount", 0))

    # -- operations -------------------------------------------------------------------------

    async def status(
        self, conn: Executor, destinations: Sequence[str] | None = None
    ) -> OutboxStatus:
        """Counts by state and the age in seconds of the oldest pending/claimed delivery."""
        d = self.deliveries
        where = [d.c.destination.in_(destinations)] if destinations else []
        counts: dict[str, int] = dict(
            (
                await conn.execute(
                    select(d.c.status, func.count()).where(*where).group_by(d.c.status)
                )
            )
            .tuples()
            .all()
        )
        oldest = await self.oldest_undelivered(conn, destinations)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else None
        return OutboxStatus(
            pending=int(counts.get(PENDING, 0)),
            claimed=int(counts.get(CLAIMED, 0)),
            dead=int(counts.get(DEAD, 0)),
            delivered=int(counts.get(DELIVERED, 0)),
            oldest_pending_age=age,
        )

    async def oldest_undelivered(
        self, conn: Executor, destinations: Sequence[str] | None = None
    ) -> dt.datetime | None:
        """``occurred_at`` of the oldest event with a pending or claimed delivery, if any."""
        d, e = self.deliveries, self.events
        where = [d.c.destination.in_(destinations)] if destinations else []
        oldest = (
            await conn.execute(
                select(func.min(e.c.occurred_at))
                .select_from(d.join(e, e.c.id == d.c.event_id))
                .where(d.c.status.in_((PENDING, CLAIMED)), *where)
            )
        ).scalar_one()
        return _aware(oldest)

    async def dead(self, conn: Executor, *, limit: int = 100) -> list[dict[str, Any]]:
        """Dead deliveries, oldest first: id, event id and name, destination, attempts, error."""
        d, e = self.deliveries, self.events
        rows = await conn.execute(
            select(
                d.c.id,
                d.c.event_id,
                e.c.name,
                d.c.destination,
                d.c.attempts,
                d.c.last_error,
                d.c.aggregate_type,
                d.c.aggregate_id,
            )
            .select_from(d.join(e, e.c.id == d.c.event_id))
            .where(d.c.status == DEAD)
            .order_by(d.c.id)
            .limit(limit)
        )
        return [dict(r._mapping) for r in rows]

    async def requeue(
        self, conn: Executor, *, ids: Sequence[int] | None = None, destination: str | None = None
    ) -> int:
        """Put dead deliveries back to pending with attempts reset; returns how many."""
        d = self.deliveries
        stmt = update(d).where(d.c.status == DEAD)
        if ids is not None:
            stmt = stmt.where(d.c.id.in_(ids))
        if destination is not None:
            stmt = stmt.where(d.c.destination == destination)
        stmt = stmt.values(status=PENDING, attempts=0, next_attempt_at=utcnow(), last_error=None)
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def discard(self, conn: Executor, ids: Sequence[int]) -> int:
        """Give up on dead deliveries (marked delivered with their error kept)."""
        d = self.deliveries
        stmt = (
            update(d)
            .where(d.c.status == DEAD, d.c.id.in_(ids))
            .values(status=DELIVERED, delivered_at=utcnow())
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def blocked_aggregates(self, conn: Executor) -> list[tuple[str, str, str]]:
        """(destination, aggregate type, aggregate id) held up by a dead delivery (ordered mode)."""
        d = self.deliveries
        rows = await conn.execute(
            select(d.c.destination, d.c.aggregate_type, d.c.aggregate_id)
            .where(d.c.status == DEAD)
            .distinct()
            .order_by(d.c.destination, d.c.aggregate_type, d.c.aggregate_id)
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def purge(self, conn: Executor, *, older_than: float, batch_size: int = 1000) -> int:
        """Delete up to ``batch_size`` delivered rows older than ``older_than`` seconds.

        Then deletes events older than that which have no delivery row left that is not
        delivered. Rows being delivered (claimed) or pending are never touched. Returns
        the number of delivery rows deleted; call again until it returns 0.
        """
        d, e = self.deliveries, self.events
        cutoff = utcnow() - dt.timedelta(seconds=older_than)
        picked = (
            select(d.c.id)
            .where(d.c.status == DELIVERED, d.c.delivered_at < cutoff)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        removed = int(
            getattr(await conn.execute(delete(d).where(d.c.id.in_(picked))), "rowcount", 0)
        )
        stale = (
            select(e.c.sequence)
            .where(e.c.occurred_at < cutoff, ~exists().where(d.c.event_id == e.c.id))
            .limit(batch_size)
            .scalar_subquery()
        )
        await conn.execute(delete(e).where(e.c.sequence.in_(stale)))
        return removed

    async def backfill(self, conn: Executor, destination: str, *, since: dt.datetime) -> int:
        """Opt-in: give ``destination`` (a later subscriber) the retained events since ``since``.

        New subscribers start from "now": rows are only written for destinations known
        at commit. This inserts pending rows for older events it has no row for yet.
        """
        d, e = self.deliveries, self.events
        source = (
            select(
                e.c.id,
                literal(destination, String),
                e.c.aggregate_type,
                e.c.aggregate_id,
                literal(PENDING, String),
                literal(0, Integer),
                e.c.occurred_at,
            )
            .where(
                e.c.occurred_at >= since,
                ~exists().where(d.c.event_id == e.c.id, d.c.destination == destination),
            )
            .order_by(e.c.sequence)
        )
        stmt = insert(d).from_select(
            [
                "event_id",
                "destination",
                "aggregate_type",
                "aggregate_id",
                "status",
                "attempts",
                "next_attempt_at",
            ],
            source,
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))


_default: list[Outbox] = []


def enable_outbox(metadata: MetaData, **options: Any) -> Outbox:
    """Add the outbox tables to ``metadata`` and make it the default outbox of units of work.

    One line, before ``metadata.create_all`` (or Alembic autogenerate), turns the
    best-effort in-process dispatch into the transactional outbox.
    """
    outbox = Outbox(metadata, **options)
    _default[:] = [outbox]
    return outbox


def disable_outbox() -> None:
    """Forget the default outbox (events go back to best-effort in-process dispatch)."""
    _default.clear()


def default_outbox() -> Outbox | None:
    """The outbox set by :func:`enable_outbox`, if any."""
    return _default[0] if _default else None


async def create_outbox_tables(engine: AsyncEngine, outbox: Outbox | None = None) -> None:
    """Create the outbox tables (and indexes) if they do not exist; nothing else."""
    outbox = outbox or default_outbox()
    if outbox is None:
        raise OutboxError("no outbox enabled; call enable_outbox(metadata) first")
    await create_tables(engine, outbox.metadata, [outbox.events, outbox.deliveries])
