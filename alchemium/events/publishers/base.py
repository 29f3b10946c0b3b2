"""The ``Publisher`` protocol: the relay's only plug point, and the outcomes it understands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError

__all__ = [
    "BatchPublisher",
    "PermanentPublishError",
    "Publisher",
    "PublisherConfigurationError",
    "PublisherUnavailableError",
    "RetryLater",
    "StartablePublisher",
    "destinations_of",
    "start_publisher",
]


@runtime_checkable
class Publisher(Protocol):
    """Delivers events to the destination(s) named by :attr:`name`.

    ``name`` is one destination (``"redis"``) or several (an in-process publisher
    drains one destination per subscriber); the relay reads it before every claim,
    so it may change over time. ``publish`` must return only once the event is
    durably accepted (broker confirm, handler finished) and raise otherwise; it is
    called with no database transaction open and may be called more than once for
    the same event (delivery is at least once: consumers deduplicate on
    ``event.id``).

    A publisher that writes to a broker puts :func:`alchemium.telemetry.trace_headers`
    ``(event)`` into its message headers, so consumers can continue the trace, and
    may name its broker in a ``messaging_system`` attribute (``"kafka"``,
    ``"nats"``, ...) for the relay's publish span.

    What the relay does with what ``publish`` raises: :class:`PermanentPublishError`
    makes the row dead at once, :class:`RetryLater` retries it after the delay the
    broker asked for, anything else retries it with the relay's backoff (dead after
    ``max_attempts``).

    A publisher may also have ``async start()`` (see :class:`StartablePublisher`): the
    relay awaits it once, before its first claim, so bad configuration fails there;
    and ``async publish_many(items)`` (see :class:`BatchPublisher`): the relay then
    hands it the rows of a claimed batch at once instead of calling ``publish`` per row.
    """

    @property
    def name(self) -> str | Sequence[str]:
        """The destination (or destinations) this publisher drains."""
        ...

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """Deliver ``event`` to ``destination`` (one of :attr:`name`), or raise."""
        ...


@runtime_checkable
class StartablePublisher(Protocol):
    """A publisher that can check its configuration before the first event.

    ``start`` connects, checks the credentials and that the stream, topic or queue
    exists, and raises :class:`PublisherConfigurationError` (wrong configuration) or
    :class:`PublisherUnavailableError` (the broker cannot be reached or refuses us)
    with one line saying what is wrong. It may be awaited more than once.
    """

    async def start(self) -> None:
        """Connect and check; raise with one clear line if publishing cannot work."""
        ...


@runtime_checkable
class BatchPublisher(Protocol):
    """A publisher that sends many events at once (a pipeline: one round trip).

    ``publish_many`` gets ``(event, destination)`` pairs in claim order and returns
    one outcome per pair, in the same order: ``None`` once the broker accepted that
    event, or the exception that failed it (read as :meth:`Publisher.publish`'s, so
    :class:`PermanentPublishError` and :class:`RetryLater` keep their meaning). Raising
    fails every pair with that exception. The relay's ``publish_timeout`` bounds the
    whole call. A batch is all the relay's rows for this publisher in one claim; an
    empty one is never passed.
    """

    async def publish_many(
        self, items: Sequence[tuple[DomainEvent, str]]
    ) -> Sequence[BaseException | None]:
        """Deliver each pair; one outcome per pair (``None`` = accepted), in order."""
        ...


class PublisherConfigurationError(OutboxError):
    """A publisher is configured in a way that cannot work (found when it is created or started).

    A template naming an unknown field, an unknown URL scheme, a missing extra, a
    stream or topic that does not exist. ``alchemium relay`` exits 2 on it.
    """


class PublisherUnavailableError(OutboxError):
    """A publisher's broker cannot be reached, or refused our credentials, when it started.

    ``alchemium relay`` exits 3 on it (as for an unreachable database).
    """


class PermanentPublishError(OutboxError):
    """A delivery that can never succeed as it is: the relay marks the row dead at once.

    Raised for what retrying cannot fix: a webhook receiver's 4xx (other than 408 and
    429), a message the broker refuses for its size or shape, a routing template that
    needs a metadata key the event does not have. The row keeps the message as its
    ``last_error``; fix the cause and requeue it (``alchemium outbox requeue``).
    """


class RetryLater(OutboxError):
    """The broker asked us to come back later (HTTP 429 ``Retry-After``, throttling).

    The relay retries the row ``seconds`` from the database's now instead of after its
    own backoff. The attempt still counts toward ``max_attempts``, so a receiver that
    throttles forever ends in the dead letters rather than in an endless loop.
    """

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = max(0.0, float(seconds))


def destinations_of(publisher: Publisher) -> tuple[str, ...]:
    """The destinations ``publisher`` drains, as a tuple."""
    name = publisher.name
    return (name,) if isinstance(name, str) else tuple(name)


async def start_publisher(publisher: Publisher) -> None:
    """Await ``publisher.start()`` if it has one (publishers written before it need none)."""
    start = getattr(publisher, "start", None)
    if start is not None and callable(start):
        await start()
