"""What operators ask of the outbox and do to it: status, lag, dead letters, requeue, purge.

:class:`OutboxAdministration` is the half of :class:`~alchemium.events.outbox.Outbox`
that the CLI (``alchemium outbox ...``), dashboards and scripts use; the commit and
the relay use the other half (``outbox.py``). Every time is the database's clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Integer,
    String,
    and_,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from alchemium.events.marks import flush_marks_before_reading
from alchemium.events.outbox_schema import (
    CLAIMED,
    DEAD,
    DELIVERED,
    PENDING,
    Executor,
    OutboxTables,
    age_of,
    database_now,
    dialect_of,
)

__all__ = ["DestinationStatus", "OutboxAdministration", "OutboxStatus", "OverdueDestination"]


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


class OutboxAdministration(OutboxTables):
    """Status, lag and maintenance of the outbox tables; :class:`Outbox` inherits them."""

    async def settle_marks(self, conn: Executor) -> None:
        """Write this process's queued "delivered" marks of after-commit dispatches first.

        The reads of the delivery states call it, so a status read right after a
        commit in the same process shows what the commit's subscribers did (see
        :mod:`alchemium.events.marks`).
        """
        await flush_marks_before_reading(self, conn.in_transaction(), dialect_of(conn))

    async def status(
        self, conn: Executor, destinations: Sequence[str] | None = None
    ) -> OutboxStatus:
        """Counts by state over ``destinations`` (all if None) and the lag (see OutboxStatus).

        The totals of :meth:`destination_status`; counting reads every delivery row.
        """
        return OutboxStatus.total(await self.destination_status(conn, destinations))

    async def destination_status(
        self, conn: Executor, destinations: Sequence[str] | None = None
    ) -> list[DestinationStatus]:
        """One :class:`DestinationStatus` per destination with rows, ordered by name.

        Two statements: counts by destination and state (reads every delivery row,
        delivered ones kept for retention included), then the lag and the overdue
        time of the undelivered rows, on the database's clock.
        """
        await self.settle_marks(conn)
        d = self.deliveries
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
            destination: (age_of(db_now, oldest), age_of(db_now, due_since))
            for destination, oldest, due_since, db_now in (
                await conn.execute(
                    select(
                        d.c.destination,
                        func.min(self.occurred_at_of_row()),
                        func.min(self.due_since(now)),
                        now,
                    )
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
        await self.settle_marks(conn)
        d = self.deliveries
        where = [d.c.destination.in_(destinations)] if destinations else []
        oldest, now = (
            await conn.execute(
                select(func.min(self.occurred_at_of_row()), database_now()).where(
                    d.c.status.in_((PENDING, CLAIMED)), *where
                )
            )
        ).one()
        return age_of(now, oldest)

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
            select(d.c.destination, func.count(), func.min(self.due_since(now)), now)
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
            OverdueDestination(destination, int(n), age_of(db_now, since) or 0.0)
            for destination, n, since, db_now in rows
        ]

    async def undelivered(self, conn: Executor, destinations: Sequence[str]) -> int:
        """How many rows of ``destinations`` are pending or claimed (none if no destination)."""
        if not destinations:
            return 0
        await self.settle_marks(conn)
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
                e.c.name.label("name"),  # "type" in the Debezium shape
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
        """Give up on dead deliveries: completed like delivered rows, their error kept."""
        d = self.deliveries
        return await self.complete(conn, d.c.status == DEAD, d.c.id.in_(ids), keep_claim=True)

    async def complete(self, conn: Executor, *where: Any, keep_claim: bool = False) -> int:
        """Complete the rows matching ``where`` as delivered, by the outbox's ``completion``.

        ``keep``: status ``delivered`` and ``delivered_at`` the database's now (the claim
        cleared unless ``keep_claim``). ``delete``: the rows are deleted. ``archive``:
        moved to the archive table, delivered (one statement on PostgreSQL; an INSERT
        and a DELETE in the caller's transaction on SQLite). Returns how many rows.
        """
        d = self.deliveries
        if self.completion == "keep":
            values: dict[str, Any] = {"status": DELIVERED, "delivered_at": database_now()}
            if not keep_claim:
                values |= {"claim_token": None, "claimed_until": None}
            stmt = update(d).where(*where).values(**values)
            return int(getattr(await conn.execute(stmt), "rowcount", 0))
        if self.completion == "delete":
            return int(getattr(await conn.execute(delete(d).where(*where)), "rowcount", 0))
        archive = self.archive
        assert archive is not None
        names = [c.name for c in d.c]
        if dialect_of(conn) == "postgresql":
            moved = delete(d).where(*where).returning(*d.c).cte("moved")
            source: Any = moved
        else:
            source = d
        done = {"status": literal(DELIVERED, String), "delivered_at": database_now()}
        rows = select(*(done.get(n, source.c[n]) for n in names))
        if source is d:
            rows = rows.where(*where)
        inserted = await conn.execute(insert(archive).from_select(names, rows))
        if source is d:
            await conn.execute(delete(d).where(*where))
        return int(getattr(inserted, "rowcount", 0))

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
        """Delete up to ``batch_size`` events older than ``older_than`` seconds, and their rows.

        Only events every delivery row of which is delivered (or that have none) go:
        pending, claimed and dead rows, and their events, are never touched. Returns
        the number of delivery rows deleted; call again until it returns 0. An event's
        age is read from its ``occurred_at`` (the writer's clock) against the
        database's now: retention, not a comparison anything is decided by.

        The events are chosen by the ``occurred_at`` index, oldest first, each checked
        for undelivered rows by the (event, destination) unique index, and locked
        ``SKIP LOCKED``: a purge costs the same with millions of rows kept as with
        none, whether or not anything is left to purge, and never waits for a relay.
        """
        d, e = self.deliveries, self.events
        picked = (
            select(e.c.id)
            .where(
                e.c.occurred_at < database_now(-older_than),
                ~exists().where(d.c.event_id == e.c.id, d.c.status != DELIVERED),
            )
            .order_by(e.c.occurred_at)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
        ids = list((await conn.execute(picked)).scalars())
        if not ids:
            return 0
        removed = int(
            getattr(await conn.execute(delete(d).where(d.c.event_id.in_(ids))), "rowcount", 0)
        )
        await conn.execute(delete(e).where(e.c.id.in_(ids)))
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
