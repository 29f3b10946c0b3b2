"""The ``Publisher`` protocol: the relay's only plug point."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from alchemium.domain_event import DomainEvent

__all__ = ["Publisher", "destinations_of"]


@runtime_checkable
class Publisher(Protocol):
    """Delivers events to the destination(s) named by :attr:`name`.

    ``name`` is one destination (``"redis"``) or several (an in-process publisher
    drains one destination per subscriber); the relay reads it before every claim,
    so it may change over time. ``publish`` must return only once the event is
    durably accepted (broker confirm, handler finished) and raise otherwise; it is
    called with no database transaction open and may be called more than once for
    the same event (delivery is at least once: consumers deduplicate on
    ``event.id``).

    A publisher that writes to a broker puts :func:`alchemium.telemetry.trace_headers`
    ``(event)`` into its message headers, so consumers can continue the trace, and
    may name its broker in a ``messaging_system`` attribute (``"kafka"``,
    ``"nats"``, ...) for the relay's publish span.
    """

    @property
    def name(self) -> str | Sequence[str]:
        """The destination (or destinations) this publisher drains."""
        ...

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """Deliver ``event`` to ``destination`` (one of :attr:`name`), or raise."""
        ...


def destinations_of(publisher: Publisher) -> tuple[str, ...]:
    """The destinations ``publisher`` drains, as a tuple."""
    name = publisher.name
    return (name,) if isinstance(name, str) else tuple(name)
