"""Fault scenarios on a real RabbitMQ: broker restart (G1), broker paused (G2), consumer
SIGKILL (G3), and connection loss with deliveries in hand.

Destructive (they restart the session's broker or cut its connections): marked
``fault``; run them on their own, serially (``-m fault``). Each prints its figures:
published, confirmed, received unique, duplicates, lost, recovery seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import unibus
from unibus.errors import DeliveryLost, PublishFailed
from unibus_contract.faults import fault_figures, longest_gap

pytestmark = [pytest.mark.fault, pytest.mark.broker]

CHILD = Path(__file__).with_name("g3_consumer.py")




def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def pause_then_resume(broker: Any, seconds: float) -> None:
    """Freeze the broker for ``seconds`` (G2), in a worker thread."""
    broker.pause()
    try:
        time.sleep(seconds)   # the fault's duration, not a barrier
    finally:
        broker.unpause()


@pytest.mark.parametrize("fault", [pytest.param("restart", id="G1-restart"),
                                   pytest.param("pause", id="G2-pause")])
async def test_g1_g2_broker_restarted_or_paused_mid_stream_loses_no_confirmed_message(
        rabbitmq_broker: Any, record_property: Any, fault: str) -> None:
    heartbeat = 2
    url = with_query(rabbitmq_broker.url, f"recovery=90&heartbeat={heartbeat}")
    topic, group = f"g1-{uuid.uuid4().hex}", "g1"
    total, batch = 3000, 50
    confirmed: set[str] = set()
    published = 0
    received: Counter[str] = Counter()
    first_seen: dict[str, float] = {}
    confirmed_at: list[float] = []
    fault_at: float | None = None
    loop = asyncio.get_running_loop()
    producer_done = asyncio.Event()

    async with unibus.connect(url) as pub_bus, unibus.connect(url) as sub_bus:
        await pub_bus.declare_group(topic, group)
        timings = pub_bus.capabilities.timings

        async def produce() -> None:
            nonlocal published, fault_at
            injected: asyncio.Future[Any] | None = None
            after = 0
            # At least `total` messages, and publishing goes on through the whole fault
            # and for a few batches after it: the fault hits the stream, not its end.
            while published < total or injected is None or not injected.done() or after < 5:
                if injected is not None and injected.done():
                    after += 1
                messages = [unibus.Message(str(i).encode())
                            for i in range(published, published + batch)]
                published += len(messages)
                try:
                    await pub_bus.publish_many(topic, messages)
                except PublishFailed as exc:
                    # Not confirmed: allowed to be lost, counted as published only.
                    print(f"publish_many failed: {exc}")
                    continue
                confirmed.update(m.id for m in messages)
                confirmed_at.append(loop.time())
                if injected is None and published >= total // 3:
                    fault_at = loop.time()
                    # Longer than the heartbeat timeout, so that the client may notice.
                    inject = (rabbitmq_broker.restart if fault == "restart" else
                              partial(pause_then_resume, rabbitmq_broker, 4 * heartbeat))
                    injected = asyncio.ensure_future(asyncio.to_thread(inject))
            assert injected is not None
            await injected
            producer_done.set()

        async def consume() -> None:
            deadline = None
            async with sub_bus.subscribe(topic, group=group, prefetch=100) as sub:
                while True:
                    if producer_done.is_set():
                        if confirmed <= received.keys():
                            return
                        deadline = deadline or loop.time() + timings.recovery + 30
                        if loop.time() > deadline:
                            return
                    for delivery in await sub.fetch(100, timeout=0.5):
                        received[delivery.id] += 1
                        first_seen.setdefault(delivery.id, loop.time())
                        # From the dead channel: DeliveryLost, the broker redelivers it.
                        with contextlib.suppress(DeliveryLost):
                            await delivery.ack()

        await asyncio.gather(produce(), consume())

    lost = len(confirmed - received.keys())
    # Recovery: the longest pause in the stream of confirmations or of first deliveries,
    # i.e. how long the fault stopped the traffic.
    recovery = max(longest_gap(confirmed_at), longest_gap(sorted(first_seen.values())))
    name = "rabbitmq G1 broker restarted" if fault == "restart" else "rabbitmq G2 broker paused"
    record_property(fault, fault_figures(name, published=published,
                                  confirmed=len(confirmed), received=received, lost=lost,
                                  recovery=recovery).line)
    assert lost == 0
    assert len(confirmed) == published, "every publish_many was retried until confirmed"
    assert fault_at is not None
    assert recovery > 1.0, f"the {fault} must have interrupted the stream"


async def test_g3_consumer_sigkilled_mid_batch_gets_every_unacked_message_redelivered(
        rabbitmq_broker: Any, record_property: Any) -> None:
    url = rabbitmq_broker.url
    topic, group = f"g3-{uuid.uuid4().hex}", "g3"
    total, ack_first, prefetch = 1000, 300, 50
    async with unibus.connect(url) as bus:
        timings = bus.capabilities.timings
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [str(i).encode() for i in range(total)])
        confirmed = {m.id for m in sent}

        child = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), url, topic, group, str(ack_first), str(prefetch),
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert child.stdout is not None
        acked: set[str] = set()
        held: set[str] = set()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = (await asyncio.wait_for(child.stdout.readline(),
                                               deadline - time.monotonic())).decode()
                if not line:
                    break
                kind, _, value = line.strip().partition(" ")
                if kind == "ACKED":
                    acked.add(value)
                elif kind == "HELD":
                    held.add(value)
                elif kind == "HOLDING":
                    break
            assert held, "the child consumer never reached its unacked batch"
            child.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()

        received: Counter[str] = Counter()
        recovery: float | None = None
        async with bus.subscribe(topic, group=group, prefetch=prefetch) as sub:
            deadline = time.monotonic() + timings.redelivery + 30
            while not confirmed <= (acked | received.keys()) and time.monotonic() < deadline:
                for delivery in await sub.fetch(prefetch, timeout=0.5):
                    received[delivery.id] += 1
                    if recovery is None and delivery.id in held:
                        recovery = time.monotonic() - killed_at
                    await delivery.ack()

    # Whatever the child acked but the broker had not yet recorded comes back too:
    # those are duplicates, and so is any repeat delivery here.
    everything = Counter(received)
    for message_id in acked:
        everything[message_id] += 1
    lost = len(confirmed - everything.keys())
    record_property("g3", fault_figures("rabbitmq G3 consumer SIGKILL", published=total,
                                  confirmed=len(confirmed), received=everything, lost=lost,
                                  recovery=recovery).line)
    assert lost == 0
    assert held <= received.keys(), "every unacked message of the killed consumer came back"


async def test_deliveries_from_a_lost_connection_cannot_be_settled_and_come_back(
        rabbitmq_broker: Any) -> None:
    url = with_query(rabbitmq_broker.url, "recovery=60")
    topic, group = f"cut-{uuid.uuid4().hex}", "cut"
    async with unibus.connect(url) as bus:
        timings = bus.capabilities.timings
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [b"one", b"two"])
        async with bus.subscribe(topic, group=group, prefetch=10) as sub:
            # fetch returns what has arrived (at least one): collect both before the cut.
            before: list[unibus.Delivery] = []
            ready_by = time.monotonic() + timings.delivery
            while len(before) < 2 and time.monotonic() < ready_by:
                before += await sub.fetch(10, timeout=ready_by - time.monotonic())
            assert len(before) == 2
            cut = await asyncio.create_subprocess_exec(
                "docker", "exec", rabbitmq_broker.container_id, "rabbitmqctl", "-q",
                "close_all_connections", "unibus fault test",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            assert await cut.wait() == 0
            after: list[unibus.Delivery] = []
            deadline = time.monotonic() + timings.recovery
            while len(after) < 2 and time.monotonic() < deadline:
                after += await sub.fetch(10, timeout=deadline - time.monotonic())
            for old in before:
                with pytest.raises(DeliveryLost, match="redelivers"):
                    await old.ack()
            assert sorted(d.id for d in after) == sorted(m.id for m in sent)
            assert all(d.attempt == 2 for d in after)
            for d in after:
                await d.ack()
            await bus.publish(topic, b"after the cut")
            (last,) = await sub.fetch(10, timeout=timings.delivery)
            assert last.body == b"after the cut"
            await last.ack()
