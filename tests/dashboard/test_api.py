"""The dashboard's JSON API and pages over httpx, on SQLite and PostgreSQL.

What an operator relies on: counts that match the outbox, dead letters that can be
requeued or discarded exactly once (a row changed meanwhile is a 409 and nothing
changes), every action recorded with who did it, payloads hidden unless allowed,
and a clear 4xx for every bad request, never a 500.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from fastapi import FastAPI
from sqlalchemy import MetaData, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request

from alchemium import UnitOfWork
from alchemium.dashboard import DashboardConfigurationError, create_app
from alchemium.events import (
    AuditLog,
    OutboxRelay,
    SubscriberRegistry,
    create_audit_table,
    create_outbox_tables,
    disable_audit,
    enable_audit,
)
from alchemium.events.outbox import Outbox
from alchemium.events.outbox_actions import OutboxActionLog
from tests.dashboard.conftest import (
    ORIGIN,
    TOKEN,
    bearer,
    client,
    recorded,
    seed,
    statuses,
)
from tests.events.relay_support import Sink, StalledSink, insert_events
from tests.models import Base, UserRepository
from tests.rig import free_port

Factory = async_sessionmaker[AsyncSession]
MakeApp = Callable[..., Starlette]

postgres_only = pytest.mark.parametrize("backend", ["postgresql"])


# -- reading -------------------------------------------------------------------------------------


async def test_overview_counts_each_state_per_destination_and_the_throughput(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    await seed(session_factory, outbox, delivered=3, dead=2, pending=4)
    await seed(session_factory, outbox, pending=1, destination="mailer")
    async with client(make_app()) as c:
        response = await c.get("/api/overview")
    assert response.status_code == 200
    doc = response.json()
    by_name = {d["destination"]: d for d in doc["destinations"]}
    assert set(by_name) == {"mailer", "sink"}
    sink = by_name["sink"]
    assert (sink["pending"], sink["claimed"], sink["delivered"], sink["dead"]) == (4, 0, 3, 2)
    assert sink["oldest_pending_age"] is not None
    assert by_name["mailer"]["pending"] == 1
    assert doc["totals"]["pending"] == 5
    assert doc["delivered_exact"] is True
    assert doc["counting"] == "all counts are exact"
    minutes = doc["throughput"]["minutes"]
    assert len(minutes) == 60
    assert doc["throughput"]["total"] == 3  # delivered just now, inside the last hour
    assert minutes[-1]["delivered"] + minutes[-2]["delivered"] == 3


async def test_overview_counts_abandoned_deliveries_apart_from_dead_ones(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    seeded = await seed(session_factory, outbox, dead=2)
    d = outbox.deliveries
    async with session_factory() as session:  # as a destination's give-up policy leaves it
        await session.execute(
            update(d).where(d.c.id == seeded.dead_ids[0]).values(status="abandoned")
        )
        await session.commit()
    async with client(make_app()) as c:
        doc = (await c.get("/api/overview")).json()
        page = await c.get("/")
    [sink] = doc["destinations"]
    assert (sink["dead"], sink["abandoned"]) == (1, 1)
    assert doc["totals"]["abandoned"] == 1
    assert re.search(r'class="abandoned">1<', page.text)


async def test_overview_page_shows_the_counts_and_the_chart(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    await seed(session_factory, outbox, delivered=2, pending=1)
    async with client(make_app()) as c:
        page = await c.get("/")
    assert page.status_code == 200
    assert 'data-destination="sink"' in page.text
    assert re.search(r'class="pending">1<', page.text)
    assert re.search(r'class="delivered">2<', page.text)
    assert "<svg" in page.text
    assert "2 delivered in the window" in page.text
    assert "How counted: all counts are exact" in page.text


async def test_dead_letters_hide_payloads_unless_allowed(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    seeded = await seed(session_factory, outbox, delivered=1, dead=2)
    async with client(make_app()) as c:
        hidden = (await c.get("/api/dead")).json()
        page = await c.get("/dead")
    assert hidden["total"] == 2
    assert [i["id"] for i in hidden["items"]] == seeded.dead_ids
    first = hidden["items"][0]
    assert first["payload"] is None
    assert first["payload_hidden"] is True
    assert "sink refused" in first["last_error"]
    assert first["event_name"] == "user_created"
    assert "hidden (start the dashboard with show_payloads=True" in page.text
    assert "&#34;n&#34;" not in page.text

    async with client(make_app(show_payloads=True)) as c:
        shown = (await c.get("/api/dead")).json()
        event = (await c.get(f"/api/events/{first['event_id']}")).json()
    assert shown["items"][0]["payload"] == {"n": 1}
    assert event["event"]["payload"] == {"n": 1}


async def test_dead_letters_filter_by_destination_and_event_name(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    await seed(session_factory, outbox, dead=2)
    mail = await seed(session_factory, outbox, dead=1, destination="mailer", name="invoice_sent")
    async with client(make_app()) as c:
        by_destination = (await c.get("/api/dead", params={"destination": "mailer"})).json()
        by_name = (await c.get("/api/dead", params={"name": "invoice_sent"})).json()
        empty_fields = await c.get("/dead?destination=&name=&aggregate_type=&aggregate_id=")
        paged = (await c.get("/api/dead", params={"per_page": 2, "page": 2})).json()
    assert [i["id"] for i in by_destination["items"]] == mail.dead_ids
    assert [i["id"] for i in by_name["items"]] == mail.dead_ids
    assert empty_fields.status_code == 200  # an empty form field is no filter
    assert (paged["total"], len(paged["items"]), paged["has_next"]) == (3, 1, False)


async def test_one_event_shows_every_delivery(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    (event,) = await insert_events(session_factory, outbox, 1, destinations=("a", "b"))
    relay = OutboxRelay(session_factory, Sink(name="a"), listen=False, outbox=outbox)
    await relay.run_once()
    async with client(make_app()) as c:
        doc = (await c.get(f"/api/events/{event.id}")).json()
        page = await c.get(f"/events/{event.id}")
    assert doc["event"]["id"] == str(event.id)
    assert doc["event"]["name"] == "user_created"
    assert doc["event"]["payload_hidden"] is True
    assert [(d["destination"], d["status"], d["attempts"]) for d in doc["deliveries"]] == [
        ("a", "delivered", 1),
        ("b", "pending", 0),
    ]
    assert doc["deliveries"][0]["delivered_at"] is not None
    assert page.status_code == 200
    assert "status-delivered" in page.text
    assert "status-pending" in page.text


@pytest.mark.parametrize("completion", ["delete", "archive"])
async def test_deleted_or_archived_deliveries_are_read_where_they_went(
    make_app: MakeApp, engine: AsyncEngine, session_factory: Factory, completion: str
) -> None:
    """Counts, chart, one event and discard follow ``Outbox(completion=...)``."""
    box = Outbox(MetaData(), table_name="done_outbox", completion=completion)
    await create_outbox_tables(engine, box)
    seeded = await seed(session_factory, box, delivered=2, dead=2, pending=1)
    archived = completion == "archive"
    async with client(make_app(outbox=box, actions=True, token=TOKEN), **bearer("ops")) as c:
        overview = (await c.get("/api/overview")).json()
        page = await c.get("/")
        event = (await c.get(f"/api/events/{seeded.events[0].id}")).json()
        discarded = await c.post("/api/dead/discard", json={"ids": seeded.dead_ids[:1]})
        after = (await c.get("/api/overview")).json()
    (sink,) = overview["destinations"]
    assert (sink["pending"], sink["dead"], sink["delivered"]) == (1, 2, 2 if archived else 0)
    assert (overview["completion"], overview["delivered_kept"]) == (completion, archived)
    assert f"completion={completion}" in overview["counting"]
    assert overview["throughput"]["recorded"] is archived
    assert overview["throughput"]["total"] == (2 if archived else 0)
    assert page.status_code == 200
    assert ("delivered in the window" in page.text) is archived
    assert [(d["status"], d["archived"]) for d in event["deliveries"]] == (
        [("delivered", True)] if archived else []
    )
    assert event["completion"] == completion
    assert discarded.status_code == 200, discarded.text
    (sink,) = after["destinations"]
    assert (sink["dead"], sink["delivered"]) == (1, 3 if archived else 0)
    async with engine.connect() as conn:
        left = await conn.execute(
            select(box.deliveries.c.id).where(box.deliveries.c.id == seeded.dead_ids[0])
        )
        assert left.all() == []
        if box.archive is not None:
            moved = await conn.execute(
                select(box.archive.c.status, box.archive.c.last_error).where(
                    box.archive.c.id == seeded.dead_ids[0]
                )
            )
            status, error = moved.one()
            assert status == "delivered"
            assert "sink refused" in error


async def test_blocked_aggregates_name_the_dead_head_and_what_waits_behind_it(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    events = await insert_events(session_factory, outbox, 6, aggregates=2)  # aggregates 0 and 1
    head = events[0]  # aggregate "0": events 0, 2, 4
    relay = OutboxRelay(
        session_factory,
        Sink(fail=lambda e: e.id == head.id),
        ordered=True,
        max_attempts=1,
        listen=False,
        outbox=outbox,
    )
    while await relay.run_once():
        pass
    async with client(make_app()) as c:
        doc = (await c.get("/api/blocked")).json()
        page = await c.get("/blocked")
    (item,) = doc["items"]
    assert (item["destination"], item["aggregate_type"], item["aggregate_id"]) == (
        "sink",
        "user",
        "0",
    )
    assert (item["head_status"], item["waiting"]) == ("dead", 2)
    assert item["head_event_id"] == str(head.id)
    assert "sink refused" in item["head_error"]
    assert page.status_code == 200
    assert "Waiting behind" in page.text


async def test_relays_page_lists_who_holds_a_lease(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    await insert_events(session_factory, outbox, 3)
    sink = StalledSink()
    relay = OutboxRelay(
        session_factory, sink, relay_id="relay-a", lease=60, listen=False, outbox=outbox
    )
    task = asyncio.create_task(relay.run_once())
    try:
        await asyncio.wait_for(sink.started.wait(), 30)
        async with client(make_app()) as c:
            doc = (await c.get("/api/relays")).json()
            page = await c.get("/relays")
    finally:
        sink.release.set()
        await task
    (lease,) = doc["relays"]
    assert (lease["relay"], lease["rows"], lease["expired_rows"]) == ("relay-a", 3, 0)
    assert 0 < lease["seconds_left"] <= 60
    assert "relay-a" in page.text


@pytest.fixture
async def audit(engine: AsyncEngine) -> Any:
    log = enable_audit(Base.metadata)
    try:
        await create_audit_table(engine, log)
        yield log
    finally:
        disable_audit()
        Base.metadata.remove(log.table)


async def test_audit_log_filters_by_entity_key_actor_and_time(
    make_app: MakeApp, session_factory: Factory, registry: SubscriberRegistry, audit: AuditLog
) -> None:
    async with UnitOfWork(session_factory, registry=registry, actor="alice") as uow:
        ann = await UserRepository.create(uow.session, {"name": "Ann"})
        await UserRepository.create(uow.session, {"name": "Bob"})
        await uow.flush()
        ann_id = ann.id
    async with UnitOfWork(session_factory, registry=registry, actor="carol") as uow:
        loaded = await UserRepository.get(uow.session, ann_id)
        assert loaded is not None
        UserRepository.update(loaded, {"position": "CTO"})
    async with client(make_app(audit=audit)) as c:
        everything = (await c.get("/api/audit")).json()
        by_actor = (await c.get("/api/audit", params={"actor": "carol"})).json()
        by_key = (await c.get("/api/audit", params={"entity": "user", "entity_id": ann_id})).json()
        future = (await c.get("/api/audit", params={"since": "2999-01-01T00:00:00Z"})).json()
        page = await c.get("/audit", params={"actor": "alice"})
    assert [(i["action"], i["actor"]) for i in everything["items"]] == [
        ("updated", "carol"),
        ("created", "alice"),
        ("created", "alice"),
    ]
    assert [i["action"] for i in by_actor["items"]] == ["updated"]
    assert [i["action"] for i in by_key["items"]] == ["updated", "created"]
    assert by_key["items"][0]["changes"] is None  # hidden: changes are payloads
    assert future["items"] == []
    assert page.status_code == 200
    assert page.text.count("<td>alice</td>") == 2


async def test_audit_page_without_auditing_is_404(make_app: MakeApp) -> None:
    async with client(make_app(audit=False)) as c:
        response = await c.get("/api/audit")
        overview = await c.get("/")
    assert response.status_code == 404
    assert "auditing is not enabled" in response.json()["error"]["message"]
    assert "Audit log</a>" not in overview.text


# -- acting --------------------------------------------------------------------------------------


async def test_requeue_by_api_records_who_and_a_relay_then_delivers(
    make_app: MakeApp,
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    action_log: OutboxActionLog,
) -> None:
    seeded = await seed(session_factory, outbox, dead=2)
    target = seeded.dead_ids[0]
    async with client(make_app(actions=True, token=TOKEN), **bearer("alice")) as c:
        response = await c.post("/api/dead/requeue", json={"ids": [target]})
        actions = (await c.get("/api/actions")).json()
    assert response.status_code == 200, response.text
    assert response.json() == {"action": "requeue", "rows": 1, "delivery_ids": [target]}
    assert await statuses(session_factory, outbox, seeded.dead_ids) == ["pending", "dead"]
    (entry,) = await recorded(engine, action_log)
    assert (entry.actor, entry.action, entry.delivery_ids, entry.rows) == (
        "alice",
        "requeue",
        [target],
        1,
    )
    assert entry.client is not None
    assert actions["items"][0]["actor"] == "alice"

    relay = OutboxRelay(session_factory, Sink(), listen=False, outbox=outbox)
    assert await relay.run_once() == 1
    assert await statuses(session_factory, outbox, seeded.dead_ids) == ["delivered", "dead"]


async def test_a_row_changed_meanwhile_is_a_409_and_nothing_changes(
    make_app: MakeApp,
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    action_log: OutboxActionLog,
) -> None:
    seeded = await seed(session_factory, outbox, dead=2)
    first, second = seeded.dead_ids
    async with client(make_app(actions=True, token=TOKEN), **bearer("bob")) as c:
        assert (await c.post("/api/dead/discard", json={"ids": [first]})).status_code == 200
        # Another operator discarded `first`; bob still sees both rows and requeues them.
        conflict = await c.post("/api/dead/requeue", json={"ids": [first, second]})
    assert conflict.status_code == 409
    error = conflict.json()["error"]
    assert error["code"] == "changed_meanwhile"
    assert f"#{first}" in error["message"]
    assert "nothing was changed" in error["message"]
    assert await statuses(session_factory, outbox, [first, second]) == ["delivered", "dead"]
    assert [a.action for a in await recorded(engine, action_log)] == ["discard"]


async def test_a_selection_acts_only_if_it_still_matches_what_the_operator_saw(
    make_app: MakeApp,
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    action_log: OutboxActionLog,
) -> None:
    await seed(session_factory, outbox, dead=2)
    mail = await seed(session_factory, outbox, dead=3, destination="mailer")
    selection = {"destination": "mailer"}
    async with client(make_app(actions=True, token=TOKEN), **bearer("carol")) as c:
        stale = await c.post("/api/dead/requeue", json={"selection": selection, "expected": 2})
        done = await c.post("/api/dead/requeue", json={"selection": selection, "expected": 3})
    assert stale.status_code == 409
    assert "3 still dead" in stale.json()["error"]["message"]
    assert done.json() == {"action": "requeue", "rows": 3, "delivery_ids": mail.dead_ids}
    assert set(await statuses(session_factory, outbox, mail.dead_ids)) == {"pending"}
    (entry,) = await recorded(engine, action_log)
    assert entry.selection == {
        "destination": "mailer",
        "name": None,
        "aggregate_type": None,
        "aggregate_id": None,
    }


async def test_two_operators_requeueing_the_same_row_at_once_change_it_once(
    make_app: MakeApp,
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    action_log: OutboxActionLog,
) -> None:
    seeded = await seed(session_factory, outbox, dead=1)
    app = make_app(actions=True, token=TOKEN)
    async with client(app, **bearer("ann")) as ann, client(app, **bearer("bob")) as bob:
        answers = await asyncio.gather(
            ann.post("/api/dead/requeue", json={"ids": seeded.dead_ids}),
            bob.post("/api/dead/requeue", json={"ids": seeded.dead_ids}),
        )
    assert sorted(a.status_code for a in answers) == [200, 409]
    assert len(await recorded(engine, action_log)) == 1


async def test_form_actions_need_the_csrf_token_and_the_same_origin(
    make_app: MakeApp,
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    action_log: OutboxActionLog,
) -> None:
    seeded = await seed(session_factory, outbox, dead=3)
    one, two, three = seeded.dead_ids
    async with client(make_app(actions=True, token=TOKEN)) as c:
        login = await c.post(
            "/login",
            data={"name": "dora", "token": TOKEN, "next": "/dead"},
            headers={"Origin": ORIGIN},
        )
        assert login.status_code == 303
        page = await c.get("/dead")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        assert "Requeue" in page.text

        without = await c.post("/dead/requeue", data={"row": one})
        forged = await c.post("/dead/requeue", data={"row": one, "csrf_token": "x" * 43})
        foreign = await c.post(
            "/dead/requeue",
            data={"row": one, "csrf_token": csrf.group(1)},
            headers={"Origin": "http://evil.test"},
        )
        json_without_header = await c.post("/api/dead/requeue", json={"ids": [one]})
        plain_text = await c.post(
            "/api/dead/requeue", content='{"ids": [1]}', headers={"Content-Type": "text/plain"}
        )
        assert [r.status_code for r in (without, forged, foreign, json_without_header)] == [
            403,
            403,
            403,
            403,
        ]
        assert plain_text.status_code == 415
        assert await statuses(session_factory, outbox, [one]) == ["dead"]

        ok = await c.post(
            "/dead/requeue",
            data={"row": one, "csrf_token": csrf.group(1), "next": "/dead?destination=sink"},
            headers={"Origin": ORIGIN},
        )
        assert ok.status_code == 303
        assert ok.headers["location"] == "/dead?destination=sink&notice=requeue&rows=1"
        checked = await c.post(
            "/dead/discard",
            content=urlencode([("ids", two), ("ids", three), ("csrf_token", csrf.group(1))]),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert checked.status_code == 303
        after = await c.get(ok.headers["location"])
    assert "Requeued 1 dead delivery." in after.text
    assert await statuses(session_factory, outbox, [one, two, three]) == [
        "pending",
        "delivered",
        "delivered",
    ]
    assert [(a.actor, a.action, a.rows) for a in await recorded(engine, action_log)] == [
        ("dora", "discard", 2),
        ("dora", "requeue", 1),
    ]


async def test_read_only_dashboard_has_no_buttons_and_refuses_every_action(
    make_app: MakeApp,
    session_factory: Factory,
    outbox: Outbox,
    engine: AsyncEngine,
    action_log: OutboxActionLog,
) -> None:
    seeded = await seed(session_factory, outbox, dead=1)
    (row,) = seeded.dead_ids
    async with client(make_app()) as c:
        page = await c.get("/dead")
        event_page = await c.get(f"/events/{seeded.events[0].id}")
        form = await c.post("/dead/requeue", data={"row": row})
        api = await c.post("/api/dead/discard", json={"ids": [row]})
    assert page.status_code == 200
    assert "<button" not in page.text.split("<main>")[1].replace('<button type="submit">Filter', "")
    assert "read-only" in page.text
    assert "Requeue" not in event_page.text
    assert form.status_code == 403
    assert "read-only" in form.text
    assert api.status_code == 403
    assert api.json()["error"]["code"] == "forbidden"
    assert await statuses(session_factory, outbox, [row]) == ["dead"]
    assert await recorded(engine, action_log) == []


# -- signing in ----------------------------------------------------------------------------------


async def test_a_token_protects_every_page(make_app: MakeApp) -> None:
    async with client(make_app(token=TOKEN)) as c:
        anonymous = await c.get("/api/overview")
        wrong = await c.get("/api/overview", headers={"Authorization": "Bearer nope"})
        page = await c.get("/dead?destination=x")
        right = await c.get("/api/overview", headers=bearer())
        bad_login = await c.post("/login", data={"name": "eve", "token": "guess"})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "not_authenticated"
    assert wrong.status_code == 401
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fdead%3Fdestination%3Dx"
    assert right.status_code == 200
    assert bad_login.status_code == 401
    assert "not the dashboard&#39;s token" in bad_login.text


async def test_an_auth_hook_decides_who_may_look_and_names_the_actor(
    make_app: MakeApp,
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    action_log: OutboxActionLog,
) -> None:
    seeded = await seed(session_factory, outbox, dead=1)

    async def operator(request: Request) -> str | None:
        return request.headers.get("X-Forwarded-User")

    async with client(make_app(actions=True, auth=operator)) as c:
        refused = await c.get("/api/overview")
        done = await c.post(
            "/api/dead/requeue",
            json={"ids": seeded.dead_ids},
            headers={"X-Forwarded-User": "frank"},
        )
    assert refused.status_code == 401
    assert done.status_code == 200
    assert [a.actor for a in await recorded(engine, action_log)] == ["frank"]


def test_options_that_cannot_work_are_refused_at_creation(engine: AsyncEngine) -> None:
    with pytest.raises(DashboardConfigurationError, match="actions=True needs token= or auth="):
        create_app(engine, actions=True)
    with pytest.raises(DashboardConfigurationError, match="at least 16 characters"):
        create_app(engine, token="short")
    with pytest.raises(DashboardConfigurationError, match="not both"):
        create_app(engine, token=TOKEN, auth=lambda r: "x")


# -- refusals: a 4xx that says what was wrong, never a 500 -----------------------------------


BAD_REQUESTS = [
    ("/api/dead?destination=nowhere", 404, "unknown destination 'nowhere'"),
    ("/api/events/not-a-uuid", 400, "expected a UUID"),
    ("/api/events/00000000-0000-0000-0000-000000000000", 404, "no event 00000000"),
    ("/api/dead?colour=red", 400, "parameter 'colour': not a parameter of this page"),
    ("/api/dead?page=abc", 400, "parameter 'page': expected a whole number"),
    ("/api/dead?page=0", 400, "expected a number at least 1"),
    ("/api/dead?per_page=100000", 400, "from 1 to 500"),
    ("/api/dead?page=7", 404, "page 7 is past the end; there is 1 page of 50"),
    ("/api/blocked?page=3", 404, "page 3 is past the end"),
    ("/api/audit?since=yesterday", 400, "expected an ISO 8601 time"),
    ("/api/overview?minutes=0", 400, "parameter 'minutes'"),
    ("/api/nothing-here", 404, "Not Found"),
]


def path_id(path: str) -> str:
    """A test id of a request path: ``/api/events/not-a-uuid`` -> ``api-events-not-a-uuid``."""
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


@pytest.mark.parametrize(
    ("path", "status", "message"), BAD_REQUESTS, ids=[path_id(r[0]) for r in BAD_REQUESTS]
)
async def test_bad_requests_get_a_clear_json_error(
    path: str,
    status: int,
    message: str,
    make_app: MakeApp,
    session_factory: Factory,
    outbox: Outbox,
    audit: AuditLog,
) -> None:
    await seed(session_factory, outbox, dead=1)
    async with client(make_app(audit=audit)) as c:
        response = await c.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]["message"]


BAD_PAGES = [
    ("/dead?destination=nowhere", 404, "unknown destination &#39;nowhere&#39;"),
    ("/events/xyz", 400, "expected a UUID"),
    ("/dead?page=9", 404, "page 9 is past the end"),
    ("/audit?until=2024-13-45", 400, "expected an ISO 8601 time"),
    ("/no-such-page", 404, "Not Found"),
]


@pytest.mark.parametrize(
    ("path", "status", "message"), BAD_PAGES, ids=[path_id(r[0]) for r in BAD_PAGES]
)
async def test_bad_page_requests_get_an_error_page(
    path: str,
    status: int,
    message: str,
    make_app: MakeApp,
    session_factory: Factory,
    outbox: Outbox,
    audit: AuditLog,
) -> None:
    await seed(session_factory, outbox, dead=1)
    async with client(make_app(audit=audit)) as c:
        response = await c.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert message in response.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "give either 'ids' or 'selection'"),
        ({"ids": []}, "expected a list of 1 to 10000 delivery ids"),
        ({"ids": ["x"]}, "expected a delivery id, got 'x'"),
        ({"ids": [0]}, "of 1 or more"),
        ({"ids": [True]}, "expected delivery ids"),
        ({"selection": {"destination": "sink"}}, "the number of dead rows"),
        ({"selection": {"colour": "red"}, "expected": 1}, "selection.colour"),
        ({"selection": {"destination": "nowhere"}, "expected": 0}, "unknown destination"),
        ({"ids": [1], "force": True}, "parameter 'force'"),
        ([1, 2], "expected a JSON object"),
    ],
)
async def test_malformed_actions_are_refused_before_anything_changes(
    body: Any,
    message: str,
    make_app: MakeApp,
    engine: AsyncEngine,
    session_factory: Factory,
    outbox: Outbox,
    action_log: OutboxActionLog,
) -> None:
    seeded = await seed(session_factory, outbox, dead=1)
    async with client(make_app(actions=True, token=TOKEN), **bearer()) as c:
        response = await c.post("/api/dead/requeue", json=body)
        wrong_method = await c.get("/api/dead/requeue")
        unknown_action = await c.post("/api/dead/explode", json={"ids": [1]})
    assert response.status_code in (400, 404), response.text
    assert message in response.json()["error"]["message"]
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert unknown_action.status_code == 404
    assert await statuses(session_factory, outbox, seeded.dead_ids) == ["dead"]
    assert await recorded(engine, action_log) == []


async def test_an_action_without_its_log_table_is_refused(
    engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    from sqlalchemy import MetaData

    seeded = await seed(session_factory, outbox, dead=1)
    app = create_app(
        engine, actions=True, token=TOKEN, outbox=outbox, action_log=OutboxActionLog(MetaData())
    )
    async with client(app, **bearer()) as c:
        response = await c.post("/api/dead/requeue", json={"ids": seeded.dead_ids})
    assert response.status_code == 503
    assert "no action log table 'alchemium_outbox_action'" in response.json()["error"]["message"]
    assert await statuses(session_factory, outbox, seeded.dead_ids) == ["dead"]


async def test_a_database_without_outbox_tables_is_a_503(tmp_path: Any) -> None:
    app = create_app(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    try:
        async with client(app) as c:
            api = await c.get("/api/overview")
            page = await c.get("/")
    finally:
        await app.state.dashboard.close()
    assert api.status_code == 503
    assert "no outbox table 'alchemium_outbox'" in api.json()["error"]["message"]
    assert page.status_code == 503
    assert "create_outbox_tables" in page.text


async def test_a_database_that_cannot_be_reached_is_a_503() -> None:
    app = create_app(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres")
    try:
        async with client(app) as c:
            response = await c.get("/api/overview")
    finally:
        await app.state.dashboard.close()
    assert response.status_code == 503
    assert "the database could not answer" in response.json()["error"]["message"]


# -- mounting and scale --------------------------------------------------------------------------


async def test_mounted_in_fastapi_links_and_api_carry_the_prefix(
    make_app: MakeApp, session_factory: Factory, outbox: Outbox
) -> None:
    await seed(session_factory, outbox, dead=1)
    api = FastAPI()
    api.mount("/ops", make_app())
    async with client(api) as c:
        page = await c.get("/ops/")
        dead = await c.get("/ops/api/dead")
        css = await c.get("/ops/static/dashboard.css")
        missing = await c.get("/ops/api/events/zzz")
    assert page.status_code == 200
    assert 'href="/ops/dead"' in page.text
    assert 'href="/ops/static/dashboard.css"' in page.text
    assert dead.json()["total"] == 1
    assert css.status_code == 200
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "invalid_parameter"


@postgres_only
async def test_large_outbox_estimates_delivered_and_says_so(
    make_app: MakeApp, engine: AsyncEngine, session_factory: Factory, outbox: Outbox
) -> None:
    await seed(session_factory, outbox, delivered=40, dead=2, pending=3)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("ANALYZE alchemium_outbox_delivery")
    async with client(make_app(exact_below=10)) as c:
        doc = (await c.get("/api/overview")).json()
        page = await c.get("/")
    (sink,) = doc["destinations"]
    assert doc["delivered_exact"] is False
    assert "estimate from PostgreSQL's statistics" in doc["counting"]
    assert (sink["pending"], sink["dead"]) == (3, 2)  # exact
    assert sink["delivered"] == 40  # reltuples is exact right after ANALYZE of a small table
    assert "≈ 40" in page.text
    assert "pg_class.reltuples" in page.text
