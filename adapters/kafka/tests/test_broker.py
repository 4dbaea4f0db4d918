"""Kafka-specific behaviour on a real broker (beyond the contract suite)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

import unibus
from unibus.errors import (
    BrokerError,
    BrokerUnavailable,
    DeliveryLost,
    PublishFailed,
    UnibusError,
)
from unibus.url import make_url
from unibus_kafka._consumer import KafkaConsumer
from unibus_kafka._poller import Poller
from unibus_kafka._producer import Producer as AdapterProducer
from unibus_kafka._url import parse_settings
from unibus_kafka.adapter import KafkaAdapter

pytestmark = pytest.mark.broker


def fresh(label: str) -> str:
    return f"kt-{label}-{uuid.uuid4().hex[:12]}"


async def test_publish_many_confirms_every_message_and_a_group_gets_them_all(
        kafka_url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [unibus.Message(b"x" * 256, key=f"k{i % 7}")
                                              for i in range(3000)])
        async with bus.subscribe(topic, group=group, prefetch=500) as sub:
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            while len(seen) < len(sent) and time.monotonic() < deadline:
                for delivery in await sub.fetch(timeout=1):
                    seen.add(delivery.id)
                    await delivery.ack()
    assert seen == {m.id for m in sent}


async def test_a_delivered_record_sets_every_field_a_delivery_has(kafka_url: str) -> None:
    # KafkaConsumer._take builds a plain record's delivery field by field (for speed),
    # the rest coming from its class and its partition's state: a field added to
    # Delivery or KafkaDelivery must be set or provided there too.
    from unibus.message import Delivery
    from unibus_kafka._consumer import KafkaDelivery

    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish(topic, b"fields", key="k")
        async with bus.subscribe(topic, group=group) as sub:
            [delivery] = await sub.fetch(1, timeout=10)
            assert isinstance(delivery, KafkaDelivery)
            for name in (*Delivery.__slots__, *KafkaDelivery.__slots__):
                getattr(delivery, name)   # AttributeError if left unset
            assert (delivery.topic, delivery.group, delivery.attempt, delivery.due) == (
                topic, group, 1, 0.0)
            assert delivery._consumer is sub._consumer
            assert delivery.message == sent
            await delivery.ack()


async def test_a_fetch_waiting_for_room_in_the_prefetch_is_woken_by_an_ack(
        kafka_url: str) -> None:
    # At full prefetch a fetch waits; the partitions' states are alerted meanwhile, so
    # an ack takes the slow way, which wakes it. Once it has returned, acks take the
    # short way again.
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        await bus.publish_many(topic, [b"a", b"b", b"c", b"d"])
        async with bus.subscribe(topic, group=group, prefetch=2) as sub:
            held: list[unibus.Delivery] = []
            while len(held) < 2:
                held += await sub.fetch(2, timeout=10)
            waiting = asyncio.create_task(sub.fetch(2, timeout=10))
            # One turn of the loop: the task runs up to its waiter (it awaits nothing
            # before it), not a wait for time to pass.
            await asyncio.sleep(0)
            assert not waiting.done()
            consumer = sub._consumer
            assert isinstance(consumer, KafkaConsumer)
            states = list(consumer._poller.parts.values())
            assert states
            assert all(s.alert for s in states)
            waiter = consumer._waiter
            assert waiter is not None
            await held[0].ack()
            # Woken by the ack itself: no other callback ran in between (the poller's
            # thread wakes a waiting fetch too, but only through the loop).
            assert waiter.done()
            more = await asyncio.wait_for(waiting, 5)
            assert len(more) == 1
            assert not any(s.alert for s in states)
            for delivery in [*held[1:], *more]:
                await delivery.ack()


async def test_an_ephemeral_nack_wakes_a_fetch_waiting_for_room(kafka_url: str) -> None:
    # An ephemeral subscription redelivers a nacked message from memory: the nack frees
    # its room in the prefetch at once, so a fetch waiting for room gets the next one.
    topic = fresh("t")
    async with unibus.connect(kafka_url) as bus:
        await bus.adapter.declare_group(topic, "unused")   # the topic, no group
        async with bus.subscribe(topic, prefetch=1) as sub:
            first = await bus.publish(topic, b"first")
            second = await bus.publish(topic, b"second")
            [held] = await sub.fetch(1, timeout=10)
            assert held.id == first.id
            waiting = asyncio.create_task(sub.fetch(1, timeout=10))
            await asyncio.sleep(0)            # one turn: the task reaches its waiter
            assert not waiting.done()
            consumer = sub._consumer
            assert isinstance(consumer, KafkaConsumer)
            waiter = consumer._waiter
            assert waiter is not None
            await held.nack(delay=30)
            assert waiter.done()              # woken by the nack itself
            [nxt] = await asyncio.wait_for(waiting, 5)
            assert nxt.id == second.id
            await nxt.ack()


async def test_settling_after_close_raises_delivery_lost_and_the_group_gets_it_back(
        kafka_url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish(topic, b"held")
        sub = await bus.subscribe(topic, group=group).open()
        [delivery] = await sub.fetch(1, timeout=10)
        await sub.aclose()
        with pytest.raises(DeliveryLost):
            await delivery.ack()
        async with bus.subscribe(topic, group=group) as again:
            [back] = await again.fetch(1, timeout=10)
            assert back.id == sent.id
            await back.ack()


async def test_an_unreachable_bootstrap_list_fails_within_the_connect_timeout() -> None:
    bus = unibus.connect("kafka://127.0.0.1:1,127.0.0.1:2?connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await bus.open()
    assert time.monotonic() - started < bus.capabilities.timings.connect_timeout + 0.25
    await bus.aclose()


async def test_a_sasl_password_refused_never_reaches_errors_or_logs(
        kafka_broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    secret = f"never-log-{uuid.uuid4().hex}"
    url = str(kafka_broker.url).replace("kafka://", f"kafka://app:{secret}@")
    with caplog.at_level(logging.DEBUG):
        bus = unibus.connect(f"{url}?connect_timeout=3")
        with pytest.raises(UnibusError) as refused:
            await bus.open()
        await bus.aclose()
    assert secret not in str(refused.value)
    assert secret not in repr(bus)
    assert all(secret not in record.getMessage() for record in caplog.records)


async def test_a_record_over_the_driver_limit_is_publish_failed_with_its_id(
        kafka_url: str) -> None:
    topic = fresh("t")
    async with unibus.connect(f"{kafka_url}&message_max_bytes=40000") as bus:
        limit = bus.capabilities.max_message_size
        # Headers count against the record size too: fill them past the driver's limit.
        headers = {f"h{i}": "v" * 1000 for i in range(40)}
        message = unibus.Message(b"x" * limit, headers=headers)
        with pytest.raises(PublishFailed) as failed:
            await bus.publish_many(topic, [message])
        assert failed.value.message_ids == (message.id,)


async def test_an_ephemeral_subscription_is_positioned_when_open_returns(
        kafka_url: str) -> None:
    topic = fresh("t")
    async with unibus.connect(kafka_url) as bus:
        await bus.publish(topic, b"before")
        async with bus.subscribe(topic) as sub:
            after = await bus.publish(topic, b"after")
            got = await sub.fetch(10, timeout=bus.capabilities.timings.delivery)
            assert [d.id for d in got] == [after.id]


async def test_nack_goes_through_the_retry_lane_with_attempt_and_delay(kafka_url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish(topic, b"again", key="k", headers={"h": "1"})
        async with bus.subscribe(topic, group=group) as sub:
            [first] = await sub.fetch(1, timeout=10)
            nacked = time.monotonic()
            await first.nack(delay=0.5)
            [second] = await sub.fetch(1, timeout=10)
            waited = time.monotonic() - nacked
            assert (second.id, second.topic, second.attempt) == (sent.id, topic, 2)
            assert (second.key, dict(second.headers)) == ("k", {"h": "1"})
            assert waited >= 0.5
            await second.ack()
            assert await sub.fetch(1, timeout=1.0) == []


async def test_a_nack_the_retry_lane_refuses_leaves_the_delivery_to_be_settled_again(
        kafka_url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as writer, \
            unibus.connect(f"{kafka_url}&message_max_bytes=40000") as bus:
        # Readable by the small bus, too large for its producer to copy to the lane.
        # One key: one partition, so the big record is read first.
        await writer.declare_group(topic, group)
        big = await writer.publish(topic, b"x" * 45_000, key="k")
        after = await writer.publish(topic, b"after", key="k")
        async with bus.subscribe(topic, group=group, prefetch=1) as sub:
            [held] = await sub.fetch(1, timeout=10)
            assert held.id == big.id
            with pytest.raises(PublishFailed):
                await held.nack()
            assert not held.settled
            # Still open: it keeps its place in the prefetch, and the commit point.
            assert await sub.fetch(1, timeout=0.5) == []
            await held.ack()
            [next_one] = await sub.fetch(1, timeout=10)
            assert next_one.id == after.id
            await next_one.ack()
    async with unibus.connect(kafka_url) as bus, \
            bus.subscribe(topic, group=group) as sub:
        assert await sub.fetch(1, timeout=2.0) == []   # both acks were committed


async def test_a_subscription_failing_before_its_thread_starts_closes_its_driver_consumer(
        kafka_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    def refuse(poller: Poller, tp: Any) -> tuple[int, int]:
        made.append(poller._kc)   # the driver's consumer exists by now
        raise BrokerError(f"reading the end of {tp.topic} failed")

    monkeypatch.setattr(Poller, "_watermarks", refuse)
    topic = fresh("t")
    async with unibus.connect(kafka_url) as bus:
        await bus.publish(topic, b"x")   # the topic exists
        with pytest.raises(BrokerError, match="failed"):
            async with bus.subscribe(topic):
                pass
    [kc] = made
    with pytest.raises(RuntimeError, match="closed"):
        kc.assignment()   # closed, not left to the garbage collector


async def test_a_publish_still_creating_its_topic_when_the_bus_closes_fails_not_hangs(
        kafka_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    created, closed = threading.Event(), threading.Event()
    create = AdapterProducer._create_topics

    def create_then_wait_for_the_close(self: AdapterProducer, admin: Any, names: list[str]) -> None:
        create(self, admin, names)
        created.set()
        closed.wait(30)   # the broker answering slowly, while the bus closes

    monkeypatch.setattr(AdapterProducer, "_create_topics", create_then_wait_for_the_close)
    bus = unibus.connect(kafka_url)
    await bus.open()
    publishing = asyncio.create_task(bus.publish(fresh("t"), b"x"))
    await asyncio.to_thread(created.wait, 30)
    await bus.aclose()
    closed.set()
    # Queued after the producer's flush, its report would never be served.
    with pytest.raises(BrokerUnavailable, match="closed"):
        await asyncio.wait_for(publishing, 10)


async def test_a_held_delivery_keeps_the_commit_point_below_it_whatever_is_acked_after(
        kafka_url: str) -> None:
    # Acks out of order, then a close (which commits what is settled): the commit
    # point is the highest *contiguous* settled offset, not the highest settled one.
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(f"{kafka_url}&partitions=1") as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [f"m{i}".encode() for i in range(10)])
        async with bus.subscribe(topic, group=group, prefetch=10) as sub:
            got: list[unibus.Delivery] = []
            while len(got) < 10:
                got += await sub.fetch(10 - len(got), timeout=10)
            assert [d.id for d in got] == [m.id for m in sent]
            for delivery in got[1:]:
                await delivery.ack()   # the first is held, unsettled, at the close
        async with bus.subscribe(topic, group=group) as sub:
            again = await sub.fetch(10, timeout=10)
    assert [d.id for d in again][:1] == [sent[0].id]


async def test_many_concurrent_publishers_share_one_producer(kafka_url: str) -> None:
    topic = fresh("t")
    async with unibus.connect(kafka_url) as bus:
        results = await asyncio.gather(*(bus.publish(topic, f"{i}".encode())
                                         for i in range(200)))
    assert len({m.id for m in results}) == 200


async def test_the_loop_serves_reports_for_bulk_publishes_and_hands_lone_ones_back(
        kafka_url: str) -> None:
    # Bulk: the event loop serves the delivery reports (no GIL hand-off per report).
    # A lone publish: the poll thread serves its report and wakes it at once.
    topic = fresh("t")
    async with unibus.connect(kafka_url) as bus:
        await bus.publish(topic, b"first")   # creates the topic
        adapter = bus.adapter
        assert isinstance(adapter, KafkaAdapter)
        producer = adapter._producer
        assert producer is not None

        def loop_serves() -> bool:
            return producer.loop_serves
        bulk = asyncio.create_task(bus.publish_many(topic, [b"x" * 256] * 20_000))
        await asyncio.sleep(0)   # the publish has queued its first records
        assert loop_serves()
        sent = await bulk
        assert len(sent) == 20_000
        # The loop's next tick (within a millisecond, well inside a lone publish's
        # round trip) hands the reports back to the thread.
        for i in range(20):
            one = await bus.publish(topic, f"{i}".encode())
            assert not loop_serves()
            assert one.body == f"{i}".encode()
        # Many lone publishes at once add up to a bulk one.
        many = await asyncio.gather(*(bus.publish(topic, b"m") for _ in range(200)))
        assert len({m.id for m in many}) == 200


async def test_records_wait_in_the_driver_while_the_loop_has_no_room_and_keep_key_order(
        kafka_url: str) -> None:
    """With the prefetch full nobody takes records; once room is made every one comes,
    in publish order per key, whichever side (loop or thread) took it from the driver."""
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [unibus.Message(b"%d" % i, key=f"k{i % 5}")
                                              for i in range(5000)])
        async with bus.subscribe(topic, group=group, prefetch=10) as sub:
            held: list[unibus.Delivery] = []
            while len(held) < 10:
                held += await sub.fetch(timeout=10)
            # Full: this fetch waits for room, and the thread only serves the driver.
            assert await sub.fetch(timeout=1.5) == []
            consumer = sub._consumer
            assert isinstance(consumer, KafkaConsumer)
            inbox = consumer._poller.inbox
            taken_ahead = sum(len(records) for _, records in inbox)
            assert taken_ahead <= 5, f"{taken_ahead} records were taken with no room for them"
            received = held
            for delivery in held:
                await delivery.ack()
            deadline = time.monotonic() + 60
            while len(received) < len(sent) and time.monotonic() < deadline:
                batch = await sub.fetch(timeout=1)
                received += batch
                for delivery in batch:
                    await delivery.ack()
    assert sorted(d.id for d in received) == sorted(m.id for m in sent)
    for key in {m.key for m in sent}:
        assert [d.id for d in received if d.key == key] == [m.id for m in sent if m.key == key]


async def test_a_prefetch_beyond_the_drivers_batch_limit_still_fetches(kafka_url: str) -> None:
    # confluent-kafka's consume() refuses more than 1,000,000 records per call.
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [b"a", b"b", b"c"])
        async with bus.subscribe(topic, group=group, prefetch=2_000_000) as sub:
            received: list[unibus.Delivery] = []
            deadline = time.monotonic() + 30
            while len(received) < 3 and time.monotonic() < deadline:
                received += await sub.fetch(timeout=1)
            for delivery in received:
                await delivery.ack()
    assert sorted(d.id for d in received) == sorted(m.id for m in sent)


def bootstrap(kafka_url: str) -> str:
    """The bootstrap list of ``kafka_url``, for a raw confluent-kafka client."""
    return parse_settings(make_url(kafka_url)).bootstrap


def committed_count(kafka_url: str, topic: str, group: str) -> int:
    """The sum of the group's committed offsets over the topic's partitions."""
    reader = Consumer({"bootstrap.servers": bootstrap(kafka_url), "group.id": group})
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = reader.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        reader.close()
    return sum(tp.offset for tp in offsets if tp.offset >= 0)


async def test_a_held_delayed_message_never_stops_the_topics_commit_point(
        kafka_url: str) -> None:
    """A delayed publish waits in the topic's delay lane, not in the topic: what comes
    after it under the same key is committed while it is held."""
    topic, group = fresh("t"), fresh("g")
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        await bus.publish(topic, b"later", key="k", delay=600)
        sent = await bus.publish_many(topic, [unibus.Message(b"now", key="k")
                                              for _ in range(10)])
        async with bus.subscribe(topic, group=group) as sub:
            received: list[unibus.Delivery] = []
            deadline = time.monotonic() + 30
            while len(received) < len(sent) and time.monotonic() < deadline:
                for delivery in await sub.fetch(timeout=1):
                    received.append(delivery)
                    await delivery.ack()
    assert [d.id for d in received] == [m.id for m in sent]
    assert committed_count(kafka_url, topic, group) == len(sent)


async def test_a_record_of_the_topic_itself_is_never_held_whatever_its_headers(
        kafka_url: str) -> None:
    """Only a lane's records are read for bookkeeping: a foreign record in the topic
    carrying ``unibus.due`` and ``unibus.attempt`` comes at once, first attempt."""
    topic, group = fresh("t"), fresh("g")
    far = b"%d" % ((time.time() + 3600) * 1_000_000)
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        producer = Producer({"bootstrap.servers": bootstrap(kafka_url)})
        producer.produce(topic, b"foreign", headers=[("unibus.id", b"f-1"), ("unibus.due", far),
                                                     ("unibus.attempt", b"7"), ("x", b"y")])
        assert producer.flush(10) == 0
        async with bus.subscribe(topic, group=group) as sub:
            [delivery] = await sub.fetch(1, timeout=10)
            assert (delivery.id, delivery.body, delivery.attempt) == ("f-1", b"foreign", 1)
            assert dict(delivery.headers) == {"x": "y"}
            await delivery.ack()


async def test_a_subscription_without_a_group_gets_delayed_publishes_from_the_delay_lane(
        kafka_url: str) -> None:
    topic = fresh("t")
    async with unibus.connect(kafka_url) as bus, bus.subscribe(topic) as sub:
        published = time.time()
        sent = await bus.publish(topic, b"later", delay=0.5)
        [delivery] = await sub.fetch(1, timeout=10)
        assert time.time() - published >= 0.5
        assert (delivery.id, delivery.topic, delivery.attempt) == (sent.id, topic, 1)
        await delivery.ack()
