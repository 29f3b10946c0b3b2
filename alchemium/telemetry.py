"""OpenTelemetry for alchemium: spans, the trace context an event carries, metric instruments.

Optional: it needs ``opentelemetry-api`` (``pip install 'alchemium[otel]'``) and an SDK
configured by the application; alchemium never configures one. Three states:

- **the API is not installed** (or :func:`disable` was called): :data:`enabled` is
  False and every instrumented point in alchemium costs one attribute check.
- **the API is installed but no SDK is configured** (the global tracer provider is
  still the API's proxy, and :func:`instrument` was not called): no span is started,
  no context is stored; each point costs that check and one function call.
- **an SDK is configured** (globally, or handed to :func:`instrument`): alchemium
  starts the spans listed in ``docs/observability.md`` and stores the trace context
  with each event it records.

Trace context across the outbox: when an event is recorded while a valid span is
current, its W3C ``traceparent`` (and ``tracestate``, if any) go into the event's
``metadata`` (so into the outbox row and every broker message, no schema change).
The after-commit dispatch and the relay restore it as the parent of their spans:
the delivery belongs to the trace of the request that recorded the event, hours
later and in another process. :func:`trace_headers` gives publishers the headers
to put on the wire.

This module sits in the lowest layer (next to ``errors`` and ``context``) so the
unit of work can open its commit span without knowing the events package. It
imports the standard library and, guarded, ``opentelemetry``; nothing of alchemium.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - exercised where opentelemetry-api is not installed
    _trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Meter, MeterProvider
    from opentelemetry.trace import Span, SpanContext, Tracer, TracerProvider

__all__ = [
    "INSTRUMENTATION_NAME",
    "TRACE_KEYS",
    "add_trace_context",
    "available",
    "database_attributes",
    "disable",
    "enable",
    "enabled",
    "event_context",
    "finished_span",
    "instrument",
    "meter",
    "span",
    "span_context_of",
    "trace_headers",
    "tracer",
    "uninstrument",
]

INSTRUMENTATION_NAME = "alchemium"
TRACE_KEYS = ("traceparent", "tracestate")
"""The event ``metadata`` keys holding the W3C trace context recorded with the event."""

available: bool = _trace is not None
"""Whether ``opentelemetry-api`` could be imported."""

enabled: bool = available
"""Checked by every instrumented point: False without ``opentelemetry-api`` or after
:func:`disable`. Read it, do not set it (use :func:`disable` / :func:`enable`)."""

_KINDS: dict[str, Any] = (
    {k.name.lower(): k for k in _trace.SpanKind} if _trace is not None else {}
)  # "client" -> SpanKind.CLIENT
_tracer_provider: Any = None  # given to instrument(); None: the global one
_meter_provider: Any = None
_tracer: Any = None  # the alchemium tracer, once a real provider is known
_meter: Any = None
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


class EventLike(Protocol):
    """What this module reads of a ``DomainEvent`` (it cannot import it: a lower layer)."""

    @property
    def id(self) -> Any:
        """The event id."""
        ...

    @property
    def name(self) -> str:
        """The event name."""
        ...

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The event metadata, where the trace context is kept."""
        ...


@functools.cache
def _version() -> str | None:
    """alchemium's version, for the tracer and meter (read once: it scans sys.path)."""
    try:
        return importlib.metadata.version("alchemium")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return None


def instrument(
    *, tracer_provider: TracerProvider | None = None, meter_provider: MeterProvider | None = None
) -> None:
    """Use these providers instead of the global ones (tests, apps without global providers).

    Without this, alchemium follows ``opentelemetry.trace.set_tracer_provider`` and
    ``opentelemetry.metrics.set_meter_provider``, as instrumentation libraries do.
    Raises RuntimeError if ``opentelemetry-api`` is not installed.
    """
    global _tracer_provider, _meter_provider, _tracer, _meter
    if not available:
        raise RuntimeError(
            "alchemium.telemetry needs opentelemetry-api: pip install 'alchemium[otel]'"
        )
    _tracer_provider, _meter_provider = tracer_provider, meter_provider
    _tracer = _meter = None


def uninstrument() -> None:
    """Forget the providers given to :func:`instrument`: follow the global ones again."""
    global _tracer_provider, _meter_provider, _tracer, _meter
    _tracer_provider = _meter_provider = _tracer = _meter = None


def disable() -> None:
    """No spans, no stored trace context, no metric instruments: as if the API were absent."""
    global enabled
    enabled = False


def enable() -> None:
    """Undo :func:`disable` (no effect without ``opentelemetry-api``)."""
    global enabled
    enabled = available


def tracer() -> Tracer | None:
    """alchemium's tracer, or None while no SDK is configured (no span would be recorded).

    The global tracer provider can be set only once, so a real one, once seen, is kept.
    """
    global _tracer
    if _tracer is not None or not enabled:
        return _tracer if enabled else None
    provider = _tracer_provider
    if provider is None:
        provider = _trace.get_tracer_provider()
        if isinstance(provider, _trace.ProxyTracerProvider):
            return None
    _tracer = provider.get_tracer(INSTRUMENTATION_NAME, _version())
    return _tracer  # type: ignore[no-any-return]


def meter() -> Meter | None:
    """alchemium's meter, or None while no metrics SDK is configured."""
    global _meter
    if _meter is not None or not enabled:
        return _meter if enabled else None
    provider = _meter_provider
    if provider is None:
        provider = _metrics.get_meter_provider()
        # The API's own providers (the proxy before an SDK is set, the no-op one)
        # record nothing: instruments on them would only cost time.
        if type(provider).__module__.startswith("opentelemetry.metrics"):
            return None
    _meter = provider.get_meter(INSTRUMENTATION_NAME, _version())
    return _meter  # type: ignore[no-any-return]


def add_trace_context(metadata: MutableMapping[str, Any]) -> None:
    """Put the current span's W3C context into ``metadata`` if a valid span is current.

    ``traceparent`` and, when not empty, ``tracestate``; keys already there are kept
    (an application may carry a context it received). Call it only when
    :data:`enabled`. Cheap: one context variable read when no span is current.
    """
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return
    metadata.setdefault(
        "traceparent",
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}",
    )
    state = context.trace_state.to_header()
    if state:
        metadata.setdefault("tracestate", state)


def _stored(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {k: metadata[k] for k in TRACE_KEYS if isinstance(metadata.get(k), str)}


def event_context(event: EventLike) -> Context | None:
    """The context stored with ``event`` (its recording span, remote); None if none or invalid."""
    carrier = _stored(event.metadata)
    if "traceparent" not in carrier:
        return None
    context = TraceContextTextMapPropagator().extract(carrier)
    if not _trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def span_context_of(event: EventLike) -> SpanContext | None:
    """The span context stored with ``event``, or None."""
    context = event_context(event)
    return None if context is None else _trace.get_current_span(context).get_span_context()


def trace_headers(event: EventLike) -> dict[str, str]:
    """The trace context headers a publisher puts on the message it sends for ``event``.

    For every publisher (Redis Streams fields, AMQP headers, Kafka/NATS headers, ...):
    a consumer extracts them with its propagator and continues the trace. While a
    recording span is current (the relay's publish span) they are that span's
    context, written by the global propagator (W3C ``traceparent``/``tracestate``
    by default; ``baggage`` and others if configured), so the consumer's span
    becomes a child of the publish. Otherwise the W3C context stored with the event
    when it was recorded (works without opentelemetry installed). Empty when neither.
    """
    if enabled:
        current = _trace.get_current_span()
        if current.is_recording():
            headers: dict[str, str] = {}
            _propagate.inject(headers)
            if headers:
                return headers
    return _stored(event.metadata)


def database_attributes(system: str, namespace: str | None) -> dict[str, str]:
    """``db.system.name`` and ``db.namespace`` (when known) of a database span."""
    attributes = {"db.system.name": system}
    if namespace:
        attributes["db.namespace"] = namespace
    return attributes


def span(
    name: str,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    *,
    parent: Context | SpanContext | None = None,
    links: Sequence[SpanContext] = (),
) -> contextlib.AbstractContextManager[Span | None]:
    """A current span named ``name``, or a no-op context manager while no SDK is configured.

    ``kind``: ``"internal"``, ``"client"``, ``"producer"``, ``"consumer"`` or ``"server"``.
    ``parent``: a context (or a span context) to start from instead of the current
    one (an event's recording context); ``links``: span contexts to link to. The span records an
    exception leaving the block and sets its status to ERROR (OpenTelemetry's
    default), then lets it propagate.
    """
    found = tracer()
    if found is None:
        return _NO_SPAN
    if parent is not None and isinstance(parent, _trace.SpanContext):
        parent = _trace.set_span_in_context(_trace.NonRecordingSpan(parent))
    return found.start_as_current_span(
        name,
        context=parent,
        kind=_KINDS[kind],
        attributes=attributes,
        links=[_trace.Link(c) for c in links] if links else None,
    )


def finished_span(
    name: str, kind: str, attributes: Mapping[str, Any], *, start_time: int
) -> SpanContext | None:
    """Record a span that began at ``start_time`` (``time.time_ns()``) and ends now.

    For work whose span is only worth keeping once its outcome is known (a relay's
    claim that found rows: idle polls make no spans). Returns its context (to link
    to), or None while no SDK is configured.
    """
    found = tracer()
    if found is None:
        return None
    started = found.start_span(
        name, kind=_KINDS[kind], attributes=attributes, start_time=start_time
    )
    started.end()
    return started.get_span_context()
