"""Fixtures of the observability tests: an OpenTelemetry SDK recording in memory.

alchemium is handed the SDK with ``telemetry.instrument(...)`` for the test only; the
global providers are never set in the test process, so other tests see what an
application without an SDK sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from alchemium import telemetry
from tests.events.relay_support import rabbitmq_server, redis_server  # noqa: F401


@dataclass
class Spans:
    """The spans the SDK finished during the test, and a tracer for the test's own spans."""

    exporter: InMemorySpanExporter
    provider: TracerProvider
    tracer: Tracer
    metrics: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, (name, [s.name for s in self.finished()])
        return found[0]


@pytest.fixture
def spans() -> Iterator[Spans]:
    """alchemium traced by an SDK whose spans stay in memory (and metrics, read on demand)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorded = Spans(exporter, provider, provider.get_tracer("tests"))
    meters = MeterProvider(metric_readers=[recorded.metrics])
    telemetry.instrument(tracer_provider=provider, meter_provider=meters)
    yield recorded
    telemetry.uninstrument()
    provider.shutdown()
    meters.shutdown()


def traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent of ``span``, as the propagator writes it."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    return span.get_span_context().span_id


def trace_id(span: ReadableSpan) -> int:
    return span.get_span_context().trace_id
