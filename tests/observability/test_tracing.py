"""Spans of a unit of work, its dispatch and the relay, and the trace context an event carries.

Real SDK (in memory), real databases (SQLite and PostgreSQL), real relay rounds.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import UniqueViolation, UnitOfWork, telemetry
from alchemium.events import DomainEvent, OutboxRelay, SubscriberRegistry
from alchemium.events.outbox import Outbox
from tests.events.relay_support import Sink
from tests.models import UserRepository
from tests.observability.conftest import Spans, parent_id, span_id, trace_id, traceparent

Factory = async_sessionmaker[AsyncSession]


async def stored_metadata(engine: AsyncEngine, outbox: Outbox) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(outbox.events.c.metadata).order_by(outbox.events.c.sequence)
        )
        return [dict(m) for m in rows.scalars()]


async def create_user(factory: Factory, registry: SubscriberRegistry, name: str = "ann") -> None:
    async with UnitOfWork(factory, registry=registry) as uow:
        await UserRepository.create(uow.session, {"name": name})
        await uow.flush()  # recorded now, under the caller's span


class TracedSink(Sink):
    """A publisher noting, for each event, the trace headers it would put on the wire."""

    def __init__(self, name: str = "sink", **options: Any) -> None:
        super().__init__(name=name, **options)
        self.headers: list[dict[str, str]] = []

    async def publish(self, event: DomainEvent, destination: str) -> None:
        self.headers.append(telemetry.trace_headers(event))
        await super().publish(event, destination)


# -- without an SDK ----------------------------------------------------------------------------


async def test_without_an_sdk_no_span_is_made_and_no_context_is_stored(
    engine: AsyncEngine, session_factory: Factory, registry: SubscriberRegistry, outbox: Outbox
) -> None:
    assert telemetry.available
    assert telemetry.enabled
    assert telemetry.tracer() is None
    registry.add_destination("sink", "user_*")
    await create_user(session_factory, registry)

    assert await stored_metadata(engine, outbox) == [{}]
    sink = TracedSink()
    assert await OutboxRelay(session_factory, sink, listen=False).run_once() == 1
    assert sink.headers == [{}]


# -- the unit of work ----------------------------------------------------------------------------


async def test_commit_span_wraps_the_outbox_insert_with_database_attributes(
    spans: Spans,
    engine: AsyncEngine,
    session_factory: Factory,
    registry: SubscriberRegistry,
    backend: str,
) -> None:
    await create_user(session_factory, registry)

    commit = spans.one("COMMIT")
    assert commit.kind is SpanKind.CLIENT
    assert commit.attributes is not None
    assert commit.attributes["db.system.name"] == backend
    assert commit.attributes["db.operation.name"] == "COMMIT"
    assert commit.attributes["db.namespace"] == engine.url.database
    insert = spans.one("INSERT alchemium_outbox")
    assert insert.kind is SpanKind.CLIENT
    assert parent_id(insert) == span_id(commit)
    assert insert.attributes is not None
    assert insert.attributes["db.collection.name"] == "alchemium_outbox"
    assert insert.attributes["messaging.batch.message_count"] == 1


async def test_a_failed_commit_leaves_an_error_span(
    spans: Spans, session_factory: Factory, registry: SubscriberRegistry
) -> None:
    await create_user(session_factory, registry, "ann")
    with pytest.raises(UniqueViolation):
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "ann"})

    failed = [s for s in spans.named("COMMIT") if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert any(e.name == "exception" for e in failed[0].events)


async def test_an_event_stores_the_span_current_when_it_was_recorded(
    spans: Spans,
    engine: AsyncEngine,
    session_factory: Factory,
    registry: SubscriberRegistry,
    outbox: Outbox,
) -> None:
    with spans.tracer.start_as_current_span("POST /users") as request:
        await create_user(session_factory, registry)

    (request_span,) = spans.named("POST /users")
    assert await stored_metadata(engine, outbox) == [{"traceparent": traceparent(request_span)}]
    assert request.get_span_context().trace_id == trace_id(spans.one("COMMIT"))
    assert parent_id(spans.one("COMMIT")) == span_id(request_span)


async def test_changes_first_flushed_at_commit_carry_the_commit_span(
    spans: Spans,
    engine: AsyncEngine,
    session_factory: Factory,
    registry: SubscriberRegistry,
    outbox: Outbox,
) -> None:
    with spans.tracer.start_as_current_span("job"):
        async with UnitOfWork(session_factory, registry=registry) as uow:
            await UserRepository.create(uow.session, {"name": "ann"})  # flushed by the commit

    assert await stored_metadata(engine, outbox) == [
        {"traceparent": traceparent(spans.one("COMMIT"))}
    ]


async def test_tracestate_is_stored_and_an_application_traceparent_is_kept(
    spans: Spans,
    engine: AsyncEngine,
    session_factory: Factory,
    registry: SubscriberRegistry,
    outbox: Outbox,
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    remote = SpanContext(
        trace_id=0x1234, span_id=0x99, is_remote=True, trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "abc")]),
    )  # fmt: skip
    with trace.use_span(NonRecordingSpan(remote)):
        await create_user(session_factory, registry, "ann")
    received = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    async with UnitOfWork(
        session_factory, registry=registry, metadata={"traceparent": received}
    ) as uow:
        await UserRepository.create(uow.session, {"name": "bob"})

    stored = await stored_metadata(engine, outbox)
    assert stored[0] == {
        "traceparent": f"00-{0x1234:032x}-{0x99:016x}-01",
        "tracestate": "vendor=abc",
    }
    assert stored[1]["traceparent"] == received


# -- the after-commit dispatch ---------------------------------------------------------------------


async def test_dispatch_span_is_a_child_of_the_recording_span(
    spans: Spans, session_factory: Factory, registry: SubscriberRegistry
) -> None:
    @registry.on("user_created", name="welcome")
    def welcome(event: DomainEvent) -> None:
        pass

    @registry.on("user_created", name="broken")
    def broken(event: DomainEvent) -> None:
        raise RuntimeError("mail server down")

    with spans.tracer.start_as_current_span("POST /users"):
        await create_user(session_factory, registry)

    request = spans.one("POST /users")
    for name in ("welcome", "broken"):
        dispatch = spans.one(f"process {name}")
        assert dispatch.kind is SpanKind.CONSUMER
        assert parent_id(dispatch) == span_id(request)
        assert trace_id(dispatch) == trace_id(request)
        assert dispatch.attributes is not None
        assert dispatch.attributes["messaging.operation.type"] == "process"
        assert dispatch.attributes["messaging.destination.name"] == name
        assert dispatch.attributes["messaging.system"] == "alchemium"
    assert spans.one("process welcome").status.status_code is StatusCode.UNSET
    assert spans.one("process broken").status.status_code is StatusCode.ERROR


# -- the relay ----------------------------------------------------------------------------------


async def test_publish_span_belongs_to_the_recording_trace_and_links_the_claim(
    spans: Spans, session_factory: Factory, registry: SubscriberRegistry, backend: str
) -> None:
    registry.add_destination("sink", "user_*")
    with spans.tracer.start_as_current_span("POST /users"):
        await create_user(session_factory, registry, "ann")
    with spans.tracer.start_as_current_span("POST /users"):
        await create_user(session_factory, registry, "bob")
    sink = TracedSink()
    relay = OutboxRelay(session_factory, sink, listen=False)

    assert await relay.run_once() == 2

    claim = spans.one("claim alchemium_outbox")
    assert claim.parent is None  # the relay's own trace
    assert claim.kind is SpanKind.CLIENT
    assert claim.attributes is not None
    assert claim.attributes["messaging.batch.message_count"] == 2
    assert claim.attributes["messaging.operation.type"] == "receive"
    assert claim.attributes["db.system.name"] == backend
    requests = spans.named("POST /users")
    publishes = spans.named("publish sink")
    assert len(publishes) == 2
    for request, publish, headers in zip(requests, publishes, sink.headers, strict=True):
        assert publish.kind is SpanKind.PRODUCER
        assert trace_id(publish) == trace_id(request)
        assert parent_id(publish) == span_id(request)
        assert [link.context.span_id for link in publish.links] == [span_id(claim)]
        assert publish.attributes is not None
        assert publish.attributes["messaging.destination.name"] == "sink"
        assert publish.attributes["messaging.operation.type"] == "send"
        assert publish.attributes["alchemium.delivery.attempt"] == 1
        # on the wire: the publish span, so a consumer's span is its child
        assert headers["traceparent"] == traceparent(publish)
    assert {p.attributes["messaging.message.id"] for p in publishes if p.attributes} == {
        str(e.id) for e in sink.received
    }


async def test_an_event_recorded_without_a_span_is_published_under_the_claim(
    spans: Spans, session_factory: Factory, registry: SubscriberRegistry
) -> None:
    registry.add_destination("sink", "user_*")
    telemetry.disable()
    try:
        await create_user(session_factory, registry)
    finally:
        telemetry.enable()
    assert spans.finished() == []  # disabled: no span at all
    relay = OutboxRelay(
        session_factory, Sink(fail=lambda _e: True), listen=False, backoff_base=0.01
    )

    await relay.run_once()

    claim, publish = spans.one("claim alchemium_outbox"), spans.one("publish sink")
    assert parent_id(publish) == span_id(claim)
    assert publish.links == ()
    assert publish.status.status_code is StatusCode.ERROR


async def test_trace_headers_without_a_recording_span_are_the_events_context(
    spans: Spans, session_factory: Factory, registry: SubscriberRegistry
) -> None:
    registry.add_destination("sink", "user_*")
    with spans.tracer.start_as_current_span("POST /users"):
        await create_user(session_factory, registry)
    telemetry.uninstrument()  # a relay process without an SDK
    sink = TracedSink()

    assert await OutboxRelay(session_factory, sink, listen=False).run_once() == 1

    assert sink.headers == [{"traceparent": traceparent(spans.one("POST /users"))}]
