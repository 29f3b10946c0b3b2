"""How entity changes become domain events.

A session-level ``after_flush`` hook turns every flushed change of a model
handled by a CrudRepository into an event of the unit of work that owns the
session: ``<entity>_created`` (column values, with the generated key),
``<entity>_updated`` (``changes``: only the columns whose value changed, old and
new; nothing when nothing changed) and ``<entity>_deleted`` (last column values).
``after_flush`` is the one moment where generated keys are known *and* attribute
history is still there (flush resets it), and it never touches attributes after
commit. Bulk operations, which bypass the flush, record through ``record_rows``
and friends. Domain objects using :class:`EventSourceMixin` collect their own
events, which the unit of work gathers before commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event as sa_event
from sqlalchemy import inspect
from sqlalchemy.orm import Session
from sqlalchemy.orm.base import NO_VALUE

from alchemium.events.event import DomainEvent, json_safe
from alchemium.modelinfo import ModelInfo, model_info

if TYPE_CHECKING:
    from alchemium.uow import Hook, UnitOfWork

__all__ = [
    "EventSourceMixin",
    "add_before_commit_hook",
    "collect_object_events",
    "global_before_commit_hooks",
    "register_entity",
]

_UOW_KEY = "alchemium.uow"


@dataclass(frozen=True, slots=True)
class EntityConfig:
    """How changes of one model are named and whether they are recorded."""

    entity: str
    enabled: bool


_entities: dict[type[Any], EntityConfig] = {}
_hooks: list[Hook] = []


def register_entity(model: type[Any], *, entity: str, enabled: bool = True) -> None:
    """Record change events for ``model`` under the prefix ``entity`` (or not, if disabled)."""
    _entities[model] = EntityConfig(entity=entity, enabled=enabled)


def entity_config(cls: type[Any]) -> EntityConfig | None:
    """The configuration for ``cls`` or its nearest registered base class."""
    for klass in cls.__mro__:
        config = _entities.get(klass)
        if config is not None:
            return config
    return None


def add_before_commit_hook(hook: Hook) -> None:
    """Run ``await hook(uow)`` in every unit of work just before its commit (e.g. audit)."""
    if hook not in _hooks:
        _hooks.append(hook)


def remove_before_commit_hook(hook: Hook) -> None:
    """Undo :func:`add_before_commit_hook`."""
    if hook in _hooks:
        _hooks.remove(hook)


def global_before_commit_hooks() -> list[Hook]:
    """The hooks added with :func:`add_before_commit_hook`, in order."""
    return list(_hooks)


def _owner(session: Any) -> UnitOfWork | None:
    info = getattr(session, "info", None)
    return info.get(_UOW_KEY) if info is not None else None


def wants_events(session: Any, info: ModelInfo) -> bool:
    """Whether changes of ``info.model`` in ``session`` must be recorded as events."""
    if _owner(session) is None:
        return False
    config = entity_config(info.model)
    return config is not None and config.enabled


def _columns(info: ModelInfo, values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in info.columns if k in values and values[k] is not NO_VALUE}


def _add(uow: UnitOfWork, info: ModelInfo, action: str, key: str, payload: dict[str, Any]) -> None:
    config = entity_config(info.model)
    assert config is not None
    uow.add_event(
        DomainEvent.create(
            f"{config.entity}_{action}",
            aggregate_type=config.entity,
            aggregate_id=key,
            payload=payload,
            metadata=uow.event_metadata(),
        )
    )


def _enabled(obj: object) -> ModelInfo | None:
    config = entity_config(type(obj))
    if config is None or not config.enabled:
        return None
    return model_info(type(obj))


def _diff(obj: object, info: ModelInfo) -> dict[str, dict[str, Any]]:
    state = inspect(obj)
    changes: dict[str, dict[str, Any]] = {}
    for key in info.columns:
        history = state.attrs[key].history
        if not history.added:
            continue
        new = history.added[0]
        old = history.deleted[0] if history.deleted else None
        if history.deleted and old == new:
            continue
        changes[key] = {"old": old, "new": new}
    return changes


@sa_event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _flush_context: Any) -> None:
    uow = _owner(session)
    if uow is None:
        return
    for obj in session.new:
        info = _enabled(obj)
        if info is not None:
            _add(uow, info, "created", info.identity(obj), _columns(info, inspect(obj).dict))
    for obj in session.dirty:
        info = _enabled(obj)
        if info is not None:
            changes = _diff(obj, info)
            if changes:
                _add(uow, info, "updated", info.identity(obj), {"changes": changes})
    for obj in session.deleted:
        info = _enabled(obj)
        if info is not None:
            _add(uow, info, "deleted", info.identity(obj), _columns(info, inspect(obj).dict))
        if isinstance(obj, EventSourceMixin):
            uow._seen_sources.append(obj)


def record_rows(session: Any, info: ModelInfo, action: str, objs: Iterable[object]) -> None:
    """Record ``<entity>_<action>`` with the column values of each object (bulk inserts)."""
    uow = _owner(session)
    if uow is None or not wants_events(session, info):
        return
    for obj in objs:
        _add(uow, info, action, info.identity(obj), _columns(info, inspect(obj).dict))


def record_bulk_updates(
    session: Any, info: ModelInfo, old_rows: Sequence[Any], data: Mapping[str, Any]
) -> None:
    """Record ``<entity>_updated`` for each row of a bulk update that actually changed."""
    uow = _owner(session)
    if uow is None:
        return
    for row in old_rows:
        old = dict(zip(info.columns, row, strict=True))
        changes = {k: {"old": old[k], "new": v} for k, v in data.items() if old[k] != v}
        if changes:
            key = ":".join(str(old[k]) for k in info.primary_key)
            _add(uow, info, "updated", key, {"changes": changes})


def record_bulk_deletes(session: Any, info: ModelInfo, rows: Sequence[Any]) -> None:
    """Record ``<entity>_deleted`` with the last values of each row a bulk delete returned."""
    uow = _owner(session)
    if uow is None:
        return
    for row in rows:
        values = dict(zip(info.columns, row, strict=True))
        key = ":".join(str(values[k]) for k in info.primary_key)
        _add(uow, info, "deleted", key, values)


class EventSourceMixin:
    """Lets a domain object record its own events; the unit of work collects them at commit.

    ``order.record_event("order_placed", {"total": 10})`` -> before commit the unit of
    work that loaded or added ``order`` turns it into a DomainEvent whose aggregate is
    the order (its key known by then). The payload is checked for JSON-safety at once.
    """

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


def collect_object_events(uow: UnitOfWork, session: Any) -> None:
    """Turn events queued on EventSourceMixin objects the session saw into uow events."""
    seen = [*session.identity_map.values(), *session.new, *uow._seen_sources]
    uow._seen_sources.clear()
    done: set[int] = set()
    for obj in seen:
        if not isinstance(obj, EventSourceMixin) or id(obj) in done:
            continue
        done.add(id(obj))
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
