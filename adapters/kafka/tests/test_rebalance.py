"""Rebalance: three consumers join and leave one group during a 50,000-message run.

Offsets are committed only up to the highest contiguous settled offset and, on
revocation, committed before the partition is dropped: no message may be lost.
Duplicates (deliveries of a settled-but-uncommitted offset or of an unsettled one
that moved to another member) are allowed, counted and printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

import unibus
from unibus.errors import DeliveryLost

pytestmark = [pytest.mark.broker, pytest.mark.fault]


async def until(progress: asyncio.Event, done: Callable[[], bool]) -> None:
    """Wait until ``done()``, re-checking whenever ``progress`` is set."""
    while not done():
        progress.clear()
        await progress.wait()


async def publish_paced(bus: unibus.Bus, topic: str, *, total: int, batch: int, body: bytes,
                        keys: int, pause: float, confirmed: set[str],
                        progress: asyncio.Event) -> None:
    """Publish ``total`` keyed messages in batches, ``pause`` s apart, noting each confirmed."""
    for start in range(0, total, batch):
        messages = await bus.publish_many(topic, [
            unibus.Message(body, key=f"k{(start + i) % keys}") for i in range(batch)])
        confirmed.update(m.id for m in messages)
        progress.set()
        await asyncio.sleep(pause)


async def test_consumers_joining_and_leaving_mid_run_lose_nothing(kafka_url: str) -> None:
    topic, group = f"rb-{uuid.uuid4().hex[:12]}", f"rb-{uuid.uuid4().hex[:12]}"
    total, batch = 50_000, 500
    url = f"{kafka_url}&partitions=6"
    received: Counter[str] = Counter()
    per_consumer: Counter[str] = Counter()
    lost_acks = 0
    confirmed: set[str] = set()
    published = asyncio.Event()
    stops = {name: asyncio.Event() for name in ("c1", "c2", "c3")}
    events: list[str] = []
    progress = asyncio.Event()   # set whenever confirmed or received grows
    started = time.monotonic()

    async def consume(name: str) -> None:
        nonlocal lost_acks
        async with unibus.connect(url) as bus, bus.subscribe(topic, group=group,
                                                             prefetch=256) as sub:
            events.append(f"{time.monotonic() - started:5.1f}s {name} joined")
            while not stops[name].is_set():
                for delivery in await sub.fetch(timeout=0.2):
                    received[delivery.id] += 1
                    progress.set()
                    per_consumer[name] += 1
                    try:
                        await delivery.ack()
                    except DeliveryLost:
                        lost_acks += 1
        events.append(f"{time.monotonic() - started:5.1f}s {name} left")

    async with unibus.connect(url) as bus:
        await bus.declare_group(topic, group)

        async def publish() -> None:
            # Paced: the run spans the joins and leaves.
            await publish_paced(bus, topic, total=total, batch=batch, body=b"r" * 256, keys=97,
                                pause=0.1, confirmed=confirmed, progress=progress)
            published.set()

        async def at(count: int) -> None:
            await until(progress, lambda: len(confirmed) >= count)

        async def choreography() -> None:
            tasks = [asyncio.create_task(consume("c1"))]
            await at(total // 6)
            tasks.append(asyncio.create_task(consume("c2")))
            await at(2 * total // 6)
            tasks.append(asyncio.create_task(consume("c3")))
            await at(3 * total // 6)
            stops["c1"].set()
            await at(4 * total // 6)
            stops["c2"].set()
            await published.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    until(progress, lambda: confirmed <= received.keys()), 60)
            stops["c3"].set()
            await asyncio.gather(*tasks)

        await asyncio.wait_for(asyncio.gather(publish(), choreography()), timeout=110)

    duplicates = sum(received.values()) - len(received)
    lost = len(confirmed - set(received))
    print("\nrebalance: " + "; ".join(events))
    print(f"rebalance: published={total} confirmed={len(confirmed)} "
          f"received_unique={len(received)} duplicates={duplicates} lost={lost} "
          f"acks_after_revocation={lost_acks} per_consumer={dict(per_consumer)}")
    assert lost == 0
    assert all(per_consumer[name] > 0 for name in ("c1", "c2", "c3"))


async def test_a_member_that_joins_gets_nothing_another_member_acked(kafka_url: str) -> None:
    """A revocation commits what was settled, whichever side (event loop or consumer
    thread) served it, and an ack racing with it raises DeliveryLost: no message whose
    ``ack()`` returned reaches the partition's next owner."""
    topic, group = f"rb-{uuid.uuid4().hex[:12]}", f"rb-{uuid.uuid4().hex[:12]}"
    total, batch = 20_000, 250
    url = f"{kafka_url}&partitions=6"
    acked_by_first: set[str] = set()
    got_by_second: list[str] = []
    received: set[str] = set()
    confirmed: set[str] = set()
    progress = asyncio.Event()
    stop = asyncio.Event()

    async def consume(into: Callable[[str], None], acked: set[str] | None) -> None:
        async with unibus.connect(url) as bus, bus.subscribe(topic, group=group,
                                                             prefetch=256) as sub:
            while not stop.is_set():
                for delivery in await sub.fetch(timeout=0.2):
                    into(delivery.id)
                    received.add(delivery.id)
                    progress.set()
                    try:
                        await delivery.ack()   # in order: what is acked is contiguous
                    except DeliveryLost:
                        continue
                    if acked is not None:
                        acked.add(delivery.id)

    async with unibus.connect(url) as bus:
        await bus.declare_group(topic, group)
        # Paced: the first member stays busy.
        publish = publish_paced(bus, topic, total=total, batch=batch, body=b"j" * 64, keys=31,
                                pause=0.05, confirmed=confirmed, progress=progress)

        async def run() -> None:
            first = asyncio.create_task(consume(lambda _: None, acked_by_first))
            await until(progress, lambda: len(acked_by_first) >= 2_000)
            second = asyncio.create_task(consume(got_by_second.append, None))
            await until(progress, lambda: len(confirmed) == total and confirmed <= received)
            stop.set()
            await asyncio.gather(first, second)

        await asyncio.wait_for(asyncio.gather(publish, run()), timeout=100)

    again = acked_by_first.intersection(got_by_second)
    print(f"\nrejoin: first acked {len(acked_by_first)}, second got {len(got_by_second)}, "
          f"of them acked by the first: {len(again)}")
    assert got_by_second, "the second member was never assigned a partition"
    assert not again
    assert confirmed <= received


async def test_a_revocation_served_on_the_event_loop_commits_at_once(kafka_url: str) -> None:
    """The loop serves rebalances when its own drain calls the driver, usually moments
    after a periodic commit: the revocation's commit must go regardless, so the next
    member starts after everything acked."""
    from confluent_kafka import TopicPartition

    from unibus_kafka._consumer import KafkaConsumer

    topic, group = f"rb-{uuid.uuid4().hex[:12]}", f"rb-{uuid.uuid4().hex[:12]}"
    url = f"{kafka_url}&partitions=1"
    async with unibus.connect(url) as bus:
        await bus.declare_group(topic, group)
        await bus.publish_many(topic, [b"acked %d" % i for i in range(100)])
        async with bus.subscribe(topic, group=group, prefetch=100) as sub:
            acked = 0
            while acked < 100:
                for delivery in await sub.fetch(timeout=10):
                    await delivery.ack()
                    acked += 1
            consumer = sub._consumer
            assert isinstance(consumer, KafkaConsumer)
            poller = consumer._poller
            state = poller._parts[(topic, 0)]
            with poller.driving:   # as inside the loop's drain, right after a commit
                poller._last_commit = time.monotonic()
                poller._on_revoke(poller._kc, [TopicPartition(topic, 0)])
            assert state.revoked
            assert state.committed == state.commit_to > 0
        await bus.publish(topic, b"marker")
        async with bus.subscribe(topic, group=group) as again:
            [first] = await again.fetch(1, timeout=30)
            assert first.body == b"marker"
            await first.ack()
