"""The CloudEvents envelope, read back by the CloudEvents SDK, and the routing templates."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from cloudevents.core.bindings import amqp, http, kafka

from alchemium.events import DomainEvent
from alchemium.events.publishers import (
    CloudEventsEnvelope,
    PermanentPublishError,
    PublisherConfigurationError,
    Template,
)
from alchemium.events.publishers.nats import SUBJECT

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _event(schema_version: int = 1, **metadata: object) -> DomainEvent:
    return DomainEvent.create(
        "order_placed",
        aggregate_type="order",
        aggregate_id="42",
        payload={"total": 12.5, "note": "café"},
        metadata={"tenant": "acme", "correlation_id": "req-1", "traceparent": TRACEPARENT}
        | metadata,
        id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        occurred_at=dt.datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=dt.timezone.utc),
        schema_version=schema_version,
    )


def _check(parsed: Any, event: DomainEvent) -> None:
    """What every binding must carry, as the SDK reads it."""
    assert parsed.get_specversion() == "1.0"
    assert parsed.get_id() == str(event.id)
    assert parsed.get_source() == "//shop.example.com/orders"
    assert parsed.get_type() == "order_placed"
    assert parsed.get_subject() == "42"
    assert parsed.get_time() == event.occurred_at
    assert parsed.get_data() == {"total": 12.5, "note": "café"}
    for name, value in {
        "tenant": "acme",
        "correlationid": "req-1",
        "traceparent": TRACEPARENT,
        "partitionkey": "42",
        "aggregatetype": "order",
        "schemaversion": "1",
    }.items():
        assert parsed.get_extension(name) == value


ENVELOPE = CloudEventsEnvelope(source="//shop.example.com/orders")


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_http_binding_is_read_back_by_the_sdk(mode: str) -> None:
    event = _event()
    message = CloudEventsEnvelope(source=ENVELOPE.source, mode=mode).encode(event, "http")
    _check(http.from_http_event(http.HTTPMessage(message.headers, message.body)), event)
    if mode == "binary":
        assert message.headers["ce-id"] == str(event.id)
        assert message.headers["content-type"] == "application/json"
    else:
        assert message.headers["content-type"].startswith("application/cloudevents+json")


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_kafka_binding_is_read_back_by_the_sdk(mode: str) -> None:
    event = _event()
    message = CloudEventsEnvelope(source=ENVELOPE.source, mode=mode).encode(event, "kafka")
    record = kafka.KafkaMessage(
        headers={k: v.encode() for k, v in message.headers.items()},
        key=message.partition_key.encode(),
        value=message.body,
    )
    _check(kafka.from_kafka_event(record), event)
    if mode == "binary":
        assert set(message.headers) >= {"ce_id", "ce_specversion", "ce_type", "content-type"}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_amqp_binding_is_read_back_by_the_sdk(mode: str) -> None:
    event = _event()
    message = CloudEventsEnvelope(source=ENVELOPE.source, mode=mode).encode(event, "amqp")
    parsed = amqp.from_amqp_event(
        amqp.AMQPMessage(
            properties={"content-type": message.content_type},
            application_properties=dict(message.headers),
            application_data=message.body,
        )
    )
    _check(parsed, event)
    if mode == "binary":
        assert message.headers["cloudEvents_id"] == str(event.id)


def test_http_header_values_are_percent_encoded_as_the_binding_says() -> None:
    event = _event(tenant="zürich team")
    message = ENVELOPE.encode(event, "http")
    assert message.headers["ce-tenant"] == "z%C3%BCrich%20team"
    parsed = http.from_http_event(http.HTTPMessage(message.headers, message.body))
    assert parsed.get_extension("tenant") == "zürich team"


def test_dataschema_carries_the_schema_version_when_configured() -> None:
    envelope = CloudEventsEnvelope(
        dataschema="https://schemas.example.com/{name}/v{schema_version}.json"
    )
    attributes = envelope.attributes(_event(schema_version=3))
    assert attributes["dataschema"] == "https://schemas.example.com/order_placed/v3.json"
    assert "schemaversion" not in attributes
    assert CloudEventsEnvelope().attributes(_event())["schemaversion"] == "1"


def test_extensions_of_missing_metadata_are_left_out() -> None:
    event = DomainEvent.create("x", aggregate_type="a", aggregate_id="1")
    attributes = CloudEventsEnvelope().attributes(event)
    assert not {"tenant", "correlationid", "traceparent"} & set(attributes)


def test_trace_context_comes_from_one_pluggable_function() -> None:
    envelope = CloudEventsEnvelope(trace_context=lambda e: {"traceparent": "00-abc", "x": "1"})
    headers = envelope.encode(_event(), "nats").headers
    assert headers["ce-traceparent"] == "00-abc"


def test_a_replayed_delivery_is_marked_by_an_extension_the_sdk_reads() -> None:
    message = ENVELOPE.encode(_event(replay=True), "http")
    parsed = http.from_http_event(http.HTTPMessage(message.headers, message.body))
    assert parsed.get_extension("replay") == "true"
    assert "replay" not in ENVELOPE.attributes(_event())


@pytest.mark.parametrize(
    "template",
    ["{nmae}", "{name.upper}", "{name!r}", "{id:>10}", "{metadata}", "{name[0]}", "{"],
)
def test_template_naming_an_unknown_field_fails_at_configuration(template: str) -> None:
    with pytest.raises(PublisherConfigurationError, match=r"template|metadata"):
        Template(template)


@pytest.mark.parametrize(
    "options",
    [{"type": "{typ}"}, {"extensions": {"Tenant": "{name}"}}, {"mode": "batch"}, {"source": ""}],
)
def test_bad_envelope_options_fail_at_configuration(options: dict[str, object]) -> None:
    with pytest.raises(PublisherConfigurationError):
        CloudEventsEnvelope(**options)


def test_template_renders_event_fields_and_metadata() -> None:
    template = Template("{metadata[tenant]}.{aggregate_type}.{name}.v{schema_version}")
    assert template.render(_event()) == "acme.order.order_placed.v1"
    assert template.fields == {"metadata", "aggregate_type", "name", "schema_version"}


def test_template_missing_metadata_or_invalid_result_is_permanent() -> None:
    event = DomainEvent.create("x", aggregate_type="a", aggregate_id="1")
    with pytest.raises(PermanentPublishError, match=str(event.id)):
        Template("t.{metadata[tenant]}").render(event)
    spaced = DomainEvent.create("x", aggregate_type="a", aggregate_id="has space")
    with pytest.raises(PermanentPublishError, match="does not match"):
        Template("events.{aggregate_id}", what="NATS subject").render(spaced, valid=SUBJECT)
