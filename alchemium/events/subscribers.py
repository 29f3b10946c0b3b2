"""Subscribers: who receives which events, kept in blinker signals inside a registry.

``@on("user_created")`` subscribes a sync or async handler to one event name,
``@on("user_*")`` to every name matching a pattern and ``@on("*")`` to every event.
Handlers are held strongly (a handler defined inside a function keeps firing) and
each has a stable ``name``: with the outbox enabled every subscriber is a durable
destination whose delivery is tracked per event. External destinations (brokers)
are routed by the same patterns.

Patterns are shell-style over the whole event name: ``*`` matches any run of
characters (also none), ``?`` exactly one; every other character matches itself.
``[`` and ``]`` are refused when registered (no character classes), so a pattern
never silently means something else than it says. Exact names are blinker signals
(one dict lookup); patterns are compiled once, and what matches an event name is
computed once per name and cached until the subscriptions change.

A :class:`SubscriberRegistry` scopes subscribers: the module-level ``on`` uses
the default registry; tests and apps that must not share handlers create their
own and pass it to ``UnitOfWork(registry=...)`` and to the relay.

Unlike ``Signal.send``, dispatch never stops at a failing receiver: alchemium
calls each receiver itself (see ``alchemium.events.dispatch``).

A handler defined in a script run as ``python shop.py`` lives in module
``__main__``, so its default name is ``__main__.notify``, while a relay started
with ``--import shop`` knows it as ``shop.notify``: rows for the ``__main__`` name
would wait for a relay that never comes. Subscribing such a handler without
``name=`` emits :class:`MainModuleNameWarning`. It warns rather than refuses:
the name is right as long as the script delivers its own events (after-commit
dispatch, a relay running inside the script, tests, notebooks), and refusing
would break those; the warning says how to make the name stable.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from blinker import Namespace

from alchemium.domain_event import DomainEvent
from alchemium.errors import EventConfigurationError, EventError

__all__ = [
    "MAIN_MODULE_HINT",
    "Handler",
    "MainModuleNameWarning",
    "Subscriber",
    "SubscriberRegistry",
    "default_registry",
    "is_main_module_name",
    "off",
    "on",
]

Handler = Callable[[DomainEvent], Awaitable[None] | None]

WILDCARD = "*"

_Route = TypeVar("_Route")

_ROUTES_CACHED = 4096  # event names whose routes are kept; dropped all at once beyond


def event_pattern(pattern: str, *, what: str) -> re.Pattern[str] | None:
    """The compiled matcher of ``pattern``, None for an exact event name.

    Raises EventConfigurationError for something that is not a non-empty string or uses
    ``[``/``]`` (``what`` says which registration is refused: ``"subscriber 'x'"``).
    """
    if not isinstance(pattern, str) or not pattern:
        raise EventConfigurationError(
            f"{what}: the event name or pattern must be a non-empty string"
        )
    if "[" in pattern or "]" in pattern:
        raise EventConfigurationError(
            f"{what}: {pattern!r} uses [ or ], which event patterns do not support; "
            "use * (any characters) and ? (one character)"
        )
    if "*" not in pattern and "?" not in pattern:
        return None
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.compile(regex, re.DOTALL)


MAIN_MODULE_HINT = (
    "pass name='...' to on()/subscribe(), or move the handler into a module that the "
    "relay imports (alchemium relay --import MODULE)"
)


class MainModuleNameWarning(UserWarning):
    """A subscriber got its default name from ``__main__``: no other process can serve it."""


def is_main_module_name(name: str) -> bool:
    """Whether ``name`` is a default subscriber name taken from a script (``__main__.*``)."""
    return name.startswith("__main__.")


@dataclass(frozen=True, slots=True)
class Subscriber:
    """A handler subscribed to ``event`` (an event name or a pattern) under a unique ``name``."""

    name: str
    event: str
    handler: Handler

    async def __call__(self, event: DomainEvent) -> None:
        """Call the handler with ``event``, awaiting it if it is a coroutine function."""
        result = self.handler(event)
        if inspect.isawaitable(result):
            await result


class SubscriberRegistry:
    """A scope of subscribers and of the external destinations (brokers) events go to."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._signals = Namespace()  # exact event names
        self._by_name: dict[str, Subscriber] = {}
        self._patterns: dict[str, re.Pattern[str]] = {}  # subscriber name -> its pattern
        # external destination -> its patterns (None: an exact event name)
        self._destinations: dict[str, dict[str, re.Pattern[str] | None]] = {}
        self._subscriber_routes: dict[str, tuple[Subscriber, ...]] = {}
        self._destination_routes: dict[str, tuple[str, ...]] = {}

    def subscribe(self, event: str, handler: Handler, *, name: str | None = None) -> Subscriber:
        """Subscribe ``handler`` to ``event``, a name or a pattern (``"user_*"``, ``"*"``).

        ``name`` defaults to ``module.qualname``. Raises EventError for a handler that
        is not callable or a name already taken, EventConfigurationError for a pattern
        with ``[``/``]``. A default name from ``__main__`` (a handler in a script) emits
        :class:`MainModuleNameWarning`: a relay in another process cannot serve it.
        """
        return self._subscribe(event, handler, name)

    def _subscribe(self, event: str, handler: Handler, name: str | None) -> Subscriber:
        # Called by subscribe() and by on()'s decorator: a warning points at their caller.
        if not callable(handler):
            raise EventError(f"subscriber for {event!r} must be callable, got {handler!r}")
        if not name:
            name = f"{handler.__module__}.{handler.__qualname__}"
            if is_main_module_name(name):
                warnings.warn(
                    f"subscriber {handler.__qualname__!r} for {event!r} gets the default "
                    f"name {name!r} because it is defined in a script run as __main__; a "
                    "relay in another process never serves that name, so its undelivered "
                    f"events would stay pending: {MAIN_MODULE_HINT}",
                    MainModuleNameWarning,
                    stacklevel=3,
                )
        matcher = event_pattern(event, what=f"subscriber {name!r}")
        existing = self._by_name.get(name)
        if existing is not None:
            if existing.handler is handler and existing.event == event:
                return existing
            raise EventError(
                f"a subscriber named {name!r} already exists in registry {self.name!r}; "
                "pass name=... to tell them apart"
            )
        if name in self._destinations:
            raise EventError(f"{name!r} is already a destination in registry {self.name!r}")
        subscriber = Subscriber(name=name, event=event, handler=handler)
        if matcher is None:
            self._signals.signal(event).connect(subscriber, weak=False)
        else:
            self._patterns[name] = matcher
        self._by_name[name] = subscriber
        self._subscriber_routes.clear()
        return subscriber

    def unsubscribe(self, handler_or_name: Handler | str) -> None:
        """Remove a subscriber by handler or by name; unknown ones raise EventError."""
        for sub in list(self._by_name.values()):
            if sub.name == handler_or_name or sub.handler is handler_or_name:
                if self._patterns.pop(sub.name, None) is None:
                    self._signals.signal(sub.event).disconnect(sub)
                del self._by_name[sub.name]
                self._subscriber_routes.clear()
                return
        raise EventError(f"no subscriber {handler_or_name!r} in registry {self.name!r}")

    def on(self, event: str, *, name: str | None = None) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`subscribe`; returns the handler unchanged."""

        def decorate(handler: Handler) -> Handler:
            self._subscribe(event, handler, name)
            return handler

        return decorate

    def subscribers_for(self, event_name: str) -> list[Subscriber]:
        """Subscribers of exactly ``event_name``, then those of matching patterns.

        Each group in subscription order. Computed once per event name (cached until
        a subscription changes).
        """
        routes = self._subscriber_routes.get(event_name)
        if routes is None:
            found: list[Subscriber] = []
            signal = self._signals.get(event_name)
            if signal is not None:
                found.extend(r for r in signal.receivers_for(None) if isinstance(r, Subscriber))
            found.extend(
                self._by_name[name]
                for name, matcher in self._patterns.items()
                if matcher.fullmatch(event_name)
            )
            routes = _cache(self._subscriber_routes, event_name, tuple(found))
        return list(routes)

    def subscriber(self, name: str) -> Subscriber | None:
        """The subscriber called ``name``, if any."""
        return self._by_name.get(name)

    @property
    def subscribers(self) -> list[Subscriber]:
        """Every subscriber, in subscription order."""
        return list(self._by_name.values())

    def add_destination(self, name: str, event: str = WILDCARD) -> None:
        """Route events matching ``event`` (a name or a pattern) to an external destination.

        With the outbox enabled, each such event gets a delivery row for ``name`` that
        a relay with a publisher of that name drains. Calling it again for the same
        destination adds a pattern (``"user_*"`` then ``"order_*"``: both go there).
        Raises EventConfigurationError for a pattern with ``[``/``]``, EventError for a
        name that is a subscriber.
        """
        if name in self._by_name:
            raise EventError(f"{name!r} is already a subscriber in registry {self.name!r}")
        matcher = event_pattern(event, what=f"destination {name!r}")
        self._destinations.setdefault(name, {})[event] = matcher
        self._destination_routes.clear()

    def destinations_for(self, event_name: str) -> list[str]:
        """External destination names that receive ``event_name``, in registration order.

        Computed once per event name (cached until a destination is added or removed).
        """
        routes = self._destination_routes.get(event_name)
        if routes is None:
            found = tuple(
                destination
                for destination, patterns in self._destinations.items()
                if any(
                    pattern == event_name if matcher is None else matcher.fullmatch(event_name)
                    for pattern, matcher in patterns.items()
                )
            )
            routes = _cache(self._destination_routes, event_name, found)
        return list(routes)

    def clear(self) -> None:
        """Remove every subscriber and destination."""
        for sub in list(self._by_name.values()):
            self.unsubscribe(sub.name)
        self._destinations.clear()
        self._destination_routes.clear()

    @contextmanager
    def scoped(self) -> Iterator[SubscriberRegistry]:
        """Within the block, subscriptions made on this registry are removed afterwards."""
        before = dict(self._by_name)
        destinations = {name: dict(patterns) for name, patterns in self._destinations.items()}
        try:
            yield self
        finally:
            for name in [n for n in self._by_name if n not in before]:
                self.unsubscribe(name)
            self._destinations = destinations
            self._destination_routes.clear()

    def __repr__(self) -> str:
        return f"SubscriberRegistry({self.name!r}, subscribers={len(self._by_name)})"

    def knows(self, destination: str) -> bool:
        """Whether ``destination`` is a subscriber or an external destination of this registry."""
        return destination in self._by_name or destination in self._destinations


def _cache(routes: dict[str, _Route], event_name: str, found: _Route) -> _Route:
    if len(routes) >= _ROUTES_CACHED:
        routes.clear()  # many distinct names (generated ones?): keep memory bounded
    routes[event_name] = found
    return found


default_registry = SubscriberRegistry()


def on(
    event: str, *, name: str | None = None, registry: SubscriberRegistry | None = None
) -> Callable[[Handler], Handler]:
    """Subscribe the decorated handler to ``event`` (``"*"`` for all) in ``registry``."""
    return (registry or default_registry).on(event, name=name)


def off(handler_or_name: Handler | str, *, registry: SubscriberRegistry | None = None) -> None:
    """Unsubscribe a handler (or a subscriber name) from ``registry``."""
    (registry or default_registry).unsubscribe(handler_or_name)
