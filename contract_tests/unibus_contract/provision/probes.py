"""Readiness probes: one real client round trip per broker, not a log line.

Each probe takes the broker's URL and a timeout for this one attempt, and
returns only after a message went through the broker and came back:

* RabbitMQ (aio-pika): publish with publisher confirms to an exclusive queue, get it back.
* Kafka (confluent-kafka): produce with ``acks=all``, consume it back in a
  consumer group (classic protocol, the Python clients' default), which also
  creates ``__consumer_offsets`` before the first test needs it.
* NATS (nats-py): create a JetStream file stream, publish (PubAck), fetch and
  ack through a pull consumer, delete the stream.

A probe raises whatever the client raised when the broker is not ready yet; the
caller retries until its deadline. Client libraries are imported lazily, so this
module imports without any of them. The async clients run on a private event
loop in a worker thread, so probes may be called from inside a running loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ProbeFailed", "probe_kafka", "probe_nats", "probe_rabbitmq", "run_in_fresh_loop"]

logger = logging.getLogger(__name__)

PROBE_TOPIC = "unibus-probe"


class ProbeFailed(RuntimeError):
    """A round trip completed at the transport level but did not return the message."""


def run_in_fresh_loop(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to completion on a new event loop in a worker thread.

    Args:
        factory: Creates the coroutine; called inside the worker thread.

    Raises:
        BaseException: Whatever the coroutine raised.
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(factory())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=target, name="unibus-probe", daemon=True)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def probe_rabbitmq(url: str, timeout: float) -> None:
    """Round-trip one confirmed message through RabbitMQ.

    Args:
        url: ``amqp://user:password@127.0.0.1:PORT/``.
        timeout: Seconds this attempt may take.

    Raises:
        ProbeFailed: The message did not come back.
        Exception: The client's error while the broker is not ready.
    """
    run_in_fresh_loop(lambda: asyncio.wait_for(_rabbitmq_round_trip(url, timeout), timeout))


async def _rabbitmq_round_trip(url: str, timeout: float) -> None:
    import aio_pika

    body = uuid.uuid4().bytes
    connection = await aio_pika.connect(url, timeout=timeout)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
        message = None
        while message is None:  # bounded by the caller's wait_for
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
        await message.ack()
        if message.body != body:
            raise ProbeFailed(f"rabbitmq: expected {body!r}, got {message.body!r}")
    finally:
        await connection.close()


def probe_kafka(url: str, timeout: float) -> None:
    """Produce one message with ``acks=all`` and consume it back in a group.

    Args:
        url: ``kafka://127.0.0.1:PORT``.
        timeout: Seconds this attempt may take.

    Raises:
        ProbeFailed: Delivery failed or the message did not come back in time.
        Exception: The client's error while the broker is not ready.
    """
    from confluent_kafka import Consumer, KafkaError, Producer

    deadline = time.monotonic() + timeout
    servers = urlsplit(url).netloc
    value = uuid.uuid4().hex.encode()
    quiet = logging.getLogger(f"{__name__}.kafka")
    producer = Producer(
        {
            "bootstrap.servers": servers,
            "acks": "all",
            "message.timeout.ms": max(1000, int(timeout * 1000)),
            "logger": quiet,
        }
    )
    outcome: list[KafkaError | None] = []
    producer.produce(PROBE_TOPIC, value, on_delivery=lambda err, _msg: outcome.append(err))
    while not outcome and time.monotonic() < deadline:
        producer.poll(0.1)
    producer.flush(0)
    if not outcome or outcome[0] is not None:
        raise ProbeFailed(f"kafka: produce not confirmed: {outcome[0] if outcome else 'timeout'}")

    consumer = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": "unibus-probe",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "logger": quiet,
        }
    )
    try:
        consumer.subscribe([PROBE_TOPIC])
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            if message.value() == value:
                return
        raise ProbeFailed("kafka: produced message not consumed back in time")
    finally:
        consumer.close()


def probe_nats(url: str, timeout: float) -> None:
    """Round-trip one message through a JetStream file stream and pull consumer.

    Args:
        url: ``nats://127.0.0.1:PORT``.
        timeout: Seconds this attempt may take.

    Raises:
        ProbeFailed: The message did not come back.
        Exception: The client's error while the server is not ready.
    """
    run_in_fresh_loop(lambda: asyncio.wait_for(_nats_round_trip(url), timeout))


async def _nats_round_trip(url: str) -> None:
    import nats

    async def ignore(_exc: Exception) -> None:
        """Connection errors surface as the exception of connect() instead."""

    stream = f"UNIBUS_PROBE_{uuid.uuid4().hex}"
    subject = f"unibus.probe.{stream}"
    body = uuid.uuid4().bytes
    client = await nats.connect(
        url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0, error_cb=ignore
    )
    try:
        js = client.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        try:
            await js.publish(subject, body)
            sub = await js.pull_subscribe(subject, durable=None, stream=stream)
            messages = await sub.fetch(1, timeout=5)
            await messages[0].ack()
            if messages[0].data != body:
                raise ProbeFailed(f"nats: expected {body!r}, got {messages[0].data!r}")
        finally:
            await js.delete_stream(stream)
    finally:
        await client.close()
