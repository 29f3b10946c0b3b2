"""What one relay reports about itself: delivery counters, histograms and liveness.

:class:`RelayMonitor` is filled in by :class:`~alchemium.events.relay.OutboxRelay`
as it works and read by its Prometheus endpoint and health check
(:mod:`alchemium.events.monitoring`). Every figure is also recorded through the
OpenTelemetry metrics API when an SDK meter provider is configured
(:func:`alchemium.telemetry.meter`).

Labels are bounded: the destination (as many as the relay serves) and a fixed
outcome; never an aggregate, an event id or an event name.
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alchemium import telemetry as _telemetry
from alchemium.events.outbox_schema import DeliveryRow

__all__ = ["LATENCY_BUCKETS", "PUBLISH_BUCKETS", "Histogram", "RelayMonitor"]

PUBLISH_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the publish duration histogram."""
LATENCY_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 21600.0, 86400.0,
)  # fmt: skip
"""Upper bounds (seconds) of the commit-to-delivered histogram: milliseconds to a day."""

UNKNOWN_DESTINATION = "unknown"
"""Destination label of rows delivered in a round that lost leases on rows of several
destinations: which of them this relay recorded cannot be told apart."""


@dataclass
class Histogram:
    """Counts of observed values per bucket (upper bounds ``bounds``, then +Inf), sum, count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last, as Prometheus wants them."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class RelayMonitor:
    """Counters, histograms and liveness of one relay (not shared between relays).

    Figures: ``deliveries[(destination, outcome)]`` with outcome ``delivered``,
    ``retried`` (failed, will be retried) or ``dead``; ``lost_leases`` (rows another
    relay took over before this one recorded them); ``publish_duration[(destination,
    outcome)]`` with outcome ``ok`` or ``error``; ``commit_to_delivered[destination]``
    (seconds from the event's ``occurred_at`` to its delivery, see :meth:`delivered`).

    Liveness (monotonic seconds): whether :meth:`OutboxRelay.run` is running, since
    when a round has been in progress and when it last made progress, since when
    rounds have been failing, and since when the LISTEN connection is down.
    """

    def __init__(self) -> None:
        self.deliveries: dict[tuple[str, str], int] = {}
        self.lost_leases = 0
        self.publish_duration: dict[tuple[str, str], Histogram] = {}
        self.commit_to_delivered: dict[str, Histogram] = {}
        self.running = False
        self.started_at: float | None = None
        self.busy_since: float | None = None
        self.last_progress = time.monotonic()
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.listen_expected = False
        self.listening = False
        self.listen_changed = time.monotonic()
        self.clock_offset: float | None = None  # database clock minus this host's, seconds
        self._instruments: tuple[Any, Any, Any, Any] | None = None
        self._meter: Any = None
        # The instruments as looked up when the rounds in progress began: a publish
        # records into them without asking OpenTelemetry for its provider per event.
        self._round_instruments: tuple[Any, Any, Any, Any] | None = None

    # -- liveness ----------------------------------------------------------------------------

    def started(self, *, listen: bool) -> None:
        """``run`` began; ``listen``: a LISTEN connection is expected (PostgreSQL, listen=True)."""
        self.running = True
        self.started_at = self.last_progress = time.monotonic()
        self.listen_expected = listen
        self.listening = False
        self.listen_changed = self.last_progress

    def stopped(self) -> None:
        """``run`` returned."""
        self.running = False
        self.busy_since = None

    def round_started(self) -> None:
        """Rounds (claim, publish, record; the next batch claimed during the publishes) begin."""
        self.busy_since = self.last_progress = time.monotonic()
        self._round_instruments = self._otel()

    def progressed(self) -> None:
        """A step of the round in progress finished (a claim; publishes and records tell too)."""
        self.last_progress = time.monotonic()

    def round_finished(self, error: BaseException | None = None) -> None:
        """The round ended, failed with ``error`` if given (database errors, mostly)."""
        now = time.monotonic()
        self.busy_since = None
        self.last_progress = now
        if error is None:
            self.failing_since = self.last_error = None
        else:
            if self.failing_since is None:
                self.failing_since = now
            self.last_error = f"{type(error).__name__}: {error}"[:500]

    def listen(self, up: bool) -> None:
        """The LISTEN connection came up or went down."""
        if up != self.listening:
            self.listening = up
            self.listen_changed = time.monotonic()

    def clock(self, database_now: dt.datetime) -> None:
        """Remember how far the database clock is from this host's (read at lag checks)."""
        if database_now.tzinfo is None:
            database_now = database_now.replace(tzinfo=dt.timezone.utc)
        self.clock_offset = database_now.timestamp() - time.time()

    # -- figures -----------------------------------------------------------------------------

    def published(self, destination: str, seconds: float, *, ok: bool) -> None:
        """One publish to ``destination`` took ``seconds`` and succeeded or not."""
        self.last_progress = time.monotonic()
        outcome = "ok" if ok else "error"
        histogram = self.publish_duration.get((destination, outcome))
        if histogram is None:
            histogram = self.publish_duration[(destination, outcome)] = Histogram(PUBLISH_BUCKETS)
        histogram.observe(seconds)
        instruments = self._round_instruments
        if instruments is not None:
            instruments[2].record(seconds, {"destination": destination, "outcome": outcome})

    def recorded(
        self,
        ok: Sequence[DeliveryRow],
        delivered: int,
        retried: Iterable[DeliveryRow],
        dead: Iterable[DeliveryRow],
        lost: int,
    ) -> None:
        """The outcomes one round recorded: ``delivered`` of the ``ok`` rows, the failed rows
        ``retried`` or ``dead``, and ``lost`` rows whose lease another relay had taken.
        """
        self.last_progress = time.monotonic()
        counts: dict[tuple[str, str], int] = {}
        rows: Sequence[DeliveryRow] = ok
        if delivered != len(ok):  # a lost lease: which rows were recorded is unknown
            destinations = {r.destination for r in ok}
            only = destinations.pop() if len(destinations) == 1 else UNKNOWN_DESTINATION
            rows = ()
            if delivered:
                counts[(only, "delivered")] = delivered
        for row in rows:
            key = (row.destination, "delivered")
            counts[key] = counts.get(key, 0) + 1
        for outcome, failed in (("retried", retried), ("dead", dead)):
            for row in failed:
                key = (row.destination, outcome)
                counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            self.deliveries[key] = self.deliveries.get(key, 0) + n
        self.lost_leases += lost
        self._delivered(rows)
        instruments = self._otel()
        if instruments is not None:
            for (destination, outcome), n in counts.items():
                instruments[0].add(n, {"destination": destination, "outcome": outcome})
            if lost:
                instruments[1].add(lost)

    def _delivered(self, rows: Sequence[DeliveryRow]) -> None:
        """Commit-to-delivered latency of ``rows``, delivered now.

        From the event's ``occurred_at`` (the writer's clock, at the flush that recorded
        it, normally just before COMMIT) to now on the database clock (this host's
        clock plus the offset read at the last lag check; this host's clock before
        the first one). Like the lag, a writer whose clock runs ahead makes it read low.
        """
        if not rows:
            return
        now = time.time() + (self.clock_offset or 0.0)
        instruments = self._otel()
        for row in rows:
            latency = max(0.0, now - row.event.occurred_at.timestamp())
            histogram = self.commit_to_delivered.get(row.destination)
            if histogram is None:
                histogram = self.commit_to_delivered[row.destination] = Histogram(LATENCY_BUCKETS)
            histogram.observe(latency)
            if instruments is not None:
                instruments[3].record(latency, {"destination": row.destination})

    def _otel(self) -> tuple[Any, Any, Any, Any] | None:
        """The OpenTelemetry instruments, created once an SDK meter provider is there."""
        if not _telemetry.enabled:
            return None
        meter = _telemetry.meter()
        if meter is None:
            return None
        if meter is not self._meter:
            self._meter = meter
            self._instruments = (
                meter.create_counter(
                    "alchemium.relay.deliveries",
                    unit="{delivery}",
                    description="Delivery attempts recorded by the relay, by outcome "
                    "(delivered, retried, dead)",
                ),
                meter.create_counter(
                    "alchemium.relay.lost_leases",
                    unit="{delivery}",
                    description="Rows another relay took over before this one recorded them",
                ),
                meter.create_histogram(
                    "alchemium.relay.publish.duration",
                    unit="s",
                    description="Duration of one publish to a destination",
                    explicit_bucket_boundaries_advisory=list(PUBLISH_BUCKETS),
                ),
                meter.create_histogram(
                    "alchemium.relay.commit_to_delivered",
                    unit="s",
                    description="From the event's occurred_at to its delivery by the relay",
                    explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
                ),
            )
        return self._instruments
