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

Every time a relay compares against (``next_attempt_at``, ``claimed_until``,
``delivered_at``, purge cutoffs, the lag) is computed in SQL from the database's
clock, :class:`database_now`, never from the clock of the process that sends the
statement: relays and writers on hosts whose clocks disagree still agree on who
holds a lease and what is due. ``occurred_at`` is the writer's clock (a fact
about the event); only the lag and the retention of events read it.

All SQL of the outbox lives in this module; the relay and the after-commit
dispatch only decide what to do with the results. It is longer than 500 lines
because it holds every statement on the two tables; splitting it is planned
separately.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
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
    case,
    delete,
    exists,
    func,
    insert,
    inspect,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.tables import BigId, JsonDocument, create_tables, existing_table

__all__ = [
    "DeliveryRow",
    "DestinationStatus",
    "Outbox",
    "OutboxStatus",
    "OverdueDestination",
    "create_outbox_tables",
    "database_now",
    "default_outbox",
    "enable_outbox",
]

PENDING, CLAIMED, DELIVERED, DEAD = "pending", "claimed", "delivered", "dead"


Executor = AsyncSession | AsyncConnection


class database_now(FunctionElement[dt.datetime]):  # noqa: N801 - reads like func.now()
    """The database's current UTC time, plus ``seconds`` if given, as a SQL expression.

    ``database_now()`` is "now" and ``database_now(30)`` is "30 seconds from now" on
    the clock of the database server, whatever the clock of this process says;
    ``seconds`` may also be a SQL expression (a bind parameter). The value is the
    same for every row of one statement.

    - PostgreSQL: ``statement_timestamp()`` (+ ``make_interval(secs => ...)``): the
      start of the current statement, so it is current inside a long transaction
      (unlike ``now()``), and STABLE (unlike ``clock_timestamp()``), so a comparison
      with it can use an index.
    - SQLite: ``strftime('%Y-%m-%d %H:%M:%f', 'now', '+N seconds') || '000'``: the
      text format SQLAlchemy stores a SQLite ``DateTime`` in (microseconds, six
      digits), so the string comparisons SQLite does on these columns order times
      correctly. SQLite's clock has millisecond precision, and it is the clock of
      the process running the statement: an embedded database has one host.

    Other databases raise ``CompileError``.
    """

    type = DateTime(timezone=True)
    name = "database_now"
    inherit_cache = True

    def __init__(self, seconds: float | ColumnElement[Any] | None = None) -> None:
        if seconds is None:
            super().__init__()
        elif isinstance(seconds, ColumnElement):
            super().__init__(seconds)
        else:
            super().__init__(literal(float(seconds), Float()))


def _database_now_offset(element: database_now, compiler: SQLCompiler, **kw: Any) -> str | None:
    clauses = list(element.clauses)
    return compiler.process(clauses[0], **kw) if clauses else None


@compiles(database_now, "postgresql")
def _database_now_postgresql(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = _database_now_offset(element, compiler, **kw)
    if offset is None:
        return "statement_timestamp()"
    return f"(statement_timestamp() + make_interval(secs => {offset}))"


@compiles(database_now, "sqlite")
def _database_now_sqlite(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = _database_now_offset(element, compiler, **kw)
    # %f is seconds with milliseconds ("SS.SSS"): three more digits make SQLAlchemy's
    # "YYYY-MM-DD HH:MM:SS.ffffff", so text comparisons with stored values hold.
    modifier = "" if offset is None else f", printf('%+.6f seconds', {offset})"
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now'{modifier}) || '000')"


@compiles(database_now)
def _database_now_other(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    raise CompileError(
        f"the outbox reads the database clock on PostgreSQL and SQLite only, "
        f"not on {compiler.dialect.name}"
    )


def _dialect(conn: Executor) -> str:
    bind = conn.bind if isinstance(conn, AsyncSession) else conn.engine
    return bind.dialect.name if bind is not None else ""


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite gives naive datetimes back; every time stored here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def _age(now: dt.datetime | None, then: dt.datetime | None) -> float | None:
    """Seconds from ``then`` to ``now`` (``now`` read from the database), at least 0."""
    now, then = _aware(now), _aware(then)
    if now is None or then is None:
        return None
    return max(0.0, (now - then).total_seconds())


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
    """Counts of delivery rows by state and the age of the oldest undelivered one.

    ``oldest_pending_age`` is the lag: seconds from the ``occurred_at`` of the oldest
    event with a pending or claimed row to the database's now. ``occurred_at`` is
    the writer's clock, so a writer whose clock runs ahead by N seconds makes it read
    up to N seconds low (never below 0), one behind makes it read high; nothing is
    decided by it. ``overdue`` (per destination) only reads the database clock.
    """

    pending: int
    claimed: int
    dead: int
    delivered: int
    oldest_pending_age: float | None  # seconds

    @classmethod
    def total(cls, destinations: Sequence[DestinationStatus]) -> OutboxStatus:
        """The totals of per-destination statuses (the lag is the largest one)."""
        ages = [s.oldest_pending_age for s in destinations if s.oldest_pending_age is not None]
        return cls(
            pending=sum(s.pending for s in destinations),
            claimed=sum(s.claimed for s in destinations),
            dead=sum(s.dead for s in destinations),
            delivered=sum(s.delivered for s in destinations),
            oldest_pending_age=max(ages, default=None),
        )


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """The delivery rows of one destination: counts by state, the lag, and how overdue.

    ``oldest_pending_age``: the lag, as in :class:`OutboxStatus` (writer's clock).
    ``overdue``: seconds since the oldest *due* row of the destination became due
    (a pending row past its ``next_attempt_at``, a claimed row past its lease), on
    the database clock; ``None`` when no row is due. A served destination stays near
    0; one that keeps growing is not drained by any relay.
    """

    destination: str
    pending: int
    claimed: int
    dead: int
    delivered: int
    oldest_pending_age: float | None  # seconds
    overdue: float | None  # seconds


@dataclass(frozen=True, slots=True)
class OverdueDestination:
    """A destination with ``rows`` rows due for more than a threshold (see ``Outbox.overdue``).

    ``overdue`` is how long the oldest of them has been due, in seconds on the
    database clock.
    """

    destination: str
    rows: int
    overdue: float


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
        ``pg_notify`` on PostgreSQL, last, so a listening relay wakes at commit. The rows
        are due, and claimed rows leased for ``lease`` seconds, from the database's now.

        Synchronous: it runs inside the unit of work's commit pass (see
        ``UnitOfWorkHooks.before_commit``), or through ``AsyncSession.run_sync``.
        """
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
        rows = [
            {
                "event_id": e.id,
                "destination": destination,
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "status": CLAIMED if claim_now else PENDING,
                "attempts": 1 if claim_now else 0,
                "claim_token": claim_token if claim_now else None,
                "claim_now": claim_now,
            }
            for e, destination, claim_now in deliveries
        ]
        if rows:
            session.execute(self._insert_deliveries(lease), rows)
        if notify and rows and session.get_bind().dialect.name == "postgresql":
            session.execute(select(func.pg_notify(self.channel, "")))
        return len(rows)

    def _insert_deliveries(self, lease: float) -> Any:
        """The INSERT of delivery rows: due now, claimed ones leased, on the database clock."""
        claimed = bindparam("claim_now", type_=Boolean())
        return insert(self.deliveries).values(
            next_attempt_at=database_now(),
            claimed_until=case((claimed, database_now(lease)), else_=null()),
        )

    # -- claiming and completing ------------------------------------------------------------

    def _due(self, destinations: Sequence[str], ordered: bool) -> Any:
        """Rows of ``destinations`` a relay may claim now (by the database's clock)."""
        d = self.deliveries
        now = database_now()
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
        ``limit``, ``token``, ``lease`` (seconds), ``claimed_by``; "now" is the database's.
        """
        d, e = self.deliveries, self.events
        picked = (
            select(d.c.id)
            .where(self._due(destinations, ordered))
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
                claimed_until=database_now(bindparam("lease", type_=Float())),
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
        LOCKED``). Rows whose lease expired are due again. What is due and the new
        lease (``lease`` seconds) are reckoned on the database's clock. Run it in a
        short transaction of its own and commit before publishing.
        """
        if not destinations:
            return []
        d = self.deliveries
        if _dialect(conn) == "postgresql":
            stmt = self._claims.get((tuple(destinations), ordered))
            if stmt is None:
                stmt = self._claim_statement(destinations, ordered)
                self._claims[(tuple(destinations), ordered)] = stmt
            params = {
                "limit": limit,
                "token": token,
                "lease": float(lease),
                "claimed_by": claimed_by,
            }
            return [
                DeliveryRow(r.id, r.destination, r.attempts, _event_of(r._mapping, "event_"))
                for r in (await conn.execute(stmt, params)).all()
            ]
        due = (
            select(d.c.id)
            .where(self._due(destinations, ordered))
            # Due order, in the order of the "due" index: claiming costs the same with
            # millions of delivered rows kept for retention as with none.
            .order_by(d.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        values = {
            "status": CLAIMED,
            "claim_token": token,
            "claimed_until": database_now(lease),
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
        """Extend the lease of rows still claimed under ``token`` to ``lease`` seconds from
        the database's now; returns how many."""
        d = self.deliveries
        stmt = (
            update(d)
            .where(d.c.claim_token == token, d.c.status == CLAIMED)
            .values(claimed_until=database_now(lease))
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def mark_delivered(
        self, conn: Executor, token: uuid.UUID, ids: Sequence[int] | None = None
    ) -> int:
        """Mark rows claimed under ``token`` delivered (only those in ``ids`` if given).

        ``delivered_at`` is the database's now.
        """
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
            status=DELIVERED, delivered_at=database_now(), claim_token=None, claimed_until=None
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
            .values(
                status=DELIVERED, delivered_at=database_now(), claim_token=None, claimed_until=None
            )
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def mark_failed(
        self,
        conn: Executor,
        token: uuid.UUID,
        *,
        error: str,
        retry_in: float | None,
        row_id: int | None = None,
        event_id: uuid.UUID | None = None,
        destination: str | None = None,
    ) -> int:
        """Record a failed attempt: pending again ``retry_in`` seconds from the database's
        now, or dead if ``retry_in`` is None.

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
        if retry_in is None:
            values["status"] = DEAD
        else:
            values["status"] = PENDING
            values["next_attempt_at"] = database_now(retry_in)
        return int(getattr(await conn.execute(stmt.values(**values)), "rowcount", 0))

    # -- operations -------------------------------------------------------------------------

    async def status(
        self, conn: Executor, destinations: Sequence[str] | None = None
    ) -> OutboxStatus:
        """Counts by state over ``destinations`` (all if None) and the lag (see OutboxStatus).

        The totals of :meth:`destination_status`; counting reads every delivery row.
        """
        return OutboxStatus.total(await self.destination_status(conn, destinations))

    def _due_since(self, now: Any) -> Any:
        """When an undelivered row became due (NULL if it is not due at ``now``)."""
        d = self.deliveries
        return case(
            (and_(d.c.status == PENDING, d.c.next_attempt_at <= now), d.c.next_attempt_at),
            (and_(d.c.status == CLAIMED, d.c.claimed_until < now), d.c.claimed_until),
            else_=null(),
        )

    async def destination_status(
        self, conn: Executor, destinations: Sequence[str] | None = None
    ) -> list[DestinationStatus]:
        """One :class:`DestinationStatus` per destination with rows, ordered by name.

        Two statements: counts by destination and state (reads every delivery row,
        delivered ones kept for retention included), then the lag and the overdue
        time of the undelivered rows, on the database's clock.
        """
        d, e = self.deliveries, self.events
        where = [d.c.destination.in_(destinations)] if destinations else []
        counts: dict[str, dict[str, int]] = {}
        for destination, state, n in await conn.execute(
            select(d.c.destination, d.c.status, func.count())
            .where(*where)
            .group_by(d.c.destination, d.c.status)
        ):
            counts.setdefault(destination, {})[state] = int(n)
        now = database_now()
        ages: dict[str, tuple[float | None, float | None]] = {
            destination: (_age(db_now, oldest), _age(db_now, due_since))
            for destination, oldest, due_since, db_now in (
                await conn.execute(
                    select(
                        d.c.destination,
                        func.min(e.c.occurred_at),
                        func.min(self._due_since(now)),
                        now,
                    )
                    .select_from(d.join(e, e.c.id == d.c.event_id))
                    .where(d.c.status.in_((PENDING, CLAIMED)), *where)
                    .group_by(d.c.destination)
                )
            )
        }
        return [
            DestinationStatus(
                destination=destination,
                pending=by_state.get(PENDING, 0),
                claimed=by_state.get(CLAIMED, 0),
                dead=by_state.get(DEAD, 0),
                delivered=by_state.get(DELIVERED, 0),
                oldest_pending_age=ages.get(destination, (None, None))[0],
                overdue=ages.get(destination, (None, None))[1],
            )
            for destination, by_state in sorted(counts.items())
        ]

    async def lag(self, conn: Executor, destinations: Sequence[str] | None = None) -> float | None:
        """Seconds from the oldest undelivered event's ``occurred_at`` to the database's now.

        ``None`` when every row of ``destinations`` (all if None) is delivered or dead.
        One statement over the undelivered rows only. See :class:`OutboxStatus` for
        what the writer's clock does to it.
        """
        d, e = self.deliveries, self.events
        where = [d.c.destination.in_(destinations)] if destinations else []
        oldest, now = (
            await conn.execute(
                select(func.min(e.c.occurred_at), database_now())
                .select_from(d.join(e, e.c.id == d.c.event_id))
                .where(d.c.status.in_((PENDING, CLAIMED)), *where)
            )
        ).one()
        return _age(now, oldest)

    async def overdue(
        self, conn: Executor, *, older_than: float, exclude: Sequence[str] = ()
    ) -> list[OverdueDestination]:
        """Destinations (but those in ``exclude``) with rows due for over ``older_than`` seconds.

        A row is due once pending past its ``next_attempt_at`` or claimed past its
        lease; "over ``older_than`` seconds" is on the database's clock. A destination
        no relay drains shows up here (there is no registry of relays). One statement
        over the undelivered rows; ordered by destination.
        """
        d = self.deliveries
        now, cutoff = database_now(), database_now(-older_than)
        where = [d.c.destination.not_in(exclude)] if exclude else []
        rows = await conn.execute(
            select(d.c.destination, func.count(), func.min(self._due_since(now)), now)
            .where(
                d.c.status.in_((PENDING, CLAIMED)),
                or_(
                    and_(d.c.status == PENDING, d.c.next_attempt_at < cutoff),
                    and_(d.c.status == CLAIMED, d.c.claimed_until < cutoff),
                ),
                *where,
            )
            .group_by(d.c.destination)
            .order_by(d.c.destination)
        )
        return [
            OverdueDestination(destination, int(n), _age(db_now, since) or 0.0)
            for destination, n, since, db_now in rows
        ]

    async def undelivered(self, conn: Executor, destinations: Sequence[str]) -> int:
        """How many rows of ``destinations`` are pending or claimed (none if no destination)."""
        if not destinations:
            return 0
        d = self.deliveries
        stmt = select(func.count()).where(
            d.c.destination.in_(destinations), d.c.status.in_((PENDING, CLAIMED))
        )
        return int((await conn.execute(stmt)).scalar_one())

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
        stmt = stmt.values(
            status=PENDING, attempts=0, next_attempt_at=database_now(), last_error=None
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def discard(self, conn: Executor, ids: Sequence[int]) -> int:
        """Give up on dead deliveries (marked delivered with their error kept)."""
        d = self.deliveries
        stmt = (
            update(d)
            .where(d.c.status == DEAD, d.c.id.in_(ids))
            .values(status=DELIVERED, delivered_at=database_now())
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

        Then deletes events older than that which have no delivery row left. Rows being
        delivered (claimed) or pending are never touched. Returns the number of delivery
        rows deleted; call again until it returns 0. The cutoff is the database's now
        minus ``older_than``; an event's age is read from its ``occurred_at`` (the
        writer's clock), which only shifts when an event with nothing left to deliver
        is deleted.
        """
        d, e = self.deliveries, self.events
        cutoff = database_now(-older_than)
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
        at commit. This inserts pending rows, due at once, for older events it has no
        row for yet.
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
                database_now(),
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
