"""CloudEvents 1.0 envelopes for broker publishers, and routing templates.

One event, one mapping (docs/relay.md, *CloudEvents*):

============================  =========================================================
CloudEvents attribute         value
============================  =========================================================
``id``                        the event id (the consumer's deduplication key)
``source``                    configured (``CloudEventsEnvelope(source=...)``)
``type``                      the event name (or a template on it)
``subject``                   the aggregate id
``time``                      the event's ``occurred_at`` (RFC 3339)
``datacontenttype``           ``application/json`` (the payload, as JSON)
``dataschema``                a template on the schema version, if configured; otherwise
                              the extension ``schemaversion`` carries it (default 1)
extensions                    ``aggregatetype``, ``partitionkey`` (the aggregate id),
                              ``traceparent``/``tracestate`` (trace context), and the
                              metadata mapping (``tenant``, ``correlationid`` by default)
============================  =========================================================

Two content modes, each by its protocol binding: *structured* sends one JSON
document (``application/cloudevents+json``); *binary* puts the attributes in the
message's headers (HTTP and NATS ``ce-``, Kafka ``ce_``, AMQP ``cloudEvents_``, Pub/Sub
``ce-`` attributes) and the payload as the body. :meth:`CloudEventsEnvelope.encode`
is the one place where a publisher's headers are built.

Routing templates (:class:`Template`) name a topic, subject, stream or queue after
the event: ``"orders.{name}"``, ``"{aggregate_type}.{aggregate_id}"``,
``"tenant-{metadata[tenant]}"``. A template naming an unknown field raises
:class:`PublisherConfigurationError` when it is created, never at the first event.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from alchemium.domain_event import DomainEvent
from alchemium.encoding import plain_json
from alchemium.events.event_fields import schema_version_of
from alchemium.events.publishers.base import PermanentPublishError, PublisherConfigurationError
from alchemium.telemetry import trace_headers

__all__ = [
    "BINDINGS",
    "STRUCTURED_CONTENT_TYPE",
    "Binding",
    "CloudEventsEnvelope",
    "ContentMode",
    "EncodedEvent",
    "Template",
    "schema_version_of",
]

Binding = Literal["http", "kafka", "amqp", "nats", "pubsub", "sqs"]
ContentMode = Literal["binary", "structured"]

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
SPEC_VERSION = "1.0"

# Binary mode, per protocol binding: (prefix of attribute headers, header of datacontenttype).
# AMQP carries the content type as a message property, not an application property.
BINDINGS: dict[str, tuple[str, str | None]] = {
    "http": ("ce-", "content-type"),
    "kafka": ("ce_", "content-type"),
    "amqp": ("cloudEvents_", None),
    "nats": ("ce-", "content-type"),
    "pubsub": ("ce-", "content-type"),
    "sqs": ("ce-", "content-type"),
}

# What a template may name: the event's fields, the destination, metadata[key].
TEMPLATE_FIELDS = frozenset(
    {"id", "name", "aggregate_type", "aggregate_id", "schema_version", "destination", "metadata"}
)
_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
_RESERVED = frozenset(
    {
        "id",
        "source",
        "specversion",
        "type",
        "datacontenttype",
        "dataschema",
        "subject",
        "time",
        "data",
        "data_base64",
    }
)


def _rfc3339(event: DomainEvent) -> str:
    return event.occurred_at.isoformat().replace("+00:00", "Z")


class Template:
    """A name built from an event: ``"orders.{name}"``, ``"{metadata[tenant]}.events"``.

    Fields: ``id``, ``name``, ``aggregate_type``, ``aggregate_id``, ``schema_version``,
    ``destination`` and ``metadata[key]``. Anything else (an unknown field, attribute
    access, a format spec) raises :class:`PublisherConfigurationError` here, when the
    publisher is configured. Rendering never calls ``str.format`` on event data.
    """

    __slots__ = ("_parts", "text", "what")

    def __init__(self, text: str, *, what: str = "template") -> None:
        self.text, self.what = text, what
        self._parts: list[tuple[str, str | None, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as err:
            raise PublisherConfigurationError(f"{what} {text!r}: {err}") from err
        for literal, name, spec, conversion in parsed:
            if name is None:
                self._parts.append((literal, None, None))
                continue
            match = re.fullmatch(r"([a-z_]+)(?:\[([^\]]+)\])?", name)
            base, key = (match.group(1), match.group(2)) if match else (name, None)
            if spec or conversion or match is None or base not in TEMPLATE_FIELDS:
                raise PublisherConfigurationError(
                    f"{what} {text!r} names {{{name}}}; a template may name "
                    f"{', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS - {'metadata'}))}"
                    " or {metadata[key]}, without format specs"
                )
            if (base == "metadata") != (key is not None):
                raise PublisherConfigurationError(
                    f"{what} {text!r}: {{{name}}} is not a field; metadata is read as "
                    "{metadata[key]}"
                )
            self._parts.append((literal, base, key))

    @property
    def fields(self) -> frozenset[str]:
        """The fields the template names (``metadata[key]`` as ``metadata``)."""
        return frozenset(base for _, base, _ in self._parts if base is not None)

    def render_optional(self, event: DomainEvent, destination: str = "") -> str | None:
        """The rendered text, or None if it names a metadata key the event does not have."""
        out: list[str] = []
        for literal, base, key in self._parts:
            out.append(literal)
            if base is None:
                continue
            if base == "metadata":
                value = event.metadata.get(key or "")
                if value is None:
                    return None
                out.append(value if isinstance(value, str) else json.dumps(plain_json(value)))
            elif base == "schema_version":
                out.append(schema_version_of(event))
            elif base == "destination":
                out.append(destination)
            else:
                out.append(str(getattr(event, base)))
        return "".join(out)

    def render(
        self, event: DomainEvent, destination: str = "", *, valid: re.Pattern[str] | None = None
    ) -> str:
        """The rendered text; raises :class:`PermanentPublishError` if it cannot be built.

        A missing metadata key, or a result that ``valid`` does not match fully (a
        character a broker refuses in a subject or topic name), can never succeed on a
        retry: the delivery goes to the dead letters at once, naming the event.
        """
        rendered = self.render_optional(event, destination)
        if rendered is None:
            raise PermanentPublishError(
                f"event {event.id} ({event.name}): {self.what} {self.text!r} needs a metadata "
                f"key the event does not have (metadata keys: {sorted(event.metadata) or 'none'})"
            )
        if valid is not None and not valid.fullmatch(rendered):
            raise PermanentPublishError(
                f"event {event.id} ({event.name}): {self.what} {self.text!r} gave "
                f"{rendered!r}, which does not match {valid.pattern!r}"
            )
        return rendered

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """One event as a message: its body, headers, content type and partition key."""

    body: bytes
    headers: dict[str, str]
    content_type: str
    partition_key: str


@dataclass(frozen=True)
class CloudEventsEnvelope:
    """How a publisher wraps events: CloudEvents 1.0, binary or structured mode.

    Args:
        source: the ``source`` attribute (a URI-reference naming your service),
            e.g. ``"//shop.example.com/orders"``.
        mode: ``"binary"`` (attributes in headers, the payload as the body) or
            ``"structured"`` (one ``application/cloudevents+json`` document).
        type: template of the ``type`` attribute (default the event name);
            ``"com.example.{name}"`` adds a reverse-DNS prefix.
        dataschema: template of the ``dataschema`` URI, e.g.
            ``"https://schemas.example.com/{name}/v{schema_version}.json"``; without
            it the schema version goes into the ``schemaversion`` extension.
        extensions: extension name -> template, read from the event; an extension
            whose metadata key an event lacks is left out of that event. Default:
            ``tenant`` and ``correlationid`` from the metadata.
        partition_key: template of the ``partitionkey`` extension (Kafka key, Pub/Sub
            ordering key, SQS group id): default the aggregate id.
        trace_context: a function giving an event's W3C trace headers
            (``traceparent``, ``tracestate``); default
            :func:`alchemium.telemetry.trace_headers`: the relay's publish span while
            a tracer records it (a consumer's span then continues the publish), else
            the context stored with the event when it was recorded.
    """

    source: str = "/alchemium"
    mode: ContentMode = "binary"
    type: str = "{name}"
    dataschema: str | None = None
    extensions: Mapping[str, str] = field(
        default_factory=lambda: {
            "tenant": "{metadata[tenant]}",
            "correlationid": "{metadata[correlation_id]}",
        }
    )
    partition_key: str = "{aggregate_id}"
    trace_context: Callable[[DomainEvent], Mapping[str, str]] = trace_headers
    _templates: dict[str, Template] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("binary", "structured"):
            raise PublisherConfigurationError(
                f"CloudEventsEnvelope(mode={self.mode!r}): use 'binary' or 'structured'"
            )
        if not isinstance(self.source, str) or not self.source:
            raise PublisherConfigurationError(
                "CloudEventsEnvelope(source=...) must be a non-empty URI-reference"
            )
        templates = {
            "type": Template(self.type, what="CloudEvents type"),
            "partitionkey": Template(self.partition_key, what="partition key"),
        }
        if self.dataschema is not None:
            templates["dataschema"] = Template(self.dataschema, what="dataschema")
        for name, text in self.extensions.items():
            if not _EXTENSION_NAME.fullmatch(name) or name in _RESERVED:
                raise PublisherConfigurationError(
                    f"CloudEvents extension name {name!r}: lower-case letters and digits, at "
                    "most 20, not a context attribute's name"
                )
            templates[f"ext:{name}"] = Template(text, what=f"extension {name!r}")
        object.__setattr__(self, "_templates", templates)

    def attributes(self, event: DomainEvent, destination: str = "") -> dict[str, str]:
        """The context attributes and extensions of ``event``, every value a string."""
        t = self._templates
        attributes = {
            "specversion": SPEC_VERSION,
            "id": str(event.id),
            "source": self.source,
            "type": t["type"].render(event, destination),
            "subject": event.aggregate_id,
            "time": _rfc3339(event),
            "datacontenttype": "application/json",
            "aggregatetype": event.aggregate_type,
            "partitionkey": t["partitionkey"].render(event, destination),
        }
        if "dataschema" in t:
            attributes["dataschema"] = t["dataschema"].render(event, destination)
        else:
            attributes["schemaversion"] = schema_version_of(event)
        for key, template in t.items():
            if key.startswith("ext:"):
                value = template.render_optional(event, destination)
                if value is not None:
                    attributes[key[4:]] = value
        for name, value in self.trace_context(event).items():
            attributes[name.lower()] = value
        if event.metadata.get("replay"):
            attributes["replay"] = "true"  # a delivery made by a replay (docs/lifecycle.md)
        return attributes

    def structured(self, event: DomainEvent, destination: str = "") -> dict[str, Any]:
        """The structured-mode JSON document of ``event`` (attributes plus ``data``)."""
        return {**self.attributes(event, destination), "data": plain_json(event.payload)}

    def encode(
        self,
        event: DomainEvent,
        binding: Binding,
        destination: str = "",
        *,
        mode: ContentMode | None = None,
    ) -> EncodedEvent:
        """``event`` as a message of ``binding`` in this envelope's mode (or ``mode``).

        Binary: every attribute becomes a header with the binding's prefix (HTTP
        header values percent-encoded as its binding says), ``datacontenttype``
        becomes the content type, the payload JSON is the body. Structured: the
        content type is ``application/cloudevents+json``, the body the whole document.
        This is the one place a publisher's headers come from.
        """
        prefix, content_header = BINDINGS[binding]
        if (mode or self.mode) == "structured":
            document = self.structured(event, destination)
            headers = {content_header: STRUCTURED_CONTENT_TYPE} if content_header else {}
            return EncodedEvent(
                _dumps(document), headers, STRUCTURED_CONTENT_TYPE, document["partitionkey"]
            )
        attributes = self.attributes(event, destination)
        content_type = attributes.pop("datacontenttype")
        headers = {
            f"{prefix}{name}": _http_value(value) if binding == "http" else value
            for name, value in attributes.items()
        }
        if content_header:
            headers[content_header] = content_type
        return EncodedEvent(
            _dumps(plain_json(event.payload)), headers, content_type, attributes["partitionkey"]
        )


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _http_value(value: str) -> str:
    """A header value as the HTTP binding writes it: printable ASCII except space, '"' and '%'
    as is, everything else percent-encoded (UTF-8)."""
    return quote(value, safe="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%'))
