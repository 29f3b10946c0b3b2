"""Publishers from URLs: what ``alchemium relay --publisher URL`` accepts.

=====================================================  =========================================
URL                                                    publisher
=====================================================  =========================================
``redis://host:6379/0`` (``rediss://``, ``unix://``)   :class:`RedisStreamPublisher`
``amqp://user:pass@host/vhost`` (``amqps://``)         :class:`RabbitMQPublisher`
``nats://host:4222[,host2:4222]``                      :class:`NatsPublisher`
``kafka://host:9092[,host2:9092]``                     :class:`KafkaPublisher`
``pubsub://PROJECT/TOPIC``                             :class:`PubSubPublisher`
``sqs://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE``       :class:`SqsPublisher` (``sqs+http://`` for
                                                       a local endpoint such as moto)
``sns://arn:aws:sns:REGION:ACCOUNT:TOPIC``             :class:`SnsPublisher`
``https://partner.example.com/hooks`` (``http://``)    :class:`WebhookPublisher`; the secret(s)
                                                       from ``$ALCHEMIUM_WEBHOOK_SECRET``
                                                       (space-separated)
=====================================================  =========================================

Options are query parameters: ``name`` (the destination drained; ``--destination``
sets it too), ``stream``/``subject`` (NATS), ``topic`` (Kafka, NATS
has ``subject``), ``emulator_host`` (Pub/Sub), ``region``/``endpoint_url`` (SQS/SNS),
``dead_on_4xx=false`` (webhooks), ``timeout`` (seconds) for all, and for the
CloudEvents envelope ``mode`` (``binary``/``structured``) and ``source``. An unknown
scheme, an unknown parameter or a missing secret raise
:class:`PublisherConfigurationError` naming what is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from alchemium.events.publishers.base import Publisher, PublisherConfigurationError
from alchemium.events.publishers.cloudevents import CloudEventsEnvelope

__all__ = ["SCHEMES", "WEBHOOK_SECRET_VARIABLE", "publisher_from_url"]

WEBHOOK_SECRET_VARIABLE = "ALCHEMIUM_WEBHOOK_SECRET"
_ENVELOPE = ("mode", "source")


def _split(spec: str) -> tuple[str, str, dict[str, str]]:
    """``(scheme, the URL without its query, the query as a dict)``."""
    parts = urlsplit(spec)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return parts.scheme, urlunsplit(parts._replace(query="")), query


def _options(spec: str, query: dict[str, str], allowed: tuple[str, ...]) -> dict[str, Any]:
    accepted = {*allowed, *_ENVELOPE, "timeout", "name"}
    unknown = set(query) - accepted
    if unknown:
        raise PublisherConfigurationError(
            f"publisher {spec!r}: unknown option(s) {', '.join(sorted(unknown))} "
            f"(accepted: {', '.join(sorted(accepted))})"
        )
    options: dict[str, Any] = {k: v for k, v in query.items() if k in allowed or k == "name"}
    if "timeout" in query:
        try:
            options["timeout"] = float(query["timeout"])
        except ValueError as err:
            raise PublisherConfigurationError(
                f"publisher {spec!r}: timeout must be a number of seconds"
            ) from err
    envelope: dict[str, Any] = {k: query[k] for k in _ENVELOPE if k in query}
    if envelope:
        options["envelope"] = CloudEventsEnvelope(**envelope)
    return options


def _redis(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.redis import RedisStreamPublisher

    return RedisStreamPublisher(spec, name=query.get("name", "redis"))


def _amqp(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.rabbitmq import RabbitMQPublisher

    return RabbitMQPublisher(spec, name=query.get("name", "rabbitmq"))


def _nats(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.nats import NatsPublisher

    return NatsPublisher(url, **_options(spec, query, ("subject", "stream")))


def _kafka(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.kafka import KafkaPublisher

    servers = urlsplit(url).netloc
    if not servers:
        raise PublisherConfigurationError(f"publisher {spec!r}: kafka://host:port[,host:port]")
    return KafkaPublisher(servers, **_options(spec, query, ("topic",)))


def _pubsub(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.pubsub import PubSubPublisher

    parts = urlsplit(url)
    topic = parts.path.strip("/")
    return PubSubPublisher(parts.netloc, topic, **_options(spec, query, ("emulator_host",)))


def _sqs(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.aws import SqsPublisher

    scheme = "http" if spec.startswith("sqs+http://") else "https"
    parts = urlsplit(url)
    queue_url = urlunsplit(parts._replace(scheme=scheme))
    options = _options(spec, query, ("region", "endpoint_url"))
    options.setdefault("endpoint_url", f"{scheme}://{parts.netloc}")
    if "region" not in options and ".amazonaws.com" in parts.netloc:
        options["region"] = parts.netloc.split(".")[1]
    return SqsPublisher(queue_url, **options)


def _sns(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.aws import SnsPublisher

    return SnsPublisher(
        url.removeprefix("sns://"), **_options(spec, query, ("region", "endpoint_url"))
    )


def _webhook(spec: str, url: str, query: dict[str, str], env: Mapping[str, str]) -> Publisher:
    from alchemium.events.publishers.webhook import WebhookPublisher

    secrets = env.get(WEBHOOK_SECRET_VARIABLE, "").split()
    if not secrets:
        raise PublisherConfigurationError(
            f"webhook publisher {url!r} needs its signing secret in ${WEBHOOK_SECRET_VARIABLE} "
            "('whsec_...', several separated by spaces)"
        )
    options = _options(spec, query, ("dead_on_4xx",))
    if "dead_on_4xx" in options:
        options["dead_on_4xx"] = options["dead_on_4xx"].lower() not in ("0", "false", "no")
    return WebhookPublisher(url, secrets, **options)


_Factory = Callable[[str, str, dict[str, str], Mapping[str, str]], Publisher]
SCHEMES: dict[str, _Factory] = {
    "redis": _redis,
    "rediss": _redis,
    "unix": _redis,
    "amqp": _amqp,
    "amqps": _amqp,
    "nats": _nats,
    "kafka": _kafka,
    "pubsub": _pubsub,
    "sqs": _sqs,
    "sqs+http": _sqs,
    "sns": _sns,
    "https": _webhook,
    "http": _webhook,
}


def publisher_from_url(
    spec: str, *, name: str | None = None, environ: Mapping[str, str] | None = None
) -> Publisher:
    """The publisher a URL names (table above); ``name`` sets its destination name.

    Raises :class:`PublisherConfigurationError` for an unknown scheme or option, a
    missing secret, or a missing extra, before anything connects.
    """
    import os

    if spec.startswith("sns://"):  # an ARN is no URL: its colons are not a port
        address, _, raw_query = spec.partition("?")
        scheme, url, query = "sns", address, dict(parse_qsl(raw_query, keep_blank_values=True))
    else:
        scheme, url, query = _split(spec)
    if name is not None:
        query["name"] = name
    factory = SCHEMES.get(scheme)
    if factory is None:
        raise PublisherConfigurationError(
            f"unknown publisher {spec!r} (use inprocess or a URL: "
            f"{', '.join(s + '://' for s in SCHEMES)})"
        )
    return factory(spec, url, query, os.environ if environ is None else environ)
