"""The dashboard's HTTP side: routes, pages and their ``/api/...`` twins, errors, actions.

Each page is one handler that builds its document (``Dashboard.*_document``) and
renders it as HTML (Jinja2, ``templates/``) or, under ``/api``, as JSON. Refusals are
``DashboardRequestError``s (and ``DeliveryChangedError``, 409) turned into an error
page or ``{"error": {"status", "code", "message"}}``; a database that cannot answer is a
503, never a 500 with a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from alchemium import __version__
from alchemium.dashboard.actions import (
    one,
    parse_form_action,
    parse_json_action,
    read_form,
    read_json,
)
from alchemium.dashboard.chart import throughput_svg
from alchemium.dashboard.errors import (
    DashboardRequestError,
    NotAuthenticatedError,
    UnavailableError,
    UnsupportedMediaError,
)
from alchemium.dashboard.params import SELECTION_FIELDS, Params
from alchemium.dashboard.security import CSRF_FIELD, Access, AuthHook, Operator
from alchemium.dashboard.state import ACTIONS, Dashboard
from alchemium.events.audit import AuditLog, default_audit_log
from alchemium.events.outbox import default_outbox
from alchemium.events.outbox_actions import OutboxActionLog
from alchemium.events.outbox_admin import DeliveryChangedError, OutboxAdministration

__all__ = ["create_app"]

logger = logging.getLogger("alchemium.dashboard")

Document = dict[str, Any]
Builder = Callable[[Dashboard, Request, Params], Awaitable[Document]]

PAGE_PARAMS = ("page", "per_page")


def create_app(
    engine_or_url: AsyncEngine | str | URL,
    *,
    actions: bool = False,
    token: str | None = None,
    auth: AuthHook | None = None,
    show_payloads: bool = False,
    outbox: OutboxAdministration | None = None,
    audit: AuditLog | bool = True,
    action_log: OutboxActionLog | None = None,
    secret: str | bytes | None = None,
    refresh: float = 5.0,
    title: str = "alchemium outbox",
    exact_below: int = 100_000,
) -> Starlette:
    """The operations dashboard as an ASGI app: mount it in Starlette/FastAPI or run it.

    Args:
        engine_or_url: the async engine of the outbox database, or its URL (the app
            then owns an engine, disposed at the app's lifespan shutdown).
        actions: allow requeue and discard (POST). Needs ``token`` or ``auth``.
        token: a shared secret (16+ characters); every page then needs it (bearer
            header, or a sign-in on ``/login``).
        auth: ``auth(request) -> name | None`` (sync or async), your own sign-in: the
            name is recorded with each action; None answers 401. Not with ``token``.
        show_payloads: show event payloads and audited changes (they may hold personal
            data; hidden by default).
        outbox: the outbox tables (default: the one of ``enable_outbox``, or the default
            table names).
        audit: the audit log for the audit page (True: the one of ``enable_audit``, or
            the default table name if it exists in the database; False: no audit page).
        action_log: where actions are recorded (default: ``alchemium_outbox_action``).
        secret: key of the session and CSRF signatures; default random per app, so give
            one when several processes serve the dashboard.
        refresh: seconds between reloads of the live pages (0: never).
        exact_below: PostgreSQL counts delivered rows exactly below this many rows in the
            delivery table, and estimates them above (see the overview page).

    Raises:
        DashboardConfigurationError: actions without token or auth, both, a short token.
    """
    access = Access(actions=actions, token=token, auth=auth, secret=secret)
    owns_engine = not isinstance(engine_or_url, AsyncEngine)
    engine = (
        engine_or_url
        if isinstance(engine_or_url, AsyncEngine)
        else create_async_engine(engine_or_url, pool_pre_ping=True)
    )
    box = outbox if outbox is not None else default_outbox()
    if box is None:
        from sqlalchemy import MetaData

        box = OutboxAdministration(MetaData())
    if audit is True:
        from sqlalchemy import MetaData

        audit_log: AuditLog | None = default_audit_log() or AuditLog(MetaData())
    else:
        audit_log = audit or None
    if action_log is None:
        from sqlalchemy import MetaData

        action_log = OutboxActionLog(MetaData())
    dashboard = Dashboard(
        engine,
        box,
        audit=audit_log,
        action_log=action_log,
        show_payloads=show_payloads,
        owns_engine=owns_engine,
        exact_below=exact_below,
    )
    http = _Http(dashboard, access, refresh=refresh, title=title)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await dashboard.close()

    app = Starlette(
        routes=http.routes(),
        exception_handlers={
            DashboardRequestError: http.refusal,
            DeliveryChangedError: http.refusal,
            HTTPException: http.refusal,
            sa_exc.DBAPIError: http.refusal,
            OSError: http.refusal,
        },
        lifespan=lifespan,
    )
    app.state.dashboard = dashboard
    return app


class _Http:
    """The routes of one app and what they share: the dashboard, access rules, templates."""

    def __init__(self, dashboard: Dashboard, access: Access, *, refresh: float, title: str):
        self.dashboard = dashboard
        self.access = access
        self.refresh = refresh
        self.title = title
        self.templates = Environment(
            loader=PackageLoader("alchemium.dashboard", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True)

    def routes(self) -> list[Route | Mount]:
        pages: list[tuple[str, str, Builder, tuple[str, ...], str]] = [
            ("/", "overview", _overview, ("minutes",), "overview.html"),
            ("/dead", "dead", _dead, (*SELECTION_FIELDS, *PAGE_PARAMS), "dead.html"),
            ("/blocked", "blocked", _blocked, PAGE_PARAMS, "blocked.html"),
            ("/relays", "relays", _relays, (), "relays.html"),
            ("/audit", "audit", _audit, _AUDIT_PARAMS, "audit.html"),
            ("/actions", "actions", _actions, PAGE_PARAMS, "actions.html"),
        ]
        routes: list[Route | Mount] = []
        for path, name, build, allowed, template in pages:
            routes.append(Route(path, self._html(build, allowed, template), name=name))
            api_path = "/api/overview" if path == "/" else f"/api{path}"
            routes.append(Route(api_path, self._json(build, allowed), name=f"api_{name}"))
        routes += [
            Route("/api", self.index, name="api_index"),
            Route(
                "/api/throughput",
                self._json(_throughput, ("minutes",)),
                name="api_throughput",
            ),
            Route("/events/{event_id}", self._html(_event, (), "event.html"), name="event"),
            Route("/api/events/{event_id}", self._json(_event, ()), name="api_event"),
            Route("/dead/{action}", self.act_form, methods=["POST"], name="act"),
            Route("/api/dead/{action}", self.act_json, methods=["POST"], name="api_act"),
            Route("/login", self.login, methods=["GET", "POST"], name="login"),
            Route("/logout", self.logout, methods=["POST"], name="logout"),
            Mount(
                "/static",
                StaticFiles(packages=[("alchemium.dashboard", "static")]),
                name="static",
            ),
        ]
        return routes

    # -- pages ----------------------------------------------------------------------------------

    def _html(
        self, build: Builder, allowed: tuple[str, ...], template: str
    ) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            operator = await self.access.operator(request)
            params = Params(request.query_params, {*allowed, "notice", "rows"})
            document = await build(self.dashboard, request, params)
            return await self.render(request, template, document, operator)

        return page

    def _json(
        self, build: Builder, allowed: tuple[str, ...]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            await self.access.operator(request)
            document = await build(self.dashboard, request, Params(request.query_params, allowed))
            return JSONResponse(document)

        return endpoint

    async def render(
        self,
        request: Request,
        template: str,
        document: Document,
        operator: Operator,
        status: int = 200,
    ) -> Response:
        nonce, new = self.access.csrf_nonce(request)
        context = {
            "doc": document,
            "title": self.title,
            "version": __version__,
            "operator": operator,
            "actions": self.access.actions,
            "signs_in": self.access.signs_in,
            "token_login": self.access.token is not None,
            "show_payloads": self.dashboard.show_payloads,
            "audit": await self._audit_nav(),
            "csrf_field": CSRF_FIELD,
            "csrf": self.access.csrf_token(nonce),
            "refresh": self.refresh,
            "request": request,
            "url": lambda name, **kw: request.url_for(name, **kw).path,
            "query": lambda **kw: urlencode({k: v for k, v in kw.items() if v not in (None, "")}),
            "chart": throughput_svg,
            "here": _here(request, drop=("notice", "rows")),
            "notice": request.query_params.get("notice"),
            "notice_rows": request.query_params.get("rows"),
        }
        html = self.templates.get_template(template).render(context)
        response = HTMLResponse(html, status_code=status)
        if new:
            self.access.set_csrf_cookie(
                response, nonce, path=_cookie_path(request), secure=_https(request)
            )
        return response

    async def _audit_nav(self) -> bool:
        try:
            return await self.dashboard.audit_available()
        except (sa_exc.DBAPIError, OSError):
            return False

    async def index(self, request: Request) -> Response:
        """``GET /api``: what this dashboard serves and allows."""
        await self.access.operator(request)
        Params(request.query_params, ())
        base = request.url_for("api_index").path
        return JSONResponse(
            {
                "version": __version__,
                "actions": self.access.actions,
                "show_payloads": self.dashboard.show_payloads,
                "audit": await self.dashboard.audit_available(),
                "endpoints": [
                    f"GET {base}/overview",
                    f"GET {base}/throughput",
                    f"GET {base}/dead",
                    f"GET {base}/events/{{event_id}}",
                    f"GET {base}/blocked",
                    f"GET {base}/relays",
                    f"GET {base}/audit",
                    f"GET {base}/actions",
                    f"POST {base}/dead/requeue",
                    f"POST {base}/dead/discard",
                ],
            }
        )

    # -- actions --------------------------------------------------------------------------------

    async def act_form(self, request: Request) -> Response:
        """``POST /dead/{action}`` from a page: one row, the checked rows, or a selection."""
        action = _action(request)
        self.access.require_actions()
        operator = await self.access.operator(request)
        form = await read_form(request)
        self.access.check_action(request, operator, one(form, CSRF_FIELD) or "")
        ids, selection, expected = parse_form_action(form)
        result = await self.dashboard.act(
            action,
            actor=_actor(operator),
            client=_client(request),
            ids=ids,
            selection=selection,
            expected=expected,
        )
        target = _local_path(one(form, "next"), request.url_for("dead").path)
        separator = "&" if "?" in target else "?"
        notice = urlencode({"notice": action, "rows": result["rows"]})
        return RedirectResponse(f"{target}{separator}{notice}", status_code=303)

    async def act_json(self, request: Request) -> Response:
        """``POST /api/dead/{action}`` with ``{"ids": [...]}`` or ``{"selection", "expected"}``."""
        action = _action(request)
        self.access.require_actions()
        operator = await self.access.operator(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise UnsupportedMediaError("send the action as application/json")
        self.access.check_action(request, operator, None)
        ids, selection, expected = parse_json_action(await read_json(request))
        result = await self.dashboard.act(
            action,
            actor=_actor(operator),
            client=_client(request),
            ids=ids,
            selection=selection,
            expected=expected,
        )
        return JSONResponse(result)

    # -- signing in -----------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        """Token mode: a form asking for the token and a name; sets the session cookie."""
        if self.access.token is None:
            raise HTTPException(404, "this dashboard has no token sign-in")
        error = None
        target = _local_path(request.query_params.get("next"), request.url_for("overview").path)
        if request.method == "POST":
            self.access.check_origin(request)
            form = await read_form(request)
            target = _local_path(one(form, "next"), target)
            name = (one(form, "name") or "").strip()[:100]
            if not name:
                error = "Give your name: it is recorded with every action you take."
            elif not self.access.check_token(one(form, "token") or ""):
                error = "That is not the dashboard's token."
            else:
                response = RedirectResponse(target, status_code=303)
                self.access.start_session(
                    response, name, path=_cookie_path(request), secure=_https(request)
                )
                return response
        document = {"next": target, "error": error}
        status = 401 if error else 200
        return await self.render(request, "login.html", document, Operator(None, "open"), status)

    async def logout(self, request: Request) -> Response:
        self.access.check_origin(request)
        response = RedirectResponse(request.url_for("login").path, status_code=303)
        self.access.end_session(response, path=_cookie_path(request))
        return response

    # -- refusals -------------------------------------------------------------------------------

    async def refusal(self, request: Request, error: Exception) -> Response:
        """The error page (or JSON error) of a refused request; never a traceback."""
        status, code, message = _describe(error)
        if (
            isinstance(error, NotAuthenticatedError)
            and self.access.token
            and not _wants_json(request)
        ):
            login = request.url_for("login").path
            return RedirectResponse(
                f"{login}?{urlencode({'next': _here(request)})}", status_code=303
            )
        if _wants_json(request):
            body = {"error": {"status": status, "code": code, "message": message}}
            return JSONResponse(body, status_code=status)
        document = {"status": status, "code": code, "message": message}
        operator = Operator(None, "open")
        return await self.render(request, "error.html", document, operator, status)


_AUDIT_PARAMS = ("entity", "entity_id", "actor", "since", "until", *PAGE_PARAMS)


async def _overview(d: Dashboard, _r: Request, p: Params) -> Document:
    return await d.overview_document(p)


async def _throughput(d: Dashboard, _r: Request, p: Params) -> Document:
    return await d.throughput_document(p)


async def _dead(d: Dashboard, _r: Request, p: Params) -> Document:
    return await d.dead_document(p)


async def _event(d: Dashboard, r: Request, _p: Params) -> Document:
    return await d.event_document(r.path_params["event_id"])


async def _blocked(d: Dashboard, _r: Request, p: Params) -> Document:
    return await d.blocked_document(p)


async def _relays(d: Dashboard, _r: Request, p: Params) -> Document:
    return await d.relays_document(p)


async def _audit(d: Dashboard, _r: Request, p: Params) -> Document:
    return await d.audit_document(p)


async def _actions(d: Dashboard, _r: Request, p: Params) -> Document:
    return await d.actions_document(p)


def _describe(error: Exception) -> tuple[int, str, str]:
    if isinstance(error, DashboardRequestError):
        return error.status, error.code, str(error)
    if isinstance(error, DeliveryChangedError):
        return 409, "changed_meanwhile", str(error)
    if isinstance(error, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error.status_code, code, str(error.detail)
    logger.warning("dashboard: the database could not answer", exc_info=error)
    unavailable = UnavailableError(
        f"the database could not answer: {type(error).__name__}: {str(error).splitlines()[0]}"
    )
    return unavailable.status, unavailable.code, str(unavailable)


def _relative(request: Request) -> str:
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    return str(path[len(root) :] if root and path.startswith(root) else path)


def _wants_json(request: Request) -> bool:
    relative = _relative(request)
    return relative == "/api" or relative.startswith("/api/")


def _here(request: Request, drop: tuple[str, ...] = ()) -> str:
    """This request's path and query (without the parameters in ``drop``)."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k not in drop]
    return f"{request.url.path}?{urlencode(kept)}" if kept else request.url.path


def _cookie_path(request: Request) -> str:
    return str(request.scope.get("root_path") or "/")


def _https(request: Request) -> bool:
    return request.url.scheme == "https"


def _local_path(candidate: str | None, default: str) -> str:
    """``candidate`` if it is a path on this site (no scheme, no ``//host``), else ``default``."""
    if candidate and candidate.startswith("/") and not candidate.startswith(("//", "/\\")):
        return candidate
    return default


def _action(request: Request) -> str:
    action = str(request.path_params["action"])
    if action not in ACTIONS:
        raise HTTPException(404, f"no action {action!r} (expected requeue or discard)")
    return action


def _actor(operator: Operator) -> str:
    return operator.name or "anonymous"


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None
