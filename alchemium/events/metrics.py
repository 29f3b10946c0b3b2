"""Outbox metrics: gauges read from the database, and the Prometheus text of a relay.

Two sources, as in ``docs/observability.md``:

- **Outbox gauges** (:class:`OutboxGauges`): rows by destination and status, the lag
  and the overdue time per destination, relays holding leases. Read from the outbox
  tables (true across every relay and writer), cached for a few seconds so frequent
  scrapes cost one pair of queries per cache period.
- **Relay figures** (:class:`~alchemium.events.relay_monitor.RelayMonitor`):
  deliveries, retries, dead letters, lost leases, publish durations and
  commit-to-delivered latencies counted by one relay.

:func:`prometheus_text` renders both in the Prometheus text format (0.0.4);
:meth:`OutboxGauges.observe` also reports the gauges through the OpenTelemetry
metrics API. Every label is bounded: destination, status, outcome.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from alchemium import telemetry as _telemetry
from alchemium.events.outbox_admin import DestinationStatus, OutboxAdministration
from alchemium.events.outbox_schema import ABANDONED, CLAIMED, DEAD, DELIVERED, PENDING
from alchemium.events.relay_monitor import Histogram, RelayMonitor

__all__ = ["CONTENT_TYPE", "OutboxGauges", "OutboxSnapshot", "prometheus_text"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = (PENDING, CLAIMED, DELIVERED, DEAD, ABANDONED)

logger = logging.getLogger("alchemium.relay")


@dataclass(frozen=True, slots=True)
class OutboxSnapshot:
    """The outbox gauges at one moment: per-destination status and the relays holding leases.

    ``read_at`` is ``time.monotonic()`` when it was read.
    """

    destinations: tuple[DestinationStatus, ...]
    relays_holding_leases: int
    read_at: float

    def lag(self, destination: str) -> float | None:
        """The lag of ``destination`` (None when it has nothing undelivered or no rows)."""
        for status in self.destinations:
            if status.destination == destination:
                return status.oldest_pending_age
        return None


class OutboxGauges:
    """Outbox figures read from the database, at most every ``max_age`` seconds.

    ``read()`` runs two statements of :meth:`Outbox.destination_status` (counting
    every delivery row: keep ``max_age`` at a few seconds, not less, on large
    tables) and one of :meth:`Outbox.leaseholders`, in one short session. Concurrent
    callers share one read.
    """

    def __init__(
        self,
        session_factory: Callable[[], AsyncSession],
        outbox: OutboxAdministration,
        *,
        max_age: float = 5.0,
    ) -> None:
        self.session_factory = session_factory
        self.outbox = outbox
        self.max_age = max_age
        self._snapshot: OutboxSnapshot | None = None
        self._lock = asyncio.Lock()
        self._observed = False

    @property
    def snapshot(self) -> OutboxSnapshot | None:
        """The last snapshot read, if any (no database access)."""
        return self._snapshot

    async def read(self, max_age: float | None = None) -> OutboxSnapshot:
        """The snapshot, read again from the database if older than ``max_age`` seconds.

        Database errors propagate.
        """
        limit = self.max_age if max_age is None else max_age
        async with self._lock:
            snapshot = self._snapshot
            if snapshot is not None and time.monotonic() - snapshot.read_at <= limit:
                return snapshot
            async with self.session_factory() as session:
                per = await self.outbox.destination_status(session)
                holders = await self.outbox.leaseholders(session)
            self._snapshot = OutboxSnapshot(tuple(per), holders, time.monotonic())
            return self._snapshot

    async def refresh_forever(self, interval: float) -> None:
        """Read every ``interval`` seconds until cancelled (for :meth:`observe`).

        A failed read is logged (``alchemium.relay``, WARNING) and the last snapshot kept.
        """
        while True:
            try:
                await self.read(max_age=0)
            except Exception:
                logger.warning("could not read the outbox gauges", exc_info=True)
            await asyncio.sleep(interval)

    def observe(self) -> bool:
        """Report the gauges through the OpenTelemetry metrics API (once); False without an SDK.

        The callbacks read the last snapshot (they cannot wait for the database):
        keep it fresh with :meth:`refresh_forever`.
        """
        meter = _telemetry.meter() if _telemetry.enabled else None
        if meter is None:
            return False
        if self._observed:
            return True
        self._observed = True
        from opentelemetry.metrics import CallbackOptions, Observation

        def gauge(
            values: Callable[[OutboxSnapshot], Iterable[tuple[float, dict[str, str]]]],
        ) -> Any:
            def callback(_options: CallbackOptions) -> Iterator[Observation]:
                snapshot = self._snapshot
                if snapshot is not None:
                    for value, attributes in values(snapshot):
                        yield Observation(value, attributes)

            return [callback]

        meter.create_observable_gauge(
            "alchemium.outbox.rows",
            gauge(_rows),
            unit="{row}",
            description="Outbox delivery rows by destination and status (from the database)",
        )
        meter.create_observable_gauge(
            "alchemium.outbox.lag",
            gauge(
                lambda s: (
                    (st.oldest_pending_age or 0.0, {"destination": st.destination})
                    for st in s.destinations
                )
            ),
            unit="s",
            description="Age of the oldest undelivered event per destination (0: none)",
        )
        meter.create_observable_gauge(
            "alchemium.outbox.overdue",
            gauge(
                lambda s: (
                    (st.overdue or 0.0, {"destination": st.destination}) for st in s.destinations
                )
            ),
            unit="s",
            description="How long the oldest due row per destination has been due (0: none)",
        )
        meter.create_observable_gauge(
            "alchemium.outbox.relays_holding_leases",
            gauge(lambda s: ((s.relays_holding_leases, {}),)),
            unit="{relay}",
            description="Relays holding a live lease on outbox rows",
        )
        return True


def _rows(snapshot: OutboxSnapshot) -> Iterator[tuple[float, dict[str, str]]]:
    for st in snapshot.destinations:
        for status, n in zip(
            STATUSES,
            (st.pending, st.claimed, st.delivered, st.dead, st.abandoned),
            strict=True,
        ):
            yield n, {"destination": st.destination, "status": status}


# -- Prometheus text format ---------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Sequence[tuple[str, str]]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, labels: Sequence[tuple[str, str]], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, labels: Sequence[tuple[str, str]], h: Histogram) -> None:
        for bound, count in h.cumulative():
            self.sample(f"{name}_bucket", [*labels, ("le", _number(bound))], count)
        self.sample(f"{name}_sum", labels, h.sum)
        self.sample(f"{name}_count", labels, h.count)


def prometheus_text(monitor: RelayMonitor | None, snapshot: OutboxSnapshot | None) -> str:
    """The Prometheus text exposition of a relay's figures and the outbox gauges."""
    out = _Text()
    if snapshot is not None:
        out.family(
            "alchemium_outbox_rows", "gauge", "Outbox delivery rows by destination and status"
        )
        for value, attributes in _rows(snapshot):
            out.sample("alchemium_outbox_rows", list(attributes.items()), value)
        out.family(
            "alchemium_outbox_lag_seconds",
            "gauge",
            "Age of the oldest undelivered event per destination (0: nothing undelivered)",
        )
        for st in snapshot.destinations:
            out.sample(
                "alchemium_outbox_lag_seconds",
                [("destination", st.destination)],
                st.oldest_pending_age or 0.0,
            )
        out.family(
            "alchemium_outbox_overdue_seconds",
            "gauge",
            "How long the oldest due row per destination has been due (0: none due)",
        )
        for st in snapshot.destinations:
            out.sample(
                "alchemium_outbox_overdue_seconds",
                [("destination", st.destination)],
                st.overdue or 0.0,
            )
        out.family(
            "alchemium_outbox_relays_holding_leases", "gauge", "Relays holding a live lease on rows"
        )
        out.sample("alchemium_outbox_relays_holding_leases", [], snapshot.relays_holding_leases)
    if monitor is not None:
        _relay_text(out, monitor)
    return "\n".join(out.lines) + "\n"


def _relay_text(out: _Text, monitor: RelayMonitor) -> None:
    out.family("alchemium_relay_running", "gauge", "1 while this relay's loop runs")
    out.sample("alchemium_relay_running", [], 1 if monitor.running else 0)
    if monitor.listen_expected:
        out.family("alchemium_relay_listening", "gauge", "1 while the LISTEN connection is up")
        out.sample("alchemium_relay_listening", [], 1 if monitor.listening else 0)
    out.family(
        "alchemium_relay_deliveries_total",
        "counter",
        "Delivery attempts recorded by this relay by outcome: delivered, retried, dead",
    )
    for (destination, outcome), n in sorted(monitor.deliveries.items()):
        out.sample(
            "alchemium_relay_deliveries_total",
            [("destination", destination), ("outcome", outcome)],
            n,
        )
    out.family(
        "alchemium_relay_lost_leases_total",
        "counter",
        "Rows another relay took over before this relay recorded them",
    )
    out.sample("alchemium_relay_lost_leases_total", [], monitor.lost_leases)
    out.family("alchemium_relay_publish_duration_seconds", "histogram", "Duration of one publish")
    for (destination, outcome), h in sorted(monitor.publish_duration.items()):
        out.histogram(
            "alchemium_relay_publish_duration_seconds",
            [("destination", destination), ("outcome", outcome)],
            h,
        )
    out.family(
        "alchemium_relay_commit_to_delivered_seconds",
        "histogram",
        "From an event's occurred_at to its delivery by this relay",
    )
    for destination, h in sorted(monitor.commit_to_delivered.items()):
        out.histogram(
            "alchemium_relay_commit_to_delivered_seconds", [("destination", destination)], h
        )
