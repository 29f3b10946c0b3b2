"""The outbox's SQL for events that live long: replay, filtered requeue, giving up, fallbacks.

:class:`OutboxLifecycle` is inherited by
:class:`~alchemium.events.outbox_admin.OutboxAdministration` (and so by
:class:`~alchemium.events.outbox.Outbox`):

- **replay** (and ``backfill``, built on it): fresh deliveries of retained events
  for a destination, chosen by time, event name and aggregate, in batches with a
  pause between them, idempotent (a pending delivery is never duplicated), marked
  (``replayed_at``) so publishers can tell consumers;
- **requeue** of dead (and, if asked, abandoned) deliveries chosen by destination,
  event name, error text, age and count, with a dry run;
- the relay's **giving up**: a failed delivery becomes ``dead`` or ``abandoned``
  (a destination's policy, :mod:`alchemium.events.policies`), and the claim and
  completion of the fallback handler run once it did.

Every time compared is the database's clock (``database_now``); an event's age is
read from its ``occurred_at`` (the writer's clock, as for retention).

Why this module is a little over 500 lines: it is the SQL of these three features
and nothing else, kept out of ``outbox_admin.py`` (status, purge) so that neither
grows past its purpose; splitting it further would separate requeue from the
giving up it undoes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, and_, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.outbox_partitions import OutboxPartitions
from alchemium.events.outbox_schema import (
    ABANDONED,
    CLAIMED,
    DEAD,
    DELIVERED,
    PENDING,
    Executor,
    database_now,
    dialect_of,
)
from alchemium.events.subscribers import SubscriberRegistry, default_registry, event_pattern

__all__ = ["GivenUpDelivery", "OutboxLifecycle", "ReplayReport"]

_INSERTS: dict[str, Any] = {"postgresql": pg_insert, "sqlite": sqlite_insert}


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay did for ``destination``.

    ``matched``: retained events chosen by the filters and routed to the destination;
    ``created``: new delivery rows (the destination had none for the event);
    ``redelivered``: delivered rows made pending again; ``skipped``: rows left as
    they were because they are pending or claimed (never duplicated), dead or
    abandoned (requeue those); ``batches``: transactions used.
    """

    destination: str
    matched: int
    created: int
    redelivered: int
    skipped: int
    batches: int

    @property
    def scheduled(self) -> int:
        """Deliveries the replay made pending (created + redelivered)."""
        return self.created + self.redelivered


@dataclass(frozen=True, slots=True)
class GivenUpDelivery:
    """A dead or abandoned delivery whose fallback handler is to run (claimed for it)."""

    id: int
    destination: str
    status: str
    attempts: int
    error: str | None
    event: DomainEvent
    replay: bool


@dataclass(frozen=True, slots=True)
class _Batch:
    matched: int
    created: int
    redelivered: int
    last_sequence: int


class OutboxLifecycle(OutboxPartitions):
    """Replay, filtered requeue, giving up and fallbacks; see the module docstring."""

    # -- replay ------------------------------------------------------------------------------

    async def replay(
        self,
        sessions: Callable[[], AsyncSession],
        destination: str,
        *,
        since: dt.datetime,
        until: dt.datetime | None = None,
        event_types: Sequence[str] | None = None,
        aggregate_type: str | None = None,
        aggregate_id: str | None = None,
        registry: SubscriberRegistry | None = None,
        batch_size: int = 500,
        pause: float = 0.5,
        max_waiting: int | None = None,
    ) -> ReplayReport:
        """Deliver the retained events chosen by the filters to ``destination`` again.

        Events with ``since <= occurred_at < until`` whose name the destination
        subscribes to in ``registry`` (default: the default registry; a subscriber's
        event name or pattern, or an external destination's patterns), narrowed by
        ``event_types`` (names or ``*``/``?`` patterns) and the aggregate. A
        destination the registry does not know (a new one) needs ``event_types``:
        without them nothing says which events it takes, and OutboxError is raised.

        For each event: no row for the destination yet → a pending row is inserted;
        a delivered row → pending again; a pending, claimed, dead or abandoned row is
        left alone (so running it twice never duplicates a pending delivery). With
        ``completion="delete"`` or ``"archive"`` a delivered row has left the table, so
        its event gets a new row (``created``). Events the retention purge deleted
        are gone: only retained events can be replayed. The rows it schedules carry
        ``replayed_at``; publishers see the event with ``metadata["replay"] = True``.
        Runs in batches of ``batch_size`` events, each its own transaction from
        ``sessions()``, sleeping ``pause`` seconds between them so live traffic keeps
        its share of the database and the relays.

        ``max_waiting`` paces the replay by the relays instead: before each batch it
        waits (asking again every ``pause`` seconds, at least 0.1) until fewer than
        ``max_waiting`` replayed deliveries of the destination are pending or claimed,
        so live events of the destination never queue behind more than about
        ``max_waiting + batch_size`` replayed ones. With no relay serving the
        destination it waits for ever: run it with a timeout.
        """
        if batch_size < 1 or pause < 0 or (max_waiting is not None and max_waiting < 1):
            raise ValueError("batch_size and max_waiting must be >= 1 and pause >= 0")
        async with sessions() as session:
            names = await self.replay_names(
                session, destination, since=since, until=until, event_types=event_types,
                registry=registry,
            )  # fmt: skip
        matched = created = redelivered = batches = 0
        after = 0
        while names:
            if max_waiting is not None:
                await self._wait_for_relays(sessions, destination, max_waiting, max(pause, 0.1))
            async with sessions() as session:
                batch = await self._replay_batch(
                    session,
                    destination,
                    names,
                    since=since,
                    until=until,
                    aggregate=(aggregate_type, aggregate_id),
                    after=after,
                    limit=batch_size,
                    redeliver=True,
                )
                await session.commit()
            batches += 1
            matched += batch.matched
            created += batch.created
            redelivered += batch.redelivered
            if batch.matched < batch_size:
                break
            after = batch.last_sequence
            await asyncio.sleep(pause)
        return ReplayReport(
            destination,
            matched,
            created,
            redelivered,
            matched - created - redelivered,
            batches,
        )

    async def _wait_for_relays(
        self,
        sessions: Callable[[], AsyncSession],
        destination: str,
        max_waiting: int,
        interval: float,
    ) -> None:
        """Return once fewer than ``max_waiting`` replayed rows of ``destination`` are
        pending or claimed, counting every ``interval`` seconds (one SELECT each)."""
        d = self.deliveries
        waiting = select(func.count()).where(
            d.c.destination == destination,
            d.c.status.in_((PENDING, CLAIMED)),
            d.c.replayed_at.is_not(None),
        )
        while True:
            async with sessions() as session:
                if int((await session.execute(waiting)).scalar_one()) < max_waiting:
                    return
            await asyncio.sleep(interval)

    async def replay_names(
        self,
        conn: Executor,
        destination: str,
        *,
        since: dt.datetime,
        until: dt.datetime | None = None,
        event_types: Sequence[str] | None = None,
        registry: SubscriberRegistry | None = None,
    ) -> list[str]:
        """The names of retained events in the window that a replay to ``destination`` takes.

        Routing is the registry's own (the names it would route to ``destination`` at
        commit), so a replay never hands a destination an event it does not subscribe
        to. One ``SELECT DISTINCT name`` over the window.
        """
        registry = registry if registry is not None else default_registry
        known = registry.knows(destination)
        if not known and not event_types:
            raise OutboxError(
                f"destination {destination!r} is neither a subscriber nor a destination of "
                f"registry {registry.name!r}, so nothing says which events it takes: import "
                "the module that subscribes it, or name the event types to replay"
            )
        patterns = [event_pattern(p, what=f"replay to {destination!r}") for p in event_types or ()]
        wanted = list(zip(event_types or (), patterns, strict=True))
        e = self.events
        window = [e.c.occurred_at >= since]
        if until is not None:
            window.append(e.c.occurred_at < until)
        names = (await conn.execute(select(e.c.name).where(*window).distinct())).scalars()

        def takes(name: str) -> bool:
            if known and not (
                destination in registry.destinations_for(name)
                or any(s.name == destination for s in registry.subscribers_for(name))
            ):
                return False
            return not wanted or any(
                p == name if m is None else m.fullmatch(name) for p, m in wanted
            )

        return sorted(name for name in names if takes(name))

    async def backfill_rows(
        self, conn: Executor, destination: str, names: Sequence[str], *, since: dt.datetime
    ) -> int:
        """One statement: pending, replay-marked rows for events of ``names`` since ``since``
        that ``destination`` has no row for (delivered ones are not redelivered, as long
        as ``completion="keep"`` keeps their rows)."""
        if not names:
            return 0
        batch = await self._replay_batch(
            conn,
            destination,
            names,
            since=since,
            until=None,
            aggregate=(None, None),
            after=0,
            limit=None,
            redeliver=False,
        )
        return batch.created

    async def _replay_batch(
        self,
        conn: Executor,
        destination: str,
        names: Sequence[str],
        *,
        since: dt.datetime,
        until: dt.datetime | None,
        aggregate: tuple[str | None, str | None],
        after: int,
        limit: int | None,
        redeliver: bool,
    ) -> _Batch:
        d, e = self.deliveries, self.events
        where = [e.c.sequence > after, e.c.occurred_at >= since, e.c.name.in_(list(names))]
        if until is not None:
            where.append(e.c.occurred_at < until)
        if aggregate[0] is not None:
            where.append(e.c.aggregate_type == aggregate[0])
        if aggregate[1] is not None:
            where.append(e.c.aggregate_id == str(aggregate[1]))
        picked = select(e.c.sequence).where(*where).order_by(e.c.sequence)
        if limit is not None:
            picked = picked.limit(limit)
        sequences = list((await conn.execute(picked)).scalars())
        if not sequences:
            return _Batch(0, 0, 0, after)
        low, high = sequences[0], sequences[-1]
        chosen = and_(*where[1:], e.c.sequence >= low, e.c.sequence <= high)
        now = database_now()
        source = select(
            e.c.id,
            literal(destination, String),
            e.c.aggregate_type,
            e.c.aggregate_id,
            literal(PENDING, String),
            literal(0, Integer),
            now,
            now,
            *([e.c.occurred_at] if self.partition_by is not None else []),
        ).where(chosen)
        insert = (
            _INSERTS[dialect_of(conn)](d)
            .from_select(
                [
                    "event_id",
                    "destination",
                    "aggregate_type",
                    "aggregate_id",
                    "status",
                    "attempts",
                    "next_attempt_at",
                    "replayed_at",
                    *(["event_occurred_at"] if self.partition_by is not None else []),
                ],
                source,
            )
            .on_conflict_do_nothing()
        )
        created = int(getattr(await conn.execute(insert), "rowcount", 0))
        redelivered = 0
        if redeliver:
            stmt = (
                update(d)
                .where(
                    d.c.destination == destination,
                    d.c.status == DELIVERED,
                    d.c.event_id.in_(select(e.c.id).where(chosen)),
                )
                .values(
                    status=PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    replayed_at=now,
                    delivered_at=None,
                    last_error=None,
                )
            )
            redelivered = int(getattr(await conn.execute(stmt), "rowcount", 0))
        return _Batch(len(sequences), created, redelivered, high)

    # -- requeue -----------------------------------------------------------------------------

    async def requeue_matching(
        self,
        conn: Executor,
        *,
        ids: Sequence[int] | None = None,
        destination: str | None = None,
        event_type: str | None = None,
        error_contains: str | None = None,
        min_age: float | None = None,
        limit: int | None = None,
        include_abandoned: bool = False,
        dry_run: bool = False,
    ) -> int:
        """Put the chosen dead deliveries back to pending (attempts reset); returns how many.

        Chosen: status ``dead`` (and ``abandoned`` only with ``include_abandoned``),
        narrowed by ``ids``, ``destination``, ``event_type`` (a name or a ``*``/``?``
        pattern), ``error_contains`` (in the last error, ignoring case), ``min_age``
        (seconds since the row's last attempt was due, database clock), at most
        ``limit`` rows (oldest first). ``dry_run`` counts them and changes nothing.
        """
        d, e = self.deliveries, self.events
        statuses = (DEAD, ABANDONED) if include_abandoned else (DEAD,)
        where: list[Any] = [d.c.status.in_(statuses)]
        if ids is not None:
            where.append(d.c.id.in_(list(ids)))
        if destination is not None:
            where.append(d.c.destination == destination)
        if error_contains:
            where.append(
                func.lower(d.c.last_error).contains(error_contains.lower(), autoescape=True)
            )
        if min_age is not None:
            where.append(d.c.next_attempt_at <= database_now(-min_age))
        if event_type is not None:
            matcher = event_pattern(event_type, what="requeue --event-type")
            if matcher is None:
                where.append(d.c.event_id.in_(select(e.c.id).where(e.c.name == event_type)))
            else:
                found = await conn.execute(
                    select(e.c.name)
                    .distinct()
                    .where(e.c.id.in_(select(d.c.event_id).where(*where)))
                )
                names = [n for n in found.scalars() if matcher.fullmatch(n)]
                where.append(d.c.event_id.in_(select(e.c.id).where(e.c.name.in_(names))))
        picked = select(d.c.id).where(*where).order_by(d.c.id)
        if limit is not None:
            picked = picked.limit(limit)
        if dry_run:
            counted = select(func.count()).select_from(picked.subquery())
            return int((await conn.execute(counted)).scalar_one())
        stmt = (
            update(d)
            .where(d.c.id.in_(picked.scalar_subquery()), d.c.status.in_(statuses))
            .values(
                status=PENDING,
                attempts=0,
                next_attempt_at=database_now(),
                last_error=None,
                claim_token=None,
                claimed_until=None,
                fallback_pending=None,
            )
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    # -- giving up and fallbacks -------------------------------------------------------------

    async def database_time(self, conn: Executor) -> dt.datetime:
        """The database's current time (aware UTC)."""
        value: dt.datetime = (await conn.execute(select(database_now()))).scalar_one()
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)

    async def mark_given_up(
        self,
        conn: Executor,
        token: uuid.UUID,
        *,
        row_id: int,
        status: str,
        error: str,
        fallback: bool,
    ) -> int:
        """Record a claimed row's last failure as final: ``dead`` or ``abandoned``.

        Only while still claimed under ``token``. ``next_attempt_at`` becomes the
        database's now (when it gave up: what ``min_age`` of a requeue reads);
        ``fallback`` marks the row for its destination's fallback handler, in the same
        UPDATE, so the handler is owed even if this process dies right after.
        """
        if status not in (DEAD, ABANDONED):
            raise ValueError(f"a delivery gives up as dead or abandoned, not {status!r}")
        d = self.deliveries
        stmt = (
            update(d)
            .where(d.c.claim_token == token, d.c.status == CLAIMED, d.c.id == row_id)
            .values(
                status=status,
                last_error=error[:2000],
                claim_token=None,
                claimed_until=None,
                next_attempt_at=database_now(),
                fallback_pending=True if fallback else None,
            )
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))

    async def claim_fallbacks(
        self,
        conn: Executor,
        destinations: Sequence[str],
        *,
        token: uuid.UUID,
        lease: float,
        limit: int = 100,
    ) -> list[GivenUpDelivery]:
        """Claim dead or abandoned rows of ``destinations`` whose fallback is owed.

        A claimed fallback is leased (``claimed_until``) so concurrent relays do not
        run it together; one whose lease lapsed (its relay died, or it failed and is
        waiting to be retried) is claimed again.
        """
        if not destinations:
            return []
        d = self.deliveries
        now = database_now()
        due = (
            select(d.c.id)
            .where(
                d.c.fallback_pending.is_(True),
                d.c.status.in_((DEAD, ABANDONED)),
                d.c.destination.in_(list(destinations)),
                or_(d.c.claimed_until.is_(None), d.c.claimed_until < now),
            )
            .order_by(d.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(d)
            .where(d.c.id.in_(due.scalar_subquery()))
            .values(claim_token=token, claimed_until=database_now(lease))
            .returning(
                d.c.id,
                d.c.event_id,
                d.c.destination,
                d.c.status,
                d.c.attempts,
                d.c.last_error,
                d.c.replayed_at,
            )
        )
        claimed = (await conn.execute(stmt)).all()
        if not claimed:
            return []
        events = await self.events_by_id(conn, {c.event_id for c in claimed})
        return [
            GivenUpDelivery(
                c.id,
                c.destination,
                c.status,
                c.attempts,
                c.last_error,
                events[c.event_id],
                c.replayed_at is not None,
            )
            for c in sorted(claimed, key=lambda r: r.id)
        ]

    async def finish_fallback(
        self, conn: Executor, token: uuid.UUID, row_id: int, *, retry_in: float | None
    ) -> int:
        """Record a fallback's outcome: done (``retry_in`` None), or owed again in
        ``retry_in`` seconds (database clock). Only while claimed under ``token``."""
        d = self.deliveries
        values: dict[str, Any] = {"claim_token": None}
        if retry_in is None:
            values.update(fallback_pending=None, claimed_until=None)
        else:
            values.update(claimed_until=database_now(retry_in))
        stmt = (
            update(d)
            .where(d.c.id == row_id, d.c.claim_token == token, d.c.fallback_pending.is_(True))
            .values(**values)
        )
        return int(getattr(await conn.execute(stmt), "rowcount", 0))
