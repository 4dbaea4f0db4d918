"""The provisioned brokers are real and controllable, proven with the raw client libraries.

Per broker: it starts; one message round-trips (aio-pika with publisher confirms,
confluent-kafka in a consumer group, nats-py through JetStream); a confirmed
message survives a restart at the same address and another round trip works;
while paused no round trip completes and after unpausing one does; once stopped
its port refuses connections and after starting it serves again.

Every wait is bounded by a declared timing below or the spec's ``ready_timeout``.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import docker
import docker.errors
import pytest

from unibus_contract.broker_fixtures import new_topic_name
from unibus_contract.provision import (
    KAFKA,
    NATS,
    RABBITMQ,
    SPECS,
    Broker,
    BrokerSpec,
    Layout,
    NetworkMode,
    image_unavailable_reason,
    network_mode,
)

#: A healthy single-node broker round-trips one message well within this.
ROUND_TRIP_SECONDS = 15.0
#: How long a round trip is given to (not) complete against a paused broker.
PAUSED_ATTEMPT_SECONDS = 2.0


# --- Specs, without Docker ------------------------------------------------------------


def _layout(spec: BrokerSpec, mode: NetworkMode) -> Layout:
    ports = {name: 40000 + index for index, name in enumerate(spec.port_names)}
    return Layout(mode=mode, ports=ports, instance="abc123")


@pytest.mark.parametrize("mode", list(NetworkMode))
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_spec_gives_a_loopback_url_on_its_client_port(name: str, mode: NetworkMode) -> None:
    spec = SPECS[name]
    layout = _layout(spec, mode)
    parts = urlsplit(spec.url(layout))
    assert parts.hostname == "127.0.0.1"
    assert parts.port == layout.ports[spec.port_names[0]]
    assert spec.published[0] == spec.port_names[0]


@pytest.mark.parametrize("mode", list(NetworkMode))
def test_kafka_advertises_the_address_clients_dial(mode: NetworkMode) -> None:
    layout = _layout(KAFKA, mode)
    env = KAFKA.configure(layout).env
    client = layout.ports["kafka"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://127.0.0.1:{client}"
    assert f"PLAINTEXT://{layout.bind}:{client}" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"


def test_kafka_cluster_ids_never_look_like_options() -> None:
    layout = _layout(KAFKA, NetworkMode.HOST)
    ids = {KAFKA.configure(layout).env["CLUSTER_ID"] for _ in range(500)}
    assert len(ids) == 500
    assert all(len(cluster_id) == 22 and not cluster_id.startswith("-") for cluster_id in ids)


def test_host_network_binds_loopback_only() -> None:
    for spec in SPECS.values():
        layout = _layout(spec, NetworkMode.HOST)
        config = spec.configure(layout)
        rendered = " ".join([*config.env.values(), *(config.command or ())])
        rendered += b"".join(config.files.values()).decode()
        assert "0.0.0.0" not in rendered, spec.name


def test_rabbitmq_gets_unique_node_name_and_moved_erlang_ports() -> None:
    layout = _layout(RABBITMQ, NetworkMode.HOST)
    config = RABBITMQ.configure(layout)
    assert config.env["RABBITMQ_NODENAME"] == "rabbit-abc123@localhost"
    assert config.env["RABBITMQ_DIST_PORT"] == str(layout.ports["dist"])
    assert config.env["ERL_EPMD_PORT"] == str(layout.ports["epmd"])
    conf = config.files["/etc/rabbitmq/conf.d/90-unibus.conf"].decode()
    assert "loopback_users = none" in conf
    assert f"listeners.tcp.default = 127.0.0.1:{layout.ports['amqp']}" in conf


@pytest.mark.parametrize(
    ("setting", "has_bridge", "expected"),
    [
        ("host", True, NetworkMode.HOST),
        ("ports", False, NetworkMode.PORTS),
        ("", True, NetworkMode.PORTS),
        ("auto", False, NetworkMode.HOST),
    ],
)
def test_network_mode_follows_the_setting_then_the_engine(
    setting: str, has_bridge: bool, expected: NetworkMode
) -> None:
    assert network_mode(setting, has_bridge=has_bridge) is expected


def test_unknown_network_mode_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="UNIBUS_CONTAINER_NETWORK='bridged'"):
        network_mode("bridged")


def test_image_override_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIBUS_IMAGE_NATS", raising=False)
    assert NATS.image == "nats:2"
    monkeypatch.setenv("UNIBUS_IMAGE_NATS", "unibus-local/nats:2.15.1")
    assert NATS.image == "unibus-local/nats:2.15.1"


class _Images:
    """The ``images`` API of a Docker engine that has ``local`` and can pull ``pullable``."""

    def __init__(self, local: set[str], pullable: set[str]) -> None:
        self.local = local
        self.pullable = pullable
        self.pulled: list[str] = []

    def get(self, image: str) -> object:
        if image not in self.local:
            raise docker.errors.ImageNotFound(f"No such image: {image}")
        return object()

    def pull(self, image: str) -> object:
        self.pulled.append(image)
        if image not in self.pullable:
            raise docker.errors.APIError("500 Server Error",
                                         explanation="registry-1.docker.io: no such host")
        self.local.add(image)
        return object()


class _Engine:
    def __init__(self, images: _Images) -> None:
        self.images = images
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> _Engine:
    """A stand-in Docker engine with the local image ``here:1`` that can pull ``remote:1``."""
    fake = _Engine(_Images(local={"here:1"}, pullable={"remote:1"}))
    monkeypatch.setattr(docker, "from_env", lambda: fake)
    return fake


def test_an_image_neither_local_nor_pullable_is_one_reason_with_the_way_out(
    engine: _Engine,
) -> None:
    reason = image_unavailable_reason("nowhere:1")
    assert reason is not None
    assert "nowhere:1" in reason
    assert "no such host" in reason
    assert "python -m unibus_contract.images" in reason
    assert "UNIBUS_IMAGE_*" in reason
    assert engine.closed


@pytest.mark.parametrize(("image", "pulls"), [("here:1", []), ("remote:1", ["remote:1"])])
def test_a_local_or_pullable_image_is_available(
    engine: _Engine, image: str, pulls: list[str]
) -> None:
    assert image_unavailable_reason(image) is None
    assert engine.images.pulled == pulls
    assert engine.closed


# --- Real brokers -----------------------------------------------------------------------


def _test_timeout(spec: BrokerSpec) -> float:
    """Three waits for readiness, one graceful stop and a handful of round trips."""
    return 3 * spec.ready_timeout + spec.stop_timeout + 8 * ROUND_TRIP_SECONDS


def _port_refuses(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    assert parts.port is not None
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _answers_within(url: str, greeting: bytes, seconds: float) -> bool:
    """Whether the server at ``url`` sends its first protocol bytes within ``seconds``.

    A paused (frozen) server still gets TCP connections accepted by the kernel,
    but never answers: a raw socket shows that without leaving a client library's
    half-open connection behind.
    """
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=seconds) as sock:
        sock.settimeout(seconds)
        if greeting:
            sock.sendall(greeting)
        try:
            return sock.recv(1) != b""
        except TimeoutError:
            return False


@pytest.fixture
def restore() -> Iterator[list[Broker]]:
    """Brokers appended here are brought back to running after the test."""
    touched: list[Broker] = []
    yield touched
    for broker in touched:
        broker.ensure_running()


def _assert_started(broker: Broker, spec: BrokerSpec) -> None:
    assert broker.spec is spec
    assert broker.status == "running"
    assert broker.ready_seconds is not None
    assert 0 < broker.ready_seconds <= spec.ready_timeout
    assert urlsplit(broker.url).hostname == "127.0.0.1"


# --- RabbitMQ (aio-pika) -------------------------------------------------------------


async def _amqp_publish(url: str, queue_name: str, body: bytes) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=ROUND_TRIP_SECONDS)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
        )


async def _amqp_receive(url: str, queue_name: str) -> bytes:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=ROUND_TRIP_SECONDS)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                return message.body
    raise AssertionError("queue iterator ended without a message")


async def _amqp_round_trip(url: str) -> None:
    queue_name, body = new_topic_name("rt"), uuid.uuid4().bytes
    await _amqp_publish(url, queue_name, body)
    received = await asyncio.wait_for(_amqp_receive(url, queue_name), ROUND_TRIP_SECONDS)
    assert received == body


#: The AMQP 0-9-1 protocol header; the server answers it with Connection.Start.
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


@pytest.mark.broker
@pytest.mark.timeout(_test_timeout(RABBITMQ))
async def test_rabbitmq_round_trips_and_survives_restart_pause_and_stop(
    rabbitmq_broker: Broker, restore: list[Broker]
) -> None:
    broker = rabbitmq_broker
    restore.append(broker)
    _assert_started(broker, RABBITMQ)
    url = broker.url
    assert f":{urlsplit(url).password}@" in url
    assert f":{urlsplit(url).password}@" not in repr(broker), "the repr hides the password"
    await _amqp_round_trip(url)

    durable_queue, kept = new_topic_name("kept"), uuid.uuid4().bytes
    await _amqp_publish(url, durable_queue, kept)  # confirmed before the restart
    await asyncio.to_thread(broker.restart)
    assert broker.url == url
    received = await asyncio.wait_for(_amqp_receive(url, durable_queue), ROUND_TRIP_SECONDS)
    assert received == kept
    await _amqp_round_trip(url)

    await asyncio.to_thread(broker.pause)
    assert broker.status == "paused"
    assert not _answers_within(url, AMQP_HEADER, PAUSED_ATTEMPT_SECONDS)
    await asyncio.to_thread(broker.unpause)
    assert _answers_within(url, AMQP_HEADER, ROUND_TRIP_SECONDS)
    await _amqp_round_trip(url)

    await asyncio.to_thread(broker.stop)
    assert broker.status == "exited"
    assert _port_refuses(url)
    await asyncio.to_thread(broker.start)
    assert broker.url == url
    await _amqp_round_trip(url)


# --- Kafka (confluent-kafka, consumer group, classic protocol) -----------------------


def _kafka_produce(url: str, topic: str, value: bytes, *, timeout: float) -> bool:
    """Produce with acks=all; True once the broker confirmed it within ``timeout``."""
    from confluent_kafka import KafkaError, Producer

    producer = Producer(
        {
            "bootstrap.servers": urlsplit(url).netloc,
            "acks": "all",
            "message.timeout.ms": int(timeout * 1000),
        }
    )
    outcome: list[KafkaError | None] = []
    producer.produce(topic, value, on_delivery=lambda err, _msg: outcome.append(err))
    deadline = time.monotonic() + timeout + 1.0  # the client fails the message at `timeout`
    while not outcome and time.monotonic() < deadline:
        producer.poll(0.1)
    producer.purge()
    producer.flush(0)
    return bool(outcome) and outcome[0] is None


def _kafka_consume_one(url: str, topic: str, group: str) -> bytes:
    """The next message of ``topic`` for consumer group ``group``, committed."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": urlsplit(url).netloc,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + ROUND_TRIP_SECONDS
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            consumer.commit(message=message, asynchronous=False)
            value = message.value()
            assert isinstance(value, bytes)
            return value
        raise AssertionError(f"no message on {topic} for group {group} in {ROUND_TRIP_SECONDS}s")
    finally:
        consumer.close()


def _kafka_round_trip(url: str) -> None:
    topic, value = new_topic_name("rt"), uuid.uuid4().bytes
    assert _kafka_produce(url, topic, value, timeout=ROUND_TRIP_SECONDS)
    assert _kafka_consume_one(url, topic, group=new_topic_name("g")) == value


@pytest.mark.broker
@pytest.mark.timeout(_test_timeout(KAFKA))
def test_kafka_round_trips_and_survives_restart_pause_and_stop(
    kafka_broker: Broker, restore: list[Broker]
) -> None:
    broker = kafka_broker
    restore.append(broker)
    _assert_started(broker, KAFKA)
    url = broker.url
    _kafka_round_trip(url)

    topic, group = new_topic_name("kept"), new_topic_name("g")
    first, kept = uuid.uuid4().bytes, uuid.uuid4().bytes
    assert _kafka_produce(url, topic, first, timeout=ROUND_TRIP_SECONDS)
    assert _kafka_consume_one(url, topic, group) == first  # commits the group's offset
    assert _kafka_produce(url, topic, kept, timeout=ROUND_TRIP_SECONDS)
    broker.restart()
    assert broker.url == url
    # The group resumes after its committed offset: the log and the offsets survived.
    assert _kafka_consume_one(url, topic, group) == kept
    _kafka_round_trip(url)

    broker.pause()
    assert broker.status == "paused"
    assert not _kafka_produce(url, new_topic_name("paused"), b"x", timeout=PAUSED_ATTEMPT_SECONDS)
    broker.unpause()
    _kafka_round_trip(url)

    broker.stop()
    assert broker.status == "exited"
    assert _port_refuses(url)
    broker.start()
    assert broker.url == url
    _kafka_round_trip(url)


# --- NATS JetStream (nats-py) --------------------------------------------------------


async def _nats_ignore_errors(_exc: Exception) -> None:
    """Connection errors surface through connect() and the calls instead."""


async def _js_publish(url: str, stream: str, body: bytes) -> None:
    import nats

    client = await nats.connect(url, connect_timeout=5, error_cb=_nats_ignore_errors)
    try:
        js = client.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.m", body, timeout=ROUND_TRIP_SECONDS)
        assert ack.stream == stream
    finally:
        await client.close()


async def _js_receive(url: str, stream: str) -> bytes:
    import nats

    client = await nats.connect(url, connect_timeout=5, error_cb=_nats_ignore_errors)
    try:
        js = client.jetstream()
        sub = await js.pull_subscribe(f"{stream}.>", durable="reader", stream=stream)
        messages = await sub.fetch(1, timeout=ROUND_TRIP_SECONDS)
        await messages[0].ack_sync()
        return messages[0].data
    finally:
        await client.close()


async def _js_round_trip(url: str) -> None:
    stream, body = new_topic_name("rt"), uuid.uuid4().bytes
    await _js_publish(url, stream, body)
    assert await _js_receive(url, stream) == body


@pytest.mark.broker
@pytest.mark.timeout(_test_timeout(NATS))
async def test_nats_jetstream_round_trips_and_survives_restart_pause_and_stop(
    nats_broker: Broker, restore: list[Broker]
) -> None:
    broker = nats_broker
    restore.append(broker)
    _assert_started(broker, NATS)
    url = broker.url
    await _js_round_trip(url)

    stream, kept = new_topic_name("kept"), uuid.uuid4().bytes
    await _js_publish(url, stream, kept)  # PubAck before the restart: stored on file
    await asyncio.to_thread(broker.restart)
    assert broker.url == url
    assert await _js_receive(url, stream) == kept
    await _js_round_trip(url)

    await asyncio.to_thread(broker.pause)
    assert broker.status == "paused"
    # A NATS server sends INFO as soon as a client connects; a frozen one does not.
    assert not _answers_within(url, b"", PAUSED_ATTEMPT_SECONDS)
    await asyncio.to_thread(broker.unpause)
    assert _answers_within(url, b"", ROUND_TRIP_SECONDS)
    await _js_round_trip(url)

    await asyncio.to_thread(broker.stop)
    assert broker.status == "exited"
    assert _port_refuses(url)
    await asyncio.to_thread(broker.start)
    assert broker.url == url
    await _js_round_trip(url)
