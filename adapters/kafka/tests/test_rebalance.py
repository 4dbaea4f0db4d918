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
            for start in range(0, total, batch):
                messages = await bus.publish_many(topic, [
                    unibus.Message(b"r" * 256, key=f"k{(start + i) % 97}")
                    for i in range(batch)])
                confirmed.update(m.id for m in messages)
                progress.set()
                await asyncio.sleep(0.1)   # pacing: the run spans the joins and leaves
            published.set()

        async def until(done: Callable[[], bool]) -> None:
            while not done():
                progress.clear()
                await progress.wait()

        async def at(count: int) -> None:
            await until(lambda: len(confirmed) >= count)

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
                await asyncio.wait_for(until(lambda: confirmed <= received.keys()), 60)
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
