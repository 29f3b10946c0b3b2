"""Who and where: the actor and tenant of the current request.

Web middleware sets the actor and tenant once per request; every UnitOfWork created
in that context picks them up unless it is given ``actor=`` / ``tenant=`` explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = [
    "current_actor",
    "current_tenant",
    "use_actor",
    "use_tenant",
]

_actor: ContextVar[str | None] = ContextVar("alchemium_actor", default=None)
_tenant: ContextVar[str | None] = ContextVar("alchemium_tenant", default=None)


def current_actor() -> str | None:
    """The actor set by :func:`use_actor` in this context, if any."""
    return _actor.get()


def current_tenant() -> str | None:
    """The tenant set by :func:`use_tenant` in this context, if any."""
    return _tenant.get()


@contextmanager
def use_actor(actor: str | None) -> Iterator[None]:
    """Within the block, units of work without ``actor=`` record ``actor``."""
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


@contextmanager
def use_tenant(tenant: str | None) -> Iterator[None]:
    """Within the block, units of work without ``tenant=`` act for ``tenant``."""
    token = _tenant.set(tenant)
    try:
        yield
    finally:
        _tenant.reset(token)
