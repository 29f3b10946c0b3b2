"""The outbox's tables and the SQL built on them: what the rows are and how they are chosen.

``alchemium_outbox`` holds one row per committed event (the retained event log).
``alchemium_outbox_delivery`` holds one row per event *and destination* (a named
in-process subscriber or an external publisher), with its delivery state::

    pending --claim--> claimed --success--> delivered
       ^                  |
       +----failure-------+  (attempts < max_attempts, next_attempt_at = backoff)
                          +----failure----> dead  (attempts >= max_attempts; requeue -> pending)
                          +----failure----> abandoned  (a destination's DeliveryPolicy gave up)

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

This module builds; it executes nothing. The operations that run these statements
are :class:`alchemium.events.outbox.Outbox` (the commit, the relay's claim and
outcomes) and :class:`alchemium.events.outbox_admin.OutboxAdministration` (what
operators ask and do).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
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
    bindparam,
    case,
    column,
    exists,
    insert,
    inspect,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
    values,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.event_fields import schema_version_of, trace_context_of
from alchemium.events.tables import BigId, JsonDocument, existing_table

__all__ = [
    "ABANDONED",
    "CLAIMED",
    "CLAIMED_SQL",
    "COMPLETIONS",
    "DEAD",
    "DELIVERED",
    "PARTITION_PERIODS",
    "PENDING",
    "PENDING_SQL",
    "SHAPES",
    "UNDELIVERED_SQL",
    "DeliveryRow",
    "Executor",
    "OutboxTables",
    "age_of",
    "aware",
    "database_now",
    "dialect_of",
    "event_of",
    "status_constant",
]

PENDING, CLAIMED, DELIVERED, DEAD = "pending", "claimed", "delivered", "dead"
# Given up by a destination's policy (alchemium.events.policies): never retried, and not
# requeued by a requeue of every dead row unless asked for.
ABANDONED = "abandoned"

# The events table's column names per shape (keys stay alchemium's). "debezium" is the
# table Debezium's outbox event router reads: id, aggregatetype, aggregateid, type,
# payload (+ tracingspancontext and schemaversion); change data capture can then
# replace the relay without touching the code that writes events (docs/outbox-cdc.md).
SHAPES: dict[str, dict[str, str]] = {
    "alchemium": {
        "name": "name",
        "aggregate_type": "aggregate_type",
        "aggregate_id": "aggregate_id",
    },
    "debezium": {"name": "type", "aggregate_type": "aggregatetype", "aggregate_id": "aggregateid"},
}

Executor = AsyncSession | AsyncConnection


def status_constant(value: str) -> ColumnElement[str]:
    """A delivery status written into the SQL as a constant, not bound (our own word,
    never input): PostgreSQL can then prove a partial index on the status applies even
    in the generic plan it caches for a statement run many times (a relay's)."""
    return literal_column(f"'{value}'", String())


# The undelivered statuses as SQL constants: what the relay's statements (claim, lag,
# overdue, what is left) compare with, so that they reach the partial "due" index.
PENDING_SQL, CLAIMED_SQL = status_constant(PENDING), status_constant(CLAIMED)
UNDELIVERED_SQL = (PENDING_SQL, CLAIMED_SQL)


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


def dialect_of(conn: Executor) -> str:
    """The dialect name of what ``conn`` runs on (\"\" if unbound)."""
    bind = conn.bind if isinstance(conn, AsyncSession) else conn.engine
    return bind.dialect.name if bind is not None else ""


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` with UTC attached if naive: SQLite gives naive datetimes back."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def age_of(now: dt.datetime | None, then: dt.datetime | None) -> float | None:
    """Seconds from ``then`` to ``now`` (``now`` read from the database), at least 0."""
    now, then = aware(now), aware(then)
    if now is None or then is None:
        return None
    return max(0.0, (now - then).total_seconds())


def event_of(row: Mapping[Any, Any], prefix: str = "") -> DomainEvent:
    """The DomainEvent of an outbox event row (its columns named ``prefix + column``).

    The row's JSON values are taken over by the event (``DomainEvent.from_stored``):
    pass a row just read, not values anything else keeps using.
    """
    occurred_at = aware(row[prefix + "occurred_at"])
    assert occurred_at is not None  # NOT NULL
    # NULL (a row written before the column existed) is version 1; the Debezium shape
    # stores it as text.
    version = row.get(prefix + "schema_version")
    return DomainEvent.from_stored(
        id=row[prefix + "id"],
        name=row[prefix + "name"],
        aggregate_type=row[prefix + "aggregate_type"],
        aggregate_id=row[prefix + "aggregate_id"],
        payload=row[prefix + "payload"] or {},
        occurred_at=occurred_at,
        metadata=row[prefix + "metadata"] or {},
        schema_version=1 if version is None else int(version),
    )


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """A claimed delivery: the event, where it goes, and which attempt this is.

    ``event`` is as stored (its stored schema version); ``replay`` is True for a
    delivery made by a replay (``Outbox.replay``, ``backfill``).
    """

    id: int
    destination: str
    attempts: int
    event: DomainEvent
    replay: bool = False


COMPLETIONS = ("keep", "delete", "archive")

# What a partitioned outbox's partitions span (PostgreSQL's date_trunc units).
PARTITION_PERIODS = ("day", "week", "month")


class OutboxTables:
    """The outbox tables in ``metadata`` (declared, or reused if already there).

    Also builds the statements the operations share: the INSERT of delivery rows,
    the condition that makes a row due, PostgreSQL's one-statement claim.

    ``completion`` says what becomes of a delivery row once delivered: ``"keep"`` it
    (status ``delivered``, until the retention purge), ``"delete"`` it at once, or
    ``"archive"`` it: move it to ``<table_name>_delivery_archive`` (declared here too),
    where no relay or commit reads or locks it (the dashboard reads it).

    ``partition_by`` (PostgreSQL only): ``"day"``, ``"week"`` or ``"month"`` makes both
    tables ``PARTITION BY RANGE`` on the event's ``occurred_at`` (the delivery table
    carries it as ``event_occurred_at``), so old events and their deliveries go by
    detaching and dropping a partition instead of deleting rows
    (:mod:`alchemium.events.outbox_partitions`). A partitioned table's keys must hold
    the partition key: the events' primary key is ``(sequence, occurred_at)`` and
    ``id`` is unique with ``occurred_at``; the deliveries' key is ``(id,
    event_occurred_at)``. A partitioned outbox has no foreign key from deliveries to
    events: with one, attaching a new partition waits for every transaction writing
    to the outbox (it locks the other table ``SHARE ROW EXCLUSIVE``). Both tables are
    written together by :meth:`~alchemium.events.outbox.Outbox.write` and emptied
    together by the purge and by dropping partitions.
    """

    def __init__(
        self,
        metadata: MetaData,
        *,
        table_name: str = "alchemium_outbox",
        schema: str | None = None,
        shape: str = "alchemium",
        completion: str = "keep",
        partition_by: str | None = None,
    ) -> None:
        if partition_by is not None and partition_by not in PARTITION_PERIODS:
            raise OutboxError(
                f"Outbox(partition_by={partition_by!r}): expected one of "
                f"{', '.join(PARTITION_PERIODS)}, or None"
            )
        if partition_by is not None and shape != "alchemium":
            raise OutboxError(
                f"Outbox(shape={shape!r}, partition_by={partition_by!r}): a partitioned "
                "outbox has alchemium's shape only (Debezium's outbox router reads one table)"
            )
        if shape not in SHAPES:
            raise OutboxError(f"Outbox(shape={shape!r}): expected one of {', '.join(SHAPES)}")
        if completion not in COMPLETIONS:
            raise OutboxError(
                f"Outbox(completion={completion!r}): expected one of {', '.join(COMPLETIONS)}"
            )
        self.metadata = metadata
        self.shape = shape
        self.completion = completion
        self.partition_by = partition_by
        self.archive: Table | None = None
        events = existing_table(metadata, table_name, schema)
        deliveries = existing_table(metadata, f"{table_name}_delivery", schema)
        if events is not None and deliveries is not None:
            if ("event_occurred_at" in deliveries.c) != (partition_by is not None):
                raise OutboxError(
                    f"Outbox(partition_by={partition_by!r}): the tables {table_name!r} already "
                    f"declared on this MetaData are "
                    f"{'partitioned' if partition_by is None else 'not partitioned'}"
                )
            self.events, self.deliveries = events, deliveries
            self._declare_archive(table_name, schema)
            return
        # Column *keys* are alchemium's names in both shapes, so every statement reads
        # the same; the Debezium shape only changes the names in the database.
        names = SHAPES[shape]
        partitioned = partition_by is not None
        self.events = Table(
            table_name,
            metadata,
            Column("sequence", BigId, primary_key=True, autoincrement=True),
            Column("id", Uuid(), nullable=False, unique=not partitioned),
            Column(names["name"], String(200), nullable=False, key="name"),
            Column(names["aggregate_type"], String(100), nullable=False, key="aggregate_type"),
            Column(names["aggregate_id"], String(200), nullable=False, key="aggregate_id"),
            Column("payload", JsonDocument, nullable=False),
            Column("metadata", JsonDocument, nullable=False),
            Column("occurred_at", DateTime(timezone=True), nullable=False, primary_key=partitioned),
            *(
                [
                    Column("tracingspancontext", Text, nullable=True, key="tracing"),
                    Column("schemaversion", String(50), nullable=False, key="schema_version"),
                ]
                if shape == "debezium"
                # NULL: written before schema versions existed, i.e. version 1.
                else [Column("schema_version", Integer, nullable=True)]
            ),
            *(
                [UniqueConstraint("id", "occurred_at", name=f"uq_{table_name}_id")]
                if partitioned
                else []
            ),
            schema=schema,
            **self._partitioning("occurred_at"),
        )
        # Partitioned: the event's occurred_at, the deliveries' partition key, so an event
        # and its deliveries are in partitions of the same period and go together.
        event_key: list[Any] = (
            [Column("event_occurred_at", DateTime(timezone=True), primary_key=True)]
            if partitioned
            else []
        )
        self.deliveries = Table(
            f"{table_name}_delivery",
            metadata,
            Column("id", BigId, primary_key=True, autoincrement=True),
            *event_key,
            Column(
                "event_id",
                Uuid(),
                *([] if partitioned else [ForeignKey(self.events.c.id, ondelete="CASCADE")]),
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
            # Set (database clock) when a replay made this delivery; publishers see
            # metadata["replay"] = True.
            Column("replayed_at", DateTime(timezone=True), nullable=True),
            # True while the destination's fallback handler has yet to run for this dead
            # or abandoned row (alchemium.events.policies).
            Column("fallback_pending", Boolean, nullable=True),
            UniqueConstraint(
                "event_id",
                "destination",
                *(["event_occurred_at"] if partitioned else []),
                name=f"uq_{table_name}_delivery_event",
            ),
            schema=schema,
            **self._partitioning("event_occurred_at"),
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
        # Deliveries per minute (the dashboard's chart) read delivered rows by time;
        # without it the chart scans every row kept for retention. (The purge picks
        # events by the occurred_at index below, not by delivered_at.)
        delivered = text("status = 'delivered'")
        Index(
            f"ix_{table_name}_delivery_delivered",
            self.deliveries.c.delivered_at,
            postgresql_where=delivered,
            sqlite_where=delivered,
        )
        Index(f"ix_{table_name}_occurred", self.events.c.occurred_at)
        self._declare_archive(table_name, schema)

    def _partitioning(self, column: str) -> dict[str, Any]:
        """The Table options that partition it by ``column`` (none if not partitioned)."""
        if self.partition_by is None:
            return {}
        return {"postgresql_partition_by": f"RANGE ({column})"}

    def _declare_archive(self, table_name: str, schema: str | None) -> None:
        """With ``completion="archive"``: the table delivered rows move to (its columns)."""
        if self.completion != "archive":
            return
        name = f"{table_name}_delivery_archive"
        archive = existing_table(self.metadata, name, schema)
        if archive is None:
            archive = Table(
                name,
                self.metadata,
                *(Column(c.name, c.type, nullable=c.nullable) for c in self.deliveries.c),
                schema=schema,
            )
            Index(f"ix_{name}_event", archive.c.event_id)
            # The dashboard's deliveries per minute read the archive by time.
            Index(f"ix_{name}_delivered", archive.c.delivered_at)
        self.archive = archive

    def event_of_delivery(self, deliveries: Any, events: Any) -> Any:
        """The condition joining delivery rows to their event (aliases welcome).

        Partitioned, it also matches the partition key, so PostgreSQL looks the event up
        in one partition instead of probing every partition's index.
        """
        condition = events.c.id == deliveries.c.event_id
        if self.partition_by is None:
            return condition
        return and_(condition, events.c.occurred_at == deliveries.c.event_occurred_at)

    def delivery_key(self, event: DomainEvent) -> dict[str, Any]:
        """The columns a delivery row of ``event`` gets from it besides its id (partitioned)."""
        return {} if self.partition_by is None else {"event_occurred_at": event.occurred_at}

    def shape_values(self, event: DomainEvent) -> dict[str, Any]:
        """The values of the shape's own event columns (none for alchemium's shape).

        Debezium shape: ``tracingspancontext`` holds the W3C trace context as Java
        properties (``traceparent=...``, what Debezium's outbox event router reads),
        ``schemaversion`` the payload's schema version.
        """
        if self.shape != "debezium":
            return {}
        trace = trace_context_of(event)
        return {
            "tracing": "\n".join(f"{k}={v}" for k, v in trace.items()) or None,
            "schema_version": schema_version_of(event),
        }

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

    async def events_by_id(self, conn: Executor, ids: set[Any]) -> dict[Any, DomainEvent]:
        """The stored events with these ids (one SELECT), as DomainEvents by id."""
        e = self.events
        # Labelled by key: alchemium's names in both shapes (see ``Outbox(shape=...)``).
        rows = await conn.execute(select(*(c.label(c.key) for c in e.c)).where(e.c.id.in_(ids)))
        return {row.id: event_of(row._mapping) for row in rows}

    def insert_deliveries(self, lease: float) -> Any:
        """The INSERT of delivery rows: due now, claimed ones leased, on the database clock."""
        claimed = bindparam("claim_now", type_=Boolean())
        return insert(self.deliveries).values(
            next_attempt_at=database_now(),
            claimed_until=case((claimed, database_now(lease)), else_=null()),
        )

    # -- choosing rows ----------------------------------------------------------------------

    def due(self, destinations: Sequence[str], ordered: bool) -> Any:
        """Rows of ``destinations`` a relay may claim now (by the database's clock)."""
        return and_(self.deliveries.c.destination.in_(destinations), self.due_now(ordered))

    def due_now(self, ordered: bool) -> Any:
        """Rows a relay may claim now, of any destination (:meth:`due` without them).

        The statuses are constants (:func:`status_constant`): a relay runs its claim
        every round, and PostgreSQL may cache a generic plan for it.
        """
        d = self.deliveries
        now = database_now()
        condition = and_(
            # Implied by the OR below; spelled out so the planner can prove it and walk
            # the partial "due" index instead of the primary key past delivered rows.
            d.c.status.in_(UNDELIVERED_SQL),
            or_(
                and_(d.c.status == PENDING_SQL, d.c.next_attempt_at <= now),
                and_(d.c.status == CLAIMED_SQL, d.c.claimed_until < now),
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
                    earlier.c.status != status_constant(DELIVERED),
                ),
            )
        return condition

    def claim_statement(self, destinations: Sequence[str], ordered: bool) -> Any:
        """PostgreSQL's claim, one statement: lock the due rows, claim them, read their events.

        A materialized CTE runs the locking SELECT exactly once; as a plain ``IN
        (subquery)`` the planner may re-run it and claim more than ``limit``. Parameters:
        ``limit``, ``token``, ``lease`` (seconds), ``claimed_by``; "now" is the database's.
        """
        d, e = self.deliveries, self.events
        # Partitioned: the rows are picked and updated by (id, partition key), so each
        # update finds its row in one partition instead of probing every partition.
        key = [d.c.id] if self.partition_by is None else [d.c.id, d.c.event_occurred_at]
        limit = bindparam("limit", type_=Integer())
        if len(destinations) == 1:
            # Due order is the order of the "due" index (destination, next_attempt_at):
            # the scan stops after ``limit`` rows, with millions of delivered rows kept
            # for retention or a backlog of millions pending.
            picked = (
                select(*key)
                .where(self.due(destinations, ordered))
                .order_by(d.c.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .cte("picked")
                .prefix_with("MATERIALIZED")
            )
        else:
            # With several destinations "destination IN (...)" would make PostgreSQL
            # read and sort every due row of them all, each round (measured: a relay of
            # three destinations drained a backlog at half the speed of one). Instead,
            # each destination's first ``limit`` due rows (locked, by the index), then
            # the first ``limit`` of those. Rows locked and not picked are let go when
            # the statement ends.
            served = values(column("destination", String()), name="served").data(
                [(name,) for name in destinations]
            )
            first = (
                select(*key, d.c.next_attempt_at.label("due_at"))
                .where(d.c.destination == served.c.destination, self.due_now(ordered))
                .order_by(d.c.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .lateral("first_due")
            )
            picked = (
                select(*(first.c[c.key] for c in key))
                .select_from(served.join(first, true()))
                .order_by(first.c.due_at)
                .limit(limit)
                .cte("picked")
                .prefix_with("MATERIALIZED")
            )
        claimed = (
            update(d)
            .where(
                d.c.id.in_(select(picked.c.id))
                if self.partition_by is None
                else tuple_(*key).in_(select(*(picked.c[c.key] for c in key)))
            )
            .values(
                status=CLAIMED,
                claim_token=bindparam("token", type_=d.c.claim_token.type),
                claimed_until=database_now(bindparam("lease", type_=Float())),
                claimed_by=bindparam("claimed_by", type_=d.c.claimed_by.type),
                attempts=d.c.attempts + 1,
            )
            .returning(
                d.c.id,
                d.c.event_id,
                *([d.c.event_occurred_at] if self.partition_by is not None else []),
                d.c.destination,
                d.c.attempts,
                d.c.replayed_at,
            )
            .cte("claimed")
        )
        return (
            select(
                claimed.c.id,
                claimed.c.destination,
                claimed.c.attempts,
                claimed.c.replayed_at,
                *(c.label(f"event_{c.key}") for c in e.c),
            )
            .join(e, self.event_of_delivery(claimed, e))
            .order_by(claimed.c.id)
        )

    def occurred_at_of_row(self) -> Any:
        """The ``occurred_at`` of a delivery row's event, as a correlated subquery.

        One unique-index lookup per undelivered row: the lag costs the same with
        millions of delivered rows (and their events) kept as with none, where a join
        may make the planner hash the whole events table.
        """
        d, e = self.deliveries, self.events
        return select(e.c.occurred_at).where(self.event_of_delivery(d, e)).scalar_subquery()

    def due_since(self, now: Any) -> Any:
        """When an undelivered row became due (NULL if it is not due at ``now``)."""
        d = self.deliveries
        return case(
            (and_(d.c.status == PENDING_SQL, d.c.next_attempt_at <= now), d.c.next_attempt_at),
            (and_(d.c.status == CLAIMED_SQL, d.c.claimed_until < now), d.c.claimed_until),
            else_=null(),
        )
