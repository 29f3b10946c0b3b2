"""A time-partitioned outbox on PostgreSQL: partitions made ahead, old ones dropped whole.

With ``Outbox(metadata, partition_by="day")`` (or ``"week"``, ``"month"``) both outbox
tables are ``PARTITION BY RANGE`` on the event's ``occurred_at``: an event and its
delivery rows live in partitions of the same period, named
``<table>_p<YYYYMMDD>`` and ``<table>_delivery_p<YYYYMMDD>`` after the period's first
day (UTC). Retention then drops a period's two tables instead of deleting its rows
one by one: no dead tuples, no vacuum debt, no index bloat, and a drop costs the same
with 5,000,000 rows as with 5.

What this module does, and why each step is the way it is:

- :meth:`OutboxPartitions.ensure_partitions` makes the partitions of the periods from
  ``behind`` before the database's now to ``ahead`` after it, if missing. Each is
  created as a plain table and then ``ATTACH``\\ ed, which locks the parent ``SHARE
  UPDATE EXCLUSIVE``: writers, relays and purges go on meanwhile, where ``CREATE
  TABLE ... PARTITION OF`` would queue an ``ACCESS EXCLUSIVE`` lock behind every
  running transaction and every statement behind it. Concurrent callers are
  serialised by an advisory lock. ``create_all`` / :func:`create_outbox_tables` make
  the first ones; a relay makes the rest (:class:`~alchemium.events.relay.Relay`,
  hourly), and so does ``alchemium outbox partitions`` from cron.
- :meth:`OutboxPartitions.drop_partitions` drops the periods that ended more than
  ``older_than`` seconds ago and hold no undelivered row (pending, claimed, dead or
  abandoned rows keep their period, as they keep their events from a purge). The
  delivery partition is detached first with ``DETACH PARTITION ... CONCURRENTLY``,
  which never blocks a relay, then counted again: a replay that made a row pending
  between the first count and the detach is seen, and the partition goes back
  (``ATTACH``) instead of being dropped. Then the events partition goes the same
  way. ``CONCURRENTLY`` cannot run inside a transaction block, so this needs a
  session with a pooled connection of its own, in autocommit.
- A write whose ``occurred_at`` falls in no partition (a writer whose clock is off by
  more than ``behind`` periods, or nobody made partitions for a while) fails its
  unit of work with :class:`~alchemium.errors.OutboxError` saying so: it is never
  written anywhere else.

The default-partition trap: PostgreSQL refuses ``DETACH ... CONCURRENTLY`` while the
table has a ``DEFAULT`` partition, and attaching a partition has to scan the default
one (under an ``ACCESS EXCLUSIVE`` lock on it) for rows of the new range. So this
module never creates one, and :meth:`~OutboxPartitions.drop_partitions` refuses, with
an :class:`~alchemium.errors.OutboxError` naming it, to work on tables that have one.

PostgreSQL 14 or later (``DETACH ... CONCURRENTLY``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, event, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.outbox_schema import DELIVERED, Executor, OutboxTables, database_now

__all__ = [
    "PARTITIONS_AHEAD",
    "OutboxPartition",
    "OutboxPartitions",
    "PartitionDrop",
    "period_start",
    "shift_period",
]

# Periods made ahead of the database's now by default: a relay makes them hourly, so
# three periods leave days of margin for a relay that is down.
PARTITIONS_AHEAD = 3

_PG_NAME_LIMIT = 63


@dataclass(frozen=True, slots=True)
class OutboxPartition:
    """One period of a partitioned outbox: its range and its two tables.

    ``start`` <= ``occurred_at`` < ``end`` (UTC). ``deliveries`` is None once the
    delivery partition has been dropped and the events partition not yet (a drop that
    was interrupted; the next one finishes it). ``detach_pending``: a ``DETACH ...
    CONCURRENTLY`` of one of the two was interrupted (the next drop finalizes it).
    """

    start: dt.datetime
    end: dt.datetime
    events: str | None
    deliveries: str | None
    detach_pending: bool = False


@dataclass(frozen=True, slots=True)
class PartitionDrop:
    """What :meth:`OutboxPartitions.drop_partitions` did.

    ``dropped``: the periods whose two tables are gone. ``kept``: the periods old
    enough to go that still hold undelivered rows, with how many (they stay until
    those rows are delivered, requeued and delivered, or discarded).
    """

    dropped: list[OutboxPartition]
    kept: list[tuple[OutboxPartition, int]]


def period_start(at: dt.datetime, period: str) -> dt.datetime:
    """The first instant (UTC) of the ``period`` that holds ``at``: date_trunc's meaning."""
    day = at.astimezone(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - dt.timedelta(days=day.weekday())  # ISO weeks start on Monday
    return day.replace(day=1)


def shift_period(start: dt.datetime, period: str, count: int) -> dt.datetime:
    """The start of the period ``count`` periods after the one starting at ``start``."""
    if period == "day":
        return start + dt.timedelta(days=count)
    if period == "week":
        return start + dt.timedelta(weeks=count)
    months = start.year * 12 + start.month - 1 + count
    return start.replace(year=months // 12, month=months % 12 + 1)


class OutboxPartitions(OutboxTables):
    """The partitions of a partitioned outbox: listing, making ahead, dropping old ones.

    Inherited by :class:`~alchemium.events.outbox.Outbox`; every method raises
    :class:`~alchemium.errors.OutboxError` on an outbox made without ``partition_by``.
    """

    def __init__(self, metadata: Any, **options: Any) -> None:
        super().__init__(metadata, **options)
        if self.partition_by is None:
            return
        longest = f"{self.deliveries.name}_p00000000"
        if len(longest) > _PG_NAME_LIMIT:
            raise OutboxError(
                f"Outbox(table_name={self.events.name!r}, partition_by=...): the partition "
                f"name {longest!r} is longer than PostgreSQL's {_PG_NAME_LIMIT} characters"
            )
        event.listen(self.events, "before_create", self._refuse_other_databases)
        event.listen(self.deliveries, "after_create", self._make_first_partitions)

    # -- creating the tables ----------------------------------------------------------------

    def _refuse_other_databases(self, target: Table, connection: Connection, **_: Any) -> None:
        if connection.dialect.name != "postgresql":
            raise OutboxError(
                f"Outbox(partition_by={self.partition_by!r}) is PostgreSQL only; "
                f"cannot create {target.name!r} on {connection.dialect.name}"
            )

    def _make_first_partitions(self, _target: Table, connection: Connection, **_: Any) -> None:
        """After ``create_all`` made the tables: their partitions, so writes work at once."""
        connection.execute(self._advisory_lock())
        now = connection.execute(select(database_now())).scalar_one()
        for statement in self._ensure_statements(now, set(), PARTITIONS_AHEAD, 1):
            connection.execute(statement)

    # -- reading ----------------------------------------------------------------------------

    def _partitioned(self, what: str) -> str:
        if self.partition_by is None:
            raise OutboxError(
                f"{what} needs a partitioned outbox: Outbox(..., partition_by='day'|'week'|"
                f"'month'); {self.events.name!r} is not partitioned"
            )
        return self.partition_by

    def _qualified(self, name: str) -> str:
        schema = self.events.schema
        quoted = f'"{name}"'
        return f'"{schema}".{quoted}' if schema else quoted

    async def partitions(self, conn: Executor) -> list[OutboxPartition]:
        """The outbox's periods, oldest first.

        Raises :class:`~alchemium.errors.OutboxError` if the tables have a partition
        alchemium did not make (a ``DEFAULT`` partition above all, see the module's
        docs): what this module does relies on knowing every partition's range.
        """
        period = self._partitioned("partitions()")
        rows = (await conn.execute(self._listing(), self._listing_params())).all()
        return self._periods(rows, period)

    def _listing(self) -> Any:
        return text(
            "SELECT p.relname AS parent, c.relname AS name, i.inhdetachpending AS pending, "
            "pg_get_expr(c.relpartbound, c.oid) AS bound "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE i.inhparent IN (to_regclass(:events), to_regclass(:deliveries)) "
            "ORDER BY c.relname"
        )

    def _listing_params(self) -> dict[str, str]:
        return {
            "events": self._qualified(self.events.name),
            "deliveries": self._qualified(self.deliveries.name),
        }

    def _periods(self, rows: Sequence[Any], period: str) -> list[OutboxPartition]:
        found: dict[dt.datetime, dict[str, Any]] = {}
        for row in rows:
            is_events = row.parent == self.events.name
            parent = self.events.name if is_events else self.deliveries.name
            match = re.fullmatch(re.escape(parent) + r"_p(\d{8})", row.name)
            if match is None or row.bound == "DEFAULT":
                trap = (
                    " A DEFAULT partition blocks DETACH ... CONCURRENTLY, so alchemium "
                    "never makes one; move its rows to periods and drop it."
                    if row.bound == "DEFAULT"
                    else ""
                )
                raise OutboxError(
                    f"the outbox table {parent!r} has a partition alchemium did not make: "
                    f"{row.name!r} ({row.bound}).{trap}"
                )
            start = dt.datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=dt.timezone.utc)
            entry = found.setdefault(start, {"events": None, "deliveries": None, "pending": False})
            entry["events" if is_events else "deliveries"] = row.name
            entry["pending"] = entry["pending"] or bool(row.pending)
        return [
            OutboxPartition(
                start,
                shift_period(start, period, 1),
                entry["events"],
                entry["deliveries"],
                entry["pending"],
            )
            for start, entry in sorted(found.items())
        ]

    # -- making ahead -----------------------------------------------------------------------

    async def ensure_partitions(
        self, conn: Executor, *, ahead: int = PARTITIONS_AHEAD, behind: int = 1
    ) -> list[OutboxPartition]:
        """Make the missing periods from ``behind`` before now to ``ahead`` after it.

        "Now" is the database's clock. Returns the periods made (none if all were
        there). Runs in the caller's transaction: commit afterwards. Never blocks
        writers or relays (see the module's docs).
        """
        period = self._partitioned("ensure_partitions()")
        if ahead < 0 or behind < 0:
            raise OutboxError(
                f"ensure_partitions(ahead={ahead!r}, behind={behind!r}): expected counts >= 0"
            )
        await conn.execute(self._advisory_lock())
        existing = await self.partitions(conn)
        now = (await conn.execute(select(database_now()))).scalar_one()
        have = {p.start for p in existing if p.events and p.deliveries}
        for statement in self._ensure_statements(now, have, ahead, behind):
            await conn.execute(statement)
        wanted = self._wanted(now, ahead, behind)
        return [
            OutboxPartition(start, shift_period(start, period, 1), *self._names(start))
            for start in wanted
            if start not in have
        ]

    def _advisory_lock(self) -> Any:
        key = zlib.crc32(f"alchemium partitions {self._qualified(self.events.name)}".encode())
        return select(func.pg_advisory_xact_lock(key))

    def _wanted(self, now: dt.datetime, ahead: int, behind: int) -> list[dt.datetime]:
        period = self._partitioned("ensure_partitions()")
        first = period_start(now, period)
        return [shift_period(first, period, k) for k in range(-behind, ahead + 1)]

    def _names(self, start: dt.datetime) -> tuple[str, str]:
        suffix = f"_p{start:%Y%m%d}"
        return self.events.name + suffix, self.deliveries.name + suffix

    def _ensure_statements(
        self, now: dt.datetime, have: set[dt.datetime], ahead: int, behind: int
    ) -> Iterator[Any]:
        """CREATE TABLE + ATTACH of both tables of every wanted period not in ``have``.

        ``IF NOT EXISTS`` and the check for an attached table make a period that a
        crash left half-made (created, not attached) complete.
        """
        period = self._partitioned("ensure_partitions()")
        for start in self._wanted(now, ahead, behind):
            if start in have:
                continue
            bounds = _bounds(start, shift_period(start, period, 1))
            parents = (self.events.name, self.deliveries.name)
            for parent, name in zip(parents, self._names(start), strict=True):
                table, child = self._qualified(parent), self._qualified(name)
                yield text(f"CREATE TABLE IF NOT EXISTS {child} (LIKE {table} INCLUDING DEFAULTS)")
                yield text(
                    "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_inherits WHERE inhrelid = "
                    f"'{child}'::regclass) THEN ALTER TABLE {table} ATTACH PARTITION {child} "
                    f"{bounds}; END IF; END $$"
                )

    # -- dropping old periods ---------------------------------------------------------------

    async def drop_partitions(self, session: AsyncSession, *, older_than: float) -> PartitionDrop:
        """Drop the periods that ended ``older_than`` seconds ago and hold nothing undelivered.

        ``session`` must check out a pooled connection of its own (a session from a
        ``async_sessionmaker`` bound to an engine): ``DETACH ... CONCURRENTLY`` runs in
        autocommit, outside any transaction. Oldest first; see the module's docs for
        why it never loses a row a replay made pending meanwhile.
        """
        self._partitioned("drop_partitions()")
        if older_than < 0:
            raise OutboxError(f"drop_partitions(older_than={older_than!r}): expected seconds >= 0")
        needs = (
            "drop_partitions() needs a fresh session with a pooled connection of its own "
            "(DETACH ... CONCURRENTLY cannot run inside a transaction)"
        )
        if session.in_transaction():
            raise OutboxError(f"{needs}; this session has begun a transaction already")
        try:
            conn = await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        except sa_exc.InvalidRequestError as exc:  # bound to a Connection in a transaction
            raise OutboxError(f"{needs}: {exc}") from exc
        cutoff = (await conn.execute(select(database_now(-older_than)))).scalar_one()
        dropped: list[OutboxPartition] = []
        kept: list[tuple[OutboxPartition, int]] = []
        for part in await self.partitions(conn):
            if part.end > cutoff:
                break
            if part.deliveries is not None:
                undelivered = await self._undelivered_in(conn, part.deliveries)
                if undelivered:
                    kept.append((part, undelivered))
                    continue
                await self._detach(conn, self.deliveries.name, part.deliveries, part)
                undelivered = await self._undelivered_in(conn, part.deliveries)
                if undelivered:
                    # A replay made rows of this period pending between the count and the
                    # detach: the period goes back, nothing is dropped.
                    await conn.execute(
                        text(
                            f"ALTER TABLE {self._qualified(self.deliveries.name)} ATTACH "
                            f"PARTITION {self._qualified(part.deliveries)} "
                            f"{_bounds(part.start, part.end)}"
                        )
                    )
                    kept.append((part, undelivered))
                    continue
                await conn.execute(text(f"DROP TABLE {self._qualified(part.deliveries)}"))
            if part.events is not None:
                await self._detach(conn, self.events.name, part.events, part)
                await conn.execute(text(f"DROP TABLE {self._qualified(part.events)}"))
            dropped.append(part)
        return PartitionDrop(dropped, kept)

    async def _undelivered_in(self, conn: Executor, table: str) -> int:
        count = await conn.execute(
            text(f"SELECT count(*) FROM {self._qualified(table)} WHERE status <> :delivered"),
            {"delivered": DELIVERED},
        )
        return int(count.scalar_one())

    async def _detach(self, conn: Executor, parent: str, name: str, part: OutboxPartition) -> None:
        """Detach ``name`` without blocking anyone; finish a detach a crash interrupted."""
        finalize = part.detach_pending and await self._detach_pending(conn, name)
        mode = "FINALIZE" if finalize else "CONCURRENTLY"
        try:
            await conn.execute(
                text(
                    f"ALTER TABLE {self._qualified(parent)} DETACH PARTITION "
                    f"{self._qualified(name)} {mode}"
                )
            )
        except sa_exc.DBAPIError as exc:
            raise OutboxError(
                f"could not detach the outbox partition {name!r} of {parent!r}: {exc.orig}"
            ) from exc

    async def _detach_pending(self, conn: Executor, name: str) -> bool:
        row = await conn.execute(
            text("SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass(:name)"),
            {"name": self._qualified(name)},
        )
        return bool(row.scalar_one_or_none())

    # -- writes that fit no period ----------------------------------------------------------

    @contextlib.contextmanager
    def partition_errors(self, events: Sequence[DomainEvent]) -> Iterator[None]:
        """Turn PostgreSQL's "no partition ... found for row" into an OutboxError saying why."""
        try:
            yield
        except sa_exc.DBAPIError as exc:
            if self.partition_by is None or "no partition of relation" not in str(exc.orig):
                raise
            times = sorted(e.occurred_at for e in events)
            span = f"{times[0].isoformat()}" + (
                f" to {times[-1].isoformat()}" if times[-1] != times[0] else ""
            )
            raise OutboxError(
                f"the partitioned outbox {self.events.name!r} has no partition for events "
                f"that occurred at {span} ({', '.join(sorted({e.name for e in events}))}): "
                f"partitions are made {PARTITIONS_AHEAD} {self.partition_by}(s) ahead by a "
                "running relay, create_outbox_tables or `alchemium outbox partitions`, and "
                "one back; is the writer's clock right, and has anything made partitions "
                "lately?"
            ) from exc


def _bounds(start: dt.datetime, end: dt.datetime) -> str:
    """``FOR VALUES FROM (...) TO (...)`` in UTC, colons escaped for ``text()``."""
    clause = f"FOR VALUES FROM ('{start:%Y-%m-%d %H:%M:%S}+00') TO ('{end:%Y-%m-%d %H:%M:%S}+00')"
    return clause.replace(":", "\\:")
