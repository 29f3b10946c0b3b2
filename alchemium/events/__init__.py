"""Domain events: recording, the transactional outbox, dispatch to subscribers.

Import names from here; the submodules are the implementation.
"""

from alchemium.domain_event import DomainEvent
from alchemium.events.audit import (
    AuditEntry,
    AuditLog,
    audit_history,
    create_audit_table,
    disable_audit,
    enable_audit,
)
from alchemium.events.inbox import Inbox, enable_inbox
from alchemium.events.marks import flush_delivery_marks
from alchemium.events.outbox import (
    DestinationStatus,
    Outbox,
    OutboxStatus,
    create_outbox_tables,
    default_outbox,
    disable_outbox,
    enable_outbox,
)
from alchemium.events.payloads import decode_payload
from alchemium.events.publishers import (
    BatchPublisher,
    CloudEventsEnvelope,
    InProcessPublisher,
    KafkaPublisher,
    NatsPublisher,
    PermanentPublishError,
    Publisher,
    PublisherConfigurationError,
    PublisherUnavailableError,
    PubSubPublisher,
    RabbitMQPublisher,
    RedisStreamPublisher,
    RetryLater,
    SnsPublisher,
    SqsPublisher,
    WebhookPublisher,
)
from alchemium.events.recording import (
    EventSourceMixin,
    add_before_commit_hook,
    remove_before_commit_hook,
)
from alchemium.events.relay import OutboxRelay, RelayStats
from alchemium.events.subscribers import (
    MainModuleNameWarning,
    Subscriber,
    SubscriberRegistry,
    default_registry,
    off,
    on,
)
from alchemium.events.testing import capture_events, capture_on_commit

__all__ = [
    "AuditEntry",
    "AuditLog",
    "BatchPublisher",
    "CloudEventsEnvelope",
    "DestinationStatus",
    "DomainEvent",
    "EventSourceMixin",
    "InProcessPublisher",
    "Inbox",
    "KafkaPublisher",
    "MainModuleNameWarning",
    "NatsPublisher",
    "Outbox",
    "OutboxRelay",
    "OutboxStatus",
    "PermanentPublishError",
    "PubSubPublisher",
    "Publisher",
    "PublisherConfigurationError",
    "PublisherUnavailableError",
    "RabbitMQPublisher",
    "RedisStreamPublisher",
    "RelayStats",
    "RetryLater",
    "SnsPublisher",
    "SqsPublisher",
    "Subscriber",
    "SubscriberRegistry",
    "WebhookPublisher",
    "add_before_commit_hook",
    "audit_history",
    "capture_events",
    "capture_on_commit",
    "create_audit_table",
    "create_outbox_tables",
    "decode_payload",
    "default_outbox",
    "default_registry",
    "disable_audit",
    "disable_outbox",
    "enable_audit",
    "enable_inbox",
    "enable_outbox",
    "flush_delivery_marks",
    "off",
    "on",
    "remove_before_commit_hook",
]
