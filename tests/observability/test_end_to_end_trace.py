"""One trace from an HTTP request to a Redis stream, across the outbox and another process.

A FastAPI app instrumented with ``opentelemetry-instrumentation-asgi`` creates a user
(SDK in memory in this process); a separate ``alchemium relay --once`` process, with
its own SDK writing spans to a file, publishes the event to a real Redis. The
request, commit, dispatch and publish spans share one trace id, with the parents
and links docs/observability.md documents, and the stream entry carries the
publish span's context for a consumer.

``ALCHEMIUM_TRACE_PICTURE=path.jsonl`` keeps every span of the run in that file
(``bench/trace_picture.py`` draws docs/observability-trace.png from it). No ``from
__future__ import annotations``: FastAPI resolves the endpoint's annotations at runtime.
"""

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alchemium import UnitOfWork
from alchemium.events import DomainEvent, SubscriberRegistry
from alchemium.integrations.fastapi import request_unit_of_work
from tests.events.relay_support import RedisServer, run_cli
from tests.models import UserRepository
from tests.observability.conftest import Spans, parent_id, span_id, trace_id
from tests.observability.otel_export import span_record

Factory = async_sessionmaker[AsyncSession]


def users_app(factory: Factory, registry: SubscriberRegistry) -> FastAPI:
    app = FastAPI()
    transaction = Annotated[UnitOfWork, request_unit_of_work(factory, registry=registry)]

    @app.post("/users", status_code=201)
    async def create_user(name: str, uow: transaction) -> dict[str, Any]:
        user = await UserRepository.create(uow.session, {"name": name})
        await uow.flush()
        return {"id": user.id}

    return app


async def test_request_commit_dispatch_and_relay_publish_share_one_trace(
    spans: Spans,
    session_factory: Factory,
    registry: SubscriberRegistry,
    redis_server: RedisServer,
    db_url: str,
    tmp_path: Path,
) -> None:
    welcomed: list[DomainEvent] = []

    @registry.on("user_created", name="send_welcome")
    def send_welcome(event: DomainEvent) -> None:
        welcomed.append(event)

    registry.add_destination("redis", "user_*")
    app = OpenTelemetryMiddleware(
        users_app(session_factory, registry), tracer_provider=spans.provider
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/users", params={"name": "ann"})
    assert response.status_code == 201
    assert len(welcomed) == 1

    relay_spans = tmp_path / "relay-spans.jsonl"
    done = await asyncio.to_thread(
        run_cli,
        "relay",
        "--once",
        "--url",
        db_url,
        "--publisher",
        redis_server.url,
        "--destination",
        "redis",
        "--import",
        "tests.observability.otel_export",
        env={"ALCHEMIUM_TEST_SPANS": str(relay_spans)},
    )
    assert done.returncode == 0, done.stderr
    assert "delivered=1" in done.stderr

    request = next(s for s in spans.finished() if s.kind is SpanKind.SERVER)
    commit = next(s for s in spans.named("COMMIT") if parent_id(s) == span_id(request))
    dispatch = spans.one("process send_welcome")
    relay = [json.loads(line) for line in relay_spans.read_text().splitlines()]
    claim = next(s for s in relay if s["name"] == "claim alchemium_outbox")
    publish = next(s for s in relay if s["name"] == "publish redis")

    trace = f"{trace_id(request):032x}"
    assert {f"{trace_id(commit):032x}", f"{trace_id(dispatch):032x}", publish["trace_id"]} == {
        trace
    }
    # documented parents: the commit under the request; dispatch and publish under the
    # span current when the event was recorded (here the request: the endpoint flushed)
    assert parent_id(dispatch) == span_id(request)
    assert publish["parent_id"] == f"{span_id(request):016x}"
    assert publish["kind"] == "PRODUCER"
    assert publish["attributes"]["messaging.system"] == "redis"
    assert publish["attributes"]["messaging.message.id"] == str(welcomed[0].id)
    # the claim is the relay's own trace; the publish links to it
    assert claim["parent_id"] is None
    assert claim["trace_id"] != trace
    assert publish["links"] == [claim["span_id"]]
    # on the wire: the publish span's context, for the consumer to continue the trace
    ((_, fields),) = await redis_server.entries("alchemium:events")
    assert fields["traceparent"].split("-")[1:3] == [trace, publish["span_id"]]
    assert json.loads(fields["event"])["metadata"]["traceparent"].split("-")[2] == (
        f"{span_id(request):016x}"
    )

    keep = os.environ.get("ALCHEMIUM_TRACE_PICTURE")
    if keep:
        mine = [span_record(s) for s in spans.finished()]
        for record in mine:
            record["service"] = "FastAPI app"
        Path(keep).write_text("".join(json.dumps(r) + "\n" for r in [*mine, *relay]))
