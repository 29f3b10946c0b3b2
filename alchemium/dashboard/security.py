"""Who may use the dashboard and how its actions are protected: token, auth hook, CSRF, origin.

- **Read-only by default.** Actions (POST) answer 403 unless ``actions=True``, which
  needs a ``token`` or an ``auth`` hook. With either, *every* page needs it too.
- **Token.** Scripts send ``Authorization: Bearer TOKEN`` (and may name themselves in
  ``X-Alchemium-Actor``). A browser signs in once on ``/login`` with the token and a
  name; the dashboard then sets a session cookie signed with HMAC-SHA256 (``HttpOnly``,
  ``SameSite=Strict``). The name is self-declared: with a shared token, use ``auth``
  for identities you can trust.
- **Auth hook.** ``auth(request)`` returns the operator's name (recorded with every
  action) or None (401). Sync or async; it runs on every request.
- **CSRF.** HTML forms carry a token that is the HMAC of a random per-browser cookie
  (a signed double-submit cookie): a page of another site can neither read nor forge
  it. JSON actions must be ``application/json``, which a cross-site page cannot send
  without a CORS preflight (the dashboard grants none), and, when the request is
  signed in by the session cookie, carry the same token in ``X-CSRF-Token``.
- **Origin.** An action whose ``Origin`` (or, lacking it, ``Referer``) is another
  origin than the dashboard's own is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from alchemium.dashboard.errors import (
    ActionRefusedError,
    DashboardConfigurationError,
    NotAuthenticatedError,
)

__all__ = ["Access", "AuthHook", "Operator"]

AuthHook = Callable[[Request], "str | Awaitable[str | None] | None"]
"""Returns the name of the operator making ``request``, or None to refuse it (401)."""

SESSION_COOKIE = "alchemium_dashboard_session"
CSRF_COOKIE = "alchemium_dashboard_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
ACTOR_HEADER = "x-alchemium-actor"


@dataclass(frozen=True, slots=True)
class Operator:
    """Who makes a request: ``name`` (None when the dashboard is open) and how they signed in.

    ``via`` is ``"open"``, ``"auth"``, ``"bearer"`` or ``"session"``.
    """

    name: str | None
    via: str


class Access:
    """The dashboard's access rules (see the module docstring)."""

    def __init__(
        self,
        *,
        actions: bool,
        token: str | None,
        auth: AuthHook | None,
        secret: str | bytes | None,
    ) -> None:
        if token is not None and auth is not None:
            raise DashboardConfigurationError(
                "give either token= or auth=, not both: one way of signing in"
            )
        if token is not None and len(token) < 16:
            raise DashboardConfigurationError(
                "token= must be at least 16 characters (e.g. secrets.token_urlsafe())"
            )
        if actions and token is None and auth is None:
            raise DashboardConfigurationError(
                "actions=True needs token= or auth=: a dashboard that can requeue and "
                "discard deliveries must know who does it"
            )
        self.actions = actions
        self.token = token
        self.auth = auth
        raw = secret if secret is not None else secrets.token_bytes(32)
        self._secret = raw.encode() if isinstance(raw, str) else raw

    @property
    def signs_in(self) -> bool:
        """Whether requests need a token or the auth hook's consent."""
        return self.token is not None or self.auth is not None

    # -- who is asking ------------------------------------------------------------------------

    async def operator(self, request: Request) -> Operator:
        """The operator of ``request``; NotAuthenticatedError if it must sign in and did not."""
        if self.auth is not None:
            name = self.auth(request)
            if inspect.isawaitable(name):
                name = await name
            if not name:
                raise NotAuthenticatedError("not signed in: the auth hook refused this request")
            return Operator(str(name), "auth")
        if self.token is None:
            return Operator(None, "open")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given:
            if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                raise NotAuthenticatedError("the bearer token is not the dashboard's token")
            return Operator(request.headers.get(ACTOR_HEADER) or "api-token", "bearer")
        name = self._session_name(request.cookies.get(SESSION_COOKIE))
        if name is None:
            raise NotAuthenticatedError(
                "not signed in: send Authorization: Bearer <token>, or sign in on /login"
            )
        return Operator(name, "session")

    def check_token(self, given: str) -> bool:
        """Whether ``given`` is the dashboard's token (constant time)."""
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def start_session(self, response: Response, name: str, *, path: str, secure: bool) -> None:
        """Sign the browser in as ``name`` (a signed, HttpOnly, SameSite=Strict cookie)."""
        body = base64.urlsafe_b64encode(json.dumps({"name": name}).encode()).decode()
        value = f"{body}.{self._sign('session', body)}"
        response.set_cookie(
            SESSION_COOKIE, value, httponly=True, samesite="strict", path=path, secure=secure
        )

    def end_session(self, response: Response, *, path: str) -> None:
        response.delete_cookie(SESSION_COOKIE, path=path)

    def _session_name(self, cookie: str | None) -> str | None:
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign("session", body)):
            return None
        try:
            name = json.loads(base64.urlsafe_b64decode(body.encode()))["name"]
        except (ValueError, KeyError, TypeError):
            return None
        return str(name) if name else None

    # -- CSRF and origin ------------------------------------------------------------------------

    def csrf_nonce(self, request: Request) -> tuple[str, bool]:
        """This browser's CSRF cookie value, and whether it is new (to be set)."""
        nonce = request.cookies.get(CSRF_COOKIE)
        if nonce and 16 <= len(nonce) <= 128:
            return nonce, False
        return secrets.token_urlsafe(24), True

    def csrf_token(self, nonce: str) -> str:
        """The form token for the CSRF cookie ``nonce``."""
        return self._sign("csrf", nonce)

    def set_csrf_cookie(self, response: Response, nonce: str, *, path: str, secure: bool) -> None:
        response.set_cookie(
            CSRF_COOKIE, nonce, httponly=True, samesite="strict", path=path, secure=secure
        )

    def check_action(self, request: Request, operator: Operator, form_token: str | None) -> None:
        """Refuse an action that is disabled, cross-origin, or without a valid CSRF token.

        ``form_token`` is the token of an HTML form; JSON requests pass None (their
        content type is checked by the caller) and need ``X-CSRF-Token`` only when
        signed in by the session cookie.
        """
        self.require_actions()
        self._check_origin(request)
        if form_token is None and operator.via != "session":
            return
        token = form_token if form_token is not None else request.headers.get(CSRF_HEADER)
        nonce = request.cookies.get(CSRF_COOKIE)
        if not token or not nonce or not hmac.compare_digest(token, self.csrf_token(nonce)):
            raise ActionRefusedError("missing or wrong CSRF token: reload the page and try again")

    def require_actions(self) -> None:
        """Refuse any action when the dashboard is read-only (before reading the request)."""
        if not self.actions:
            raise ActionRefusedError(
                "actions are disabled: this dashboard is read-only "
                "(start it with actions=True and a token or an auth hook)"
            )

    def check_origin(self, request: Request) -> None:
        """Refuse a POST whose Origin (or Referer) is not the dashboard's own origin."""
        self._check_origin(request)

    def _check_origin(self, request: Request) -> None:
        own = f"{request.url.scheme}://{request.url.netloc}".lower()
        origin = request.headers.get("origin")
        if origin is None:
            referer = request.headers.get("referer")
            if referer is None:
                return
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        if origin.lower() != own:
            raise ActionRefusedError(
                f"cross-origin request refused: origin {origin!r} is not this dashboard's {own!r}"
            )

    def _sign(self, purpose: str, value: str) -> str:
        digest = hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
