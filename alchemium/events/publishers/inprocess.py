"""Deliver outbox rows to the in-process subscribers of a registry."""

from __future__ import annotations

from alchemium.domain_event import DomainEvent
from alchemium.errors import EventError
from alchemium.events.subscribers import SubscriberRegistry, default_registry

__all__ = ["InProcessPublisher"]


class InProcessPublisher:
    """Calls the subscriber a delivery row is for, and only that one.

    Each subscriber of ``registry`` is a destination of its own (its ``name``), so a
    handler that succeeded for an event is never called again because another
    handler of the same event failed. These are the same handlers the after-commit
    dispatch calls; the relay delivers what that dispatch could not (a failing
    handler, a process that died after commit).
    """

    def __init__(self, registry: SubscriberRegistry | None = None) -> None:
        self.registry = registry if registry is not None else default_registry

    @property
    def name(self) -> tuple[str, ...]:
        """The names of the registry's subscribers, read at every claim."""
        return tuple(s.name for s in self.registry.subscribers)

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """Call subscriber ``destination`` with ``event``; its exception propagates."""
        subscriber = self.registry.subscriber(destination)
        if subscriber is None:
            raise EventError(
                f"no subscriber named {destination!r} in registry {self.registry.name!r}"
            )
        await subscriber(event)

    def __repr__(self) -> str:
        return f"InProcessPublisher({self.registry!r})"
