"""The commit path of events: outbox rows before commit, in-process handlers after it.

:class:`EventDelivery` plugs into every unit of work (``UnitOfWorkHooks``). Before
COMMIT, in the committing transaction, it picks the events the commit will write
or dispatch and writes them with one delivery row per (event, destination). Rows
for in-process subscribers are inserted already claimed under a token of this
commit, so the after-commit dispatch needs no extra claim round trip and the
relay leaves them alone until their lease expires (which only happens if this
process dies first).

After COMMIT it calls each subscriber in its own try/except (blinker's ``send``
would stop at the first failure), then records the outcomes in one short
transaction, fenced by the claim token. A failed handler's row goes back to
pending with a backoff, for the relay to retry. Without an outbox, dispatch is
best effort: failures are logged, nothing retried.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError, UnitOfWorkError
from alchemium.events.marks import queue_delivery_mark
from alchemium.events.outbox import DISPATCH_LEASE, Outbox, autocommit, default_outbox
from alchemium.events.subscribers import Subscriber, SubscriberRegistry, default_registry
from alchemium.uow import Commit, UnitOfWork, UnitOfWorkHooks, add_hooks

__all__ = [
    "DISPATCH_LEASE",
    "EventDelivery",
    "dispatch_events",
    "events_to_commit",
    "outbox_of",
    "registry_of",
    "retry_delay",
    "watch_commits",
    "write_events",
]

logger = logging.getLogger("alchemium.events")


_watchers: ContextVar[tuple[Callable[[Sequence[DomainEvent]], None], ...]] = ContextVar(
    "alchemium_commit_watchers", default=()
)


def registry_of(uow: UnitOfWork) -> SubscriberRegistry:
    """The subscriber registry ``uow`` dispatches to: its ``registry=``, else the default one."""
    registry = uow.registry
    if registry is None:
        return default_registry
    if not isinstance(registry, SubscriberRegistry):
        raise UnitOfWorkError(
            f"UnitOfWork(registry=...) expects a SubscriberRegistry, got {type(registry).__name__}"
        )
    return registry


def outbox_of(uow: UnitOfWork) -> Outbox | None:
    """The outbox ``uow`` writes to: its ``outbox=``, else ``enable_outbox``'s, or None."""
    outbox = uow.outbox
    if outbox is None:
        return default_outbox()
    if not isinstance(outbox, Outbox):
        raise UnitOfWorkError(
            f"UnitOfWork(outbox=...) expects an Outbox, got {type(outbox).__name__}"
        )
    return outbox


@dataclass(slots=True)
class Delivery:
    """What one commit handed to the after-commit dispatch."""

    outbox: Outbox | None
    token: uuid.UUID | None
    plan: list[tuple[DomainEvent, list[Subscriber]]] = field(default_factory=list)


def retry_delay(attempts: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait after ``attempts`` failures: exponential backoff with full jitter.

    A delay, not a time: the outbox adds it to the database's clock (``mark_failed``).
    """
    delay = min(cap, base * 2 ** max(0, attempts - 1))
    return random.uniform(delay / 2, delay)


@contextmanager
def watch_commits(callback: Callable[[Sequence[DomainEvent]], None]) -> Iterator[None]:
    """Within the block (and tasks started in it), call ``callback(events)`` after each commit."""
    token = _watchers.set((*_watchers.get(), callback))
    try:
        yield
    finally:
        _watchers.reset(token)


def events_to_commit(uow: UnitOfWork, commit: Commit) -> list[DomainEvent]:
    """The events this commit writes or dispatches, built from what the unit of work recorded.

    With an outbox (every event is written) or a ``watch_commits`` watcher every
    recorded change is built; otherwise only those with a subscriber. A change nobody
    will see is dropped unbuilt, so its EventSerializationError, if any, is not raised.
    Runs before COMMIT: a build error aborts the unit of work.
    """
    if outbox_of(uow) is not None or _watchers.get():
        return commit.all_events()
    registry = registry_of(uow)
    seen: dict[str, bool] = {}
    events: list[DomainEvent] = []
    recorded = commit.recorded
    for i, r in enumerate(recorded):
        if isinstance(r, DomainEvent):
            events.append(r)
            continue
        wanted = seen.get(r.name)
        if wanted is None:
            wanted = seen[r.name] = bool(registry.subscribers_for(r.name))
        if wanted:
            built = recorded[i] = r.build()
            events.append(built)
    return events


def _plan(
    uow: UnitOfWork, events: Sequence[DomainEvent]
) -> list[tuple[DomainEvent, list[Subscriber]]]:
    registry = registry_of(uow)
    by_name: dict[str, list[Subscriber]] = {}
    for event in events:
        if event.name not in by_name:
            by_name[event.name] = registry.subscribers_for(event.name)
    return [(event, by_name[event.name]) for event in events]


def local_delivery(uow: UnitOfWork, events: Sequence[DomainEvent]) -> Delivery | None:
    """The after-commit dispatch of a unit of work without outbox (nothing is written)."""
    return Delivery(outbox=None, token=None, plan=_plan(uow, events)) if events else None


def write_events(
    uow: UnitOfWork, session: Session, events: Sequence[DomainEvent]
) -> Delivery | None:
    """Write ``events`` to the outbox in the committing transaction (no-op without outbox).

    Synchronous: it runs in the unit of work's commit pass, through the sync session.
    """
    outbox = outbox_of(uow)
    if outbox is None or not events:
        return local_delivery(uow, events)
    registry = registry_of(uow)
    plan = _plan(uow, events)
    token = uuid.uuid4()
    rows: list[tuple[DomainEvent, str, bool]] = []
    destinations: dict[str, list[str]] = {}
    external = False
    for event, subscribers in plan:
        rows.extend((event, s.name, True) for s in subscribers)
        if event.name not in destinations:
            destinations[event.name] = registry.destinations_for(event.name)
        for destination in destinations[event.name]:
            rows.append((event, destination, False))
            external = True
    try:
        lease = outbox.dispatch_lease
        outbox.write(session, events, rows, claim_token=token, lease=lease, notify=external)
    except sa_exc.DBAPIError as err:
        if not outbox.tables_exist(session.get_bind()):
            raise OutboxError(
                f"the outbox tables ({outbox.events.name}, {outbox.deliveries.name}) do not "
                "exist: create them with metadata.create_all(...) or "
                "await create_outbox_tables(engine)"
            ) from err
        raise
    return Delivery(outbox=outbox, token=token, plan=plan)


async def dispatch_events(
    session: AsyncSession, events: Sequence[DomainEvent], delivery: Delivery | None
) -> None:
    """After commit: call subscribers, never raising into the caller; record the outcomes."""
    for watcher in _watchers.get():
        watcher(events)
    if delivery is None:
        return
    failures: list[tuple[DomainEvent, Subscriber, Exception]] = []
    succeeded: list[tuple[uuid.UUID, str]] = []
    for event, subscribers in delivery.plan:
        for subscriber in subscribers:
            try:
                await subscriber(event)
            except Exception as err:
                logger.exception(
                    "subscriber %s failed for event %s (%s); %s",
                    subscriber.name,
                    event.id,
                    event.name,
                    "the relay will retry it" if delivery.outbox else "not retried (no outbox)",
                )
                failures.append((event, subscriber, err))
            else:
                succeeded.append((event.id, subscriber.name))
    if delivery.outbox is None or delivery.token is None or not (failures or succeeded):
        return
    await _record_outcomes(session, delivery.outbox, delivery.token, succeeded, failures)


async def _record_outcomes(
    session: AsyncSession,
    outbox: Outbox,
    token: uuid.UUID,
    succeeded: list[tuple[uuid.UUID, str]],
    failures: list[tuple[DomainEvent, Subscriber, Exception]],
) -> None:
    try:
        if failures:
            await outbox.mark_delivered_by_destination(session, token, succeeded)
            for event, subscriber, err in failures:
                await outbox.mark_failed(
                    session,
                    token,
                    error=f"{type(err).__name__}: {err}",
                    retry_in=retry_delay(1),
                    event_id=event.id,
                    destination=subscriber.name,
                )
        else:
            bind = session.bind
            if outbox.mark_window > 0 and isinstance(bind, AsyncEngine):
                # Written with the marks of other commits by one UPDATE, soon.
                queue_delivery_mark(outbox, bind, token)
                return
            # One UPDATE needs no transaction around it: in autocommit it is one round
            # trip instead of three (BEGIN, UPDATE, COMMIT) after every unit of work.
            await outbox.mark_delivered(await autocommit(session), token)
        await session.commit()
    except Exception:
        # The events are committed and still claimed by us: once the lease expires
        # the relay delivers them again (at least once), so this is not data loss.
        logger.warning(
            "could not record delivery outcomes (claim %s); the relay will redeliver them",
            token,
            exc_info=True,
        )
        await session.rollback()


class EventDelivery(UnitOfWorkHooks):
    """The unit of work hooks that write the outbox before COMMIT and dispatch after it."""

    def before_commit(self, uow: UnitOfWork, session: Session, commit: Commit) -> None:
        """Choose and build the commit's events and write them to the outbox, if any."""
        events = events_to_commit(uow, commit)
        commit.events = events
        commit.info[self] = write_events(uow, session, events)

    def wants_event(self, uow: UnitOfWork, name: str) -> bool:
        """An outbox writes every event; else a watcher, subscriber or destination wants it."""
        if outbox_of(uow) is not None or _watchers.get():
            return True
        registry = registry_of(uow)
        return bool(registry.subscribers_for(name) or registry.destinations_for(name))

    async def after_commit(self, uow: UnitOfWork, commit: Commit) -> None:
        """Tell ``watch_commits`` watchers, call the subscribers, record the outcomes."""
        delivery: Delivery | None = commit.info.get(self)
        await dispatch_events(uow.session, commit.events, delivery)


add_hooks(EventDelivery())
