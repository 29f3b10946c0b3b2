"""Per-destination delivery policies: when a relay gives up, and what runs when it does.

A relay retries a failed delivery with backoff and marks it ``dead`` after its
``max_attempts``. A :class:`DeliveryPolicy` registered for a destination changes
that for the destination alone:

- ``abandon_after_attempts`` / ``abandon_after`` (seconds since the event occurred):
  a failed attempt past either limit makes the delivery ``abandoned`` instead of
  retrying it (or leaving it dead). Abandoned rows are never retried and are left
  out of a requeue of every dead row unless asked for (``include_abandoned``,
  ``--include-abandoned``): for events whose value expires (a notification, a
  cache refresh) that no operator should replay by accident.
- ``on_dead``: a fallback handler (alert, write to a parking table, ...) called
  with a :class:`~alchemium.events.outbox_lifecycle.GivenUpDelivery` once a
  delivery of the destination becomes dead or abandoned.

The fallback's guarantee is **at least once, after the state change is committed**:
the UPDATE that makes a row dead or abandoned also marks its fallback as owed; the
relay then claims it (leased, so two relays do not run it together), runs the
handler and clears the mark. A relay that dies in between leaves the mark, and a
relay serving the destination runs it at its next start or lag check. A handler
that raises is logged (ERROR, ``alchemium.relay``) and retried with the relay's
backoff; it never changes the delivery's state. Requeueing the row before the
fallback ran cancels it.

The module-level :func:`set_delivery_policy` registers in :data:`default_policies`,
which relays use unless given ``policies=``; a module imported by ``alchemium relay
--import`` can register them. :func:`prepare_delivery` is what a relay publishes
for a claimed row: the event upcast to its current schema version, marked as a
replay when a replay made the delivery.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from alchemium.domain_event import DomainEvent
from alchemium.errors import EventConfigurationError
from alchemium.events.dispatch import retry_delay
from alchemium.events.outbox_lifecycle import GivenUpDelivery
from alchemium.events.outbox_schema import ABANDONED, DEAD, DeliveryRow
from alchemium.events.upcasting import UpcasterRegistry

if TYPE_CHECKING:
    from alchemium.events.outbox import Outbox

__all__ = [
    "DeliveryPolicies",
    "DeliveryPolicy",
    "FallbackHandler",
    "default_policies",
    "prepare_delivery",
    "run_fallbacks",
    "set_delivery_policy",
]

logger = logging.getLogger("alchemium.relay")

FallbackHandler = Callable[[GivenUpDelivery], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """When a destination's failed deliveries are abandoned, and its fallback handler.

    ``abandon_after_attempts``: abandon at a failed attempt number this high or
    higher. ``abandon_after``: abandon at a failed attempt once the event is this
    many seconds old (database clock minus the event's ``occurred_at``).
    ``on_dead``: called once the delivery is dead or abandoned (at least once).
    """

    abandon_after_attempts: int | None = None
    abandon_after: float | None = None
    on_dead: FallbackHandler | None = None

    def gives_up(self, *, attempts: int, max_attempts: int, age: float | None) -> str | None:
        """``"abandoned"``, ``"dead"`` or None (retry) for a failed attempt number ``attempts``."""
        if self.abandon_after_attempts is not None and attempts >= self.abandon_after_attempts:
            return ABANDONED
        if self.abandon_after is not None and age is not None and age >= self.abandon_after:
            return ABANDONED
        return DEAD if attempts >= max_attempts else None


class DeliveryPolicies:
    """Delivery policies by destination name."""

    def __init__(self) -> None:
        self._by_destination: dict[str, DeliveryPolicy] = {}

    def set(self, destination: str, policy: DeliveryPolicy) -> None:
        """Use ``policy`` for ``destination`` (replacing an earlier one).

        Raises EventConfigurationError for a limit that is not positive or a fallback
        that is not callable.
        """
        if not isinstance(destination, str) or not destination:
            raise EventConfigurationError("a delivery policy needs a destination name")
        if policy.abandon_after_attempts is not None and policy.abandon_after_attempts < 1:
            raise EventConfigurationError(
                f"destination {destination!r}: abandon_after_attempts must be >= 1, "
                f"got {policy.abandon_after_attempts!r}"
            )
        if policy.abandon_after is not None and not policy.abandon_after > 0:
            raise EventConfigurationError(
                f"destination {destination!r}: abandon_after must be > 0 seconds, "
                f"got {policy.abandon_after!r}"
            )
        if policy.on_dead is not None and not callable(policy.on_dead):
            raise EventConfigurationError(
                f"destination {destination!r}: on_dead must be callable, got {policy.on_dead!r}"
            )
        self._by_destination[destination] = policy

    def get(self, destination: str) -> DeliveryPolicy | None:
        """The policy of ``destination``, if any."""
        return self._by_destination.get(destination)

    def with_fallback(self, destinations: Sequence[str]) -> list[str]:
        """Those of ``destinations`` whose policy has a fallback handler."""
        return [
            d
            for d in destinations
            if (p := self._by_destination.get(d)) is not None and p.on_dead is not None
        ]

    @contextmanager
    def scoped(self) -> Iterator[DeliveryPolicies]:
        """Within the block, policies set on this object are undone afterwards."""
        before = dict(self._by_destination)
        try:
            yield self
        finally:
            self._by_destination = before


default_policies = DeliveryPolicies()


def set_delivery_policy(
    destination: str,
    *,
    abandon_after_attempts: int | None = None,
    abandon_after: float | None = None,
    on_dead: FallbackHandler | None = None,
) -> DeliveryPolicy:
    """Register ``destination``'s policy in :data:`default_policies`; returns it."""
    policy = DeliveryPolicy(abandon_after_attempts, abandon_after, on_dead)
    default_policies.set(destination, policy)
    return policy


def prepare_delivery(row: DeliveryRow, upcasters: UpcasterRegistry) -> DomainEvent:
    """The event a relay publishes for ``row``: upcast, and marked if a replay made it.

    Raises UpcastError when the stored event cannot be upcast (the relay records it
    on the row like any failed publish).
    """
    event = upcasters.upcast(row.event)
    if row.replay:
        metadata = MappingProxyType({**event.metadata, "replay": True})
        event = dataclasses.replace(event, metadata=metadata)
    return event


def event_age(now: dt.datetime, event: DomainEvent) -> float:
    """Seconds from ``event.occurred_at`` to ``now`` (the database's), at least 0."""
    return max(0.0, (now - event.occurred_at).total_seconds())


async def run_fallbacks(
    outbox: Outbox,
    sessions: Callable[[], AsyncSession],
    destinations: Sequence[str],
    policies: DeliveryPolicies,
    *,
    lease: float,
    backoff_cap: float,
    relay_id: str,
) -> int:
    """Run the owed fallback handlers of ``destinations``; returns how many succeeded.

    Claims them (leased for ``lease`` seconds) in one short transaction, calls each
    handler with no transaction open, then records each outcome in another: done,
    or owed again after a backoff (up to ``backoff_cap`` seconds) if it raised.
    """
    served = policies.with_fallback(destinations)
    if not served:
        return 0
    token = uuid.uuid4()
    async with sessions() as session:
        owed = await outbox.claim_fallbacks(session, served, token=token, lease=lease)
        await session.commit()
    outcomes: list[tuple[GivenUpDelivery, float | None]] = []
    for delivery in owed:
        policy = policies.get(delivery.destination)
        handler = policy.on_dead if policy is not None else None
        try:
            if handler is None:  # the policy changed since the claim
                raise EventConfigurationError(
                    f"no fallback handler for destination {delivery.destination!r} any more"
                )
            result = handler(delivery)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "relay %s: the fallback handler of %r failed for %s delivery %d (event %s, "
                "%s); it will be retried, the delivery stays %s",
                relay_id,
                delivery.destination,
                delivery.status,
                delivery.id,
                delivery.event.id,
                delivery.event.name,
                delivery.status,
            )
            outcomes.append((delivery, retry_delay(7, cap=backoff_cap)))  # about a minute
        else:
            outcomes.append((delivery, None))
    async with sessions() as session:
        for delivery, retry_in in outcomes:
            await outbox.finish_fallback(session, token, delivery.id, retry_in=retry_in)
        await session.commit()
    return sum(1 for _, retry_in in outcomes if retry_in is None)
