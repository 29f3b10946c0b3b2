"""POST events to an HTTP endpoint, signed (Standard Webhooks); needs ``alchemium[webhook]``.

What the receiver's answer means:

=========================  ==============================================================
answer                     outcome
=========================  ==============================================================
2xx                        delivered
429 (or 503) + Retry-After retried after the delay the receiver asked for (``RetryLater``)
408, 5xx, other, timeout,  retried with the relay's backoff
connection refused
other 4xx                  dead at once (``PermanentPublishError``); ``dead_on_4xx=False``
                           retries them instead
=========================  ==============================================================
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from alchemium.domain_event import DomainEvent
from alchemium.errors import OutboxError
from alchemium.events.publishers.base import (
    PermanentPublishError,
    PublisherConfigurationError,
    RetryLater,
)
from alchemium.events.publishers.client import import_client
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope

__all__ = ["WebhookPublisher", "WebhookRefused", "sign", "verify"]

_SECRET_PREFIX = "whsec_"


class WebhookRefused(OutboxError):
    """A webhook receiver answered with a status that is retried (408, 429, 5xx, ...)."""


_RETRY_AFTER_STATUSES = frozenset({429, 503})


def _key(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        return secret
    if secret.startswith(_SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(_SECRET_PREFIX) :], validate=True)
        except ValueError as err:
            raise PublisherConfigurationError(
                "a webhook secret 'whsec_...' must be base64 after its prefix"
            ) from err
    raise PublisherConfigurationError(
        "a webhook secret is 'whsec_' followed by base64 (Standard Webhooks), or raw bytes"
    )


def sign(secret: str | bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str | bytes,
    headers: Any,
    body: bytes,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether ``headers`` carry a valid signature of ``body`` made with ``secret``.

    What a receiver checks: one of the space-separated ``webhook-signature`` entries
    matches (compared in constant time), and ``webhook-timestamp`` is within
    ``tolerance`` seconds of ``now`` (replays of old messages are refused).
    """
    try:
        message_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, message_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in signatures)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


class WebhookPublisher:
    """POSTs each event to ``url``, signed; ``publish`` returns once the receiver answered 2xx.

    Headers (Standard Webhooks): ``webhook-id`` (the event id: the receiver's
    idempotency key, the same on every retry), ``webhook-timestamp`` (Unix seconds
    when sent) and ``webhook-signature`` (``v1,<base64>``: HMAC-SHA256 of
    ``id.timestamp.body`` with each of ``secrets``, space-separated, so a receiver
    can rotate keys). The body is the CloudEvents structured document by default
    (``application/cloudevents+json``: everything the receiver needs is signed);
    binary mode adds ``ce-*`` headers, which the signature does not cover.

    Args:
        url: the receiver's ``https://`` (or ``http://``) URL.
        secrets: one secret (``whsec_`` + base64, or bytes) or several, the first is
            current; at least one is required.
        dead_on_4xx: a 4xx other than 408 and 429 makes the delivery dead at once
            (default); False retries it like any failure.
        timeout: seconds for connecting and for the answer; a timeout is retried.
        headers: extra headers sent with every request (an API key, a tenant).
    """

    def __init__(
        self,
        url: str,
        secrets: str | bytes | Sequence[str | bytes],
        *,
        name: str = "webhook",
        envelope: CloudEventsEnvelope | None = None,
        dead_on_4xx: bool = True,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._httpx = import_client("httpx", "WebhookPublisher", "httpx", "webhook")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PublisherConfigurationError(
                f"WebhookPublisher: {url!r} is not an http:// or https:// URL"
            )
        listed = [secrets] if isinstance(secrets, (str, bytes)) else list(secrets)
        if not listed:
            raise PublisherConfigurationError("WebhookPublisher: at least one secret is needed")
        for secret in listed:
            _key(secret)  # a malformed secret fails now
        self.url = url
        self.secrets = listed
        self.name = name
        self.envelope = envelope if envelope is not None else CloudEventsEnvelope(mode="structured")
        self.dead_on_4xx = dead_on_4xx
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._client: Any = None

    def _ready(self) -> Any:
        if self._client is None:
            self._client = self._httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        return self._client

    async def start(self) -> None:
        """Nothing to connect to in advance; the URL and secrets were checked when created."""
        self._ready()

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """POST the signed event; returns on 2xx, raises otherwise (see the module's table)."""
        message = self.envelope.encode(event, "http", destination)
        message_id, timestamp = str(event.id), int(time.time())
        signature = " ".join(sign(s, message_id, timestamp, message.body) for s in self.secrets)
        headers = {
            **self.headers,
            **message.headers,
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        response = await self._ready().post(self.url, content=message.body, headers=headers)
        status = response.status_code
        if 200 <= status < 300:
            return
        what = f"event {event.id} ({event.name}): {self.url} answered {status}"
        delay = _retry_after(response.headers.get("retry-after"))
        if status in _RETRY_AFTER_STATUSES and delay is not None:
            raise RetryLater(f"{what}, Retry-After {delay:.0f}s", delay)
        if 400 <= status < 500 and status not in (408, 429) and self.dead_on_4xx:
            raise PermanentPublishError(f"{what}: the receiver refuses it; not retried")
        raise WebhookRefused(what)

    async def close(self) -> None:
        """Close the HTTP client, if open."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return f"WebhookPublisher(url={self.url!r}, name={self.name!r})"
