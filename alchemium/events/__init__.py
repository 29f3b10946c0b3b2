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
from alchemium.events.erasure import (
    SubjectKeys,
    create_subject_key_table,
    disable_erasure,
    enable_erasure,
    erase_subject,
    reveal_event,
    reveal_payload,
    subject_id,
)
from alchemium.events.inbox import Inbox, enable_inbox
from alchemium.events.marks import flush_delivery_marks
from alchemium.events.metrics import OutboxGauges
from alchemium.events.monitoring import (
    RelayHealth,
    monitoring_app,
    probe_relay,
    relay_health,
    serve_monitoring,
)
from alchemium.events.outbox import (
    DestinationStatus,
    Outbox,
    OutboxStatus,
    create_outbox_tables,
    default_outbox,
    disable_outbox,
    enable_outbox,
)
from alchemium.events.outbox_lifecycle import GivenUpDelivery, ReplayReport
from alchemium.events.payloads import decode_payload
from alchemium.events.policies import DeliveryPolicy, set_delivery_policy
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
from alchemium.events.sensitive import ERASED, REDACTED, set_sensitive_hash_key
from alchemium.events.subscribers import (
    MainModuleNameWarning,
    Subscriber,
    SubscriberRegistry,
    default_registry,
    off,
    on,
)
from alchemium.events.testing import capture_events, capture_on_commit
from alchemium.events.upcasting import (
    UpcasterRegistry,
    declare_schema_version,
    default_upcasters,
    upcaster,
)

__all__ = [
    "ERASED",
    "REDACTED",
    "AuditEntry",
    "AuditLog",
    "BatchPublisher",
    "CloudEventsEnvelope",
    "DeliveryPolicy",
    "DestinationStatus",
    "DomainEvent",
    "EventSourceMixin",
    "GivenUpDelivery",
    "InProcessPublisher",
    "Inbox",
    "KafkaPublisher",
    "MainModuleNameWarning",
    "NatsPublisher",
    "Outbox",
    "OutboxGauges",
    "OutboxRelay",
    "OutboxStatus",
    "PermanentPublishError",
    "PubSubPublisher",
    "Publisher",
    "PublisherConfigurationError",
    "PublisherUnavailableError",
    "RabbitMQPublisher",
    "RedisStreamPublisher",
    "RelayHealth",
    "RelayStats",
    "ReplayReport",
    "RetryLater",
    "SnsPublisher",
    "SqsPublisher",
    "SubjectKeys",
    "Subscriber",
    "SubscriberRegistry",
    "UpcasterRegistry",
    "WebhookPublisher",
    "add_before_commit_hook",
    "audit_history",
    "capture_events",
    "capture_on_commit",
    "create_audit_table",
    "create_outbox_tables",
    "create_subject_key_table",
    "declare_schema_version",
    "decode_payload",
    "default_outbox",
    "default_registry",
    "default_upcasters",
    "disable_audit",
    "disable_erasure",
    "disable_outbox",
    "enable_audit",
    "enable_erasure",
    "enable_inbox",
    "enable_outbox",
    "erase_subject",
    "flush_delivery_marks",
    "monitoring_app",
    "off",
    "on",
    "probe_relay",
    "relay_health",
    "remove_before_commit_hook",
    "reveal_event",
    "reveal_payload",
    "serve_monitoring",
    "set_delivery_policy",
    "set_sensitive_hash_key",
    "subject_id",
    "upcaster",
]
