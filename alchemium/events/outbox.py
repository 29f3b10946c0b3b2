"""The transactional outbox: writing events at commit, claiming and completing deliveries.

:class:`Outbox` is what units of work and relays use: ``write`` inserts the events
and their delivery rows in the committing transaction; ``claim``, ``renew``,
``mark_delivered`` and ``mark_failed`` are the relay's round (claim-token fencing,
leases on the database's clock). The tables, the row states and the statements they
share are in :mod:`alchemium.events.outbox_schema`; what operators ask and do
(status, lag, dead letters, requeue, purge, backfill) is inherited from
:class:`~alchemium.events.outbox_admin.OutboxAdministration`, and a partitioned
outbox's partitions are managed by
:class:`~alchemium.events.outbox_partitions.OutboxPartitions`. All SQL of the outbox
lives in these modules; the relay and the after-commit dispatch only decide
what to do with the results.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    MetaData,
    Uuid,
    any_,
    bindparam,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from alchemium.domain_event import DomainEvent
from alchemium.encoding import plain_json
from alchemium.errors import OutboxError
from alchemium.events.outbox_admin import (
    DestinationStatus,
    OutboxAdministration,
    OutboxStatus,
    OverdueDestination,
    run_completion,
)
from alchemium.events.outbox_schema import (
    CLAIMED,
    DEAD,
    PENDING,
    DeliveryRow,
    Executor,
    database_now,
    dialect_of,
    event_of,
)
from alchemium.events.tables import create_tables

__all__ = [
    "DISPATCH_LEASE",
    "DeliveryRow",
    "DestinationStatus",
    "Outbox",
    "OutboxStatus",
    "OverdueDestination",
    "autocommit",
    "create_outbox_tables",
    "database_now",
    "default_outbox",
    "disable_outbox",
    "enable_outbox",
]


async def autocommit(session: AsyncSession) -> Executor:
    """Where to run one statement that needs no transaction: one round trip, not three.

    On PostgreSQL, with a session that checks out its own pooled connection, that
    connection switched to autocommit (no BEGIN, no COMMIT; SQLAlchemy restores its
    isolation level when it goes back to the pool). Otherwise the session itself: a
    session bound to an outside Connection must stay in its transaction, and SQLite's
    driver sends no BEGIN of its own anyway. Call it first in a fresh session
    transaction. Commit the session afterwards when it is what was returned; when the
    connection was, its statements are committed already, and ``session.commit()``
    only costs CPU (a relay skips it every round).
    """
    bind = session.get_bind()
    if isinstance(bind, Engine) and bind.dialect.name == "postgresql":
        return await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    return session


_ONE_STATEMENT_EVENTS = 100  # at most this many events (and delivery rows) in one statement

DISPATCH_LEASE = 300.0  # default seconds an after-commit dispatch's claim keeps the relay away


class Outbox(OutboxAdministration):
    """The outbox tables in ``metadata`` and the statements that use them.

    Add it to the metadata your migrations and ``create_all`` use::

        outbox = enable_outbox(Base.metadata)   # also makes it the default outbox

    Args:
        metadata: the ``MetaData`` the two tables are declared in (or found in).
        table_name: the events table; the delivery table is ``<table_name>_delivery``.
        channel: the PostgreSQL NOTIFY channel relays LISTEN on.
        schema: the schema of both tables.
        dispatch_lease: seconds the rows of a commit's in-process subscribers stay
            claimed for its after-commit dispatch; if the process dies before marking
            them, the relay delivers them again once this has passed.
        mark_window: seconds within which the "delivered" marks of many commits are
            written by one UPDATE in the background (see ``alchemium.events.marks``);
            0 writes each commit's mark at once, in the committing task.
        shape: ``"alchemium"`` (default) or ``"debezium"``: the events table named like
            Debezium's outbox event router reads it (``id``, ``aggregatetype``,
            ``aggregateid``, ``type``, ``payload``, ``tracingspancontext``,
            ``schemaversion``), so change data capture can take over from the relay
            (docs/outbox-cdc.md). The delivery table and the relay are the same.
        completion: what a delivered row becomes: ``"keep"`` (status ``delivered``,
            until the retention purge), ``"delete"`` (deleted at once; its event goes
            with the purge), ``"archive"`` (moved to ``<table_name>_delivery_archive``).
        partition_by: PostgreSQL only: ``"day"``, ``"week"`` or ``"month"`` partitions
            both tables by the events' ``occurred_at``, so retention drops whole periods
            instead of deleting rows (:mod:`alchemium.events.outbox_partitions`,
            docs/relay.md "A partitioned outbox"). None (default): plain tables.
    """

    def __init__(
        self,
        metadata: MetaData,
        *,
        table_name: str = "alchemium_outbox",
        channel: str = "alchemium_outbox",
        schema: str | None = None,
        dispatch_lease: float = DISPATCH_LEASE,
        mark_window: float = 0.05,
        shape: str = "alchemium",
        completion: str = "keep",
        partition_by: str | None = None,
    ) -> None:
        super().__init__(
            metadata,
            table_name=table_name,
            schema=schema,
            shape=shape,
            completion=completion,
            partition_by=partition_by,
        )
        if dispatch_lease <= 0 or mark_window < 0:
            raise OutboxError(
                f"Outbox(dispatch_lease={dispatch_lease!r}, mark_window={mark_window!r}): the "
                "lease must be > 0 seconds and the window >= 0 seconds"
            )
        self.channel = channel
        self.dispatch_lease = dispatch_lease
        self.mark_window = mark_window
        # Statements built once, by what they are for (see _built): a relay claims and
        # marks with the same statements every round; only their parameters change.
        self._statements: dict[tuple[Any, ...], Any] = {}

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
        written = [
            {
                "id": e.id,
                "name": e.name,
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "payload": plain_json(e.payload),
                "metadata": plain_json(e.metadata),
                "occurred_at": e.occurred_at,
                "schema_version": e.schema_version,
                **self.shape_values(e),
            }
            for e in events
        ]
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
                **self.delivery_key(e),
            }
            for e, destination, claim_now in deliveries
        ]
        dialect = session.get_bind().dialect.name
        postgresql = dialect == "postgresql"
        if self.partition_by is not None and not postgresql:
            raise OutboxError(
                f"Outbox(partition_by={self.partition_by!r}) is PostgreSQL only; this unit of "
                f"work runs on {dialect}"
            )
        small = len(written) <= _ONE_STATEMENT_EVENTS and len(rows) <= _ONE_STATEMENT_EVENTS
        with self.partition_errors(events):
            if postgresql and rows and small:
                # One round trip: the events INSERT rides in a data-modifying CTE of the
                # deliveries INSERT (the foreign key is checked at the end of the statement).
                session.execute(self._insert_all(written, rows, lease))
            else:
                session.execute(insert(self.events), written)
                if rows:
                    session.execute(self.insert_deliveries(lease), rows)
        if notify and rows and postgresql:
            session.execute(select(func.pg_notify(self.channel, "")))
        return len(rows)

    def _insert_all(
        self, written: list[dict[str, Any]], rows: list[dict[str, Any]], lease: float
    ) -> Any:
        """PostgreSQL: ``WITH e AS (INSERT events ...) INSERT deliveries ...``, one statement."""
        events = insert(self.events).values(written).cte("written_events")
        now, until = database_now(), database_now(lease)
        return (
            insert(self.deliveries)
            .values(
                [
                    {
                        **{k: v for k, v in row.items() if k != "claim_now"},
                        "next_attempt_at": now,
                        "claimed_until": until if row["claim_now"] else None,
                    }
                    for row in rows
                ]
            )
            .add_cte(events)
        )

    # -- claiming and completing ------------------------------------------------------------

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
        if dialect_of(conn) == "postgresql":
            stmt = self._built(
                ("claim", tuple(destinations), ordered),
                lambda: self.claim_statement(destinations, ordered),
            )
            params = {
                "limit": limit,
                "token": token,
                "lease": float(lease),
                "claimed_by": claimed_by,
            }
            return [
                DeliveryRow(
                    r.id,
                    r.destination,
                    r.attempts,
                    event_of(r._mapping, "event_"),
                    r.replayed_at is not None,
                )
                for r in (await conn.execute(stmt, params)).all()
            ]
        due = (
            select(d.c.id)
            .where(self.due(destinations, ordered))
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
        returned = (d.c.id, d.c.event_id, d.c.destination, d.c.attempts, d.c.replayed_at)
        stmt = update(d).where(d.c.id.in_(due.scalar_subquery())).values(**values)
        claimed = (await conn.execute(stmt.returning(*returned))).all()
        if not claimed:
            return []
        events = await self.events_by_id(conn, {c.event_id for c in claimed})
        return [
            DeliveryRow(
                c.id,
                c.destination,
                c.attempts,
                events[c.event_id],
                c.replayed_at is not None,
            )
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
        if ids is not None and not ids:
            return 0
        dialect = dialect_of(conn)

        def build() -> list[Any]:
            d = self.deliveries
            where = [d.c.claim_token == bindparam("token"), d.c.status == CLAIMED]
            if ids is not None:
                where.append(self._any_of(d.c.id, "ids", BigInteger(), dialect))
            return self.completion_statements(dialect, *where)

        statements = self._built(("delivered", dialect, ids is not None), build)
        params: dict[str, Any] = {"token": token}
        if ids is not None:
            params["ids"] = list(ids)
        return await run_completion(conn, statements, params)

    async def mark_delivered_tokens(self, conn: Executor, tokens: Sequence[uuid.UUID]) -> int:
        """Mark every row still claimed under one of ``tokens`` delivered; returns how many."""
        if not tokens:
            return 0
        dialect = dialect_of(conn)

        def build() -> list[Any]:
            d = self.deliveries
            by_token = self._any_of(d.c.claim_token, "tokens", Uuid(), dialect)
            return self.completion_statements(dialect, d.c.status == CLAIMED, by_token)

        statements = self._built(("delivered_tokens", dialect), build)
        return await run_completion(conn, statements, {"tokens": list(tokens)})

    def _built(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """The statement(s) ``build`` makes, built on the first call for ``key`` only.

        Building a statement (and its cache key) costs more client CPU than the round
        trip that sends it; the hot paths' statements take their values as bind
        parameters, so one built statement serves every call.
        """
        built = self._statements.get(key)
        if built is None:
            built = self._statements[key] = build()
        return built

    @staticmethod
    def _any_of(column: Any, name: str, item_type: Any, dialect: str) -> Any:
        """``column`` is one of the list bound as ``name``: one array parameter on
        PostgreSQL (not one per value), an expanding ``IN`` elsewhere."""
        if dialect == "postgresql":
            return column == any_(bindparam(name, type_=ARRAY(item_type)))
        return column.in_(bindparam(name, expanding=True))

    async def mark_delivered_by_destination(
        self, conn: Executor, token: uuid.UUID, pairs: Sequence[tuple[uuid.UUID, str]]
    ) -> int:
        """Mark the (event id, destination) rows claimed under ``token`` delivered."""
        if not pairs:
            return 0
        d = self.deliveries
        return await self.complete(
            conn,
            d.c.claim_token == token,
            d.c.status == CLAIMED,
            tuple_(d.c.event_id, d.c.destination).in_(list(pairs)),
        )

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
    tables = [outbox.events, outbox.deliveries]
    if outbox.archive is not None:
        tables.append(outbox.archive)
    await create_tables(engine, outbox.metadata, tables)
