"""Which column values a model's change events carry, and how they are read back.

A repository can keep columns out of its model's events (``event_exclude``: secrets,
blobs) or send something derived from them (``event_transform``: a blob's size, a
masked card number). The policy is checked when the repository class is defined,
together with every column the events will carry: a column whose Python type no
encoder knows is reported then, naming the model, the field, the type and what to
do, instead of failing the first commit in production.

:func:`decode_payload` is the consumer's side: it turns a delivered change event's
payload back into column values with :func:`alchemium.encoding.decode_value`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeGuard

from alchemium.encoding import decode_value, plain_json, unencodable_type
from alchemium.errors import EventConfigurationError, EventDecodeError, EventSerializationError
from alchemium.events.sensitive import (
    ERASED,
    HASH_PREFIX,
    REDACTED,
    SensitiveFields,
    sensitive_fields,
)
from alchemium.modelinfo import ModelInfo, model_info

__all__ = ["PayloadPolicy", "configure_payload", "decode_payload", "payload_policy"]

Transform = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class PayloadPolicy:
    """The columns a model's change events leave out, and those they send transformed.

    Applied when a change is recorded (at flush), to every change event of the model:
    created, updated, deleted, upserted, restored, bulk operations included. A
    transform is called with the column value (never with None, which stays None)
    and returns what the event carries instead; for updated events both the old and
    the new value are transformed.
    """

    model: str
    exclude: frozenset[str]
    transform: Mapping[str, Transform]
    sensitive: SensitiveFields | None = None

    def apply(self, event: str, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The payload ``event`` carries; None for an update of excluded columns only."""
        exclude = self.exclude
        if action == "updated":
            changes = {
                key: {
                    "old": self._value(event, key, change["old"]),
                    "new": self._value(event, key, change["new"]),
                }
                for key, change in payload["changes"].items()
                if key not in exclude
            }
            return {"changes": changes} if changes else None
        return {k: self._value(event, k, v) for k, v in payload.items() if k not in exclude}

    def _value(self, event: str, key: str, value: Any) -> Any:
        if self.sensitive is not None and key in self.sensitive.fields:
            return self.sensitive.hide(key, value)
        transform = self.transform.get(key)
        if transform is None or value is None:
            return value
        try:
            return transform(value)
        except Exception as err:
            raise EventSerializationError(
                event,
                key,
                value,
                reason=f"event_transform[{key!r}] of {self.model} raised {err!r}",
            ) from err


_policies: dict[type[Any], PayloadPolicy] = {}


def configure_payload(
    info: ModelInfo,
    *,
    exclude: Collection[str] | None,
    transform: Mapping[str, Transform] | None,
    check: bool,
) -> PayloadPolicy | None:
    """Validate and store what ``info.model``'s events carry; None when they carry every column.

    ``exclude`` / ``transform`` None: not declared (an earlier declaration for the model
    stays). A second, different declaration for the same model raises: two
    repositories of one model must not disagree on what leaves it (a secret excluded
    by one would be sent by the other). ``check``: the model records events, so every
    column they carry untransformed must have an encoder (EventConfigurationError
    otherwise, naming the model, the field and the type). The model's sensitive
    columns (:mod:`alchemium.events.sensitive`) are part of the policy; one cannot
    also be transformed.
    """
    current = _policies.get(info.model)
    names = _declared_exclude(info, exclude, current)
    functions = _declared_transform(info, transform, current)
    sensitive = sensitive_fields(info)
    both = names & functions.keys()
    if both:
        raise EventConfigurationError(
            f"{info.name}: {', '.join(sorted(both))} is both in event_exclude and "
            "event_transform; keep it in one",
            model=info.name,
            field=sorted(both)[0],
        )
    hidden = (sensitive.fields if sensitive is not None else frozenset()) & functions.keys()
    if hidden:
        raise EventConfigurationError(
            f"{info.name}: {', '.join(sorted(hidden))} is sensitive and in event_transform; "
            "a sensitive column is hidden, not transformed: keep it in one",
            model=info.name,
            field=sorted(hidden)[0],
        )
    if check:
        _check_encodable(info, names | functions.keys())
    if not names and not functions and sensitive is None:
        _policies.pop(info.model, None)
        return None
    policy = PayloadPolicy(info.name, names, MappingProxyType(dict(functions)), sensitive)
    _policies[info.model] = policy
    return policy


def _declared_exclude(
    info: ModelInfo, exclude: Collection[str] | None, current: PayloadPolicy | None
) -> frozenset[str]:
    before = current.exclude if current is not None else frozenset()
    if exclude is None:
        return before
    if isinstance(exclude, str):
        raise EventConfigurationError(
            f"{info.name}: event_exclude must be a collection of column names, "
            f"e.g. ({exclude!r},), not a string",
            model=info.name,
        )
    names = frozenset(exclude)
    for name in sorted(names):
        _column(info, "event_exclude", name)
    if before and names != before:
        raise EventConfigurationError(
            f"{info.name} already has event_exclude = {sorted(before)}; another repository "
            f"declares {sorted(names)}: declare it once",
            model=info.name,
        )
    return names


def _declared_transform(
    info: ModelInfo, transform: Mapping[str, Transform] | None, current: PayloadPolicy | None
) -> Mapping[str, Transform]:
    before = current.transform if current is not None else {}
    if transform is None:
        return before
    if not isinstance(transform, Mapping):
        raise EventConfigurationError(
            f"{info.name}: event_transform must map column names to functions, "
            f"got {type(transform).__name__}",
            model=info.name,
        )
    for name, function in transform.items():
        _column(info, "event_transform", name)
        if not callable(function):
            raise EventConfigurationError(
                f"{info.name}.{name}: event_transform[{name!r}] must be callable, got {function!r}",
                model=info.name,
                field=name,
            )
    if before and dict(transform) != dict(before):
        raise EventConfigurationError(
            f"{info.name} already has an event_transform for {sorted(before)}; another "
            "repository declares a different one: declare it once",
            model=info.name,
        )
    return transform


def _column(info: ModelInfo, option: str, name: object) -> None:
    if not isinstance(name, str) or name not in info.columns:
        raise EventConfigurationError(
            f"{option}: {info.name} has no column {name!r}; "
            f"columns: {', '.join(sorted(info.columns))}",
            model=info.name,
            field=str(name),
        )


def _check_encodable(info: ModelInfo, skipped: Collection[str]) -> None:
    for key, column in info.columns.items():
        if key in skipped:
            continue
        missing = unencodable_type(column.type)
        if missing is None:
            continue
        kind = f"{missing.__module__}.{missing.__qualname__}"
        raise EventConfigurationError(
            f"{info.name}.{key}: change events cannot carry its values ({kind}, column type "
            f"{column.type!r}): no encoder knows {missing.__qualname__}. Register one before "
            f"the repository is defined (alchemium.register_encoder({missing.__qualname__}, "
            f"encode, decode)), leave the column out (event_exclude = ({key!r},) or "
            f"event_transform = {{{key!r}: ...}} on the repository), or set "
            "record_events = False",
            model=info.name,
            field=key,
        )


def payload_policy(model: type[Any]) -> PayloadPolicy | None:
    """The policy of ``model`` or of its nearest base class that has one."""
    for klass in model.__mro__:
        policy = _policies.get(klass)
        if policy is not None:
            return policy
    return None


def decode_payload(model: type[Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    """The column values of a change event's ``payload`` (as delivered), decoded.

    Created, upserted, deleted and restored payloads give ``{column: value}``; an
    updated payload (its only key is ``changes``) gives ``{"changes": {column: {"old":
    value, "new": value}}}``. Columns the repository transforms keep their JSON value
    (a transform is not reversible); excluded ones are absent, as in the payload; the
    ``soft`` flag of a soft delete is kept. Sensitive columns keep what hides them
    (``"[redacted]"``, a hash, ``"[erased]"``, an erasable token not yet revealed with
    :func:`alchemium.events.erasure.reveal_payload`); revealed values are decoded. A key
    that is not a column of ``model`` (a payload of another model, or of a column since
    renamed) raises EventDecodeError.
    """
    info = model_info(model)
    policy = payload_policy(model)
    kept = policy.transform if policy is not None else {}
    hidden = policy.sensitive.fields if policy is not None and policy.sensitive else frozenset()

    def decode(key: str, value: Any) -> Any:
        column = info.columns.get(key)
        if column is None:
            if key == "soft":
                return value
            raise EventDecodeError(
                f"{info.name}.{key}", value, f"a column of {info.name} (it has none by that name)"
            )
        if key in kept or (key in hidden and _hides(value)):
            return plain_json(value)
        return decode_value(column.type, value, field=f"{info.name}.{key}")

    changes = payload.get("changes")
    if len(payload) == 1 and _is_diff(changes):
        return {
            "changes": {
                key: {"old": decode(key, c["old"]), "new": decode(key, c["new"])}
                for key, c in changes.items()
            }
        }
    return {key: decode(key, value) for key, value in payload.items()}


def _hides(value: Any) -> bool:
    """Whether ``value`` stands for a hidden sensitive value rather than being one."""
    if isinstance(value, str):
        return value in (REDACTED, ERASED) or value.startswith(HASH_PREFIX)
    return isinstance(value, Mapping) and "$erasable" in value


def _is_diff(changes: Any) -> TypeGuard[Mapping[str, Mapping[str, Any]]]:
    return isinstance(changes, Mapping) and all(
        isinstance(c, Mapping) and c.keys() == {"old", "new"} for c in changes.values()
    )
