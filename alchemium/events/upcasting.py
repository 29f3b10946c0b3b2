"""Schema versions of events and the upcasters that bring old payloads up to date.

Events outlive the code that wrote them: a ``user_created`` stored today is read
months later by a relay, an audit browser or a replay, after ``User`` changed.
Every event name has a *schema version* (1 unless declared): new events are
created at the current version (``DomainEvent.schema_version``), the outbox and
the audit log store it, and brokers receive it in the event's JSON.

An upcaster turns the payload of one version into the next::

    declare_schema_version("user_created", 2)

    @upcaster("user_created", from_version=1)
    def split_name(payload: dict) -> dict:
        first, _, last = payload.pop("name").partition(" ")
        return {**payload, "first_name": first, "last_name": last}

They run as a chain (v1 → v2 → ... → current) wherever a stored event is read back:
the relay's delivery, the after-commit dispatch of an event recorded at an older
version, replays, :func:`alchemium.events.audit_history`. Change events of a model
take their version from the repository option ``event_schema_version``.

Fail fast: the chains are checked at the first use of the registry (the first event
created or read) or by :meth:`UpcasterRegistry.validate` at startup (a relay calls it
when it starts). A gap (no upcaster from some version between the first one and the
current one) or an upcaster to a version newer than the current one raises
EventConfigurationError naming the event; an upcaster that goes backwards (a cycle)
is refused when registered. A stored event that cannot be upcast (its upcaster
raised, or it is newer than the code) raises UpcastError when read: the relay
records it on the delivery row, which is retried, then dead, and delivered after a
fix and a requeue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from alchemium.domain_event import DomainEvent, set_schema_version_resolver
from alchemium.encoding import plain_json
from alchemium.errors import EventConfigurationError, EventSerializationError, UpcastError

__all__ = [
    "Upcaster",
    "UpcasterRegistry",
    "declare_schema_version",
    "default_upcasters",
    "upcaster",
]

Upcaster = Callable[[dict[str, Any]], Mapping[str, Any]]
_F = TypeVar("_F", bound=Upcaster)


@dataclass(frozen=True, slots=True)
class _Step:
    to_version: int
    function: Upcaster


def _version(event: str, value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EventConfigurationError(f"{event!r}: {what} must be an int >= 1, got {value!r}")
    return value


class UpcasterRegistry:
    """Declared schema versions and upcasters, by event name.

    ``current_version(name)`` is the declared version, else the highest version an
    upcaster of ``name`` produces, else 1. The module-level functions use
    :data:`default_upcasters`, which is also where ``DomainEvent.create`` finds the
    version of new events.
    """

    def __init__(self) -> None:
        self._declared: dict[str, int] = {}
        self._steps: dict[str, dict[int, _Step]] = {}
        self._current: dict[str, int] | None = {}  # None: changed since last validated

    # -- declaring -------------------------------------------------------------------------

    def declare(self, event: str, version: int) -> None:
        """Declare ``event``'s current schema version; new events of that name carry it.

        Raises EventConfigurationError for a version that is not an int >= 1, or if
        ``event`` was already declared at another version (declare it once).
        """
        version = _version(event, version, "a schema version")
        before = self._declared.get(event)
        if before is not None and before != version:
            raise EventConfigurationError(
                f"{event!r} is already declared at schema version {before}; "
                f"another declaration says {version}: declare it once"
            )
        self._declared[event] = version
        self._current = None

    def register(
        self,
        event: str,
        function: Upcaster,
        *,
        from_version: int,
        to_version: int | None = None,
    ) -> None:
        """Register ``function`` to turn ``event`` payloads of ``from_version`` into
        ``to_version`` (default ``from_version + 1``).

        ``function`` gets a plain, mutable copy of the payload and returns the new one.
        Raises EventConfigurationError for an upcaster that does not go forward (it
        would make a cycle), a second upcaster from the same version, or something
        that is not callable.
        """
        start = _version(event, from_version, "from_version")
        end = start + 1 if to_version is None else _version(event, to_version, "to_version")
        if not callable(function):
            raise EventConfigurationError(f"upcaster for {event!r} must be callable")
        if end <= start:
            raise EventConfigurationError(
                f"upcaster for {event!r} from version {start} to version {end} goes "
                f"backwards: a chain through it would be a cycle ({end} -> ... -> {start} -> "
                f"{end}); an upcaster must go to a higher version"
            )
        steps = self._steps.setdefault(event, {})
        if start in steps and steps[start].function is not function:
            raise EventConfigurationError(
                f"{event!r} already has an upcaster from version {start} "
                f"({_name(steps[start].function)}); register one per version"
            )
        steps[start] = _Step(end, function)
        self._current = None

    def upcaster(
        self, event: str, *, from_version: int, to_version: int | None = None
    ) -> Callable[[_F], _F]:
        """Decorator form of :meth:`register`; returns the function unchanged."""

        def decorate(function: _F) -> _F:
            self.register(event, function, from_version=from_version, to_version=to_version)
            return function

        return decorate

    # -- checking --------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every chain now; raises EventConfigurationError naming the event.

        A chain must lead from each upcaster's version to the current version without
        a gap, and no upcaster may produce a version newer than the current one.
        Runs by itself at the first use after a change; call it at startup to fail
        before serving anything.
        """
        current: dict[str, int] = dict(self._declared)
        for event, steps in self._steps.items():
            produced = max(step.to_version for step in steps.values())
            declared = self._declared.get(event)
            if declared is not None and produced > declared:
                raise EventConfigurationError(
                    f"{event!r}: an upcaster produces schema version {produced}, newer than "
                    f"the declared current version {declared} (declare {produced}, or fix "
                    "the upcaster's to_version)"
                )
            target = declared if declared is not None else produced
            for start in sorted(steps):
                version, path = start, [start]
                while version < target:
                    step = steps.get(version)
                    if step is None:
                        raise EventConfigurationError(
                            f"{event!r}: the upcaster chain has a gap: nothing upcasts version "
                            f"{version} ({' -> '.join(map(str, path))} stops there; the current "
                            f"version is {target}); register @upcaster({event!r}, "
                            f"from_version={version})"
                        )
                    version = step.to_version
                    path.append(version)
            current[event] = target
        self._current = current

    def current_version(self, event: str) -> int:
        """The schema version new ``event`` events get and stored ones are upcast to."""
        current = self._current
        if current is None:
            self.validate()
            current = self._current
            assert current is not None
        return current.get(event, 1)

    # -- reading stored events -------------------------------------------------------------

    def upcast(self, event: DomainEvent) -> DomainEvent:
        """``event`` at the current schema version of its name (itself if already there).

        Raises UpcastError (naming the event, its id and stored version; the upcaster's
        exception as ``__cause__``) when it cannot be done.
        """
        current = self.current_version(event.name)
        if event.schema_version == current:
            return event
        payload, version = self.upcast_payload(
            event.name, plain_json(event.payload), event.schema_version, event_id=event.id
        )
        try:
            return event.with_payload(payload, schema_version=version)
        except EventSerializationError as err:
            raise UpcastError(
                event.name,
                event.id,
                event.schema_version,
                current,
                f"the upcast payload is not JSON-safe: {err}",
            ) from err

    def upcast_payload(
        self, event: str, payload: dict[str, Any], version: int, *, event_id: object = None
    ) -> tuple[dict[str, Any], int]:
        """``(payload, version)`` upcast from ``version`` to ``event``'s current version."""
        current = self.current_version(event)
        if version > current:
            raise UpcastError(
                event,
                event_id,
                version,
                current,
                "it was written by newer code than this process runs (deploy the code that "
                "declares this version, or an upcaster chain up to it)",
            )
        steps = self._steps.get(event, {})
        while version < current:
            step = steps.get(version)
            if step is None:
                raise UpcastError(
                    event,
                    event_id,
                    version,
                    current,
                    f"no upcaster from version {version} (register @upcaster({event!r}, "
                    f"from_version={version}))",
                )
            try:
                result = step.function(payload)
            except Exception as err:
                raise UpcastError(
                    event,
                    event_id,
                    version,
                    current,
                    f"upcaster {_name(step.function)} from version {version} raised "
                    f"{type(err).__name__}: {err}",
                ) from err
            if not isinstance(result, Mapping):
                raise UpcastError(
                    event,
                    event_id,
                    version,
                    current,
                    f"upcaster {_name(step.function)} from version {version} returned "
                    f"{type(result).__name__}, expected the new payload (a mapping)",
                )
            payload, version = dict(result), step.to_version
        return payload, version

    # -- scoping (tests) -------------------------------------------------------------------

    @contextmanager
    def scoped(self) -> Iterator[UpcasterRegistry]:
        """Within the block, declarations and upcasters made on this registry are undone after."""
        declared = dict(self._declared)
        steps = {event: dict(by_version) for event, by_version in self._steps.items()}
        try:
            yield self
        finally:
            self._declared, self._steps, self._current = declared, steps, None


def _name(function: object) -> str:
    return str(getattr(function, "__qualname__", None) or repr(function))


default_upcasters = UpcasterRegistry()
set_schema_version_resolver(default_upcasters.current_version)


def declare_schema_version(event: str, version: int) -> None:
    """Declare the current schema version of ``event`` in the default registry."""
    default_upcasters.declare(event, version)


def upcaster(event: str, *, from_version: int, to_version: int | None = None) -> Callable[[_F], _F]:
    """Register the decorated function as ``event``'s upcaster from ``from_version``.

    ``@upcaster("user_created", from_version=1)`` turns version-1 payloads into
    version-2 ones (``to_version`` if given). See the module docstring.
    """
    return default_upcasters.upcaster(event, from_version=from_version, to_version=to_version)
