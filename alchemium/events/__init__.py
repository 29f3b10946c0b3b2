"""Domain events: recording, the transactional outbox, dispatch to subscribers.

Import names from here; the submodules are the implementation.
"""

from alchemium.events.event import DomainEvent
from alchemium.events.outbox import (
    Outbox,
    OutboxStatus,
    create_outbox_tables,
    default_outbox,
    disable_outbox,
    enable_outbox,
)
from alchemium.events.recording import EventSourceMixin, add_before_commit_hook
from alchemium.events.subscribers import Subscriber, SubscriberRegistry, default_registry, off, on
from alchemium.events.testing import capture_events

__all__ = [
    "DomainEvent",
    "EventSourceMixin",
    "Outbox",
    "OutboxStatus",
    "Subscriber",
    "SubscriberRegistry",
    "add_before_commit_hook",
    "capture_events",
    "create_outbox_tables",
    "default_outbox",
    "default_registry",
    "disable_outbox",
    "enable_outbox",
    "off",
    "on",
]
