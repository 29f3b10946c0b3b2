"""Who and where: the actor and tenant of the current request, the unit of work of a session.

Web middleware sets the actor and tenant once per request; every UnitOfWork created
in that context picks them up unless it is given ``actor=`` / ``tenant=`` explicitly.
A UnitOfWork marks its session so repositories and flush hooks find it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alchemium.uow import UnitOfWork

__all__ = [
    "current_actor",
    "current_tenant",
    "current_unit_of_work",
    "session_tenant",
    "use_actor",
    "use_tenant",
]

UOW_KEY = "alchemium.uow"

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


def current_unit_of_work(session: Any) -> UnitOfWork | None:
    """The UnitOfWork that owns ``session`` (async or sync session), if any."""
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
    return _tenant.get()
