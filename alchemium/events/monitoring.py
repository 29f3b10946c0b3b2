"""A relay's health check and its monitoring endpoint (Prometheus metrics, health as JSON).

- :func:`relay_health`: is this relay alive (its loop running and making progress,
  rounds not failing), its LISTEN connection up, its lag under a threshold?
- :func:`monitoring_app`: an ASGI app serving ``/metrics`` (Prometheus text) and
  ``/health`` (JSON; HTTP 200 healthy, 503 not) for one relay; mount it in your
  app (``app.mount("/relay", monitoring_app(relay))``).
- :func:`serve_monitoring`: the same app on its own port, with a minimal HTTP/1.1
  server of the standard library (``alchemium relay --metrics-port N``).
- :func:`probe_relay`: ask a relay's ``/health`` from another process
  (``alchemium relay --health``, a Kubernetes exec probe).

Thresholds of ``/health`` come from its query string (seconds): ``max_lag``,
``max_stall``, ``max_listen_down``; the lag is only checked when ``max_lag`` is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

from alchemium.events.metrics import CONTENT_TYPE, OutboxGauges, prometheus_text
from alchemium.events.publishers.base import destinations_of
from alchemium.events.relay import OutboxRelay

__all__ = [
    "ASGIApp",
    "RelayHealth",
    "monitoring_app",
    "probe_relay",
    "relay_health",
    "serve_monitoring",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_LISTEN_DOWN = 60.0

logger = logging.getLogger("alchemium.relay")


@dataclass(frozen=True, slots=True)
class RelayHealth:
    """The answer of a health check: ``healthy``, and one sentence per failed check.

    ``listening`` is None when the relay uses no LISTEN connection (SQLite,
    ``listen=False``). ``lag``: seconds per destination this relay serves, read
    from the database (only when a lag threshold was given). ``busy_for``: seconds
    since the round in progress last made progress (None when idle).
    """

    healthy: bool
    problems: tuple[str, ...]
    relay_id: str
    running: bool
    listening: bool | None
    busy_for: float | None
    lag: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the body of ``/health``)."""
        data = asdict(self)
        data["problems"] = list(self.problems)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RelayHealth:
        """Rebuild from :meth:`to_dict` (what :func:`probe_relay` receives)."""
        return cls(
            healthy=bool(data["healthy"]),
            problems=tuple(data.get("problems", ())),
            relay_id=str(data.get("relay_id", "")),
            running=bool(data.get("running")),
            listening=data.get("listening"),
            busy_for=data.get("busy_for"),
            lag=dict(data.get("lag") or {}),
        )


def default_max_stall(relay: OutboxRelay) -> float:
    """How long a round may go without progress: one publish timeout plus two leases."""
    return (relay.publish_timeout or 300.0) + 2 * relay.lease


async def relay_health(
    relay: OutboxRelay,
    gauges: OutboxGauges | None = None,
    *,
    max_lag: float | None = None,
    max_stall: float | None = None,
    max_listen_down: float = DEFAULT_MAX_LISTEN_DOWN,
) -> RelayHealth:
    """Check ``relay`` (running in this process); each failed check is one problem.

    - alive: :meth:`OutboxRelay.run` is running; a round in progress made progress
      (a claim, a publish, a record) within ``max_stall`` seconds (default
      :func:`default_max_stall`); rounds have not been failing (database errors)
      for longer than that.
    - LISTEN (PostgreSQL with ``listen=True``): the connection has not been down for
      more than ``max_listen_down`` seconds (the relay reconnects by itself; it
      polls meanwhile).
    - lag, if ``max_lag`` is given: no destination the relay serves has an
      undelivered event older than ``max_lag`` seconds. Read through ``gauges``
      (from the database, cached for ``gauges.max_age``); a failed read is a problem.
    """
    monitor = relay.monitor
    now = time.monotonic()
    stall = default_max_stall(relay) if max_stall is None else max_stall
    problems: list[str] = []
    if not monitor.running:
        problems.append("the relay is not running")
    busy_for = None if monitor.busy_since is None else now - monitor.last_progress
    if busy_for is not None and busy_for > stall:
        problems.append(f"a round has made no progress for {busy_for:.0f}s (max {stall:.0f}s)")
    if monitor.failing_since is not None and now - monitor.failing_since > stall:
        problems.append(
            f"rounds have been failing for {now - monitor.failing_since:.0f}s "
            f"(max {stall:.0f}s): {monitor.last_error}"
        )
    listening: bool | None = None
    if monitor.listen_expected:
        listening = monitor.listening
        down_for = now - monitor.listen_changed
        if not listening and down_for > max_listen_down:
            problems.append(
                f"the LISTEN connection has been down for {down_for:.0f}s "
                f"(max {max_listen_down:.0f}s); the relay is polling"
            )
    lag: dict[str, float | None] = {}
    if max_lag is not None:
        gauges = gauges or OutboxGauges(relay.session_factory, relay.outbox)
        try:
            snapshot = await gauges.read()
        except Exception as err:  # noqa: BLE001 - reported as a failed check, with its cause
            problems.append(f"cannot read the lag from the database: {type(err).__name__}: {err}")
        else:
            for destination in dict.fromkeys(
                d for p in relay.publishers for d in destinations_of(p)
            ):
                lag[destination] = age = snapshot.lag(destination)
                if age is not None and age > max_lag:
                    problems.append(
                        f"destination {destination!r}: lag {age:.0f}s (max {max_lag:.0f}s)"
                    )
    return RelayHealth(
        healthy=not problems,
        problems=tuple(problems),
        relay_id=relay.relay_id,
        running=monitor.running,
        listening=listening,
        busy_for=busy_for,
        lag=lag,
    )


def _thresholds(query: str) -> dict[str, float]:
    """``max_lag``, ``max_stall``, ``max_listen_down`` from a query string (seconds)."""
    found: dict[str, float] = {}
    for key, values in urllib.parse.parse_qs(query).items():
        if key in ("max_lag", "max_stall", "max_listen_down"):
            try:
                found[key] = float(values[-1])
            except ValueError as err:
                raise ValueError(f"{key} must be a number of seconds, got {values[-1]!r}") from err
    return found


def monitoring_app(relay: OutboxRelay, gauges: OutboxGauges | None = None) -> ASGIApp:
    """An ASGI app for ``relay``: ``GET /metrics`` and ``GET /health`` (relative to its mount).

    ``/metrics``: :func:`~alchemium.events.metrics.prometheus_text` of the relay's
    figures and the outbox gauges (read from the database through ``gauges``, by
    default cached for 5 seconds). ``/health``: :func:`relay_health` as JSON, status
    200 when healthy and 503 when not; thresholds in the query string (seconds).
    """
    shared = gauges or OutboxGauges(relay.session_factory, relay.outbox)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        if scope.get("method") not in ("GET", "HEAD"):
            await _respond(send, 405, "text/plain", b"only GET\n")
        elif path == "/metrics":
            note = ""
            try:
                snapshot = await shared.read()
            except Exception as err:  # the relay's own figures are still worth serving
                logger.warning("could not read the outbox gauges for /metrics", exc_info=True)
                snapshot = None
                note = f"# outbox gauges unavailable: {type(err).__name__}\n"
            text = note + prometheus_text(relay.monitor, snapshot)
            await _respond(send, 200, CONTENT_TYPE, text.encode())
        elif path == "/health":
            try:
                thresholds = _thresholds(scope.get("query_string", b"").decode("latin-1"))
            except ValueError as err:
                await _respond(send, 400, "text/plain", f"{err}\n".encode())
                return
            health = await relay_health(relay, shared, **thresholds)
            body = json.dumps(health.to_dict()).encode()
            await _respond(send, 200 if health.healthy else 503, "application/json", body)
        else:
            await _respond(send, 404, "text/plain", b"try /metrics or /health\n")

    return app


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


async def serve_monitoring(app: ASGIApp, host: str, port: int) -> asyncio.Server:
    """Serve ``app`` on ``host:port`` with a minimal HTTP/1.1 server; one request per connection.

    Enough for Prometheus scrapes and health probes (GET, no body, no keep-alive);
    use a real ASGI server to expose more. Close it with ``server.close()``.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _version = request_line.split(" ", 2)
            path, _, query = target.partition("?")
            response: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

            async def receive() -> Message:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    response["status"] = message["status"]
                    response["headers"] = message.get("headers", [])
                elif message["type"] == "http.response.body":
                    response["body"] += message.get("body", b"")

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": method,
                "scheme": "http",
                "path": urllib.parse.unquote(path),
                "raw_path": path.encode("latin-1"),
                "query_string": query.encode("latin-1"),
                "root_path": "",
                "headers": [],
                "client": writer.get_extra_info("peername"),
                "server": (host, port),
            }
            await app(scope, receive, send)
            status = int(response["status"])
            lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
            lines += [f"{k.decode()}: {v.decode()}" for k, v in response["headers"]]
            lines.append("connection: close")
            body = b"" if method == "HEAD" else response["body"]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, OSError):
            pass  # a client that went away or sent garbage: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def probe_relay(
    port: int,
    host: str = "127.0.0.1",
    *,
    max_lag: float | None = None,
    max_stall: float | None = None,
    max_listen_down: float | None = None,
    timeout: float = 5.0,
) -> RelayHealth:
    """Ask the relay serving ``/health`` on ``host:port`` (``--metrics-port``) how it is.

    Raises ConnectionError when nothing answers there within ``timeout`` seconds or
    the answer is not a health document.
    """
    params = {
        k: v
        for k, v in (
            ("max_lag", max_lag),
            ("max_stall", max_stall),
            ("max_listen_down", max_listen_down),
        )
        if v is not None
    }
    target = "/health" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"

    async def ask() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request.encode("latin-1"))
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()

    try:
        raw = await asyncio.wait_for(ask(), timeout)
    except (OSError, asyncio.TimeoutError) as err:
        reason = str(err) or f"no answer within {timeout:g}s"
        raise ConnectionError(f"no relay answered on {host}:{port}: {reason}") from err
    _head, _, body = raw.partition(b"\r\n\r\n")
    try:
        return RelayHealth.from_dict(json.loads(body))
    except (ValueError, KeyError, TypeError) as err:
        raise ConnectionError(
            f"{host}:{port} answered, but not with a relay's health: {raw[:200]!r}"
        ) from err
