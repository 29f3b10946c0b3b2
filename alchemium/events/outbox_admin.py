"""What operators ask of the outbox and do to it: status, lag, dead letters, requeue, purge.

:class:`OutboxAdministration` is the half of :class:`~alchemium.events.outbox.Outbox`
that the CLI (``alchemium outbox ...``), dashboards and scripts use; the commit and
the relay use the other half (``outbox.py``). Every time is the database's clock.
Replay, filtered requeue and giving up are inherited from
:class:`~alchemium.events.outbox_lifecycle.OutboxLifecycle`.

Why this module is long (about 1,000 lines): it is the one place of every statement an
operator runs on the outbox: the CLI's (status, lag, requeue, purge, backfill) and,
at the end of the class, the operations dashboard's (the overview with its
PostgreSQL estimates, throughput, leases, one event, dead letters, blocked
aggregates, and requeue/discard that refuse rows changed meanwhile). Keeping them in
one class keeps the outbox's SQL in the modules named in outbox.py.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    String,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)

from alchemium.errors import ConcurrencyConflictError
from alchemium.events.marks import flush_marks_before_reading
from alchemium.events.outbox_lifecycle import OutboxLifecycle
from alchemium.events.outbox_schema import (
    ABANDONED,
    CLAIMED,
    CLAIMED_SQL,
    DEAD,
    DELIVERED,
    PENDING,
    PENDING_SQL,
    UNDELIVERED_SQL,
    Executor,
    age_of,
    aware,
    database_now,
    dialect_of,
)
from alchemium.events.subscribers import SubscriberRegistry

__all__ = [
    "BlockedAggregate",
    "DeadSelection",
    "DeliveryChangedError",
    "DestinationStatus",
    "OutboxAdministration",
    "OutboxOverview",
    "OutboxStatus",
    "OverdueDestination",
    "RelayLease",
    "Throughput",
    "run_completion",
]


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
    abandoned: int = 0

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
            abandoned=sum(s.abandoned for s in destinations),
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
    abandoned: int = 0


@dataclass(frozen=True, slots=True)
class OverdueDestination:
    """A destination with ``rows`` rows due for more than a threshold (see ``Outbox.overdue``).

    ``overdue`` is how long the oldest of them has been due, in seconds on the
    database clock.
    """

    destination: str
    rows: int
    overdue: float


async def run_completion(
    conn: Executor, statements: Sequence[Any], params: dict[str, Any] | None = None
) -> int:
    """Run :meth:`OutboxAdministration.completion_statements` in order; how many rows the
    first one completed (the archive's INSERT, when there are two)."""
    completed = 0
    for i, statement in enumerate(statements):
        result = await conn.execute(statement, params)
        if i == 0:
            completed = int(getattr(result, "rowcount", 0))
    return completed


class OutboxAdministration(OutboxLifecycle):
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
                abandoned=by_state.get(ABANDONED, 0),
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
                    d.c.status.in_(UNDELIVERED_SQL), *where
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
                d.c.status.in_(UNDELIVERED_SQL),
                or_(
                    and_(d.c.status == PENDING_SQL, d.c.next_attempt_at < cutoff),
                    and_(d.c.status == CLAIMED_SQL, d.c.claimed_until < cutoff),
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
            d.c.destination.in_(destinations), d.c.status.in_(UNDELIVERED_SQL)
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
            .select_from(d.join(e, self.event_of_delivery(d, e)))
            .where(d.c.status == DEAD)
            .order_by(d.c.id)
            .limit(limit)
        )
        return [dict(r._mapping) for r in rows]

    async def requeue(
        self, conn: Executor, *, ids: Sequence[int] | None = None, destination: str | None = None
    ) -> int:
        """Put dead deliveries back to pending with attempts reset; returns how many.

        Abandoned ones stay abandoned; :meth:`requeue_matching` has every filter.
        """
        return await self.requeue_matching(conn, ids=ids, destination=destination)

    async def discard(self, conn: Executor, ids: Sequence[int]) -> int:
        """Give up on dead or abandoned deliveries: completed like delivered rows, their
        error kept (so their events can be purged, and their aggregates unblock)."""
        d = self.deliveries
        return await self.complete(
            conn, d.c.status.in_((DEAD, ABANDONED)), d.c.id.in_(ids), keep_claim=True
        )

    async def complete(self, conn: Executor, *where: Any, keep_claim: bool = False) -> int:
        """Complete the rows matching ``where`` as delivered, by the outbox's ``completion``.

        ``keep``: status ``delivered`` and ``delivered_at`` the database's now (the claim
        cleared unless ``keep_claim``). ``delete``: the rows are deleted. ``archive``:
        moved to the archive table, delivered (one statement on PostgreSQL; an INSERT
        and a DELETE in the caller's transaction on SQLite). Returns how many rows.
        """
        statements = self.completion_statements(dialect_of(conn), *where, keep_claim=keep_claim)
        return await run_completion(conn, statements)

    def completion_statements(
        self, dialect: str, *where: Any, keep_claim: bool = False
    ) -> list[Any]:
        """The statements :meth:`complete` runs, in order, for ``dialect``.

        Built apart from running them so that a caller on a hot path (a relay's marks)
        can build them once with bind parameters in ``where`` and run them every round.
        """
        d = self.deliveries
        if self.completion == "keep":
            values: dict[str, Any] = {"status": DELIVERED, "delivered_at": database_now()}
            if not keep_claim:
                values |= {"claim_token": None, "claimed_until": None}
            return [update(d).where(*where).values(**values)]
        if self.completion == "delete":
            return [delete(d).where(*where)]
        archive = self.archive
        assert archive is not None
        names = [c.name for c in d.c]
        if dialect == "postgresql":
            moved = delete(d).where(*where).returning(*d.c).cte("moved")
            source: Any = moved
        else:
            source = d
        done = {"status": literal(DELIVERED, String), "delivered_at": database_now()}
        rows = select(*(done.get(n, source.c[n]) for n in names))
        if source is d:
            rows = rows.where(*where)
        statements: list[Any] = [insert(archive).from_select(names, rows)]
        if source is d:
            statements.append(delete(d).where(*where))
        return statements

    async def blocked_aggregates(self, conn: Executor) -> list[tuple[str, str, str]]:
        """(destination, aggregate type, aggregate id) held up by a dead or abandoned
        delivery (ordered mode)."""
        d = self.deliveries
        rows = await conn.execute(
            select(d.c.destination, d.c.aggregate_type, d.c.aggregate_id)
            .where(d.c.status.in_((DEAD, ABANDONED)))
            .distinct()
            .order_by(d.c.destination, d.c.aggregate_type, d.c.aggregate_id)
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def purge(self, conn: Executor, *, older_than: float, batch_size: int = 1000) -> int:
        """Delete up to ``batch_size`` events older than ``older_than`` seconds, and their rows.

        Only events every delivery row of which is delivered (or that have none) go:
        pending, claimed, dead and abandoned rows, and their events, are never touched. Returns
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
                ~exists().where(self.event_of_delivery(d, e), d.c.status != DELIVERED),
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

    async def backfill(
        self,
        conn: Executor,
        destination: str,
        *,
        since: dt.datetime,
        registry: SubscriberRegistry | None = None,
    ) -> int:
        """Opt-in: give ``destination`` (a later subscriber) the retained events since ``since``.

        New subscribers start from "now": rows are only written for destinations known
        at commit. This inserts pending rows, due at once and marked as replays, for
        older events it has no row for yet, of the names ``registry`` (default: the
        default one) routes to it: a subscriber of ``user_*`` gets only ``user_*``
        events. One statement; :meth:`replay` is the batched, rate-limited form that
        also redelivers. Raises OutboxError for a destination the registry does not know.
        """
        names = await self.replay_names(conn, destination, since=since, registry=registry)
        return await self.backfill_rows(conn, destination, names, since=since)

    # -- what the operations dashboard reads and does (alchemium.dashboard) ------------------
    #
    # Every read below is bounded (a LIMIT, or the undelivered rows only, which the partial
    # indexes hold) except the exact count of delivered rows, which PostgreSQL replaces by an
    # estimate from its statistics once the table is large (see ``overview``).

    async def overview(self, conn: Executor, *, exact_below: int = 100_000) -> OutboxOverview:
        """Per destination: rows by state, the lag and how overdue; cheap on a large outbox.

        Pending, claimed and dead rows are counted exactly, over the undelivered rows only
        (the partial index ``ix_<table>_delivery_aggregate``). Delivered rows are counted
        exactly on SQLite and while PostgreSQL's statistics say the delivery table has
        fewer than ``exact_below`` rows; above that they are *estimated* from
        ``pg_class.reltuples`` and the destination frequencies of ``pg_stats`` (kept by
        ANALYZE / autovacuum) minus the exact undelivered counts, and
        ``delivered_exact`` is False. Three or four statements, none of which reads
        every row of a large table.

        What "delivered" counts follows the outbox's ``completion``: the delivered rows
        kept in the delivery table (``"keep"``), the rows of the archive table
        (``"archive"``, counted or estimated the same way), or nothing (``"delete"``:
        delivered rows are gone, ``delivered_kept`` is False and the counts are 0).
        """
        await self.settle_marks(conn)
        d = self.deliveries
        undelivered: dict[str, dict[str, int]] = {}
        for destination, state, n in await conn.execute(
            select(d.c.destination, d.c.status, func.count())
            # Literal, so PostgreSQL proves the partial index's predicate in a generic plan.
            .where(d.c.status != literal(DELIVERED, String, literal_execute=True))
            .group_by(d.c.destination, d.c.status)
        ):
            undelivered.setdefault(destination, {})[state] = int(n)
        now = database_now()
        ages = {
            destination: (age_of(db_now, oldest), age_of(db_now, due_since))
            for destination, oldest, due_since, db_now in await conn.execute(
                select(
                    d.c.destination,
                    func.min(self.occurred_at_of_row()),
                    func.min(self.due_since(now)),
                    now,
                )
                .where(d.c.status.in_((PENDING, CLAIMED)))
                .group_by(d.c.destination)
            )
        }
        db_now = aware((await conn.execute(select(database_now()))).scalar_one())
        delivered, estimated = await self._delivered_counts(conn, undelivered, exact_below)
        names = sorted(set(undelivered) | {k for k, v in delivered.items() if v > 0})
        rows = [
            DestinationStatus(
                destination=name,
                pending=undelivered.get(name, {}).get(PENDING, 0),
                claimed=undelivered.get(name, {}).get(CLAIMED, 0),
                dead=undelivered.get(name, {}).get(DEAD, 0),
                abandoned=undelivered.get(name, {}).get(ABANDONED, 0),
                delivered=delivered.get(name, 0),
                oldest_pending_age=ages.get(name, (None, None))[0],
                overdue=ages.get(name, (None, None))[1],
            )
            for name in names
        ]
        return OutboxOverview(
            rows,
            delivered_exact=not estimated,
            now=db_now,
            completion=self.completion,
            delivered_kept=self.completion != "delete",
        )

    async def _delivered_counts(
        self, conn: Executor, undelivered: dict[str, dict[str, int]], exact_below: int
    ) -> tuple[dict[str, int], bool]:
        """Delivered rows per destination by ``completion``, and whether they are estimates."""
        if self.completion == "delete":
            return {}, False
        table = self.archive if self.archive is not None else self.deliveries
        # Rows of the delivery table that are not delivered are subtracted from its estimate.
        subtract = undelivered if table is self.deliveries else {}
        if dialect_of(conn) == "postgresql":
            estimate = await self._estimate_by_destination(conn, table, subtract, exact_below)
            if estimate is not None:
                return estimate, True
        stmt = select(table.c.destination, func.count()).group_by(table.c.destination)
        if table is self.deliveries:
            stmt = stmt.where(table.c.status == DELIVERED)
        return {destination: int(n) for destination, n in await conn.execute(stmt)}, False

    async def _estimate_by_destination(
        self,
        conn: Executor,
        table: Table,
        undelivered: dict[str, dict[str, int]],
        exact_below: int,
    ) -> dict[str, int] | None:
        """PostgreSQL: rows of ``table`` per destination from the planner's statistics.

        Minus the exact ``undelivered`` counts (the delivery table's other states). None
        when the table is small, was never analyzed, or has no statistics of the
        ``destination`` column yet: the caller counts exactly then.
        """
        params = {"table": table.name, "schema": table.schema}
        schema = "coalesce(:schema, current_schema())"
        total = (
            await conn.execute(
                text(
                    "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n "
                    f"ON n.oid = c.relnamespace WHERE c.relname = :table AND n.nspname = {schema}"
                ),
                params,
            )
        ).scalar_one_or_none()
        if total is None or total < max(exact_below, 0):
            return None  # small, or never analyzed (reltuples is -1)
        stats = (
            await conn.execute(
                text(
                    "SELECT most_common_vals::text::text[], most_common_freqs, null_frac, "
                    "n_distinct FROM pg_stats WHERE tablename = :table AND attname = "
                    f"'destination' AND schemaname = {schema}"
                ),
                params,
            )
        ).one_or_none()
        if stats is None:
            return None  # reltuples without column statistics: no split by destination
        values, freqs, null_frac, n_distinct = stats
        frequency = dict(zip(values or [], freqs or [], strict=True))
        distinct = n_distinct if n_distinct >= 0 else -n_distinct * total
        others = max(distinct - len(frequency), 1.0)
        rest = max(0.0, 1.0 - (null_frac or 0.0) - sum(frequency.values())) / others
        return {
            name: max(
                0,
                round(float(total) * frequency.get(name, rest))
                - sum(undelivered.get(name, {}).values()),
            )
            for name in set(frequency) | set(undelivered)
        }

    async def destination_exists(self, conn: Executor, destination: str) -> bool:
        """Whether any delivery row (in any state) has ``destination``."""
        d = self.deliveries
        stmt = select(exists().where(d.c.destination == destination))
        return bool((await conn.execute(stmt)).scalar_one())

    async def throughput(self, conn: Executor, *, minutes: int = 60) -> Throughput:
        """Deliveries per minute over the last ``minutes`` minutes (database clock), oldest first.

        Counts delivered rows by the minute of ``delivered_at``; minutes without a
        delivery are 0. The last bucket is the current, unfinished minute. Reads the
        delivered rows of the window only, by the partial index
        ``ix_<table>_delivery_delivered`` (measured in bench/dashboard.py); with
        ``completion="archive"`` the archive table's rows, by its ``delivered_at``
        index; with ``"delete"`` nothing is left to count: every minute is 0 and
        ``recorded`` is False.
        """
        read = aware((await conn.execute(select(database_now()))).scalar_one())
        assert read is not None
        now = read.astimezone(dt.timezone.utc)
        current = now.replace(second=0, microsecond=0)
        starts = [current - dt.timedelta(minutes=i) for i in reversed(range(minutes))]
        if self.completion == "delete":
            return Throughput(minutes=[(s, 0) for s in starts], now=now, recorded=False)
        d = self.archive if self.archive is not None else self.deliveries
        if dialect_of(conn) == "postgresql":
            minute: Any = func.date_trunc("minute", d.c.delivered_at)
        else:  # SQLite stores "YYYY-MM-DD HH:MM:SS.ffffff"
            minute = func.substr(d.c.delivered_at, 1, 16)
        counted = {
            _minute_key(m): int(n)
            for m, n in await conn.execute(
                select(minute, func.count())
                .where(
                    d.c.status == literal(DELIVERED, String, literal_execute=True),
                    d.c.delivered_at >= database_now(-60.0 * minutes),
                )
                .group_by(minute)
            )
        }
        return Throughput(
            minutes=[(s, counted.get(s.strftime("%Y-%m-%d %H:%M"), 0)) for s in starts],
            now=now,
            recorded=True,
        )

    async def leases(self, conn: Executor) -> list[RelayLease]:
        """Who holds claimed rows: one entry per ``claimed_by`` with its lease expiry.

        There is no registry of relays: a relay shows up here while it holds a claim
        (rows claimed at commit by the after-commit dispatch have no ``claimed_by`` and
        show as ``None``). A relay's heartbeat moves ``lease_expires`` forward every
        lease/3 seconds; an expiry in the past means the relay stopped renewing (its rows
        are due again). One statement over the claimed rows (partial "due" index).
        """
        d = self.deliveries
        now = database_now()
        rows = await conn.execute(
            select(
                d.c.claimed_by,
                func.count(),
                func.max(d.c.claimed_until),
                func.min(d.c.claimed_until),
                func.sum(_expired(d.c.claimed_until, now)),
                now,
            )
            .where(d.c.status == literal(CLAIMED, String, literal_execute=True))
            .group_by(d.c.claimed_by)
            .order_by(d.c.claimed_by)
        )
        return [
            RelayLease(
                relay=relay,
                rows=int(n),
                lease_expires=aware(latest),
                earliest_expiry=aware(earliest),
                expired_rows=int(expired or 0),
                seconds_left=_seconds_between(db_now, latest),
            )
            for relay, n, latest, earliest, expired, db_now in rows
        ]

    async def event_with_deliveries(
        self, conn: Executor, event_id: uuid.UUID
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """One event's row (payload and metadata included) and all its delivery rows.

        None if no event has that id (never written, or purged). Each delivery row has
        ``archived``: True for a row of the archive table (``completion="archive"``).
        With ``completion="delete"`` delivered rows are gone: only the undelivered ones
        are listed. Two statements by key (three with an archive).
        """
        await self.settle_marks(conn)
        d, e = self.deliveries, self.events
        event = (await conn.execute(select(e).where(e.c.id == event_id))).one_or_none()
        if event is None:
            return None
        found = [
            {**_aware_row(r._mapping), "archived": False}
            for r in await conn.execute(select(d).where(d.c.event_id == event_id))
        ]
        if self.archive is not None:
            a = self.archive
            found += [
                {**_aware_row(r._mapping), "archived": True}
                for r in await conn.execute(select(a).where(a.c.event_id == event_id))
            ]
        return _aware_row(event._mapping), sorted(found, key=lambda r: int(r["id"]))

    async def dead_letters(
        self,
        conn: Executor,
        selection: DeadSelection | None = None,
        *,
        offset: int = 0,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """A page of dead deliveries matching ``selection``, oldest first, with their events.

        Each row: the delivery's id, destination, attempts, last error, aggregate, and
        the event's id, name, payload, metadata and ``occurred_at``. Dead rows are in the
        partial "aggregate" index, so this stays cheap beside millions of delivered rows.
        """
        d, e = self.deliveries, self.events
        rows = await conn.execute(
            select(
                d.c.id,
                d.c.destination,
                d.c.attempts,
                d.c.last_error,
                d.c.aggregate_type,
                d.c.aggregate_id,
                d.c.event_id,
                e.c.name,
                e.c.payload,
                e.c.metadata,
                e.c.occurred_at,
            )
            .select_from(d.join(e, self.event_of_delivery(d, e)))
            .where(*self._dead_where(selection))
            .order_by(d.c.id)
            .offset(offset)
            .limit(limit)
        )
        return [_aware_row(r._mapping) for r in rows]

    async def count_dead(self, conn: Executor, selection: DeadSelection | None = None) -> int:
        """How many dead deliveries match ``selection`` (all if None)."""
        stmt = select(func.count()).select_from(self.deliveries)
        return int((await conn.execute(stmt.where(*self._dead_where(selection)))).scalar_one())

    async def act_on_dead(
        self,
        conn: Executor,
        action: str,
        *,
        ids: Sequence[int] | None = None,
        selection: DeadSelection | None = None,
        expected: int | None = None,
    ) -> list[int]:
        """Requeue (``"requeue"``) or discard (``"discard"``) dead deliveries; returns their ids.

        Either ``ids`` (exactly those rows: every one must still be dead) or
        ``selection`` with ``expected``, the number of matching dead rows the operator
        saw (exactly that many must still match). Otherwise :class:`DeliveryChangedError`
        is raised after the UPDATE: run this in a transaction and let the error roll it
        back, so nothing changes (``async with engine.begin()`` does). Requeue makes the
        rows pending, due now, attempts 0, error cleared; discard completes them as a
        delivery would, by the outbox's ``completion`` (delivered with their error kept,
        deleted, or archived). One UPDATE ... RETURNING, ``WHERE status = 'dead'``: a row
        a relay or another operator changed meanwhile is never touched; a discard with
        ``completion="delete"`` or ``"archive"`` then deletes or moves the rows it
        changed, in the same transaction.
        """
        if action not in ("requeue", "discard"):
            raise ValueError(f"action must be 'requeue' or 'discard', not {action!r}")
        if (ids is None) == (selection is None):
            raise ValueError("give either ids or a selection")
        if selection is not None and expected is None:
            raise ValueError("a selection needs the number of rows the operator saw (expected)")
        d = self.deliveries
        stmt = update(d).where(*self._dead_where(selection))
        if ids is not None:
            wanted = sorted(set(ids))
            stmt = stmt.where(d.c.id.in_(wanted))
            expected = len(wanted)
        if action == "requeue":
            stmt = stmt.values(
                status=PENDING, attempts=0, next_attempt_at=database_now(), last_error=None
            )
        else:
            stmt = stmt.values(status=DELIVERED, delivered_at=database_now())
        changed = sorted(int(i) for i in (await conn.execute(stmt.returning(d.c.id))).scalars())
        if len(changed) != expected:
            missing = sorted(set(ids) - set(changed)) if ids is not None else []
            raise DeliveryChangedError(action, expected or 0, len(changed), missing)
        if action == "discard" and self.completion != "keep" and changed:
            await self.complete(conn, d.c.id.in_(changed), keep_claim=True)
        return changed

    async def blocked_heads(
        self, conn: Executor, *, offset: int = 0, limit: int = 50
    ) -> list[BlockedAggregate]:
        """Aggregates held up in ordered mode, and the delivery that holds each one.

        In ``ordered`` mode a relay delivers an aggregate's rows for a destination in id
        order, so the first undelivered row (the *head*) blocks every later one while it
        is dead (until requeued or discarded) or failing (pending with attempts, waiting
        for its retry). One row per such (destination, aggregate): the head's delivery
        id, state, attempts, error and event, and how many rows wait behind it. Reads
        the undelivered rows only (partial "aggregate" index).
        """
        d, e = self.deliveries, self.events
        open_rows = d.c.status != literal(DELIVERED, String, literal_execute=True)
        groups = (
            select(
                d.c.destination,
                d.c.aggregate_type,
                d.c.aggregate_id,
                func.min(d.c.id).label("head_id"),
                (func.count() - 1).label("waiting"),
            )
            .where(open_rows)
            .group_by(d.c.destination, d.c.aggregate_type, d.c.aggregate_id)
            .subquery("groups")
        )
        head = d.alias("head")
        rows = await conn.execute(
            select(
                groups.c.destination,
                groups.c.aggregate_type,
                groups.c.aggregate_id,
                groups.c.waiting,
                head.c.id,
                head.c.status,
                head.c.attempts,
                head.c.last_error,
                head.c.next_attempt_at,
                head.c.event_id,
                e.c.name,
            )
            .select_from(
                groups.join(head, head.c.id == groups.c.head_id).join(
                    e, self.event_of_delivery(head, e)
                )
            )
            .where(or_(head.c.status == DEAD, and_(head.c.status == PENDING, head.c.attempts > 0)))
            .order_by(groups.c.destination, groups.c.aggregate_type, groups.c.aggregate_id)
            .offset(offset)
            .limit(limit)
        )
        return [
            BlockedAggregate(
                destination=r.destination,
                aggregate_type=r.aggregate_type,
                aggregate_id=r.aggregate_id,
                waiting=int(r.waiting),
                head_delivery_id=int(r.id),
                head_status=r.status,
                head_attempts=int(r.attempts),
                head_error=r.last_error,
                head_next_attempt_at=aware(r.next_attempt_at),
                head_event_id=r.event_id,
                head_event_name=r.name,
            )
            for r in rows
        ]

    async def wake_relays(self, conn: Executor, channel: str = "alchemium_outbox") -> None:
        """PostgreSQL: NOTIFY ``channel`` so listening relays claim requeued rows at once.

        Sent at commit of ``conn``'s transaction; nothing on SQLite (relays poll).
        """
        if dialect_of(conn) == "postgresql":
            await conn.execute(select(func.pg_notify(channel, "")))

    def _dead_where(self, selection: DeadSelection | None) -> list[Any]:
        """The conditions of dead rows matching ``selection`` (literal state: partial index)."""
        d, e = self.deliveries, self.events
        where: list[Any] = [d.c.status == literal(DEAD, String, literal_execute=True)]
        if selection is None:
            return where
        if selection.destination is not None:
            where.append(d.c.destination == selection.destination)
        if selection.aggregate_type is not None:
            where.append(d.c.aggregate_type == selection.aggregate_type)
        if selection.aggregate_id is not None:
            where.append(d.c.aggregate_id == selection.aggregate_id)
        if selection.name is not None:
            where.append(d.c.event_id.in_(select(e.c.id).where(e.c.name == selection.name)))
        return where

    async def database_clock(self, conn: Executor) -> dt.datetime:
        """The database's current time (UTC), for figures read against its clock."""
        now: dt.datetime = (await conn.execute(select(database_now()))).scalar_one()
        return now if now.tzinfo is not None else now.replace(tzinfo=dt.timezone.utc)

    async def leaseholders(self, conn: Executor) -> int:
        """How many relays hold a live lease now (distinct ``claimed_by`` of claimed rows).

        Rows the after-commit dispatch claims have no ``claimed_by`` and are not counted.
        One statement over the undelivered rows, on the database's clock.
        """
        d = self.deliveries
        stmt = select(func.count(d.c.claimed_by.distinct())).where(
            d.c.status == CLAIMED, d.c.claimed_until >= database_now()
        )
        return int((await conn.execute(stmt)).scalar_one())


# -- values of the dashboard's reads ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxOverview:
    """:meth:`OutboxAdministration.overview`: per-destination counts and how they were made.

    ``delivered_exact`` is False when the delivered counts are PostgreSQL estimates
    (planner statistics); the other counts are always exact. ``now`` is the database's.
    ``completion`` is the outbox's (see ``Outbox(completion=...)``): with ``"archive"``
    the delivered counts are the archive table's rows; with ``"delete"`` delivered rows
    are not kept (``delivered_kept`` is False) and every delivered count is 0.
    """

    destinations: list[DestinationStatus]
    delivered_exact: bool
    now: dt.datetime | None
    completion: str = "keep"
    delivered_kept: bool = True


@dataclass(frozen=True, slots=True)
class Throughput:
    """Deliveries per minute: ``(start of the minute, count)`` oldest first; the database's now.

    ``recorded`` is False with ``completion="delete"``: no delivered row is left to
    count, and every minute reads 0 whatever was delivered.
    """

    minutes: list[tuple[dt.datetime, int]]
    now: dt.datetime
    recorded: bool = True


@dataclass(frozen=True, slots=True)
class RelayLease:
    """A relay (``claimed_by``) holding claimed rows, and when its lease runs out.

    ``lease_expires`` is the latest ``claimed_until`` of its rows (moved forward by its
    heartbeat), ``seconds_left`` how far that is from the database's now (negative:
    the relay stopped renewing), ``expired_rows`` how many of its rows are due again.
    """

    relay: str | None
    rows: int
    lease_expires: dt.datetime | None
    earliest_expiry: dt.datetime | None
    expired_rows: int
    seconds_left: float | None


@dataclass(frozen=True, slots=True)
class BlockedAggregate:
    """An aggregate whose deliveries to ``destination`` wait behind a dead or failing head."""

    destination: str
    aggregate_type: str
    aggregate_id: str
    waiting: int
    head_delivery_id: int
    head_status: str
    head_attempts: int
    head_error: str | None
    head_next_attempt_at: dt.datetime | None
    head_event_id: uuid.UUID
    head_event_name: str


@dataclass(frozen=True, slots=True)
class DeadSelection:
    """Which dead deliveries an operator means: every given field must match (None: any)."""

    destination: str | None = None
    name: str | None = None
    aggregate_type: str | None = None
    aggregate_id: str | None = None


class DeliveryChangedError(ConcurrencyConflictError):
    """Dead deliveries an operator acted on were changed meanwhile; nothing was changed.

    Another operator or a relay requeued, discarded or purged some of them between the
    page the operator saw and the action. ``expected`` rows were meant, ``found`` were
    still dead; ``missing`` names the delivery ids no longer dead (when ids were given).
    """

    def __init__(self, action: str, expected: int, found: int, missing: Sequence[int]) -> None:
        self.action, self.expected, self.found = action, expected, found
        self.missing = list(missing)
        self.model, self.primary_key = "outbox delivery", self.missing or None
        which = f" (no longer dead: {', '.join(f'#{i}' for i in self.missing)})" if missing else ""
        Exception.__init__(
            self,
            f"cannot {action}: {expected} dead deliver{'y' if expected == 1 else 'ies'} "
            f"expected, {found} still dead{which}; another operator or a relay changed them "
            "meanwhile, nothing was changed; reload and try again",
        )


def _expired(claimed_until: Any, now: Any) -> Any:
    return case((claimed_until < now, 1), else_=0)


def _seconds_between(now: dt.datetime | None, then: dt.datetime | None) -> float | None:
    now, then = aware(now), aware(then)
    if now is None or then is None:
        return None
    return (then - now).total_seconds()


def _minute_key(value: Any) -> str:
    """``YYYY-MM-DD HH:MM`` of a PostgreSQL timestamp or a SQLite text prefix."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    return str(value)


def _aware_row(row: Any) -> dict[str, Any]:
    """A row as a dict with its datetimes in UTC (SQLite returns naive ones)."""
    return {k: aware(v) if isinstance(v, dt.datetime) else v for k, v in dict(row).items()}
