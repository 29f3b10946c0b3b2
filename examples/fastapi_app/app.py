"""A users API on alchemium: create, list (filters + pagination), read, update, delete.

Run it from the repository root::

    .venv/bin/uvicorn examples.fastapi_app.app:app --reload

``DATABASE_URL`` selects the database (default: ``fastapi_app.db``, SQLite, in the
working directory); the tables are created at startup. Every request runs in its own
UnitOfWork (``request_unit_of_work``): committed after the endpoint returns, rolled back
when it raises. The ``X-User`` header names the actor recorded in event metadata.
``user_created`` is handled by ``send_welcome`` after the commit; ``GET /welcome-emails``
shows what it "sent".
"""

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from alchemium import (
    DataValidationError,
    IntegrityViolation,
    NotFoundError,
    QueryError,
    UnitOfWork,
)
from alchemium.events import DomainEvent, SubscriberRegistry
from alchemium.integrations.fastapi import actor_from_header, request_unit_of_work
from examples.fastapi_app.models import Base, UserRepository, outbox

logger = logging.getLogger("fastapi_app")

DEFAULT_URL = "sqlite+aiosqlite:///fastapi_app.db"


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    email: str | None = None
    position: str | None = None
    age: int | None = Field(default=None, ge=0)


class UserPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    email: str | None = None
    position: str | None = None
    age: int | None = Field(default=None, ge=0)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    email: str | None
    position: str | None
    age: int | None


class UserPage(BaseModel):
    items: list[UserOut]
    total: int
    page: int
    page_size: int
    pages: int


def create_app(database_url: str | None = None) -> FastAPI:
    """Build the app for ``database_url`` (default: $DATABASE_URL or a local SQLite file)."""
    url = database_url or os.environ.get("DATABASE_URL", DEFAULT_URL)
    engine = create_async_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Concurrent requests write concurrently: WAL + a busy timeout let them queue.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    # A registry per app keeps this app's handlers to itself (tests build several apps).
    registry = SubscriberRegistry("fastapi_app")
    welcome_emails: list[dict[str, Any]] = []

    @registry.on("user_created")
    async def send_welcome(event: DomainEvent) -> None:
        # Runs after the commit: a fresh unit of work already sees the new row.
        async with UnitOfWork(session_factory, registry=registry, outbox=outbox) as uow:
            user = await UserRepository.get(uow.session, int(event.aggregate_id))
        welcome_emails.append(
            {
                "user_id": int(event.aggregate_id),
                "name": event.payload["name"],
                "actor": event.metadata.get("actor"),
                "committed": user is not None,
            }
        )
        logger.info("welcome email sent to %s", event.payload["name"])

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)  # users + outbox tables
        yield
        await engine.dispose()

    app = FastAPI(title="alchemium users API", lifespan=lifespan)
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.welcome_emails = welcome_emails

    Transaction = Annotated[
        UnitOfWork,
        request_unit_of_work(
            session_factory,
            actor=actor_from_header("X-User"),
            registry=registry,
            outbox=outbox,
        ),
    ]

    @app.exception_handler(NotFoundError)
    async def not_found(_request: Request, err: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(IntegrityViolation)
    async def conflict(_request: Request, err: IntegrityViolation) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(QueryError)
    async def bad_query(_request: Request, err: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=status.HTTP_400_BAD_REQUEST)

    @app.exception_handler(DataValidationError)
    async def bad_data(_request: Request, err: DataValidationError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.post("/users", status_code=status.HTTP_201_CREATED)
    async def create_user(body: UserIn, uow: Transaction) -> UserOut:
        user = await UserRepository.create(uow.session, body.model_dump())
        await uow.flush()  # the generated id, for the response
        return UserOut.model_validate(user)

    @app.post("/users/batch", status_code=status.HTTP_201_CREATED)
    async def create_users(body: list[UserIn], uow: Transaction) -> list[UserOut]:
        """All or nothing: one duplicate name rolls the whole batch back (409)."""
        users = [await UserRepository.create(uow.session, row.model_dump()) for row in body]
        await uow.flush()
        return [UserOut.model_validate(u) for u in users]

    @app.get("/users")
    async def list_users(
        uow: Transaction,
        name_startswith: str | None = None,
        position: str | None = None,
        min_age: int | None = None,
        max_age: int | None = None,
        order_by: str = "id",
        page: Annotated[int, Query(ge=1)] = 1,
        page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> UserPage:
        filters: dict[str, Any] = {}
        if name_startswith is not None:
            filters["name__startswith"] = name_startswith
        if position is not None:
            filters["position"] = position
        if min_age is not None:
            filters["age__gte"] = min_age
        if max_age is not None:
            filters["age__lte"] = max_age
        # order_by goes to the repository as is: an unknown column is an OrderByFieldError,
        # which the QueryError handler turns into a 400 naming the valid columns.
        found = await UserRepository.paginate(
            uow.session, filters, order_by=order_by, page=page, page_size=page_size
        )
        return UserPage(
            items=[UserOut.model_validate(u) for u in found.items],
            total=found.total or 0,
            page=found.page,
            page_size=found.page_size,
            pages=found.pages or 1,
        )

    @app.get("/users/{user_id}")
    async def get_user(user_id: int, uow: Transaction) -> UserOut:
        user = await UserRepository.get_one_or_raise(uow.session, {"id": user_id})
        return UserOut.model_validate(user)

    @app.patch("/users/{user_id}")
    async def update_user(user_id: int, body: UserPatch, uow: Transaction) -> UserOut:
        user = await UserRepository.get_one_or_raise(uow.session, {"id": user_id})
        # No flush: a duplicate name is found at commit, after this returns, and the
        # client still gets the 409 (the commit runs before the response is sent).
        UserRepository.update(obj=user, data=body.model_dump(exclude_unset=True))
        return UserOut.model_validate(user)

    @app.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_user(user_id: int, uow: Transaction) -> None:
        user = await UserRepository.get_one_or_raise(uow.session, {"id": user_id})
        await UserRepository.delete(uow.session, user)

    @app.get("/welcome-emails")
    async def list_welcome_emails() -> list[dict[str, Any]]:
        return welcome_emails

    return app


app = create_app()
