"""UnitOfWork: one session, one transaction, commit on success and rollback on anything else.

``async with UnitOfWork(async_session) as uow:`` opens a session from the factory.
On a clean exit it flushes, gathers the domain events recorded during the
transaction, runs before-commit hooks (audit rows), writes the events to the
outbox in the same transaction and commits; then it dispatches the events to
in-process subscribers and runs ``on_commit`` callbacks. On any exception,
including ``asyncio.CancelledError``, it rolls back and discards the events.
The session is always closed and its connection returned to the pool, even if
the task is cancelled again while cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from alchemium.context import UOW_KEY, current_actor, current_tenant, current_unit_of_work
from alchemium.domain_event import DomainEvent
from alchemium.errors import (
    DeadlockDetected,
    SerializationFailure,
    TenantRequiredError,
    UnitOfWorkError,
    db_errors,
    raise_mapped,
)
from alchemium.events.dispatch import (
    Delivery,
    dispatch_events,
    events_to_commit,
    local_delivery,
    write_events,
)
from alchemium.events.outbox import Outbox, default_outbox
from alchemium.events.recording import (
    RecordedChange,
    collect_object_events,
    discard_object_events,
    global_before_commit_hooks,
    has_before_commit_hooks,
)
from alchemium.events.subscribers import SubscriberRegistry, default_registry
from alchemium.events.testing import intercept_on_commit

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["UnitOfWork", "current_unit_of_work", "run_in_transaction"]

logger = logging.getLogger("alchemium.uow")

T = TypeVar("T")
SessionFactory = Callable[[], AsyncSession] | async_sessionmaker[AsyncSession]
Hook = Callable[["UnitOfWork"], Awaitable[None]]
Callback = Callable[[], Any]


class UnitOfWork:
    """One business transaction: a session, its events and its after-commit work.

    Args:
        session_factory: an ``async_sessionmaker`` (or any callable returning an AsyncSession).
        actor: who performs the work; stored in event metadata and audit rows.
        tenant: the tenant of the work, for tenant-scoped models (default: the one set
            with ``alchemium.use_tenant``).
        tenant_setting: PostgreSQL only: a setting name such as ``"app.tenant"``; each
            transaction of this unit of work starts with ``SELECT set_config(name,
            tenant, true)`` (transaction-local: it ends with COMMIT/ROLLBACK, never
            leaks through the pool) for Row Level Security policies to read with
            ``current_setting(name)``. A tenant is then required (TenantRequiredError).
        isolation_level: e.g. ``"SERIALIZABLE"``; applied to this unit of work's connection only.
        metadata: extra keys merged into every event's metadata (correlation ids, ...).
        registry: the subscriber registry to dispatch to (default: the global one).
        outbox: the outbox to write events to (default: the one set by ``enable_outbox``;
            without any, events reach in-process subscribers after commit, best effort).
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        *,
        actor: str | None = None,
        tenant: str | None = None,
        tenant_setting: str | None = None,
        isolation_level: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        registry: SubscriberRegistry | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self._factory = session_factory
        self.actor = actor
        self.tenant = tenant
        self.tenant_setting = tenant_setting
        self.isolation_level = isolation_level
        self.metadata = dict(metadata or {})
        self._registry = registry
        self._outbox = outbox
        self._seen_sources: list[Any] = []
        self._session: AsyncSession | None = None
        self._state = "new"  # new -> active -> closed
        self._events: list[DomainEvent | RecordedChange] = []
        self._callbacks: list[Callback] = []
        self._before_commit: list[Hook] = []
        self._busy: asyncio.Task[Any] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise UnitOfWorkError(
                "this UnitOfWork was already entered; create a new UnitOfWork for each block"
            )
        if self.tenant_setting is not None and (self.tenant or current_tenant()) is None:
            raise TenantRequiredError(f"UnitOfWork(tenant_setting={self.tenant_setting!r})")
        self._state = "active"
        session = self._factory()
        session.info[UOW_KEY] = self
        self._session = session
        if self.isolation_level is not None:
            try:
                await session.connection(
                    execution_options={"isolation_level": self.isolation_level}
                )
            except BaseException as err:  # noqa: BLE001 - re-raised after cleanup
                await self._finish(rollback=True)
                raise_mapped(err)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if self._state != "active":
            return
        if exc is not None:
            await self._finish(rollback=True)
            return
        try:
            await self.commit()
        except BaseException:
            await self._finish(rollback=True)
            raise
        await self._finish(rollback=False)

    async def _finish(self, *, rollback: bool) -> None:
        """Roll back if asked, close the session and release the connection, even if cancelled."""
        session = self._session
        self._state = "closed"
        self._events.clear()
        self._callbacks.clear()
        if session is None:
            return
        if rollback:
            discard_object_events(self, session)
        self._session = None

        async def close() -> None:
            try:
                if rollback:
                    await session.rollback()
            finally:
                session.info.pop(UOW_KEY, None)
                await session.close()

        try:
            await _uncancellable(close())
        except Exception:
            logger.warning("error while closing the unit of work's session", exc_info=True)

    # -- the session -----------------------------------------------------------------------

    @property
    def session(self) -> AsyncSession:
        """The AsyncSession of this unit of work; only valid inside the ``async with`` block."""
        if self._session is None:
            where = "before entering" if self._state == "new" else "after leaving"
            raise UnitOfWorkError(
                f"UnitOfWork.session used {where} its 'async with' block; "
                "use the session only inside 'async with UnitOfWork(...) as uow:'"
            )
        return self._session

    def _exclusive(self, what: str) -> _Exclusive:
        """Refuse a second task using the session while an operation is in progress.

        Tasks may take turns; two at once would interleave statements on one
        connection (SQLAlchemy does not always notice), so the second one raises.
        """
        return _Exclusive(self, what, map_errors=False)

    async def flush(self) -> None:
        """Send pending changes to the database so generated values (ids) become visible."""
        with self._exclusive("UnitOfWork.flush()") as session, db_errors(session):
            await session.flush()

    async def commit(self) -> None:
        """Commit now: flush, write events to the outbox, commit, then dispatch.

        Normally not needed: leaving the block commits. After an explicit commit the
        unit of work stays usable and the next statement starts a new transaction.
        """
        with self._exclusive("UnitOfWork.commit()") as session:
            with db_errors(session):
                if self.outbox is None and not (self._before_commit or has_before_commit_hooks()):
                    events, delivery, callbacks = await self._flush_and_commit(session)
                else:
                    await session.flush()
                    collect_object_events(self, session)
                    for hook in [*global_before_commit_hooks(), *self._before_commit]:
                        await hook(self)
                        await session.flush()
                    events, callbacks = self._take()
                    delivery = await write_events(self, session, events)
                    await _uncancellable(session.commit())
            await dispatch_events(self, session, events, delivery)
            await _run_callbacks(callbacks)

    def _take(self) -> tuple[list[DomainEvent], list[Callback]]:
        """Hand over what this transaction recorded, building the events something will see.

        Runs before COMMIT: an event that cannot be built aborts the unit of work.
        """
        recorded, callbacks = list(self._events), list(self._callbacks)
        self._events.clear()
        self._callbacks.clear()
        return events_to_commit(self, recorded), callbacks

    async def _flush_and_commit(
        self, session: AsyncSession
    ) -> tuple[list[DomainEvent], Delivery | None, list[Callback]]:
        """Flush and COMMIT in one pass through SQLAlchemy's greenlet bridge.

        For a commit with no I/O to do between the last flush and COMMIT (no outbox to
        write, no before-commit hook): the separate ``await flush()`` costs about 4% of
        a one-row unit of work. Object events are collected and the events taken before
        COMMIT as on the other path, and only the COMMIT is shielded: the flush stays
        cancellable.
        """
        taken: tuple[list[DomainEvent], list[Callback]] = ([], [])
        committing = False

        def flush_and_commit(sync_session: Session) -> None:
            nonlocal taken, committing
            sync_session.flush()
            collect_object_events(self, sync_session)
            taken = self._take()
            committing = True
            sync_session.commit()

        await _uncancellable(session.run_sync(flush_and_commit), shield=lambda: committing)
        events, callbacks = taken
        return events, local_delivery(self, events), callbacks

    async def rollback(self) -> None:
        """Roll back the transaction and discard recorded events and callbacks."""
        with self._exclusive("UnitOfWork.rollback()") as session:
            self._events.clear()
            self._callbacks.clear()
            discard_object_events(self, session)
            with db_errors(session):
                await session.rollback()

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested transaction: an exception inside rolls back only what was done inside.

        Events and ``on_commit`` callbacks recorded inside a savepoint that rolls back
        are discarded with it.
        """
        session = self.session
        # Changes and object events from before the savepoint belong to the outer
        # transaction: flush and collect them now, so the marks below exclude them
        # (begin_nested would flush them *after* the marks were taken).
        with db_errors(session):
            await session.flush()
        collect_object_events(self, session)
        marks = len(self._events), len(self._callbacks)
        with db_errors(session):
            await _begin_sqlite_transaction(session)
            nested = await session.begin_nested()
        try:
            yield
            await nested.commit()
        except BaseException as err:
            del self._events[marks[0] :]
            del self._callbacks[marks[1] :]
            discard_object_events(self, session)
            # Also when a failed flush deactivated it: only a rollback reactivates the
            # outer transaction. Closed means someone already rolled it back.
            with contextlib.suppress(sa_exc.ResourceClosedError):
                await _uncancellable(nested.rollback())
            if isinstance(err, Exception):
                raise_mapped(err, session)
            raise

    # -- events and hooks ------------------------------------------------------------------

    @property
    def registry(self) -> SubscriberRegistry:
        """The subscriber registry this unit of work dispatches to."""
        return self._registry if self._registry is not None else default_registry

    @property
    def outbox(self) -> Outbox | None:
        """The outbox events are written to, or None for best-effort in-process dispatch."""
        return self._outbox if self._outbox is not None else default_outbox()

    @property
    def pending_events(self) -> tuple[DomainEvent, ...]:
        """Events recorded so far in the current transaction, in recording order.

        Builds the change events recorded at flush that nothing needed yet, so it may
        raise EventSerializationError for a column value JSON cannot hold.
        """
        events = self._events
        for i, event in enumerate(events):
            if isinstance(event, RecordedChange):
                events[i] = event.build()
        return tuple(events)  # type: ignore[arg-type] # all built above

    def add_event(self, event: DomainEvent | RecordedChange) -> None:
        """Append an event or a recorded change (used by the recording machinery)."""
        self._events.append(event)

    def record(
        self,
        name: str,
        *,
        aggregate_type: str,
        aggregate_id: object,
        payload: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> DomainEvent:
        """Record a custom event, committed with this unit of work (or discarded with it)."""
        if self._state != "active":
            self.session  # noqa: B018 - raises the UnitOfWorkError explaining the misuse
        event = DomainEvent.create(
            name,
            aggregate_type=aggregate_type,
            aggregate_id=str(aggregate_id),
            payload=payload or {},
            metadata={**self.event_metadata(), **(metadata or {})},
        )
        self._events.append(event)
        return event

    def event_metadata(self) -> dict[str, Any]:
        """Metadata stamped on every event of this unit of work (actor, tenant, extra keys)."""
        meta: dict[str, Any] = dict(self.metadata)
        actor = self.actor if self.actor is not None else current_actor()
        tenant = self.tenant if self.tenant is not None else current_tenant()
        if actor is not None:
            meta["actor"] = actor
        if tenant is not None:
            meta["tenant"] = tenant
        return meta

    def on_commit(self, callback: Callback) -> None:
        """Run ``callback`` (sync or async, no arguments) once after the outermost commit.

        Callbacks run in registration order; one that raises is logged and the others
        still run. On rollback, or if registered in a savepoint that rolls back, it never runs.
        """
        self.session  # noqa: B018 - only valid inside the block
        self._callbacks.append(callback)

    def before_commit(self, hook: Hook) -> None:
        """Run ``await hook(uow)`` inside the transaction just before commit; it may write rows."""
        self._before_commit.append(hook)


_SET_CONFIG = text("SELECT set_config(:name, :value, true)")


@sa_event.listens_for(Session, "after_begin")
def _set_tenant_setting(session: Session, _transaction: Any, connection: Any) -> None:
    """For ``tenant_setting``: name the tenant to PostgreSQL at the start of each transaction.

    ``is_local=true`` makes the setting end with the transaction, so a pooled
    connection never carries it into the next unit of work (a session-level SET would).
    """
    uow = current_unit_of_work(session)
    if uow is None or uow.tenant_setting is None:
        return
    if connection.dialect.name != "postgresql":
        raise UnitOfWorkError(
            f"UnitOfWork(tenant_setting={uow.tenant_setting!r}) needs PostgreSQL, "
            f"not {connection.dialect.name}"
        )
    tenant = uow.tenant if uow.tenant is not None else current_tenant()
    connection.execute(_SET_CONFIG, {"name": uow.tenant_setting, "value": tenant})


class _Exclusive:
    """``UnitOfWork._exclusive`` (and, with ``map_errors``, ``db_errors`` inside it).

    A plain class rather than generator-based context managers: entered on every
    repository call, so its cost counts.
    """

    __slots__ = ("_map_errors", "_outer", "_session", "_uow", "_what")

    def __init__(self, uow: UnitOfWork, what: str, *, map_errors: bool) -> None:
        self._uow = uow
        self._what = what
        self._map_errors = map_errors
        self._outer: asyncio.Task[Any] | None = None
        self._session: AsyncSession | None = None

    def __enter__(self) -> AsyncSession:
        uow = self._uow
        session = self._session = uow.session
        current = asyncio.current_task()
        busy = uow._busy
        if busy is not None and busy is not current and not busy.done():
            raise UnitOfWorkError(
                f"{self._what} called while another task is using this unit of work; "
                "a UnitOfWork (like its session) belongs to one task at a time"
            )
        self._outer = busy
        uow._busy = current
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._uow._busy = self._outer
        if self._map_errors and isinstance(exc, Exception):
            raise_mapped(exc, self._session)


def session_operation(session: AsyncSession, what: str) -> contextlib.AbstractContextManager[Any]:
    """Around one repository call: map database errors, and refuse concurrent tasks.

    Outside a UnitOfWork only the error mapping applies.
    """
    uow = current_unit_of_work(session)
    if uow is None:
        return db_errors(session)
    return _Exclusive(uow, what, map_errors=True)


async def _begin_sqlite_transaction(session: AsyncSession) -> None:
    """Make the SQLite driver send its deferred BEGIN now, before a SAVEPOINT.

    sqlite3/aiosqlite begin a transaction only before a data-changing statement. A
    SAVEPOINT sent first would start a transaction of its own, and releasing it would
    commit, escaping the unit of work's rollback. Engines set up to emit BEGIN
    themselves are already in a transaction here and are left alone.
    """
    connection = await session.connection()
    if connection.dialect.name != "sqlite":
        return
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if driver is not None and not getattr(driver, "in_transaction", True):
        await connection.exec_driver_sql("BEGIN")


class _Shielded:
    """What the task waits on while ``_uncancellable`` runs: the awaited future, uncancellable.

    ``Task.cancel()`` cancels the future its task waits on. This proxy refuses
    (``cancel`` returns False), so the task instead throws CancelledError at its next
    step, after the future has completed; ``_uncancellable`` then records it and
    lets the awaitable go on. Everything else is the future's own.
    """

    __slots__ = ("_asyncio_future_blocking", "_future")

    def __init__(self, future: Any) -> None:
        self._future = future
        self._asyncio_future_blocking = True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self._future.get_loop()
        return loop

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
        self._future.add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        removed: int = self._future.remove_done_callback(fn)
        return removed

    def done(self) -> bool:
        done: bool = self._future.done()
        return done

    def result(self) -> Any:
        return self._future.result()

    def cancel(self, msg: Any = None) -> bool:
        return False


@types.coroutine
def _uncancellable(
    awaitable: Awaitable[T], *, shield: Callable[[], bool] | None = None
) -> Generator[Any, None, T]:
    """Run ``awaitable`` to completion even if the caller is cancelled meanwhile.

    Used for COMMIT, ROLLBACK and close: abandoning them half-way would leave the
    connection in an unknown state or outside the pool. A cancellation received
    meanwhile is re-raised once the awaitable has finished (like ``asyncio.shield``
    around a task, but run inline in the caller's task: no extra task, no extra
    event loop iterations on the common, uncancelled path). With ``shield``, only
    the waits that begin while ``shield()`` is true are protected; a cancellation
    before that interrupts the awaitable as usual.
    """
    steps = awaitable.__await__()
    cancelled = False
    thrown: BaseException | None = None
    while True:
        try:
            yielded = steps.send(None) if thrown is None else steps.throw(thrown)
        except StopIteration as stop:
            result: T = stop.value
            break
        thrown = None
        future = yielded if getattr(yielded, "_asyncio_future_blocking", False) else None
        if future is not None and (shield is None or shield()):
            future._asyncio_future_blocking = False  # as the task would have done
            yielded = _Shielded(future)
        try:
            yield yielded
        except GeneratorExit:
            steps.close()
            raise
        except asyncio.CancelledError as err:
            if future is not None and future.cancelled():
                thrown = err  # the awaited future itself was cancelled: its caller decides
            else:
                cancelled = True  # our task was cancelled: finish first, raise afterwards
        except BaseException as err:  # noqa: BLE001 - the future's error, handed back to the awaitable
            thrown = err
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _run_callbacks(callbacks: list[Callback]) -> None:
    if not callbacks or not intercept_on_commit(callbacks):
        return
    for callback in callbacks:
        try:
            result = callback()
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            logger.exception("on_commit callback %r failed", callback)


async def run_in_transaction(
    session_factory: SessionFactory,
    work: Callable[[UnitOfWork], Awaitable[T]],
    *,
    isolation_level: str | None = None,
    attempts: int = 5,
    backoff: float = 0.02,
    **uow_options: Any,
) -> T:
    """Run ``await work(uow)`` in a new UnitOfWork, retrying serialization failures and deadlocks.

    Each attempt is a fresh unit of work (``isolation_level`` applies to each), so
    ``work`` must be safe to run again: do all reads inside it. Between attempts it
    sleeps ``backoff * 2**n`` seconds with full jitter. After ``attempts`` tries the
    last SerializationFailure/DeadlockDetected is raised.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(1, attempts + 1):
        try:
            async with UnitOfWork(
                session_factory, isolation_level=isolation_level, **uow_options
            ) as uow:
                return await work(uow)
        except (SerializationFailure, DeadlockDetected):
            if attempt == attempts:
                raise
            delay = random.uniform(0, backoff * 2 ** (attempt - 1))
            logger.info("retrying unit of work after conflict (attempt %d)", attempt)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
