"""How entity changes become domain events.

The unit of work's ``after_flush`` hook (:class:`ChangeRecorder`, plugged into
every unit of work) turns every flushed change of a model handled by a
CrudRepository into an event of the unit of work that owns the session:
``<entity>_created`` (column values, with the generated key),
``<entity>_updated`` (``changes``: only the columns whose value changed, old and
new; nothing when nothing changed) and ``<entity>_deleted`` (last column values).
For a soft-deleted model, setting its soft-delete column records
``<entity>_deleted`` with ``"soft": true`` and clearing it ``<entity>_restored``.
``after_flush`` is the one moment where generated keys are known *and* attribute
history is still there (flush resets it), and it never touches attributes after
commit. Bulk operations, which bypass the flush, record through ``record_rows``
and friends. Domain objects using :class:`EventSourceMixin` collect their own
events, which the unit of work gathers before commit.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.dialects.postgresql import Range
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import get_history, instance_state
from sqlalchemy.orm.base import NO_VALUE, PASSIVE_NO_INITIALIZE, PASSIVE_NO_RESULT

from alchemium.domain_event import DomainEvent
from alchemium.encoding import ADDRESS_TYPES, json_safe
from alchemium.events.payloads import PayloadPolicy, Transform, configure_payload
from alchemium.modelinfo import ModelInfo, model_info
from alchemium.uow import (
    UnitOfWork,
    UnitOfWorkHooks,
    add_before_commit_hook,
    add_hooks,
    current_unit_of_work,
    global_before_commit_hooks,
    remove_before_commit_hook,
)

__all__ = [
    "ChangeRecorder",
    "EventSourceMixin",
    "RecordedChange",
    "add_before_commit_hook",
    "change_action",
    "global_before_commit_hooks",
    "record_inserted",
    "register_entity",
    "remove_before_commit_hook",
]

_OLD_KEY = "alchemium.old_values"
_SOURCES_KEY = "alchemium.event_sources"  # in uow.info: deleted EventSourceMixin objects
_NO_KEY = object()
_source_classes = False  # set when the first EventSourceMixin subclass is defined


@dataclass(frozen=True, slots=True)
class EntityConfig:
    """How changes of one model are named, whether they are recorded, what they carry."""

    entity: str
    enabled: bool
    payload: PayloadPolicy | None = None  # None: every column, as it is


_entities: dict[type[Any], EntityConfig] = {}
_resolved: dict[type[Any], EntityConfig | None] = {}  # entity_config per class, by __mro__


def register_entity(
    model: type[Any],
    *,
    entity: str,
    enabled: bool = True,
    exclude: Collection[str] | None = None,
    transform: Mapping[str, Transform] | None = None,
) -> None:
    """Record change events for ``model`` under the prefix ``entity`` (or not, if disabled).

    ``exclude`` / ``transform``: see :class:`alchemium.events.payloads.PayloadPolicy`.
    Raises EventConfigurationError, before anything is registered, for a column the
    events cannot carry (see :func:`alchemium.events.payloads.configure_payload`).
    """
    payload = configure_payload(
        model_info(model), exclude=exclude, transform=transform, check=enabled
    )
    _entities[model] = EntityConfig(entity=entity, enabled=enabled, payload=payload)
    _resolved.clear()


def entity_config(cls: type[Any]) -> EntityConfig | None:
    """The configuration for ``cls`` or its nearest registered base class."""
    try:
        return _resolved[cls]
    except KeyError:
        pass
    found = None
    for klass in cls.__mro__:
        config = _entities.get(klass)
        if config is not None:
            found = config
            break
    _resolved[cls] = found
    return found


CHANGE_ACTIONS = ("created", "updated", "deleted", "upserted", "restored")


def change_action(event: DomainEvent) -> str | None:
    """``"created"``, ``"updated"``, ... if ``event`` is an entity change event, else None.

    A change event is named ``<entity>_<action>`` for an entity some repository
    registered; custom events with other names are not change events.
    """
    prefix, _, action = event.name.rpartition("_")
    if action not in CHANGE_ACTIONS or prefix != event.aggregate_type:
        return None
    if not any(c.entity == prefix for c in _entities.values()):
        return None
    return action


def wants_events(session: Any, info: ModelInfo, action: str | None = None) -> bool:
    """Whether changes of ``info.model`` in ``session`` must be recorded as events.

    With ``action`` (``"updated"``, ...): only if something would see the event
    ``<entity>_<action>`` (:meth:`UnitOfWork.wants_event`), so that bulk operations
    do not read or return every row they change for events nobody consumes.
    """
    uow = current_unit_of_work(session)
    if uow is None:
        return False
    config = entity_config(info.model)
    if config is None or not config.enabled:
        return False
    return action is None or uow.wants_event(f"{config.entity}_{action}")


def _columns(info: ModelInfo, values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in info.columns if k in values and values[k] is not NO_VALUE}


@dataclass(frozen=True, slots=True)
class RecordedChange:
    """An entity change recorded at flush, built into a DomainEvent only if something sees it.

    Most units of work in a service without subscribers, outbox or audit record
    changes nobody reads; building (JSON conversion, freezing, a fresh uuid) is
    deferred to :meth:`build`, which the commit path calls for the changes it will
    write or dispatch, and ``uow.pending_events`` for all of them. The values are a
    snapshot taken at flush (only immutable column values are deferred, see ``_add``).
    """

    name: str
    entity: str
    key: str
    payload: dict[str, Any]
    metadata: dict[str, Any]
    occurred_at: dt.datetime

    def build(self) -> DomainEvent:
        """The DomainEvent; raises EventSerializationError for a value JSON cannot hold."""
        return DomainEvent.create(
            self.name,
            aggregate_type=self.entity,
            aggregate_id=self.key,
            payload=self.payload,
            metadata=self.metadata,
            occurred_at=self.occurred_at,
        )


# Column values that cannot change after the flush, so a deferred build sees the
# same thing an immediate one would. Anything else (JSON dicts and lists, arrays,
# bytearrays, values of unknown or registered types) is converted at once.
_IMMUTABLE = frozenset(
    {
        type(None),
        str,
        bytes,
        int,
        float,
        bool,
        decimal.Decimal,
        uuid.UUID,
        dt.datetime,
        dt.date,
        dt.time,
        dt.timedelta,
        *ADDRESS_TYPES,
        Range,  # a frozen dataclass of scalar bounds
    }
)


def _values_of(action: str, payload: Mapping[str, Any]) -> Iterator[Any]:
    if action == "updated":
        for change in payload["changes"].values():
            yield change["old"]
            yield change["new"]
    else:
        yield from payload.values()


def _add(uow: UnitOfWork, info: ModelInfo, action: str, key: str, payload: dict[str, Any]) -> None:
    _add_many(uow, info, action, ((key, payload),))


def _add_many(
    uow: UnitOfWork, info: ModelInfo, action: str, changes: Iterable[tuple[str, dict[str, Any]]]
) -> None:
    """Record ``<entity>_<action>`` for each ``(key, payload)``; one metadata and clock read."""
    config = entity_config(info.model)
    assert config is not None
    name = f"{config.entity}_{action}"
    policy = config.payload
    metadata = uow.event_metadata()
    now = dt.datetime.now(dt.timezone.utc)
    immutable = _IMMUTABLE
    add = uow.add_event
    for key, payload in changes:
        if policy is not None:
            shown = policy.apply(name, action, payload)
            if shown is None:
                continue  # an update of excluded columns only
            payload = shown
        change = RecordedChange(name, config.entity, key, payload, metadata, now)
        if all(type(v) in immutable for v in _values_of(action, payload)):
            add(change)
        else:
            add(change.build())


def _enabled(obj: object) -> ModelInfo | None:
    config = entity_config(type(obj))
    if config is None or not config.enabled:
        return None
    return model_info(type(obj))


def _diff(obj: object, info: ModelInfo, loaded: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    state = instance_state(obj)
    # Only an attribute set since the load has history to report (its committed value
    # is kept in committed_state); the others are skipped without building a History.
    # get_history rather than state.attrs, which builds an AttributeState per column.
    committed = state.committed_state
    changes: dict[str, dict[str, Any]] = {}
    for key in info.columns:
        if key not in committed:
            continue
        history = get_history(obj, key, PASSIVE_NO_INITIALIZE)
        if not history.added:
            continue
        new = history.added[0]
        old = history.deleted[0] if history.deleted else loaded.get(key)
        if old == new:
            continue
        changes[key] = {"old": old, "new": new}
    return changes


def _read_old_values(session: Session) -> None:
    """Read the stored values of columns changed while expired, before the UPDATE hides them.

    Setting an expired attribute (after a commit with ``expire_on_commit=True``) does
    not load its old value, so the attribute history has none; one SELECT per such
    object, only then, keeps ``<entity>_updated`` exact.
    """
    unknown: dict[Any, tuple[ModelInfo, list[str]]] = {}
    for obj in session.dirty:
        info = _enabled(obj)
        state = instance_state(obj)
        if info is None or state.identity is None:
            continue
        # Only an attribute set while expired has no committed value (NO_VALUE or
        # PASSIVE_NO_RESULT in committed_state, so no "deleted" history): the others are
        # skipped without building their History.
        committed = state.committed_state
        keys = [
            k
            for k in info.columns
            if ((stored := committed.get(k, _NO_KEY)) is NO_VALUE or stored is PASSIVE_NO_RESULT)
            and (h := get_history(obj, k, PASSIVE_NO_INITIALIZE)).added
            and not h.deleted
            and not h.unchanged
        ]
        if keys:
            unknown[state] = (info, keys)
    if not unknown:
        session.info.pop(_OLD_KEY, None)  # left by a flush that failed
        return
    old: dict[Any, dict[str, Any]] = {}
    with session.no_autoflush:
        for state, (info, keys) in unknown.items():
            pk = [info.columns[k] for k in info.primary_key]
            stmt = select(*(info.columns[k] for k in keys)).where(
                *(col == value for col, value in zip(pk, state.identity, strict=True))
            )
            row = session.connection().execute(stmt).first()
            if row is not None:
                old[state] = dict(zip(keys, row, strict=True))
    session.info[_OLD_KEY] = old


def _record_flushed_changes(uow: UnitOfWork, session: Session) -> None:
    """Record an event for each change of an entity this flush writes."""
    loaded: dict[Any, dict[str, Any]] = session.info.pop(_OLD_KEY, None) or {}
    for obj in session.new:
        info = _enabled(obj)
        if info is not None:
            _add(uow, info, "created", info.identity(obj), _columns(info, instance_state(obj).dict))
    for obj in session.dirty:
        info = _enabled(obj)
        if info is not None:
            changes = _diff(obj, info, loaded.get(instance_state(obj), {}))
            column = info.soft_delete_column
            soft = changes.pop(column, None) if column is not None else None
            if soft is not None and column is not None:
                # Stamping the soft-delete column is a delete, clearing it a restore.
                values = _columns(info, instance_state(obj).dict)
                if soft["old"] is None:
                    _add(uow, info, "deleted", info.identity(obj), {**values, "soft": True})
                elif soft["new"] is None:
                    _add(uow, info, "restored", info.identity(obj), values)
                else:
                    changes[column] = soft
            if changes:
                _add(uow, info, "updated", info.identity(obj), {"changes": changes})
    for obj in session.deleted:
        info = _enabled(obj)
        if info is not None:
            _add(uow, info, "deleted", info.identity(obj), _columns(info, inspect(obj).dict))
        if isinstance(obj, EventSourceMixin):
            # Gone from the session after the flush: remember it for collect().
            uow.info.setdefault(_SOURCES_KEY, []).append(obj)


def record_rows(session: Any, info: ModelInfo, action: str, objs: Iterable[object]) -> None:
    """Record ``<entity>_<action>`` with the column values of each object (bulk inserts)."""
    uow = current_unit_of_work(session)
    if uow is None or not wants_events(session, info):
        return
    _add_many(
        uow,
        info,
        action,
        ((info.identity(obj), _columns(info, inspect(obj).dict)) for obj in objs),
    )


def record_inserted(session: Any, info: ModelInfo, rows: Iterable[Mapping[str, Any]]) -> None:
    """Record ``<entity>_created`` for each inserted row, given as its column values."""
    uow = current_unit_of_work(session)
    if uow is None or not wants_events(session, info, "created"):
        return
    _add_many(uow, info, "created", ((info.key_of(row), dict(row)) for row in rows))


def record_bulk_updates(
    session: Any, info: ModelInfo, old_rows: Sequence[Any], data: Mapping[str, Any]
) -> None:
    """Record ``<entity>_updated`` for each row of a bulk update that actually changed."""
    uow = current_unit_of_work(session)
    if uow is None:
        return
    for row in old_rows:
        old = dict(zip(info.columns, row, strict=True))
        changes = {k: {"old": old[k], "new": v} for k, v in data.items() if old[k] != v}
        if changes:
            key = info.key_of(old)
            _add(uow, info, "updated", key, {"changes": changes})


def record_bulk_deletes(
    session: Any, info: ModelInfo, rows: Sequence[Any], *, soft: bool = False
) -> None:
    """Record ``<entity>_deleted`` with the last values of each row a bulk delete returned.

    ``soft``: the rows were soft-deleted (the payload gets ``"soft": true``).
    """
    uow = current_unit_of_work(session)
    if uow is None:
        return
    for row in rows:
        values = dict(zip(info.columns, row, strict=True))
        key = info.key_of(values)
        _add(uow, info, "deleted", key, {**values, "soft": True} if soft else values)


class EventSourceMixin:
    """Lets a domain object record its own events; the unit of work collects them at commit.

    ``order.record_event("order_placed", {"total": 10})`` -> before commit the unit of
    work that loaded or added ``order`` turns it into a DomainEvent whose aggregate is
    the order (its key known by then). The payload is checked for JSON-safety at once.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        global _source_classes
        _source_classes = True

    def record_event(
        self, name: str, payload: Mapping[str, Any] | None = None, **metadata: Any
    ) -> None:
        """Queue an event about this object for the unit of work that will commit it."""
        safe = json_safe(dict(payload or {}), event=name, field="")
        queue: list[tuple[str, dict[str, Any], dict[str, Any]]] = self.__dict__.setdefault(
            "_alchemium_events", []
        )
        queue.append((name, safe, metadata))

    def pop_recorded_events(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """Take the queued (name, payload, metadata) tuples, leaving none behind."""
        queue: list[tuple[str, dict[str, Any], dict[str, Any]]] = self.__dict__.pop(
            "_alchemium_events", []
        )
        return queue


def _sources(uow: UnitOfWork, session: Any) -> list[EventSourceMixin]:
    seen_deleted: list[Any] = uow.info.pop(_SOURCES_KEY, [])
    if not _source_classes:
        # No EventSourceMixin subclass exists, so no object of the session is one.
        return []
    seen = [*session.identity_map.values(), *session.new, *seen_deleted]
    unique = {id(obj): obj for obj in seen if isinstance(obj, EventSourceMixin)}
    return list(unique.values())


def _collect_object_events(uow: UnitOfWork, session: Any) -> None:
    """Turn events queued on EventSourceMixin objects the session saw into uow events."""
    for obj in _sources(uow, session):
        queued = obj.pop_recorded_events()
        if not queued:
            continue
        info = model_info(type(obj))
        config = entity_config(type(obj))
        aggregate = config.entity if config is not None else info.entity
        for name, payload, metadata in queued:
            uow.record(
                name,
                aggregate_type=aggregate,
                aggregate_id=info.identity(obj),
                payload=payload,
                metadata=metadata,
            )


class ChangeRecorder(UnitOfWorkHooks):
    """The unit of work hooks that record entity changes and EventSourceMixin events.

    ``before_flush`` reads old values only an expired attribute hides, ``after_flush``
    records the flushed changes, ``collect`` gathers the events queued on objects and
    ``after_rollback`` drops the ones still queued: without that, an object kept after a
    rollback would carry its events into the next unit of work that touches it.
    """

    def before_flush(self, uow: UnitOfWork, session: Session) -> None:
        """Remember the stored values of columns set while expired (see ``_read_old_values``)."""
        _read_old_values(session)

    def after_flush(self, uow: UnitOfWork, session: Session) -> None:
        """Record ``<entity>_created/_updated/_deleted/_restored`` for this flush's changes."""
        _record_flushed_changes(uow, session)

    def collect(self, uow: UnitOfWork, session: Session) -> None:
        """Record the events queued on EventSourceMixin objects the session saw."""
        _collect_object_events(uow, session)

    def after_rollback(self, uow: UnitOfWork, session: Session, *, savepoint: bool) -> None:
        """Drop the events still queued on objects the session saw."""
        for obj in _sources(uow, session):
            obj.pop_recorded_events()


add_hooks(ChangeRecorder())
