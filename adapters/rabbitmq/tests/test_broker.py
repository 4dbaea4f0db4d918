"""RabbitMQ-specific behaviour on a real broker: routing outcomes, queues, attempts, errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import pytest_asyncio

import unibus
from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    InvalidMessage,
    MessageTooLarge,
    PublishFailed,
)
from unibus_rabbitmq import RabbitMQAdapter
from unibus_rabbitmq._codec import encode_headers, properties
from unibus_rabbitmq._errors import is_driver_error
from unibus_rabbitmq._topology import bucket_ms, group_queue

pytestmark = pytest.mark.broker


@pytest_asyncio.fixture
async def raw(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel on the same broker, to set up odd conditions."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


def rabbit(bus: unibus.Bus) -> RabbitMQAdapter:
    adapter = bus.adapter
    assert isinstance(adapter, RabbitMQAdapter)
    return adapter


async def test_publishing_to_a_topic_without_groups_is_legal_and_keeps_nothing(
        bus: unibus.Bus, topic: str) -> None:
    await bus.publish(topic, b"nobody listens")
    await bus.declare_group(topic, "late")
    async with bus.subscribe(topic, group="late") as sub:
        await bus.publish(topic, b"after")
        got = await sub.fetch(10, timeout=bus.capabilities.timings.delivery)
        assert [d.body for d in got] == [b"after"]
        await got[0].ack()


async def test_a_nacked_publish_raises_publish_failed_with_its_ids(
        bus: unibus.Bus, raw: aio_pika.abc.AbstractChannel, topic: str) -> None:
    await bus.declare_group(topic, "g")   # also declares the exchange
    full = await raw.declare_queue(f"{topic}-full", arguments={
        "x-max-length": 0, "x-overflow": "reject-publish"})
    await full.bind("unibus", routing_key=topic)
    with pytest.raises(PublishFailed, match="refused") as info:
        await bus.publish_many(topic, [unibus.Message(b"a", id="id-a"),
                                       unibus.Message(b"b", id="id-b")])
    assert set(info.value.message_ids) == {"id-a", "id-b"}


async def test_a_returned_publish_on_a_path_that_must_route_raises(bus: unibus.Bus) -> None:
    message = unibus.Message(b"x")
    item = (message.id, message.body, properties(message, encode_headers(message)))
    with pytest.raises(PublishFailed, match="could not route") as info:
        await rabbit(bus).publisher.send("", f"no-such-queue-{uuid.uuid4().hex}", [item],
                                         must_route=True)
    assert info.value.message_ids == (message.id,)


async def test_a_deleted_delay_queue_is_declared_again(
        bus: unibus.Bus, raw: aio_pika.abc.AbstractChannel, topic: str) -> None:
    await bus.declare_group(topic, "g")
    # Long enough that "first" still waits in its delay queue when that is deleted.
    delay = 2.0
    async with bus.subscribe(topic, group="g") as sub:
        await bus.publish(topic, b"first", delay=delay)
        await raw.queue_delete(f"unibus.delay.{bucket_ms(delay)}")
        await bus.publish(topic, b"second", delay=delay)
        within = delay + bus.capabilities.timings.delay_slack + 2
        got: list[unibus.Delivery] = []
        deadline = time.monotonic() + within
        while b"second" not in {d.body for d in got} and (left := deadline - time.monotonic()) > 0:
            got += await sub.fetch(10, timeout=left)
        for d in got:
            await d.ack()
        # "first" was in the deleted queue: only what was routed after survives.
        assert b"second" in {d.body for d in got}


async def test_quorum_queue_redelivers_past_rabbitmq_4_default_delivery_limit(
        bus: unibus.Bus, topic: str) -> None:
    await bus.declare_group(topic, "g")
    await bus.publish(topic, b"stubborn")
    attempts = []
    async with bus.subscribe(topic, group="g", prefetch=1) as sub:
        while len(attempts) < 25:
            got = await sub.fetch(1, timeout=bus.capabilities.timings.redelivery)
            assert got, f"message dropped after {len(attempts)} deliveries"
            attempts.append(got[0].attempt)
            if len(attempts) < 25:
                await got[0].nack()
            else:
                await got[0].ack()
    assert attempts == list(range(1, 26))


async def test_classic_queues_count_attempts_across_nacks(amqp_url: str, topic: str) -> None:
    async with unibus.connect(f"{amqp_url}?queue_type=classic") as bus:
        await bus.declare_group(topic, "g")
        await bus.publish(topic, b"again", key="k", headers={"h": "v"})
        async with bus.subscribe(topic, group="g", prefetch=1) as sub:
            seen = []
            for _ in range(3):
                (d,) = await sub.fetch(1, timeout=bus.capabilities.timings.redelivery)
                seen.append((d.attempt, d.body, d.key, dict(d.headers)))
                await d.nack()
            (d,) = await sub.fetch(1, timeout=bus.capabilities.timings.redelivery)
            await d.ack()
        assert [s[0] for s in seen] + [d.attempt] == [1, 2, 3, 4]
        assert all(s[1:] == (b"again", "k", {"h": "v"}) for s in seen)


async def test_queue_type_mismatch_is_a_broker_error_and_the_bus_keeps_working(
        amqp_url: str, bus: unibus.Bus, topic: str) -> None:
    await bus.declare_group(topic, "g")   # quorum
    async with unibus.connect(f"{amqp_url}?queue_type=classic") as classic:
        with pytest.raises(BrokerError, match=r"inequivalent|PRECONDITION") as info:
            await classic.declare_group(topic, "g")
        assert not is_driver_error(info.value)
        await classic.declare_group(topic, "other")   # a new declaring channel
        await classic.publish(topic, b"still fine")


async def test_reserved_header_names_are_refused_before_sending(bus: unibus.Bus,
                                                               topic: str) -> None:
    with pytest.raises(InvalidMessage, match="reserved"):
        await bus.publish(topic, b"x", headers={"x-death": "forged"})


async def test_body_over_the_brokers_limit_fails_fast_without_a_driver_error(
        amqp_url: str, topic: str) -> None:
    limit = 16 * 1024 * 1024
    async with unibus.connect(f"{amqp_url}?max_message_size={limit + 10}&recovery=30") as bus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PublishFailed, match="channel closed"):
            await bus.publish(topic, b"\0" * (limit + 1))
        assert loop.time() - started < 10, "a refused publish must not be retried until recovery"
        await bus.publish(topic, b"the publish channel reopens")


async def test_the_declared_maximum_is_checked_before_sending(amqp_url: str, topic: str) -> None:
    async with unibus.connect(f"{amqp_url}?max_message_size=10") as bus:
        with pytest.raises(MessageTooLarge):
            await bus.publish(topic, b"x" * 11)


async def test_an_unknown_vhost_is_refused_like_bad_credentials(amqp_url: str) -> None:
    bus = unibus.connect(amqp_url.rstrip("/") + "/no-such-vhost")
    with pytest.raises(AuthenticationFailed, match="vhost"):
        await bus.open()
    await bus.aclose()


async def fetch_up_to(sub: unibus.Subscription, count: int,
                      within: float) -> list[unibus.Delivery]:
    """Collect deliveries until ``count`` arrived or ``within`` seconds passed.

    A fetch returns what has arrived so far (at least one), so a single fetch cannot
    show that a consumer was handed exactly its prefetch.
    """
    got: list[unibus.Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        got += await sub.fetch(100, timeout=left)
    return got


async def test_one_consumer_on_many_topics_never_holds_more_than_its_prefetch(
        bus: unibus.Bus, topic: str) -> None:
    topics = [f"{topic}-{i}" for i in range(3)]
    for name in topics:
        await bus.declare_group(name, "g")
        await bus.publish_many(name, [b"m"] * 10)
    async with bus.subscribe(topics, group="g", prefetch=4) as sub:
        first = await fetch_up_to(sub, 4, bus.capabilities.timings.delivery)
        assert len(first) == 4
        assert await sub.fetch(100, timeout=0.3) == []
        for d in first:
            await d.ack()
        received = len(first)
        while received < 30:
            batch = await sub.fetch(100, timeout=bus.capabilities.timings.delivery)
            assert 0 < len(batch) <= 4
            received += len(batch)
            for d in batch:
                await d.ack()


async def test_group_queues_are_named_topic_colon_group(
        bus: unibus.Bus, raw: aio_pika.abc.AbstractChannel, topic: str) -> None:
    await bus.declare_group(topic, "billing")
    queue = await raw.declare_queue(group_queue(topic, "billing"), passive=True)
    assert queue.name == f"{topic}:billing"


async def test_the_url_prefetch_is_the_default_of_subscriptions_that_give_none(
        amqp_url: str, topic: str) -> None:
    async with unibus.connect(f"{amqp_url}?prefetch=3") as bus:
        await bus.declare_group(topic, "g")
        await bus.publish_many(topic, [b"m"] * 10)
        async with bus.subscribe(topic, group="g") as sub:
            assert sub.prefetch == 3
            got = await fetch_up_to(sub, 3, bus.capabilities.timings.delivery)
            assert len(got) == 3
            assert await sub.fetch(100, timeout=0.3) == []
            for d in got:
                await d.ack()


async def test_ephemeral_subscriptions_count_attempts_across_nacks(bus: unibus.Bus,
                                                                   topic: str) -> None:
    async with bus.subscribe(topic, prefetch=1) as sub:
        await bus.publish(topic, b"again")
        attempts = []
        for _ in range(3):
            (d,) = await sub.fetch(1, timeout=bus.capabilities.timings.redelivery)
            attempts.append(d.attempt)
            await d.nack()
        (d,) = await sub.fetch(1, timeout=bus.capabilities.timings.redelivery)
        await d.ack()
    assert [*attempts, d.attempt] == [1, 2, 3, 4]
