"""FastAPI: one UnitOfWork per request, committed after the endpoint returns.

::

    from typing import Annotated
    from alchemium import UnitOfWork
    from alchemium.integrations.fastapi import actor_from_header, request_unit_of_work

    Transaction = Annotated[
        UnitOfWork, request_unit_of_work(async_session, actor=actor_from_header("X-User"))
    ]

    @app.post("/users", status_code=201)
    async def create_user(body: UserIn, uow: Transaction) -> UserOut:
        user = await UserRepository.create(uow.session, body.model_dump())
        await uow.flush()                      # the generated id, for the response
        return UserOut.model_validate(user)

Guarantees:

- Each request gets its own UnitOfWork (and session); concurrent requests share nothing
  but the engine's pool. The actor is a context variable, so it never leaks between
  requests either.
- The dependency has FastAPI's ``scope="function"``: it commits after the endpoint has
  returned and its response body has been built, but *before* the response is sent. A
  failing commit (a unique violation found at commit, a serialization failure) reaches
  your exception handlers like any error raised in the endpoint, so the client never
  gets a success status for a transaction that did not commit.
- An exception raised by the endpoint, ``HTTPException`` included, rolls the unit of
  work back. Returning an error response without raising commits: raise to undo.
- A request cancelled mid-way (client gone, server shutdown) rolls back and still
  returns the connection to the pool (see :class:`alchemium.UnitOfWork`).

Importing this module without FastAPI installed raises ImportError naming the extra.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from typing import Any

try:
    from fastapi import Request, params
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "alchemium.integrations.fastapi needs FastAPI >= 0.121: pip install 'alchemium[fastapi]'"
    ) from err

from alchemium.context import use_actor
from alchemium.uow import SessionFactory, UnitOfWork, check_session_factory

__all__ = ["ActorHook", "actor_from_header", "request_unit_of_work"]

ActorHook = Callable[[Request], str | None]
"""Returns the actor (user id, service name) of a request, or None when anonymous."""


def request_unit_of_work(
    session_factory: SessionFactory,
    *,
    actor: ActorHook | None = None,
    **uow_options: Any,
) -> params.Depends:
    """The ``Depends(...)`` marker of a UnitOfWork per request: put it in ``Annotated`` as is.

    ``Annotated[UnitOfWork, request_unit_of_work(async_session)]`` is the whole of it:
    the result already is a ``Depends``, so wrapping it again
    (``Depends(request_unit_of_work(...))``) fails when the route is defined.

    Args:
        session_factory: the ``async_sessionmaker`` every request's UnitOfWork uses.
        actor: called with the request before the unit of work opens; a non-None result
            becomes the unit of work's ``actor`` (event metadata, audit rows) and is set
            with :func:`alchemium.use_actor` for the rest of the request, so other units
            of work opened while handling it record it too. It may raise
            ``HTTPException`` (401, 403) to refuse the request before any database work.
            With no hook, or when it returns None, whatever :func:`alchemium.use_actor`
            set around the request (e.g. in a middleware) applies.
        **uow_options: passed to every :class:`~alchemium.UnitOfWork`
            (``isolation_level``, ``registry``, ``outbox``, ``metadata``, ...).

    The unit of work commits when the endpoint returns and rolls back when it raises;
    the commit happens before the response is sent (FastAPI ``scope="function"``).
    """

    check_session_factory(session_factory, "request_unit_of_work")

    async def unit_of_work(request: Request) -> AsyncIterator[UnitOfWork]:
        who = actor(request) if actor is not None else None
        with use_actor(who) if who is not None else nullcontext():
            async with UnitOfWork(session_factory, actor=who, **uow_options) as uow:
                yield uow

    return params.Depends(unit_of_work, scope="function")


def actor_from_header(name: str) -> ActorHook:
    """An actor hook reading the request header ``name`` (None when absent or empty).

    Only trust such a header when a gateway in front of the app sets it after
    authenticating the caller; otherwise derive the actor from your authentication.
    """

    def actor(request: Request) -> str | None:
        return request.headers.get(name) or None

    return actor
