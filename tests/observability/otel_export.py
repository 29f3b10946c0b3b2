"""An OpenTelemetry SDK for a relay subprocess: spans written to ``$ALCHEMIUM_TEST_SPANS``.

Imported with ``alchemium relay --import tests.observability.otel_export``: it sets
the global tracer provider (it is the process's own) with a processor writing each
finished span as one JSON line, at once, so a relay that exits leaves every span.
:func:`span_record` is the line format, shared with the test process's spans and
with ``bench/trace_picture.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as a plain dict: ids in hex, times in ns, attributes, links, status."""
    context = span.get_span_context()
    return {
        "name": span.name,
        "service": (span.resource.attributes.get("service.name") if span.resource else None),
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "kind": span.kind.name,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
        "links": [f"{link.context.span_id:016x}" for link in span.links],
        "status": span.status.status_code.name,
    }


class FileSpanExporter(SpanExporter):
    """Appends each span as a JSON line to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as out:
            for span in spans:
                out.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


_path = os.environ.get("ALCHEMIUM_TEST_SPANS")
if _path:
    _provider = TracerProvider(resource=Resource.create({"service.name": "alchemium relay"}))
    _provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(_path)))
    trace.set_tracer_provider(_provider)
