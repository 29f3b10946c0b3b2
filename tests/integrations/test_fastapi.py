"""The FastAPI integration and the example users API, over ASGI, on SQLite and PostgreSQL.

No ``from __future__ import annotations`` here: FastAPI must resolve the ``Annotated``
dependency declared inside ``build_app`` at runtime.
"""

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import UnitOfWork, current_actor, use_actor
from alchemium.events import SubscriberRegistry, flush_delivery_marks
from alchemium.integrations.fastapi import actor_from_header, request_unit_of_work
from examples.fastapi_app.app import create_app
from examples.fastapi_app.models import outbox
from tests.integrations.conftest import empty_database
from tests.models import User, UserRepository


@pytest.fixture
async def users_app(db_url: str) -> AsyncIterator[FastAPI]:
    app = create_app(await empty_database(db_url))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(users_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=users_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
    engine: AsyncEngine = users_app.state.engine
    await flush_delivery_marks()  # marks in flight hold a connection
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def outbox_rows(app: FastAPI) -> list[dict[str, Any]]:
    async with app.state.engine.connect() as conn:
        query = select(outbox.events.c.name, outbox.events.c.aggregate_id).order_by(
            outbox.events.c.sequence
        )
        return [dict(r._mapping) for r in await conn.execute(query)]


async def delivery_statuses(app: FastAPI) -> list[str]:
    await flush_delivery_marks()  # the after-commit marks of the requests' commits
    async with app.state.engine.connect() as conn:
        return list((await conn.scalars(select(outbox.deliveries.c.status))).all())


# -- the example users API -----------------------------------------------------------------


async def test_create_commits_then_user_created_handler_sees_the_row(
    client: httpx.AsyncClient, users_app: FastAPI
) -> None:
    response = await client.post(
        "/users", json={"name": "Alice", "age": 30}, headers={"X-User": "admin"}
    )
    assert response.status_code == 201
    user_id = response.json()["id"]
    assert isinstance(user_id, int)
    assert users_app.state.welcome_emails == [
        {"user_id": user_id, "name": "Alice", "actor": "admin", "committed": True}
    ]
    assert (await client.get(f"/users/{user_id}")).json()["name"] == "Alice"
    assert await outbox_rows(users_app) == [{"name": "user_created", "aggregate_id": str(user_id)}]
    assert await delivery_statuses(users_app) == ["delivered"]


async def test_list_filters_orders_and_paginates(client: httpx.AsyncClient) -> None:
    people = [("Ann", "eng", 25), ("Bob", "ops", 35), ("Bea", "eng", 45), ("Cid", "eng", 55)]
    created = await client.post(
        "/users/batch", json=[{"name": n, "position": p, "age": a} for n, p, a in people]
    )
    assert created.status_code == 201

    page = (await client.get("/users", params={"position": "eng", "order_by": "-age"})).json()
    assert [u["name"] for u in page["items"]] == ["Cid", "Bea", "Ann"]
    assert page["total"] == 3

    page = (await client.get("/users", params={"name_startswith": "B", "min_age": 40})).json()
    assert [u["name"] for u in page["items"]] == ["Bea"]

    first = (await client.get("/users", params={"page_size": 3, "order_by": "name"})).json()
    second = (
        await client.get("/users", params={"page_size": 3, "page": 2, "order_by": "name"})
    ).json()
    assert [u["name"] for u in first["items"]] == ["Ann", "Bea", "Bob"]
    assert [u["name"] for u in second["items"]] == ["Cid"]
    assert (first["total"], first["pages"]) == (4, 2)


async def test_bad_order_by_is_a_400_naming_the_columns(client: httpx.AsyncClient) -> None:
    response = await client.get("/users", params={"order_by": "password"})
    assert response.status_code == 400
    assert "password" in response.json()["detail"]
    assert "name" in response.json()["detail"]


async def test_update_and_delete(client: httpx.AsyncClient) -> None:
    user_id = (await client.post("/users", json={"name": "Dan", "position": "dev"})).json()["id"]
    patched = await client.patch(f"/users/{user_id}", json={"position": "lead"})
    assert patched.status_code == 200
    assert patched.json()["position"] == "lead"
    assert (await client.get(f"/users/{user_id}")).json()["position"] == "lead"

    assert (await client.delete(f"/users/{user_id}")).status_code == 204
    missing = await client.get(f"/users/{user_id}")
    assert missing.status_code == 404
    assert "User" in missing.json()["detail"]
    assert (await client.delete(f"/users/{user_id}")).status_code == 404


async def test_failing_batch_rolls_back_every_row_and_records_no_event(
    client: httpx.AsyncClient, users_app: FastAPI
) -> None:
    await client.post("/users", json={"name": "Eve"})
    response = await client.post(
        "/users/batch", json=[{"name": "Fay"}, {"name": "Gus"}, {"name": "Eve"}]
    )
    assert response.status_code == 409
    listed = (await client.get("/users")).json()
    assert [u["name"] for u in listed["items"]] == ["Eve"]
    assert [w["name"] for w in users_app.state.welcome_emails] == ["Eve"]
    assert [r["name"] for r in await outbox_rows(users_app)] == ["user_created"]


async def test_commit_failure_after_the_endpoint_returned_is_sent_as_the_error(
    client: httpx.AsyncClient, users_app: FastAPI
) -> None:
    await client.post("/users", json={"name": "Hal"})
    ivy = (await client.post("/users", json={"name": "Ivy"})).json()["id"]
    # The endpoint returns 200 data, but the duplicate name is only found at commit.
    response = await client.patch(f"/users/{ivy}", json={"name": "Hal"})
    assert response.status_code == 409
    assert (await client.get(f"/users/{ivy}")).json()["name"] == "Ivy"
    assert "user_updated" not in [r["name"] for r in await outbox_rows(users_app)]


async def test_concurrent_requests_keep_their_own_transaction_and_actor(
    client: httpx.AsyncClient, users_app: FastAPI
) -> None:
    await client.post("/users", json={"name": "taken"})

    async def create(i: int) -> httpx.Response:
        name = "taken" if i % 5 == 0 else f"user-{i}"
        return await client.post("/users", json={"name": name}, headers={"X-User": f"actor-{i}"})

    responses = await asyncio.gather(*(create(i) for i in range(20)))
    codes = [r.status_code for r in responses]
    assert codes == [409 if i % 5 == 0 else 201 for i in range(20)]
    ids = [r.json()["id"] for r in responses if r.status_code == 201]
    assert len(set(ids)) == 16

    welcomes = users_app.state.welcome_emails[1:]
    assert sorted((w["name"], w["actor"]) for w in welcomes) == sorted(
        (f"user-{i}", f"actor-{i}") for i in range(20) if i % 5
    )
    assert all(w["committed"] for w in welcomes)
    assert (await client.get("/users")).json()["total"] == 17
    assert current_actor() is None


# -- the dependency itself, on the test models ----------------------------------------------


def build_app(
    session_factory: async_sessionmaker[AsyncSession], **options: Any
) -> tuple[FastAPI, list[str | None]]:
    seen: list[str | None] = []
    app = FastAPI()
    transaction = Annotated[UnitOfWork, request_unit_of_work(session_factory, **options)]

    @app.post("/users/{name}")
    async def create(name: str, uow: transaction, fail: bool = False) -> dict[str, Any]:
        user = await UserRepository.create(uow.session, {"name": name})
        await uow.flush()
        seen.append(current_actor())
        if fail:
            raise HTTPException(status_code=418, detail="refused after the insert")
        return {"id": user.id, "actor": uow.actor}

    return app, seen


async def count_users(session_factory: async_sessionmaker[AsyncSession]) -> int:
    async with session_factory() as session:
        return int((await session.execute(select(func.count()).select_from(User))).scalar_one())


async def call(app: FastAPI, method: str, url: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.request(method, url, **kwargs)


async def test_http_exception_in_the_endpoint_rolls_back(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    app, _ = build_app(session_factory)
    assert (await call(app, "POST", "/users/kept")).status_code == 200
    response = await call(app, "POST", "/users/dropped", params={"fail": True})
    assert response.status_code == 418
    assert await count_users(session_factory) == 1


async def test_actor_hook_sets_the_actor_for_the_request_only(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    app, seen = build_app(session_factory, actor=actor_from_header("X-User"))
    response = await call(app, "POST", "/users/a", headers={"X-User": "alice"})
    assert response.json()["actor"] == "alice"
    anonymous = await call(app, "POST", "/users/b")
    assert anonymous.json()["actor"] is None
    assert seen == ["alice", None]
    assert current_actor() is None


async def test_without_hook_the_actor_set_around_the_request_applies(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    app, seen = build_app(session_factory)
    with use_actor("middleware-user"):
        await call(app, "POST", "/users/a")
    assert seen == ["middleware-user"]


async def test_actor_hook_can_refuse_the_request_before_any_database_work(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    def require_user(request: Request) -> str:
        user = request.headers.get("X-User")
        if user is None:
            raise HTTPException(status_code=401, detail="who are you?")
        return user

    app, seen = build_app(session_factory, actor=require_user)
    assert (await call(app, "POST", "/users/a")).status_code == 401
    assert seen == []
    assert await count_users(session_factory) == 0


async def test_uow_options_reach_every_unit_of_work(
    session_factory: async_sessionmaker[AsyncSession], registry: SubscriberRegistry
) -> None:
    created: list[tuple[str, str]] = []

    @registry.on("user_created")
    def remember(event: Any) -> None:
        created.append((event.payload["name"], event.metadata["source"]))

    app, _ = build_app(session_factory, registry=registry, metadata={"source": "api"})
    await call(app, "POST", "/users/zed")
    assert created == [("zed", "api")]


def test_import_without_fastapi_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "try:\n"
        "    import alchemium.integrations.fastapi\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'alchemium[fastapi]'" in result.stdout


async def test_cancelled_request_rolls_back_and_returns_its_connection(
    session_factory: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    app = FastAPI()
    inserted = asyncio.Event()
    transaction = Annotated[UnitOfWork, request_unit_of_work(session_factory)]

    @app.post("/slow/{name}")
    async def slow(name: str, uow: transaction) -> None:
        await UserRepository.create(uow.session, {"name": name})
        await uow.flush()
        inserted.set()
        await asyncio.sleep(60)

    request = asyncio.create_task(call(app, "POST", "/slow/ghost"))
    await asyncio.wait_for(inserted.wait(), timeout=10)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert await count_users(session_factory) == 0
    await flush_delivery_marks()  # marks in flight hold a connection
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
