"""The outbox relay: claim due deliveries, publish them, record the outcome.

Each round is three short steps, never one long transaction::

    claim   (own transaction: FOR UPDATE SKIP LOCKED, lease, fresh claim token; commit)
    publish (no transaction open; a heartbeat task renews the lease meanwhile)
    record  (own transaction: delivered / pending with backoff / dead,
             only WHERE claim_token = this round's token; commit)

Delivery is at least once: a relay that dies between publish and record leaves
its rows claimed; once the lease expires another relay claims and publishes
them again. A relay whose lease expired cannot overwrite what the relay that
reclaimed the rows recorded (the token no longer matches).

Wake-up: on PostgreSQL a dedicated asyncpg connection LISTENs on the outbox
channel (committing units of work NOTIFY it); the poll interval is the fallback
and the only mechanism on SQLite. On SQLite run one relay at a time.

Time: leases, due times and backoff are reckoned by the database's clock (the
outbox computes them in SQL); this module only measures intervals (heartbeat,
poll, timeouts) with the monotonic clock. Relays on hosts whose clocks disagree
never take each other's live claims.

Nothing silent: at start and with every lag check the relay warns about
destinations it does not serve whose rows have been due for longer than
``stranded_after`` (nobody drains them).

All SQL lives in :mod:`alchemium.events.outbox`; this module only schedules.
What it reports lives elsewhere too: spans and log fields in
:mod:`alchemium.events.observe`, counters and liveness in ``self.monitor``
(:mod:`alchemium.events.relay_monitor`, served by :mod:`alchemium.events.monitoring`).

Why this module is long (about 960 lines): the loop, its heartbeat, the recording
of outcomes (with the destinations' policies for giving up) and the LISTEN
connection are one scheduler whose parts share state; SQL stays in the outbox
modules, what a policy decides in :mod:`alchemium.events.policies`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncSession

from alchemium import telemetry as _telemetry
from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.dispatch import retry_delay
from alchemium.events.observe import claim_span, log_fields, publish_span
from alchemium.events.outbox import DeliveryRow, Outbox, autocommit, default_outbox
from alchemium.events.outbox_schema import ABANDONED, DEAD
from alchemium.events.policies import (
    DeliveryPolicies,
    DeliveryPolicy,
    default_policies,
    event_age,
    prepare_delivery,
    run_fallbacks,
)
from alchemium.events.publishers.base import (
    BatchPublisher,
    PermanentPublishError,
    Publisher,
    RetryLater,
    destinations_of,
    start_publisher,
)
from alchemium.events.relay_monitor import RelayMonitor
from alchemium.events.subscribers import MAIN_MODULE_HINT, is_main_module_name
from alchemium.events.upcasting import UpcasterRegistry, default_upcasters
from alchemium.uow import check_session_factory

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

__all__ = ["OutboxRelay", "RelayStats"]

logger = logging.getLogger("alchemium.relay")

SessionFactory = Callable[[], AsyncSession]

_RECONNECT_MAX = 30.0  # seconds between LISTEN reconnection attempts, at most
_LISTEN_CHECK = 5.0  # seconds between health checks of the LISTEN connection
_NO_POLICY = DeliveryPolicy()  # a destination without a policy: dead after max_attempts


_PARTITIONS_EVERY = 3600.0  # seconds between a relay's checks for missing partitions


class _Resumed:
    """A coroutine whose first step already ran and yielded ``first``: await the rest of it."""

    __slots__ = ("_coroutine", "_first")

    def __init__(self, coroutine: Coroutine[Any, Any, None], first: Any) -> None:
        self._coroutine = coroutine
        self._first = first

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine, value = self._coroutine, self._first
        while True:
            try:
                sent = yield value
            except BaseException as err:  # noqa: BLE001 - handed to the coroutine, as await does
                try:
                    value = coroutine.throw(err)
                except StopIteration:
                    return
            else:
                try:
                    value = coroutine.send(sent)
                except StopIteration:
                    return


async def _within(seconds: float | None, publishing: Awaitable[None]) -> None:
    """``await publishing``, raising TimeoutError if it takes more than ``seconds``.

    Its first step runs at once: a publish that never waits (an in-process handler)
    finishes there, and no timer is armed for it. Only one that waits (a broker's
    acknowledgement) goes on under ``asyncio.timeout`` (``wait_for`` before 3.11).
    """
    if seconds is None or not asyncio.iscoroutine(publishing):
        if seconds is None:
            await publishing
        else:
            await asyncio.wait_for(publishing, seconds)
        return
    try:
        first = publishing.send(None)
    except StopIteration:
        return
    rest = _Resumed(publishing, first)
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            await rest
    else:  # pragma: no cover - Python 3.10
        await asyncio.wait_for(_await(rest), seconds)


def _batch_publisher(publisher: Publisher | None) -> BatchPublisher | None:
    """``publisher`` if it has ``publish_many`` (see :class:`BatchPublisher`), else None."""
    if publisher is None or not callable(getattr(publisher, "publish_many", None)):
        return None
    return cast(BatchPublisher, publisher)


async def _await(awaitable: Awaitable[None]) -> None:
    await awaitable


@dataclass(slots=True)
class RelayStats:
    """Counters of one relay since it was created (not shared between relays).

    ``oldest_pending_age`` is the lag: seconds from the ``occurred_at`` of the oldest
    event that still has an undelivered (pending or claimed) row for this relay's
    destinations to the database's now, ``None`` when there is none; refreshed at
    most every ``lag_interval`` seconds. ``occurred_at`` is the writer's clock: a
    writer N seconds ahead makes the lag read up to N seconds low (see OutboxStatus).
    """

    delivered: int = 0
    retried: int = 0
    dead: int = 0
    lost_leases: int = 0
    rounds: int = 0
    errors: int = 0
    oldest_pending_age: float | None = None
    abandoned: int = 0


def asyncpg_dsn(url: URL | str) -> str:
    """A SQLAlchemy ``postgresql+asyncpg://`` URL as a DSN for ``asyncpg.connect``.

    The asyncpg dialect takes ``ssl=<mode>`` in the URL; a DSN spells it ``sslmode``
    (asyncpg.connect sends unknown DSN keys to the server as settings, which fails).
    """
    parsed = make_url(url)
    query = dict(parsed.query)
    if "ssl" in query:
        query.setdefault("sslmode", query.pop("ssl"))
    return parsed.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


@dataclass(slots=True)
class _Batch:
    """A claimed batch: its rows, their token, the publishers' routes of that moment, the
    claim span's context (when tracing) and the heartbeat renewing their lease from the
    claim until their outcomes are recorded (a prefetched batch waits under its lease)."""

    routes: dict[str, Publisher]
    token: uuid.UUID
    rows: list[DeliveryRow]
    claim: SpanContext | None = None
    heartbeat: asyncio.Task[None] | None = None

    async def release(self) -> None:
        """Stop renewing the lease (the outcomes are about to be recorded, or abandoned)."""
        heartbeat, self.heartbeat = self.heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat


@dataclass(frozen=True, slots=True)
class _Outcome:
    row: DeliveryRow
    error: BaseException | None


class OutboxRelay:
    """Delivers every committed, undelivered outbox row to ``publisher``, at least once.

    Args:
        session_factory: an ``async_sessionmaker`` (or any callable returning an
            ``AsyncSession``) for the database holding the outbox.
        publisher: a :class:`Publisher` or several; the relay claims rows whose
            destination is one of their names.
        batch_size: rows claimed per round.
        lease: seconds a claim protects rows from other relays; renewed every
            ``lease / 3`` seconds while publishing. A relay that dies holds its rows
            this long.
        poll_interval: seconds between polls when idle (and LISTEN is unavailable,
            or to pick up retries whose backoff elapsed).
        max_attempts: attempts before a row is marked dead (a destination's
            ``DeliveryPolicy`` may abandon it earlier).
        backoff_base: first retry delay in seconds; doubles per attempt (capped at
            ``backoff_cap``), with jitter.
        ordered: deliver the events of one aggregate in sequence order: a later
            row waits while an earlier one is pending, retrying or dead.
        listen: LISTEN for notifications on PostgreSQL (ignored on SQLite).
        relay_id: recorded in ``claimed_by``; default ``host:pid:random``.
        publish_timeout: seconds one ``publish`` may take before it counts as failed.
        retention: if set, delivered rows older than this many seconds are purged in
            bounded batches while the relay is idle. With a partitioned outbox
            (``Outbox(partition_by=...)``) whole periods that ended this long ago are
            dropped instead, once they hold nothing undelivered; the relay also makes
            the partitions of the coming periods, at start and hourly.
        lag_interval: seconds between lag checks (``stats.oldest_pending_age``) and
            stranded-destination checks.
        stranded_after: seconds a row of a destination this relay does not serve may
            be due before the relay warns about it (log record ``alchemium.relay``,
            WARNING, again at most every ``stranded_after`` seconds per destination);
            default ``max(60, 5 * poll_interval)``.
        outbox: the outbox to drain (default: the one set by ``enable_outbox``).
        upcasters: the schema versions and upcasters events are brought up to date with
            before publishing (default: ``alchemium.events.upcasting.default_upcasters``);
            validated when the relay starts.
        policies: per-destination delivery policies (abandoning, fallback handlers;
            default: ``alchemium.events.policies.default_policies``).
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        publisher: Publisher | Sequence[Publisher],
        *,
        batch_size: int = 100,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        max_attempts: int = 10,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        ordered: bool = False,
        listen: bool = True,
        relay_id: str | None = None,
        publish_timeout: float | None = 60.0,
        retention: float | None = None,
        lag_interval: float = 5.0,
        stranded_after: float | None = None,
        outbox: Outbox | None = None,
        upcasters: UpcasterRegistry | None = None,
        policies: DeliveryPolicies | None = None,
    ) -> None:
        if batch_size < 1 or max_attempts < 1 or lease <= 0 or poll_interval <= 0:
            raise ValueError("batch_size, max_attempts, lease and poll_interval must be > 0")
        if stranded_after is not None and stranded_after <= 0:
            raise ValueError("stranded_after must be > 0")
        box = outbox if outbox is not None else default_outbox()
        if box is None:
            raise OutboxError("no outbox: pass outbox=... or call enable_outbox(metadata)")
        self.outbox = box
        self.session_factory = check_session_factory(session_factory, "OutboxRelay")
        self.publishers: tuple[Publisher, ...] = (
            tuple(publisher) if isinstance(publisher, Sequence) else (publisher,)
        )
        if not self.publishers:
            raise ValueError("at least one publisher is needed")
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.ordered = ordered
        self.listen = listen
        self.relay_id = relay_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.publish_timeout = publish_timeout
        self.retention = retention
        self.lag_interval = lag_interval
        self.stranded_after = (
            stranded_after if stranded_after is not None else max(60.0, 5 * poll_interval)
        )
        self.stats = RelayStats()
        self._stranded_warned: dict[str, float] = {}  # destination -> monotonic time
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._lag_checked = -float("inf")
        self._purged = -float("inf")
        self._partitions_made = -float("inf")
        # A partitioned outbox's retention drop, running beside the rounds: its DETACH
        # ... CONCURRENTLY waits for every transaction already open on the outbox, and
        # the relay must keep delivering meanwhile.
        self._dropping: asyncio.Task[None] | None = None
        self.upcasters = upcasters if upcasters is not None else default_upcasters
        self.policies = policies if policies is not None else default_policies
        self.monitor = RelayMonitor()  # metrics and liveness (alchemium.events.monitoring)
        self._started = False

    # -- public API --------------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (PostgreSQL, ``listen=True``, in ``run``)."""
        return self._listening.is_set()

    async def wait_listening(self, timeout: float | None = None) -> bool:
        """Wait until the LISTEN connection is up; False if ``timeout`` elapsed first."""
        try:
            await asyncio.wait_for(self._listening.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def start(self) -> None:
        """Await each publisher's optional ``start()`` (connect, check), once per relay.

        :meth:`run`, :meth:`drain` and :meth:`run_once` call it before their first claim,
        so a bad URL, missing credentials or a missing stream fail at start with the
        publisher's one-line error (``PublisherConfigurationError`` /
        ``PublisherUnavailableError``), not at the first event.
        """
        if self._started:
            return
        for publisher in self.publishers:
            await start_publisher(publisher)
        self._started = True

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in flight (safe from signal handlers)."""
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Start the next round now instead of after the poll interval."""
        self._wake.set()

    async def run_once(self) -> int:
        """Claim, publish and record one batch; returns how many rows were delivered.

        Touches the database three times (claim, heartbeat renewals, record), each in
        its own short transaction. Database errors propagate; :meth:`run` logs them
        and tries again.
        """
        await self.start()
        _, delivered = await self._round()
        return delivered

    async def drain(self) -> int:
        """Deliver what is due now, then return how many rows were delivered (one pass).

        Checks the lag and stranded destinations first (logged as :meth:`run` does),
        then runs rounds until one claims nothing (in ``ordered`` mode, delivering an
        event makes the next one of its aggregate due), until it has claimed as many
        rows as were undelivered when it started (so events committed meanwhile cannot
        keep it going forever), or until :meth:`stop` is called. Purges if
        ``retention`` is set. No LISTEN; database errors propagate.
        """
        self.upcasters.validate()
        await self.start()
        destinations = self._destinations()
        async with self.session_factory() as session:
            bound = await self.outbox.undelivered(session, destinations)
        await self._make_partitions()
        await self._check_lag()
        await self._run_fallbacks()
        before, claimed_total = self.stats.delivered, 0
        while not self._stopping.is_set() and claimed_total < bound:
            claimed = await self._rounds(most=bound - claimed_total)
            claimed_total += claimed
            if not claimed:
                break
        if self.retention is not None:
            if self.outbox.partition_by is not None:
                await self._drop_periods(self.retention)  # one pass: its drop is awaited
            else:
                while await self._purge(self.retention):
                    pass
        return self.stats.delivered - before

    async def run(self) -> None:
        """Deliver until :meth:`stop` is called; the batch in flight is finished first.

        Database errors (a restart, a dropped connection) are logged and retried with
        a backoff; the relay never gives up by itself.
        """
        await self.start()
        self._stopping.clear()
        self.upcasters.validate()
        listener: asyncio.Task[None] | None = None
        if self.listen:
            dsn = await self._listen_dsn()
            if dsn is not None:
                listener = asyncio.create_task(self._listen_forever(dsn))
        self.monitor.started(listen=listener is not None)
        logger.info(
            "relay %s started (destinations %s, batch %d, lease %.1fs, %s)",
            self.relay_id,
            ", ".join(self._destinations()) or "none yet",
            self.batch_size,
            self.lease,
            "LISTEN + polling" if listener else "polling only",
        )
        failures = 0
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    await self._rounds()
                    await self._housekeeping(idle=True)
                except Exception:
                    failures += 1
                    self.stats.errors += 1
                    delay = min(_RECONNECT_MAX, self.poll_interval * 2 ** min(failures - 1, 6))
                    logger.warning(
                        "relay %s: round failed (%d in a row), retrying in %.1fs",
                        self.relay_id,
                        failures,
                        delay,
                        exc_info=True,
                    )
                    await self._sleep(delay, wakeable=False)
                    continue
                failures = 0
                await self._sleep(self.poll_interval, wakeable=True)
        finally:
            self.monitor.stopped()
            if self._dropping is not None:
                # A detach it interrupts stays pending; the next drop finishes it.
                self._dropping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._dropping
                self._dropping = None
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            logger.info("relay %s stopped (%s)", self.relay_id, self.stats)

    # -- one round ---------------------------------------------------------------------------

    def _destinations(self) -> list[str]:
        return [d for p in self.publishers for d in destinations_of(p)]

    def _publisher_for(self) -> dict[str, Publisher]:
        return {d: p for p in self.publishers for d in destinations_of(p)}

    async def _round(self) -> tuple[int, int]:
        """Claim, publish and record one batch: ``(rows claimed, rows delivered)``."""
        with self._watched():
            batch = await self._claim()
            if not batch.rows:
                return 0, 0
            return len(batch.rows), await self._deliver(batch)

    async def _rounds(self, most: int | None = None) -> int:
        """Rounds while there is more to claim; returns how many rows were claimed.

        The next batch is claimed while this one is delivered, so the claim's round
        trip overlaps the publishing and recording instead of following them: after a
        full batch at once, and after any batch when a notification arrived while it was
        published (events committed meanwhile; not in ``ordered`` mode, where a claim
        made before this batch is recorded would skip the later events of its
        aggregates). A prefetched batch is claimed like any other (leased, fenced by its
        own token, its lease renewed from the claim on, so a slow publish of the batch
        before it cannot let it expire and be claimed again), and a relay that dies
        holding it only delays it by a lease. Stops when there is nothing more, at
        ``most`` rows claimed, or when :meth:`stop` is called.
        """
        with self._watched():
            claimed = 0
            upcoming = await self._claim()
            while True:
                if not upcoming.rows:
                    return claimed
                claimed += len(upcoming.rows)
                more = not self._stopping.is_set() and (most is None or claimed < most)
                full = len(upcoming.rows) >= self.batch_size
                following = asyncio.create_task(self._claim()) if more and full else None

                def claim_if_woken(more: bool = more) -> None:
                    nonlocal following
                    if following is None and more and self._woken():
                        # (_woken is False once stop() was called: it wakes the relay too.)
                        following = asyncio.create_task(self._claim())

                try:
                    await self._deliver(upcoming, published=claim_if_woken)
                    await self._housekeeping(idle=False)
                except BaseException:
                    if following is not None:
                        # Its rows, if it claimed any, come back to a relay when its lease ends.
                        following.cancel()
                        with contextlib.suppress(BaseException):
                            await (await following).release()
                    raise
                if following is None:
                    return claimed
                upcoming = await following

    def _woken(self) -> bool:
        """Whether a notification arrived since the last claim (and now is taken into
        account): events were committed that the next claim can see."""
        if self.ordered or self._stopping.is_set() or not self._wake.is_set():
            return False
        self._wake.clear()
        return True

    @contextlib.contextmanager
    def _watched(self) -> Iterator[None]:
        """Tell the monitor a round is in progress and how it ended (liveness, failures)."""
        self.monitor.round_started()
        try:
            yield
        except Exception as err:
            self.monitor.round_finished(err)
            raise
        self.monitor.round_finished()

    async def _claim(self) -> _Batch:
        """Claim a batch (its own short transaction), with the routes it was claimed for.

        With a tracer, a claim that found rows makes a ``claim`` span (see
        :func:`~alchemium.events.observe.claim_span`) that the batch's publish spans link to.
        """
        routes = self._publisher_for()
        token = uuid.uuid4()
        if not routes:
            return _Batch(routes, token, [])
        tracing = _telemetry.enabled and _telemetry.tracer() is not None
        started = time.time_ns() if tracing else 0
        async with self.session_factory() as session:
            conn = await autocommit(session)
            rows = await self.outbox.claim(
                conn,
                list(routes),
                limit=self.batch_size,
                lease=self.lease,
                token=token,
                claimed_by=self.relay_id,
                ordered=self.ordered,
            )
            if conn is session:  # in a transaction (see autocommit)
                await session.commit()
            dialect = session.get_bind().dialect.name
        self.stats.rounds += 1
        self.monitor.progressed()
        if not rows:
            return _Batch(routes, token, rows)
        logger.debug(
            "relay %s claimed %d row(s) under %s",
            self.relay_id,
            len(rows),
            token,
            extra={"claim_token": str(token), "relay_id": self.relay_id},
        )
        claim = None
        if tracing:
            claim = claim_span(
                self.outbox,
                dialect=dialect,
                relay_id=self.relay_id,
                token=token,
                rows=len(rows),
                started=started,
            )
        return _Batch(routes, token, rows, claim, asyncio.create_task(self._heartbeat(token)))

    async def _deliver(self, batch: _Batch, published: Callable[[], None] | None = None) -> int:
        """Publish the claimed batch (its lease renewed meanwhile), record the outcomes.

        ``published`` is called between the two (:meth:`_rounds` may claim there).
        """
        try:
            outcomes = await self._publish_all(batch)
        finally:
            await batch.release()
        if published is not None:
            published()
        return await self._record(batch.token, outcomes)

    async def _publish_all(self, batch: _Batch) -> list[_Outcome]:
        """Publish the batch's rows: one ``publish_many`` per batch publisher, ``publish``
        per row for the others (in claim order); one outcome per row, in claim order.

        With a tracer every row is published on its own, so each message carries the
        context of its own publish span (:func:`alchemium.telemetry.trace_headers`).
        """
        routes, rows, claim = batch.routes, batch.rows, batch.claim
        batches: dict[int, tuple[BatchPublisher, list[tuple[DeliveryRow, DomainEvent]]]] = {}
        outcomes: dict[int, _Outcome] = {}
        for row in rows:
            batcher = None if claim is not None else _batch_publisher(routes.get(row.destination))
            if batcher is None:
                outcomes[row.id] = await self._publish(routes, row, claim)
                continue
            try:
                event = prepare_delivery(row, self.upcasters)
            except Exception as err:  # noqa: BLE001 - recorded on the row (an UpcastError)
                outcomes[row.id] = _Outcome(row, err)
            else:
                batches.setdefault(id(batcher), (batcher, []))[1].append((row, event))
        for batcher, items in batches.values():
            for outcome in await self._publish_batch(batcher, items):
                outcomes[outcome.row.id] = outcome
        return [outcomes[row.id] for row in rows]

    async def _publish_batch(
        self, publisher: BatchPublisher, items: list[tuple[DeliveryRow, DomainEvent]]
    ) -> list[_Outcome]:
        """One ``publish_many`` for ``items`` (rows and their upcast events)."""
        rows = [row for row, _ in items]
        results: list[BaseException | None] = []

        async def publish_many() -> None:
            answered = await publisher.publish_many([(e, row.destination) for row, e in items])
            if len(answered) != len(rows):
                raise OutboxError(
                    f"{publisher!r}.publish_many returned {len(answered)} outcome(s) for "
                    f"{len(rows)} event(s)"
                )
            results.extend(answered)

        started = time.perf_counter()
        outcomes = await self._settle(rows, publish_many(), results)
        elapsed = time.perf_counter() - started  # each message waited for the whole batch
        for outcome in outcomes:
            self.monitor.published(outcome.row.destination, elapsed, ok=outcome.error is None)
        return outcomes

    async def _publish(
        self, routes: dict[str, Publisher], row: DeliveryRow, claim: SpanContext | None
    ) -> _Outcome:
        """Publish one row; ``claim``: the claim span's context when tracing (else None)."""
        publisher = routes.get(row.destination)
        started = time.perf_counter()
        try:
            if publisher is None:  # the publisher's names changed since the claim
                raise OutboxError(f"no publisher for destination {row.destination!r}")
            event = prepare_delivery(row, self.upcasters)
            sending = publisher.publish(event, row.destination)
            if claim is not None:
                with publish_span(row, publisher, claim):
                    await _within(self.publish_timeout, sending)
            else:
                await _within(self.publish_timeout, sending)
        except Exception as err:  # noqa: BLE001 - any publish failure is recorded on the row
            outcome = _Outcome(row, err)
        else:
            outcome = _Outcome(row, None)
        self.monitor.published(
            row.destination, time.perf_counter() - started, ok=outcome.error is None
        )
        return outcome

    async def _settle(
        self,
        rows: list[DeliveryRow],
        publishing: Awaitable[None],
        results: list[BaseException | None] | None = None,
    ) -> list[_Outcome]:
        """Await a batch's ``publishing`` within ``publish_timeout``: each row's outcome.

        Raising fails every row with that exception; otherwise each row has its entry
        of ``results`` (filled by a batch publisher) or, without ``results``, succeeded.
        """
        try:
            await _within(self.publish_timeout, publishing)
        except Exception as err:  # noqa: BLE001 - any publish failure is recorded on the row
            return [_Outcome(row, err) for row in rows]
        if results is None:
            return [_Outcome(row, None) for row in rows]
        return [_Outcome(row, result) for row, result in zip(rows, results, strict=True)]

    async def _heartbeat(self, token: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                async with self.session_factory() as session:
                    renewed = await self.outbox.renew(session, token, self.lease)
                    await session.commit()
            except Exception:
                logger.warning(
                    "relay %s could not renew its lease on %s",
                    self.relay_id,
                    token,
                    exc_info=True,
                    extra={"claim_token": str(token), "relay_id": self.relay_id},
                )
            else:
                logger.debug("relay %s renewed %d lease(s)", self.relay_id, renewed)

    async def _record(self, token: uuid.UUID, outcomes: list[_Outcome]) -> int:
        # The publishes are done: losing their outcome means publishing them again after
        # the lease, so a dropped connection (a database restart) is retried for about a
        # lease. Safe: recording is fenced by the token and only touches claimed rows.
        deadline = time.monotonic() + max(self.lease, 5.0)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._record_once(token, outcomes)
            except (exc.DBAPIError, OSError):
                if time.monotonic() >= deadline:
                    raise
                logger.warning(
                    "relay %s could not record the outcome of claim %s (attempt %d), retrying",
                    self.relay_id,
                    token,
                    attempt,
                    exc_info=attempt == 1,
                    extra={"claim_token": str(token), "relay_id": self.relay_id},
                )
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    async def _record_once(self, token: uuid.UUID, outcomes: list[_Outcome]) -> int:
        ok_rows = [o.row for o in outcomes if o.error is None]
        ok = [row.id for row in ok_rows]
        failed = [o for o in outcomes if o.error is not None]
        retried = dead = abandoned = fallbacks = 0
        retried_rows: list[DeliveryRow] = []
        dead_rows: list[DeliveryRow] = []  # dead or abandoned: given up
        async with self.session_factory() as session:
            # All delivered (the usual case) is one UPDATE: no transaction needed.
            conn = session if failed else await autocommit(session)
            delivered = await self.outbox.mark_delivered(conn, token, ok)
            now = await self._now_if_aged(session, failed)
            for outcome in failed:
                row, err = outcome.row, outcome.error
                policy = self.policies.get(row.destination)
                age = event_age(now, row.event) if now is not None else None
                gave_up = (policy or _NO_POLICY).gives_up(
                    attempts=row.attempts, max_attempts=self.max_attempts, age=age
                )
                if gave_up is None and isinstance(err, PermanentPublishError):
                    gave_up = DEAD  # the broker said it can never take this event
                error = f"{type(err).__name__}: {err}"
                if gave_up is None:
                    # A broker's "retry later" sets the delay; otherwise the backoff does.
                    delay = (
                        err.seconds
                        if isinstance(err, RetryLater)
                        else retry_delay(row.attempts, base=self.backoff_base, cap=self.backoff_cap)
                    )
                    written = await self.outbox.mark_failed(
                        session, token, error=error, retry_in=delay, row_id=row.id
                    )
                    retried += written
                    if written:
                        retried_rows.append(row)
                else:
                    fallback = policy is not None and policy.on_dead is not None
                    written = await self.outbox.mark_given_up(
                        session,
                        token,
                        row_id=row.id,
                        status=gave_up,
                        error=error,
                        fallback=fallback,
                    )
                    abandoned += written if gave_up == ABANDONED else 0
                    dead += written if gave_up != ABANDONED else 0
                    fallbacks += written if fallback else 0
                    if written:
                        dead_rows.append(row)
                self._log_failure(row, err, token, give_up=gave_up, written=bool(written))
            if conn is session:  # failures were written in a transaction
                await session.commit()
        if fallbacks:
            await self._run_fallbacks()
        self.stats.abandoned += abandoned
        lost = len(outcomes) - delivered - retried - dead - abandoned
        self.stats.delivered += delivered
        self.stats.retried += retried
        self.stats.dead += dead
        self.stats.lost_leases += lost
        self.monitor.recorded(ok_rows, delivered, retried_rows, dead_rows, lost)
        if logger.isEnabledFor(logging.DEBUG):
            for row in ok_rows:
                logger.debug(
                    "delivered event %s (%s) to %s",
                    row.event.id,
                    row.event.name,
                    row.destination,
                    extra=log_fields(
                        row.event,
                        row.destination,
                        attempt=row.attempts,
                        claim=token,
                        relay_id=self.relay_id,
                    ),
                )
        if lost:
            logger.warning(
                "relay %s lost the lease on %d row(s) of claim %s before recording them; "
                "another relay owns them now (they may be delivered twice)",
                self.relay_id,
                lost,
                token,
                extra={"claim_token": str(token), "relay_id": self.relay_id},
            )
        return delivered

    async def _now_if_aged(self, session: AsyncSession, failed: list[_Outcome]) -> Any:
        """The database's now, if a failed row's policy abandons by age (else None)."""
        for outcome in failed:
            policy = self.policies.get(outcome.row.destination)
            if policy is not None and policy.abandon_after is not None:
                return await self.outbox.database_time(session)
        return None

    async def _run_fallbacks(self) -> None:
        """Run the fallback handlers owed for this relay's destinations (policies.py)."""
        await run_fallbacks(
            self.outbox,
            self.session_factory,
            self._destinations(),
            self.policies,
            lease=self.lease,
            backoff_cap=self.backoff_cap,
            relay_id=self.relay_id,
        )

    def _log_failure(
        self,
        row: DeliveryRow,
        err: BaseException | None,
        token: uuid.UUID,
        *,
        give_up: str | None,
        written: bool,
    ) -> None:
        event = row.event
        if not written:
            return  # counted as a lost lease
        fields = log_fields(
            event, row.destination, attempt=row.attempts, claim=token, relay_id=self.relay_id
        )
        if give_up:
            logger.error(
                "event %s (%s) is %s for %s after %d attempt(s): %r",
                event.id,
                event.name,
                give_up,
                row.destination,
                row.attempts,
                err,
                extra=fields,
            )
        else:
            logger.warning(
                "event %s (%s) failed for %s (attempt %d of %d), will retry: %r",
                event.id,
                event.name,
                row.destination,
                row.attempts,
                self.max_attempts,
                err,
                extra=fields,
            )

    async def _housekeeping(self, *, idle: bool) -> None:
        now = time.monotonic()
        if now - self._partitions_made >= _PARTITIONS_EVERY:
            await self._make_partitions()
        if now - self._lag_checked >= self.lag_interval:
            self._lag_checked = now
            await self._check_lag()
            await self._run_fallbacks()
        if idle and self.retention is not None and now - self._purged >= 60.0:
            self._purged = now
            if await self._purge(self.retention):
                self._purged = -float("inf")  # more may be left: purge again next idle round

    async def _check_lag(self) -> None:
        """Refresh ``stats.oldest_pending_age`` and warn about stranded destinations."""
        served = self._destinations()
        async with self.session_factory() as session:
            self.stats.oldest_pending_age = (
                await self.outbox.lag(session, served) if served else None
            )
            overdue = await self.outbox.overdue(
                session, older_than=self.stranded_after, exclude=served
            )
            self.monitor.clock(await self.outbox.database_clock(session))
        now = time.monotonic()
        for found in overdue:
            last = self._stranded_warned.get(found.destination)
            if last is not None and now - last < self.stranded_after:
                continue
            self._stranded_warned[found.destination] = now
            hint = f"; {MAIN_MODULE_HINT}" if is_main_module_name(found.destination) else ""
            logger.warning(
                "relay %s: %d row(s) for destination %r are overdue (the oldest by %.0fs, "
                "threshold %.0fs) and this relay does not serve it; unless another relay "
                "does, they stay pending%s",
                self.relay_id,
                found.rows,
                found.destination,
                found.overdue,
                self.stranded_after,
                hint,
            )

    async def _make_partitions(self) -> None:
        """A partitioned outbox: make the partitions of the coming periods if missing."""
        if self.outbox.partition_by is None:
            return
        self._partitions_made = time.monotonic()
        async with self.session_factory() as session:
            made = await self.outbox.ensure_partitions(session)
            await session.commit()
        if made:
            logger.info(
                "relay %s made outbox partitions %s",
                self.relay_id,
                ", ".join(f"{p.start:%Y-%m-%d}" for p in made),
            )

    async def _purge(self, older_than: float) -> int:
        """Purge one batch of delivered rows older than ``older_than``; returns how many.

        A partitioned outbox instead drops every old period at once, in a task beside
        the rounds (one at a time), and returns 0: nothing is left for another batch.
        """
        if self.outbox.partition_by is not None:
            if self._dropping is None or self._dropping.done():
                self._dropping = asyncio.create_task(self._drop_in_background(older_than))
            return 0
        async with self.session_factory() as session:
            purged = await self.outbox.purge(session, older_than=older_than)
            await session.commit()
        if purged:
            logger.info("relay %s purged %d delivered row(s)", self.relay_id, purged)
        return purged

    async def _drop_in_background(self, older_than: float) -> None:
        """:meth:`_drop_periods` beside the rounds; a failure is logged, and tried again later."""
        try:
            await self._drop_periods(older_than)
        except Exception:
            self.stats.errors += 1
            logger.warning(
                "relay %s could not drop old outbox periods; it tries again in a minute",
                self.relay_id,
                exc_info=True,
            )

    async def _drop_periods(self, older_than: float) -> None:
        """Drop the periods of a partitioned outbox that ended ``older_than`` seconds ago."""
        async with self.session_factory() as session:
            report = await self.outbox.drop_partitions(session, older_than=older_than)
        for part in report.dropped:
            logger.info(
                "relay %s dropped the outbox period %s", self.relay_id, f"{part.start:%Y-%m-%d}"
            )
        for part, undelivered in report.kept:
            logger.info(
                "relay %s keeps the outbox period %s: %d undelivered row(s)",
                self.relay_id,
                f"{part.start:%Y-%m-%d}",
                undelivered,
            )

    async def _sleep(self, seconds: float, *, wakeable: bool) -> None:
        waiter = self._wake if wakeable else self._stopping
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter.wait(), seconds)

    # -- LISTEN ------------------------------------------------------------------------------

    async def _listen_dsn(self) -> str | None:
        async with self.session_factory() as session:
            bind = session.get_bind()
        if bind.dialect.name != "postgresql":
            return None
        return asyncpg_dsn(bind.engine.url)

    async def _listen_forever(self, dsn: str) -> None:
        """Keep a LISTEN connection up; every (re)connection triggers a round."""
        try:
            import asyncpg
        except ImportError:
            logger.warning("relay %s: asyncpg is not installed; polling only", self.relay_id)
            return
        attempt = 0
        while True:
            conn: Any = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(dsn, timeout=10)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.outbox.channel, lambda *_args: self._wake.set())
                attempt = 0
                self._listening.set()
                self.monitor.listen(True)
                self._wake.set()  # anything committed while we were not listening
                logger.info("relay %s listening on channel %r", self.relay_id, self.outbox.channel)
                while not lost.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(lost.wait(), _LISTEN_CHECK)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.execute("SELECT 1"), _LISTEN_CHECK)
                raise ConnectionError("LISTEN connection closed")
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._listening.clear()
                self.monitor.listen(False)
                attempt += 1
                delay = min(_RECONNECT_MAX, 0.5 * 2 ** min(attempt - 1, 6))
                logger.warning(
                    "relay %s: LISTEN connection lost or refused; polling meanwhile, "
                    "reconnecting in %.1fs",
                    self.relay_id,
                    delay,
                    exc_info=attempt == 1,
                )
                self._wake.set()
                await asyncio.sleep(delay)
            finally:
                self._listening.clear()
                self.monitor.listen(False)
                if conn is not None:
                    try:
                        # asyncpg aborts the socket itself if closing fails or is interrupted.
                        await conn.close(timeout=2)
                    except Exception:  # expected: the connection is being replaced
                        logger.debug(
                            "relay %s: LISTEN connection aborted", self.relay_id, exc_info=True
                        )
