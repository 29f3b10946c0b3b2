"""Publish events to Google Cloud Pub/Sub with ordering keys; needs ``alchemium[pubsub]``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from alchemium.domain_event import DomainEvent
from alchemium.events.publishers.base import (
    PermanentPublishError,
    PublisherConfigurationError,
    PublisherUnavailableError,
)
from alchemium.events.publishers.client import import_client
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope

__all__ = ["PubSubPublisher"]

logger = logging.getLogger("alchemium.relay")

# Errors retrying cannot fix: the message or the request is wrong as it stands.
_PERMANENT = ("InvalidArgument", "PermissionDenied", "NotFound")


class PubSubPublisher:
    """Publishes each event to a Pub/Sub topic; ``publish`` returns once Pub/Sub gave it an id.

    The ordering key is the partition key (the aggregate id by default), with message
    ordering enabled on the client: Pub/Sub delivers one key's messages in publish
    order to subscriptions that enable ordering. **After a failed publish the client
    pauses that ordering key** and fails every later publish on it until it is
    resumed; this publisher calls ``resume_publish(topic, key)`` whenever a publish
    fails, so the relay's retry (and the next event of the aggregate) goes through
    instead of failing until the process restarts.

    Args:
        project: the Google Cloud project id.
        topic: the topic id (the topic must exist: :meth:`start` checks it).
        envelope: CloudEvents binary mode (``ce-`` attributes) by default.
        emulator_host: ``host:port`` of the Pub/Sub emulator (else
            ``$PUBSUB_EMULATOR_HOST``, else Google Cloud with default credentials).
        timeout: seconds one publish may take; the client itself does not retry (the
            relay does, with its backoff).
        client_options: passed to ``pubsub_v1.PublisherClient``.
    """

    def __init__(
        self,
        project: str,
        topic: str,
        *,
        name: str = "pubsub",
        envelope: CloudEventsEnvelope | None = None,
        emulator_host: str | None = None,
        timeout: float = 30.0,
        **client_options: Any,
    ) -> None:
        self._pubsub = import_client(
            "google.cloud.pubsub_v1", "PubSubPublisher", "google-cloud-pubsub", "pubsub"
        )
        if not project or not topic or "/" in project or "/" in topic:
            raise PublisherConfigurationError(
                f"PubSubPublisher(project={project!r}, topic={topic!r}): give the project id "
                "and the topic id (not a path)"
            )
        self.project, self.topic = project, topic
        self.name = name
        self.envelope = envelope if envelope is not None else CloudEventsEnvelope()
        self.emulator_host = emulator_host
        self.timeout = timeout
        self.client_options = client_options
        self._client: Any = None

    @property
    def topic_path(self) -> str:
        """``projects/<project>/topics/<topic>``."""
        return f"projects/{self.project}/topics/{self.topic}"

    def _ready(self) -> Any:
        if self._client is None:
            pubsub = self._pubsub
            options = dict(self.client_options)
            if self.emulator_host is not None:
                # An insecure channel to the emulator, for this client only (the client's
                # own emulator support reads $PUBSUB_EMULATOR_HOST, process-wide).
                import grpc
                from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

                channel = grpc.insecure_channel(self.emulator_host)
                options["transport"] = PublisherGrpcTransport(channel=channel)
            self._client = pubsub.PublisherClient(
                publisher_options=pubsub.types.PublisherOptions(enable_message_ordering=True),
                **options,
            )
        return self._client

    async def start(self) -> None:
        """Check that the topic exists and that the credentials may see it."""
        client = self._ready()
        try:
            await asyncio.to_thread(
                client.get_topic,
                request={"topic": self.topic_path},
                retry=None,  # an unreachable emulator or endpoint fails now, not in minutes
                timeout=self.timeout,
            )
        except Exception as err:
            kind = type(err).__name__
            error = PublisherConfigurationError if kind == "NotFound" else PublisherUnavailableError
            raise error(
                f"PubSubPublisher({self.name!r}): cannot use topic {self.topic_path}: "
                f"{kind}: {err}".splitlines()[0]
            ) from err

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """Publish with ordering key = partition key; resume the key if the publish fails."""
        message = self.envelope.encode(event, "pubsub", destination)
        client = self._ready()
        key = message.partition_key
        try:
            # No client-side retries: with ordering on, the client would retry forever
            # (it lifts the deadline); the relay retries instead, with its backoff.
            future = client.publish(
                self.topic_path,
                message.body,
                ordering_key=key,
                retry=None,
                timeout=self.timeout,
                **message.headers,
            )
            await asyncio.wrap_future(future)
        except BaseException as err:
            self._resume(key)
            if type(err).__name__ in _PERMANENT:
                raise PermanentPublishError(
                    f"event {event.id} ({event.name}): Pub/Sub refused it for {self.topic_path}: "
                    f"{type(err).__name__}: {err}"
                ) from err
            raise

    def _resume(self, key: str) -> None:
        """Unpause ``key`` after a failure, or every later publish on it fails at once.

        A publish cancelled (the relay's timeout) before it failed has not paused the
        key yet; it pauses it when it fails, and the next publish on the key fails,
        resumes it here, and is retried.
        """
        try:
            self._ready().resume_publish(self.topic_path, key)
        except RuntimeError as err:  # "Ordering key is not paused": nothing to undo
            logger.debug("PubSubPublisher(%r): key %r: %s", self.name, key, err)

    async def close(self) -> None:
        """Stop the client's batching threads (sending what they hold first)."""
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.stop)

    def __repr__(self) -> str:
        return f"PubSubPublisher(topic={self.topic_path!r}, name={self.name!r})"
