"""A program run as ``python -m tests.observability.without_api DB_FILE`` by the tests.

It makes ``import opentelemetry`` fail first, as where opentelemetry-api is not
installed, then commits an event (after-commit dispatch included) and relays it;
prints ``ok`` when everything held.
"""

from __future__ import annotations

import sys

sys.modules["opentelemetry"] = None  # type: ignore[assignment]

import asyncio  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy.ext.asyncio import async_sessionmaker  # noqa: E402

from alchemium import UnitOfWork, telemetry  # noqa: E402
from alchemium.events import OutboxRelay, SubscriberRegistry, enable_outbox  # noqa: E402
from tests.conftest import make_engine, reset_schema  # noqa: E402
from tests.models import Base, UserRepository  # noqa: E402

RECEIVED = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"  # a context the app was handed


class Sink:
    """Notes the trace headers a broker publisher would send."""

    name = "sink"

    def __init__(self) -> None:
        self.wire: list[dict[str, str]] = []

    async def publish(self, event: Any, destination: str) -> None:
        self.wire.append(telemetry.trace_headers(event))


async def main(path: str) -> None:
    assert not telemetry.available
    assert not telemetry.enabled
    assert telemetry.tracer() is None
    assert telemetry.meter() is None
    try:
        telemetry.instrument()
    except RuntimeError as err:
        message = str(err)
    else:
        message = "instrument() did not fail"
    assert "alchemium[otel]" in message, message
    enable_outbox(Base.metadata)
    registry = SubscriberRegistry("plain")
    registry.add_destination("sink", "user_*")
    called: list[Any] = []
    registry.subscribe("user_created", called.append, name="local")
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    await reset_schema(engine)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    meta = {"traceparent": RECEIVED}
    async with UnitOfWork(factory, registry=registry, metadata=meta) as uow:
        await UserRepository.create(uow.session, {"name": "ann"})
    assert len(called) == 1
    sink = Sink()
    assert await OutboxRelay(factory, sink, listen=False).run_once() == 1
    assert sink.wire == [{"traceparent": RECEIVED}], sink.wire
    await engine.dispose()
    print("ok")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
