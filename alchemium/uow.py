"""UnitOfWork: one session, one transaction, commit on success and rollback on anything else.

``async with UnitOfWork(async_session) as uow:`` opens a session from the factory.
On a clean exit it flushes, runs before-commit hooks and commits; then it runs
after-commit hooks and ``on_commit`` callbacks. On any exception, including
``asyncio.CancelledError``, it rolls back and discards what the transaction
recorded. The session is always closed and its connection returned to the pool,
even if the task is cancelled again while cleaning up.

The unit of work knows nothing of outboxes, subscribers or audit logs. It holds
the events recorded in its transaction (:class:`~alchemium.domain_event.DomainEvent`
values, dropped with a rollback) and announces its lifecycle to
:class:`UnitOfWorkHooks`: the events package plugs in there (writing the outbox in
the committing transaction, dispatching after commit), and so do the test captures.

Why this module is long (about 850 lines): it is the UnitOfWork, the hook interface
through which it announces its lifecycle, and the checks of what is passed as a
session or a session factory, one contract read together. What stands alone lives
elsewhere: ``shielding`` (awaiting COMMIT and close through a cancellation),
``tenancy`` (the tenant setting of each transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from alchemium import telemetry as _telemetry
from alchemium.context import current_actor, current_tenant
from alchemium.domain_event import DomainEvent, PendingEvent
from alchemium.errors import (
    AlchemiumError,
    CommitOutcomeUnknownError,
    RepositoryUsageError,
    TenantRequiredError,
    UnitOfWorkError,
    db_errors,
    is_disconnect,
    map_db_error,
    raise_mapped,
)
from alchemium.shielding import uncancellable

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Commit",
    "UnitOfWork",
    "UnitOfWorkHooks",
    "add_before_commit_hook",
    "add_hooks",
    "check_session",
    "check_session_factory",
    "current_unit_of_work",
    "remove_before_commit_hook",
    "remove_hooks",
    "run_in_transaction",
    "session_tenant",
]

logger = logging.getLogger("alchemium.uow")

T = TypeVar("T")
SessionFactory = Callable[[], AsyncSession] | async_sessionmaker[AsyncSession]
Hook = Callable[["UnitOfWork"], Awaitable[None]]
Callback = Callable[[], Any]

UOW_KEY = "alchemium.uow"


_active: ContextVar[UnitOfWork | None] = ContextVar("alchemium_unit_of_work", default=None)


def current_unit_of_work(session: Any = None) -> UnitOfWork | None:
    """The UnitOfWork that owns ``session`` (async or sync session), if any.

    Without ``session``: the unit of work whose ``async with`` block the caller is in
    (the innermost one; tasks started inside the block see it too), or None.
    """
    if session is None:
        uow = _active.get()
        return uow if uow is not None and uow._state == "active" else None
    info = getattr(session, "info", None)
    return info.get(UOW_KEY) if info is not None else None


def session_tenant(session: Any) -> str | None:
    """The tenant ``session`` acts for: its unit of work's ``tenant=``, else :func:`use_tenant`'s.

    The same resolution as the ``tenant`` of event metadata and audit rows, so the
    rows a unit of work writes and the events it records name the same tenant.
    """
    uow = current_unit_of_work(session) if session is not None else None
    if uow is not None and uow.tenant is not None:
        return uow.tenant
    return current_tenant()


# -- lifecycle hooks ---------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Commit:
    """What one commit carries from its before-commit hooks to its after-commit hooks.

    ``recorded``: the events recorded in the transaction, in recording order, built
    or still pending. ``events``: the events after-commit hooks see, chosen and built
    by a before-commit hook (the events package: every event with an outbox, else
    the ones something subscribes to). ``callbacks``: the ``on_commit`` callbacks, run
    after the after-commit hooks (a hook may take them, as ``capture_on_commit``
    does). ``info``: the hooks' own data, keyed by hook.
    """

    recorded: list[DomainEvent | PendingEvent]
    callbacks: list[Callback]
    events: list[DomainEvent] = field(default_factory=list)
    info: dict[object, Any] = field(default_factory=dict)

    def all_events(self) -> list[DomainEvent]:
        """Every recorded event, built once: every hook that asks sees the same objects."""
        return _build_all(self.recorded)


def _build_all(recorded: list[DomainEvent | PendingEvent]) -> list[DomainEvent]:
    for i, event in enumerate(recorded):
        if not isinstance(event, DomainEvent):
            recorded[i] = event.build()
    return recorded  # type: ignore[return-value] # all built above


class UnitOfWorkHooks:
    """How an extension plugs into every unit of work; every method here does nothing.

    Subclass, override what you need and register an instance with :func:`add_hooks`.
    The events package does (change recording, outbox and dispatch, audit), and so
    do the test captures; the unit of work imports none of them. Every method runs
    in the unit of work's own task, hooks in the order they were added:

    ``before_flush`` / ``after_flush`` (sync)
        Around each flush of the unit of work's session, inside SQLAlchemy's flush
        (``session`` is the sync ``Session``); they may read but not flush.
    ``collect`` (sync)
        Before a savepoint begins and before commit: bring into the unit of work what
        the application recorded outside the session (events queued on objects).
    ``before_commit`` (sync)
        After the last flush, just before COMMIT, in the same pass through
        SQLAlchemy's greenlet bridge: it may run statements through the sync
        ``session`` (outbox and audit rows). Raising aborts the unit of work.
    ``after_commit`` (async)
        After COMMIT and before the ``on_commit`` callbacks. The transaction is
        committed, so nothing may undo it: an exception is logged, not raised.
    ``after_rollback`` (sync)
        After the transaction, or a savepoint (``savepoint=True``), rolled back.
    """

    def before_flush(self, uow: UnitOfWork, session: Session) -> None:
        """Called at the start of each flush of ``uow``'s session."""

    def after_flush(self, uow: UnitOfWork, session: Session) -> None:
        """Called after each flush of ``uow``'s session, before its state is reset."""

    def collect(self, uow: UnitOfWork, session: Session) -> None:
        """Called before a savepoint and before commit, once the session is flushed."""

    def before_commit(self, uow: UnitOfWork, session: Session, commit: Commit) -> None:
        """Called just before COMMIT; may execute statements through ``session``."""

    async def after_commit(self, uow: UnitOfWork, commit: Commit) -> None:
        """Called after COMMIT, before the ``on_commit`` callbacks."""

    def after_rollback(self, uow: UnitOfWork, session: Session, *, savepoint: bool) -> None:
        """Called after a rollback of the transaction or (``savepoint=True``) of a savepoint."""

    def wants_event(self, uow: UnitOfWork, name: str) -> bool:
        """Whether an event called ``name`` recorded in ``uow`` would reach this hook.

        Bulk operations ask (:meth:`UnitOfWork.wants_event`) before they read or
        return every row they change only to record its event: when no hook wants it,
        they skip that work.
        """
        return False


_METHODS = (
    "before_flush",
    "after_flush",
    "collect",
    "before_commit",
    "after_commit",
    "after_rollback",
    "wants_event",
)


class _HookTable:
    """The registered hooks, and per method only those that override it (cheap to call)."""

    __slots__ = ("all", *_METHODS)

    def __init__(self, hooks: tuple[UnitOfWorkHooks, ...]) -> None:
        self.all = hooks
        for method in _METHODS:
            base = getattr(UnitOfWorkHooks, method)
            setattr(self, method, tuple(h for h in hooks if getattr(type(h), method) is not base))

    if TYPE_CHECKING:
        all: tuple[UnitOfWorkHooks, ...]
        before_flush: tuple[UnitOfWorkHooks, ...]
        after_flush: tuple[UnitOfWorkHooks, ...]
        collect: tuple[UnitOfWorkHooks, ...]
        before_commit: tuple[UnitOfWorkHooks, ...]
        after_commit: tuple[UnitOfWorkHooks, ...]
        after_rollback: tuple[UnitOfWorkHooks, ...]
        wants_event: tuple[UnitOfWorkHooks, ...]


_hooks = _HookTable(())
_before_commit_hooks: list[Hook] = []


def add_hooks(hooks: UnitOfWorkHooks, *, first: bool = False) -> None:
    """Plug ``hooks`` into every unit of work from now on (once; adding it again does nothing).

    ``first``: call it before the hooks already added (a hook that must change the
    events before others write them).
    """
    global _hooks
    if not isinstance(hooks, UnitOfWorkHooks):
        raise UnitOfWorkError(
            f"add_hooks expects a UnitOfWorkHooks instance, got {type(hooks).__name__}"
        )
    if hooks not in _hooks.all:
        _hooks = _HookTable((hooks, *_hooks.all) if first else (*_hooks.all, hooks))


def remove_hooks(hooks: UnitOfWorkHooks) -> None:
    """Undo :func:`add_hooks` (unknown hooks are ignored)."""
    global _hooks
    _hooks = _HookTable(tuple(h for h in _hooks.all if h is not hooks))


def add_before_commit_hook(hook: Hook) -> None:
    """Run ``await hook(uow)`` in every unit of work just before its commit.

    Such hooks run after the last flush, before the ones added with
    ``uow.before_commit``; each may write rows through ``uow.session`` (it is
    flushed after each). They run before the lifecycle hooks' ``before_commit``,
    so what they write is recorded and audited like any other change.
    """
    if hook not in _before_commit_hooks:
        _before_commit_hooks.append(hook)


def remove_before_commit_hook(hook: Hook) -> None:
    """Undo :func:`add_before_commit_hook`."""
    if hook in _before_commit_hooks:
        _before_commit_hooks.remove(hook)


def global_before_commit_hooks() -> list[Hook]:
    """The hooks added with :func:`add_before_commit_hook`, in order."""
    return list(_before_commit_hooks)


class UnitOfWork:
    """One business transaction: a session, the events it records and its after-commit work.

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
        registry: the ``SubscriberRegistry`` of ``alchemium.events`` to dispatch to
            (default: its global one).
        outbox: the ``Outbox`` of ``alchemium.events`` to write events to (default:
            the one set by ``enable_outbox``; without any, events reach in-process
            subscribers after commit, best effort).

    ``registry`` and ``outbox`` are read by the events package, which plugs into the
    unit of work through :class:`UnitOfWorkHooks`; ``info`` is where such extensions
    keep their per-unit-of-work state (like ``Session.info``).
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
        registry: object | None = None,
        outbox: object | None = None,
    ) -> None:
        self._factory = check_session_factory(session_factory, "UnitOfWork")
        self.actor = actor
        self.tenant = tenant
        self.tenant_setting = tenant_setting
        self.isolation_level = isolation_level
        self.metadata = dict(metadata or {})
        self.registry = registry
        self.outbox = outbox
        self.info: dict[str, Any] = {}
        self._session: AsyncSession | None = None
        self._state = "new"  # new -> active -> closed
        self._events: list[DomainEvent | PendingEvent] = []
        self._callbacks: list[Callback] = []
        self._before_commit: list[Hook] = []
        self._busy: asyncio.Task[Any] | None = None
        self._active_token: Token[UnitOfWork | None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise UnitOfWorkError(
                "this UnitOfWork was already entered; create a new UnitOfWork for each block"
            )
        if self.tenant_setting is not None and (self.tenant or current_tenant()) is None:
            raise TenantRequiredError(f"UnitOfWork(tenant_setting={self.tenant_setting!r})")
        session = self._factory()
        if not isinstance(session, AsyncSession):
            raise UnitOfWorkError(
                f"UnitOfWork: the session factory returned {_what(session)}, not an "
                "AsyncSession; pass an async_sessionmaker (sqlalchemy.ext.asyncio)"
            )
        self._state = "active"
        session.info[UOW_KEY] = self
        self._session = session
        self._active_token = _active.set(self)
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
            if isinstance(exc, sa_exc.StatementError):
                # The body's own SQL (``uow.session.execute(...)``) failed: raise it as the
                # alchemium error a repository call would have raised, so callers and
                # run_in_transaction classify it the same way (transient or a bug).
                mapped = map_db_error(exc)
                if mapped is not None:
                    raise mapped from exc
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
        token, self._active_token = self._active_token, None
        if token is not None:
            # Left in another context than entered (unusual): there, current_unit_of_work()
            # sees this closed unit of work and answers None.
            with contextlib.suppress(ValueError):
                _active.reset(token)
        if session is None:
            return
        if rollback:
            self._rolled_back(session, savepoint=False)
        self._session = None

        async def close() -> None:
            try:
                if rollback:
                    await session.rollback()
            finally:
                session.info.pop(UOW_KEY, None)
                await session.close()

        try:
            await uncancellable(close())
        except Exception:
            logger.warning("error while closing the unit of work's session", exc_info=True)

    def _rolled_back(self, session: AsyncSession, *, savepoint: bool) -> None:
        for hook in _hooks.after_rollback:
            hook.after_rollback(self, session.sync_session, savepoint=savepoint)

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
        """Commit now: flush, run before-commit hooks, COMMIT, then the after-commit work.

        Normally not needed: leaving the block commits. After an explicit commit the
        unit of work stays usable and the next statement starts a new transaction.
        """
        with self._exclusive("UnitOfWork.commit()") as session:
            with db_errors(session):
                if _telemetry.enabled:  # one check when opentelemetry is not installed
                    with _commit_span(session):
                        commit = await self._commit(session)
                else:
                    commit = await self._commit(session)
            for hook in _hooks.after_commit:
                try:
                    await hook.after_commit(self, commit)
                except Exception:
                    logger.exception("after-commit hook %r failed; the commit stands", hook)
            await _run_callbacks(commit.callbacks)

    async def _commit(self, session: AsyncSession) -> Commit:
        """Flush, run the hooks before COMMIT, COMMIT; returns what the hooks after it get.

        Asynchronous before-commit hooks (``uow.before_commit``, ``add_before_commit_hook``)
        run first, each followed by a flush. Then one pass through SQLAlchemy's greenlet
        bridge does the last flush, the lifecycle hooks' ``collect`` and
        ``before_commit`` (outbox and audit rows) and COMMIT: a separate ``await`` per
        step would cost a round through the bridge each. Only the COMMIT is shielded
        from cancellation; the flush and the hooks before it stay cancellable.
        """
        hooks = _hooks
        user_hooks = (
            [*_before_commit_hooks, *self._before_commit]
            if _before_commit_hooks or self._before_commit
            else None
        )
        if user_hooks:
            await session.flush()
            for hook in hooks.collect:
                hook.collect(self, session.sync_session)
            for user_hook in user_hooks:
                await user_hook(self)
                await session.flush()
        commit: Commit | None = None
        committing = False

        def finish_transaction(sync_session: Session) -> None:
            nonlocal commit, committing
            sync_session.flush()
            for hook in hooks.collect:
                hook.collect(self, sync_session)
            commit = self._take()
            for hook in hooks.before_commit:
                hook.before_commit(self, sync_session, commit)
            committing = True
            sync_session.commit()

        try:
            await uncancellable(session.run_sync(finish_transaction), shield=lambda: committing)
        except Exception as err:
            if committing and is_disconnect(err):
                raise CommitOutcomeUnknownError(
                    "the connection was lost while COMMIT was in flight: the transaction may "
                    "or may not have committed; check before doing the work again"
                ) from err
            raise
        assert commit is not None
        return commit

    def _take(self) -> Commit:
        """Hand over what this transaction recorded (the lists start afresh)."""
        commit = Commit(recorded=self._events, callbacks=self._callbacks)
        self._events = []
        self._callbacks = []
        return commit

    async def rollback(self) -> None:
        """Roll back the transaction and discard recorded events and callbacks."""
        with self._exclusive("UnitOfWork.rollback()") as session:
            self._events.clear()
            self._callbacks.clear()
            self._rolled_back(session, savepoint=False)
            with db_errors(session):
                await session.rollback()

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested transaction: an exception inside rolls back only what was done inside.

        Events and ``on_commit`` callbacks recorded inside a savepoint that rolls back
        are discarded with it.
        """
        session = self.session
        # Changes and events from before the savepoint belong to the outer transaction:
        # flush and collect them now, so the marks below exclude them (begin_nested
        # would flush them *after* the marks were taken).
        with db_errors(session):
            await session.flush()
        for hook in _hooks.collect:
            hook.collect(self, session.sync_session)
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
            self._rolled_back(session, savepoint=True)
            # Also when a failed flush deactivated it: only a rollback reactivates the
            # outer transaction. Closed means someone already rolled it back.
            with contextlib.suppress(sa_exc.ResourceClosedError):
                await uncancellable(nested.rollback())
            if isinstance(err, Exception):
                raise_mapped(err, session)
            raise

    # -- events and callbacks --------------------------------------------------------------

    @property
    def pending_events(self) -> tuple[DomainEvent, ...]:
        """Events recorded so far in the current transaction, in recording order.

        Builds the change events recorded at flush that nothing needed yet, so it may
        raise EventSerializationError for a column value JSON cannot hold.
        """
        return tuple(_build_all(self._events))

    def wants_event(self, name: str) -> bool:
        """Whether an event called ``name`` recorded now would be seen by anything.

        True when a lifecycle hook wants it (an outbox, a subscriber or destination of
        that name, an audit log, a capture), and whenever an asynchronous
        before-commit hook is set (it may read :attr:`pending_events`). Bulk
        operations record their per-row change events only then.
        """
        if self._before_commit or _before_commit_hooks:
            return True
        return any(hook.wants_event(self, name) for hook in _hooks.wants_event)

    def add_event(self, event: DomainEvent | PendingEvent) -> None:
        """Append an event, or one to build later (used by the recording machinery)."""
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
        """Metadata stamped on every event of this unit of work (actor, tenant, extra keys).

        With OpenTelemetry tracing, also the ``traceparent``/``tracestate`` of the span
        current when the event is recorded (see :mod:`alchemium.telemetry`).
        """
        meta: dict[str, Any] = dict(self.metadata)
        actor = self.actor if self.actor is not None else current_actor()
        tenant = self.tenant if self.tenant is not None else current_tenant()
        if actor is not None:
            meta["actor"] = actor
        if tenant is not None:
            meta["tenant"] = tenant
        if _telemetry.enabled:  # the W3C context of the current span, if any
            _telemetry.add_trace_context(meta)
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


@sa_event.listens_for(Session, "before_flush")
def _before_flush(session: Session, _context: Any, _instances: Any) -> None:
    uow = session.info.get(UOW_KEY)
    if uow is not None:
        for hook in _hooks.before_flush:
            hook.before_flush(uow, session)


@sa_event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context: Any) -> None:
    uow = session.info.get(UOW_KEY)
    if uow is not None:
        for hook in _hooks.after_flush:
            hook.after_flush(uow, session)


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


def _commit_span(session: AsyncSession) -> contextlib.AbstractContextManager[Any]:
    """The ``COMMIT`` span around flush, before-commit hooks and COMMIT (a no-op without SDK).

    Named and attributed by OpenTelemetry's database conventions: it is a client
    call to the database. Its children are the outbox write and, if SQLAlchemy is
    instrumented, the statements.
    """
    if _telemetry.tracer() is None:  # the API without an SDK: build no attributes
        return contextlib.nullcontext()
    bind = session.get_bind()
    attributes = _telemetry.database_attributes(bind.dialect.name, bind.engine.url.database)
    attributes["db.operation.name"] = "COMMIT"
    return _telemetry.span("COMMIT", "client", attributes)


def _what(value: object) -> str:
    """How an error message names a wrong argument: ``None``, ``a Session``, ..."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"an {name}" if name[0] in "AEIOU" else f"a {name}"


def _misuse_hint(value: object) -> str | None:
    """What to do instead, for the objects users mistake for a session or a factory."""
    if isinstance(value, UnitOfWork):
        return "pass uow.session for a session, or the async_sessionmaker for a factory"
    if isinstance(value, AsyncEngine):
        return "wrap the engine: async_sessionmaker(engine)"
    if isinstance(value, (Session, sessionmaker, Engine)):
        return (
            "alchemium is async: use create_async_engine(...) and async_sessionmaker(engine) "
            "from sqlalchemy.ext.asyncio"
        )
    return None


def check_session_factory(factory: Any, where: str) -> SessionFactory:
    """``factory`` if it can be a session factory, else UnitOfWorkError saying what to pass.

    Catches, before any I/O, the objects most often passed instead: a session, an
    engine, a sync sessionmaker, a unit of work, None. A callable that returns
    something else is caught when the unit of work starts.
    """
    if isinstance(factory, async_sessionmaker):
        return factory
    hint = _misuse_hint(factory)
    if isinstance(factory, AsyncSession):
        hint = "pass the async_sessionmaker the session came from: a unit of work opens its own"
    if hint is None and not callable(factory):
        hint = "pass an async_sessionmaker, or a callable returning an AsyncSession"
    if hint is not None:
        raise UnitOfWorkError(
            f"{where} expects a session factory (async_sessionmaker), got {_what(factory)}: {hint}"
        )
    return factory  # type: ignore[no-any-return]


def check_session(session: Any, where: str) -> AsyncSession:
    """``session`` if it is an AsyncSession, else RepositoryUsageError saying what to pass."""
    if isinstance(session, AsyncSession):
        return session
    hint = _misuse_hint(session)
    if isinstance(session, async_sessionmaker):
        hint = "open a session: async with UnitOfWork(factory) as uow, then pass uow.session"
    raise RepositoryUsageError(
        f"{where} expects an AsyncSession (uow.session), got {_what(session)}"
        + (f": {hint}" if hint else "")
    )


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


async def _run_callbacks(callbacks: list[Callback]) -> None:
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
    """Run ``await work(uow)`` in a new UnitOfWork, retrying it after a transient failure.

    Transient (``AlchemiumError.transient``): serialization failures, deadlocks, a
    connection lost before COMMIT, a busy database. Bugs are never retried, and neither
    is a CommitOutcomeUnknownError (the work may have committed). Each attempt is a
    fresh unit of work (``isolation_level`` applies to each), so ``work`` must be safe
    to run again: do all reads inside it. Between attempts it sleeps ``backoff * 2**n``
    seconds with full jitter. After ``attempts`` tries the last error is raised.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(1, attempts + 1):
        try:
            async with UnitOfWork(
                session_factory, isolation_level=isolation_level, **uow_options
            ) as uow:
                return await work(uow)
        except AlchemiumError as err:
            if not err.transient or attempt == attempts:
                raise
            delay = random.uniform(0, backoff * 2 ** (attempt - 1))
            logger.info(
                "retrying unit of work after %s (attempt %d of %d)",
                type(err).__name__,
                attempt,
                attempts,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
