"""Publish events to Amazon SQS queues and SNS topics (FIFO too); needs ``alchemium[aws]``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from alchemium.domain_event import DomainEvent
from alchemium.events.publishers.base import (
    PermanentPublishError,
    PublisherConfigurationError,
    PublisherUnavailableError,
)
from alchemium.events.publishers.client import import_client
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope, EncodedEvent

__all__ = ["SnsPublisher", "SqsPublisher"]

# Both services allow 10 message attributes at most.
_MAX_ATTRIBUTES = 10
# Error codes retrying cannot fix: the message itself is refused.
_PERMANENT = frozenset(
    {"InvalidParameterValue", "InvalidMessageContents", "InvalidParameter", "InvalidAttributeName"}
)
_MISSING = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NotFound"})


class _AwsPublisher:
    """An aiobotocore client for one service, opened at start, and the common message parts."""

    service = ""
    name: str

    def __init__(
        self,
        *,
        name: str,
        envelope: CloudEventsEnvelope | None,
        region: str | None,
        endpoint_url: str | None,
        timeout: float,
        client_options: dict[str, Any],
    ) -> None:
        self._session_module = import_client(
            "aiobotocore.session", type(self).__name__, "aiobotocore", "aws"
        )
        self.name = name
        # Structured by default: binary mode's attributes outgrow the limit of 10.
        self.envelope = envelope if envelope is not None else CloudEventsEnvelope(mode="structured")
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.client_options = client_options
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> Any:
        async with self._lock:
            if self._client is None:
                from botocore.config import Config

                stack = contextlib.AsyncExitStack()
                session = self._session_module.get_session()
                self._client = await stack.enter_async_context(
                    session.create_client(
                        self.service,
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=Config(
                            connect_timeout=self.timeout,
                            read_timeout=self.timeout,
                            retries={"max_attempts": 2, "mode": "standard"},
                        ),
                        **self.client_options,
                    )
                )
                self._stack = stack
            return self._client

    async def _check(self, call: str, target: str, **params: Any) -> None:
        client = await self._ready()
        try:
            await getattr(client, call)(**params)
        except Exception as err:
            code = _error_code(err)
            error = PublisherConfigurationError if code in _MISSING else PublisherUnavailableError
            raise error(
                f"{type(self).__name__}({self.name!r}): cannot use {target}: "
                f"{type(err).__name__}: {err}"
            ) from err

    def _attributes(self, event: DomainEvent, message: EncodedEvent) -> dict[str, Any]:
        if len(message.headers) > _MAX_ATTRIBUTES:
            raise PermanentPublishError(
                f"event {event.id} ({event.name}): {len(message.headers)} message attributes, "
                f"{self.service.upper()} allows {_MAX_ATTRIBUTES}: use the structured mode"
            )
        return {k: {"DataType": "String", "StringValue": v} for k, v in message.headers.items()}

    async def _send(self, event: DomainEvent, call: str, **params: Any) -> None:
        client = await self._ready()
        try:
            await getattr(client, call)(**params)
        except Exception as err:
            if _error_code(err) in _PERMANENT:
                raise PermanentPublishError(
                    f"event {event.id} ({event.name}): {self.service.upper()} refused it: "
                    f"{type(err).__name__}: {err}"
                ) from err
            raise

    async def close(self) -> None:
        """Close the client, if open."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class SqsPublisher(_AwsPublisher):
    """Sends each event to an SQS queue; ``publish`` returns once SQS stored it (its MessageId).

    For a FIFO queue (its URL ends in ``.fifo``), ``MessageGroupId`` is the partition
    key (the aggregate id by default: one aggregate's events stay in order) and
    ``MessageDeduplicationId`` is the event id, so a redelivery within SQS's 5-minute
    deduplication interval is accepted and dropped. A standard queue gets neither
    (it neither orders nor deduplicates: consumers deduplicate on the event id).

    Args:
        queue_url: the queue's URL.
        envelope: CloudEvents structured mode by default (binary mode's message
            attributes exceed SQS's 10 for most events).
        region: the AWS region (else the usual AWS configuration chain).
        endpoint_url: where SQS is, for moto, LocalStack or a VPC endpoint;
            credentials come from the usual AWS chain.
    """

    service = "sqs"

    def __init__(
        self,
        queue_url: str,
        *,
        name: str = "sqs",
        envelope: CloudEventsEnvelope | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = 10.0,
        **client_options: Any,
    ) -> None:
        if not queue_url.startswith(("https://", "http://")):
            raise PublisherConfigurationError(
                f"SqsPublisher: {queue_url!r} is not a queue URL (https://sqs.<region>."
                "amazonaws.com/<account>/<queue>)"
            )
        super().__init__(
            name=name,
            envelope=envelope,
            region=region,
            endpoint_url=endpoint_url,
            timeout=timeout,
            client_options=client_options,
        )
        self.queue_url = queue_url
        self.fifo = queue_url.endswith(".fifo")

    async def start(self) -> None:
        """Check the credentials and that the queue exists."""
        await self._check(
            "get_queue_attributes",
            f"queue {self.queue_url}",
            QueueUrl=self.queue_url,
            AttributeNames=["QueueArn"],
        )

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """``SendMessage`` (with group and deduplication ids on FIFO); raises if not stored."""
        message = self.envelope.encode(event, "sqs", destination)
        params: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MessageBody": message.body.decode(),
            "MessageAttributes": self._attributes(event, message),
        }
        if self.fifo:
            params["MessageGroupId"] = message.partition_key
            params["MessageDeduplicationId"] = str(event.id)
        await self._send(event, "send_message", **params)

    def __repr__(self) -> str:
        return f"SqsPublisher(queue_url={self.queue_url!r}, name={self.name!r})"


class SnsPublisher(_AwsPublisher):
    """Publishes each event to an SNS topic; ``publish`` returns once SNS accepted it.

    For a FIFO topic (its ARN ends in ``.fifo``), ``MessageGroupId`` is the partition
    key and ``MessageDeduplicationId`` the event id, as for SQS FIFO queues.
    """

    service = "sns"

    def __init__(
        self,
        topic_arn: str,
        *,
        name: str = "sns",
        envelope: CloudEventsEnvelope | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = 10.0,
        **client_options: Any,
    ) -> None:
        parts = topic_arn.split(":")
        if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sns":
            raise PublisherConfigurationError(
                f"SnsPublisher: {topic_arn!r} is not a topic ARN "
                "(arn:aws:sns:<region>:<account>:<topic>)"
            )
        super().__init__(
            name=name,
            envelope=envelope,
            region=region or parts[3],
            endpoint_url=endpoint_url,
            timeout=timeout,
            client_options=client_options,
        )
        self.topic_arn = topic_arn
        self.fifo = topic_arn.endswith(".fifo")

    async def start(self) -> None:
        """Check the credentials and that the topic exists."""
        await self._check(
            "get_topic_attributes", f"topic {self.topic_arn}", TopicArn=self.topic_arn
        )

    async def publish(self, event: DomainEvent, destination: str) -> None:
        """``Publish`` (with group and deduplication ids on FIFO); raises if not accepted."""
        message = self.envelope.encode(event, "sqs", destination)
        params: dict[str, Any] = {
            "TopicArn": self.topic_arn,
            "Message": message.body.decode(),
            "MessageAttributes": self._attributes(event, message),
        }
        if self.fifo:
            params["MessageGroupId"] = message.partition_key
            params["MessageDeduplicationId"] = str(event.id)
        await self._send(event, "publish", **params)

    def __repr__(self) -> str:
        return f"SnsPublisher(topic_arn={self.topic_arn!r}, name={self.name!r})"
