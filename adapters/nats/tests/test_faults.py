"""Fault scenarios on a real NATS JetStream server: restart mid-stream (G1), pause (G2) and
a consumer process SIGKILLed mid-batch (G3).

Destructive (they restart the session's server or kill processes): marked ``fault``;
run them on their own, serially (``-m fault``). Each prints its figures: published,
confirmed, received unique, duplicates, lost, recovery seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import unibus
from unibus.errors import PublishFailed
from unibus_contract.faults import fault_figures, longest_gap

pytestmark = [pytest.mark.fault, pytest.mark.broker]

CHILD = Path(__file__).with_name("g3_consumer.py")




async def test_g1_server_restarted_mid_stream_loses_no_confirmed_message(
        nats_broker: Any, record_property: Any) -> None:
    # File storage (the default): what the server confirmed survives its restart.
    url = f"{nats_broker.url}?ack_wait=2&heartbeat=0.5&publish_timeout=2&retry_for=60"
    topic, group = f"g1.{uuid.uuid4().hex}", "g1"
    total, batch = 3000, 50
    confirmed: set[str] = set()
    published = 0
    received: Counter[str] = Counter()
    restart_at: float | None = None
    arrivals: list[float] = []
    during = [0]      # messages published while the server was restarting
    loop = asyncio.get_running_loop()
    producer_done = asyncio.Event()

    async with unibus.connect(url) as pub_bus, unibus.connect(url) as sub_bus:
        assert pub_bus.capabilities.persistent
        await pub_bus.declare_group(topic, group)
        timings = pub_bus.capabilities.timings

        async def produce() -> None:
            nonlocal published, restart_at
            restart: asyncio.Future[Any] | None = None
            after = 0
            # At least `total` messages, and publishing goes on through the whole restart
            # and for a few batches after it: the fault hits the stream, not its end.
            while published < total or restart is None or not restart.done() or after < 5:
                messages = [unibus.Message(str(i).encode())
                            for i in range(published, published + batch)]
                published += len(messages)
                try:
                    await pub_bus.publish_many(topic, messages)
                except PublishFailed as exc:
                    # Not confirmed: allowed to be lost; counted as published only.
                    print(f"publish_many failed: {exc}")
                else:
                    confirmed.update(m.id for m in messages)
                if restart is None and len(confirmed) >= total // 3:
                    restart_at = loop.time()
                    restart = loop.run_in_executor(None, nats_broker.restart)
                elif restart is not None and restart.done():
                    after += 1
                else:
                    during[0] += len(messages)
            if restart is not None:
                await restart
            producer_done.set()

        async def consume() -> None:
            async with sub_bus.subscribe(topic, group=group, prefetch=256) as sub:
                while not (producer_done.is_set() and confirmed <= received.keys()):
                    deliveries = await sub.fetch(256, timeout=timings.recovery)
                    if not deliveries and producer_done.is_set():
                        return
                    if deliveries:
                        arrivals.append(loop.time())
                    for delivery in deliveries:
                        received[delivery.id] += 1
                        await delivery.ack()

        await asyncio.wait_for(asyncio.gather(produce(), consume()),
                               timeout=60 + 2 * timings.recovery)

    lost = len(confirmed - received.keys())
    # Recovery: the longest silence of the consumer while the restart happened.
    recovery = longest_gap([t for t in arrivals if restart_at is not None
                            and t >= restart_at - 1]) if arrivals else None
    record_property("figures", fault_figures(
        "nats G1 server restarted", published=published, confirmed=len(confirmed),
        received=received, lost=lost, recovery=recovery).line)
    print(f"G1: {during[0]} message(s) published while the server restarted")
    assert restart_at is not None, "the server was never restarted"
    assert during[0] > 0, "nothing was published during the restart"
    assert lost == 0


async def test_g2_server_paused_then_resumed_loses_no_confirmed_message(
        nats_broker: Any, record_property: Any) -> None:
    url = f"{nats_broker.url}?ack_wait=2&heartbeat=0.5&publish_timeout=2&retry_for=60"
    topic, group = f"g2.{uuid.uuid4().hex}", "g2"
    total, batch, pause_for = 2000, 50, 5.0
    confirmed: set[str] = set()
    published = 0
    received: Counter[str] = Counter()
    arrivals: list[float] = []
    paused_at: float | None = None
    during = [0]      # messages published while the server was paused
    loop = asyncio.get_running_loop()
    producer_done = asyncio.Event()

    async with unibus.connect(url) as pub_bus, unibus.connect(url) as sub_bus:
        await pub_bus.declare_group(topic, group)
        timings = pub_bus.capabilities.timings

        async def freeze() -> None:
            await loop.run_in_executor(None, nats_broker.pause)
            try:
                await asyncio.sleep(pause_for)    # the fault's duration, not a barrier
            finally:
                await loop.run_in_executor(None, nats_broker.unpause)

        async def produce() -> None:
            nonlocal published, paused_at
            frozen: asyncio.Task[None] | None = None
            after = 0
            while published < total or frozen is None or not frozen.done() or after < 5:
                messages = [unibus.Message(str(i).encode())
                            for i in range(published, published + batch)]
                published += len(messages)
                try:
                    await pub_bus.publish_many(topic, messages)
                except PublishFailed as exc:
                    print(f"publish_many failed: {exc}")
                else:
                    confirmed.update(m.id for m in messages)
                if frozen is None and len(confirmed) >= total // 3:
                    paused_at = loop.time()
                    frozen = asyncio.create_task(freeze())
                elif frozen is not None and frozen.done():
                    after += 1
                else:
                    during[0] += len(messages)
            if frozen is not None:
                await frozen
            producer_done.set()

        async def consume() -> None:
            async with sub_bus.subscribe(topic, group=group, prefetch=256) as sub:
                while not (producer_done.is_set() and confirmed <= received.keys()):
                    deliveries = await sub.fetch(256, timeout=timings.recovery)
                    if not deliveries and producer_done.is_set():
                        return
                    if deliveries:
                        arrivals.append(loop.time())
                    for delivery in deliveries:
                        received[delivery.id] += 1
                        await delivery.ack()

        await asyncio.wait_for(asyncio.gather(produce(), consume()),
                               timeout=60 + 2 * timings.recovery)

    lost = len(confirmed - received.keys())
    recovery = longest_gap([t for t in arrivals if paused_at is not None
                            and t >= paused_at - 1]) - pause_for if arrivals else None
    record_property("figures", fault_figures(
        "nats G2 server paused", published=published, confirmed=len(confirmed),
        received=received, lost=lost, recovery=recovery).line)
    print(f"G2: {during[0]} message(s) published while the server was paused")
    assert paused_at is not None, "the server was never paused"
    assert during[0] > 0, "nothing was published during the pause"
    assert lost == 0
    assert recovery is not None
    assert recovery <= timings.recovery


async def test_g3_consumer_sigkilled_mid_batch_gets_every_unacked_message_redelivered(
        nats_broker: Any, record_property: Any) -> None:
    url = f"{nats_broker.url}?ack_wait=2&heartbeat=0.5"
    topic, group = f"g3.{uuid.uuid4().hex}", "g3"
    total, prefetch, acks = 200, 50, 20
    async with unibus.connect(url) as bus:
        timings = bus.capabilities.timings
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [str(i).encode() for i in range(total)])
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), url, topic, group, str(prefetch), str(acks),
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert child.stdout is not None
            line = (await asyncio.wait_for(child.stdout.readline(), 30)).decode().strip()
            assert line.startswith("HOLDING "), line
            acked_part, _, held_part = line.removeprefix("HOLDING ").partition(" | ")
            acked, held = set(acked_part.split(",")), set(held_part.split(","))
            assert len(acked) == acks
            assert len(held) == prefetch
            child.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()

        received: Counter[str] = Counter()
        last_held_at: float | None = None
        async with bus.subscribe(topic, group=group, prefetch=64) as sub:
            deadline = time.monotonic() + timings.redelivery + timings.delivery + 10
            while time.monotonic() < deadline and len(received) < total - acks:
                for delivery in await sub.fetch(64, timeout=1):
                    received[delivery.id] += 1
                    if delivery.id in held and held <= received.keys() and last_held_at is None:
                        last_held_at = time.monotonic()
                    await delivery.ack()

    everyone = acked | received.keys()
    lost = len({m.id for m in sent} - everyone)
    redelivered_twice = len(acked & received.keys())
    recovery = None if last_held_at is None else last_held_at - killed_at
    record_property("figures", fault_figures(
        "nats G3 consumer SIGKILL", published=total, confirmed=total,
        received=received, lost=lost, recovery=recovery).line)
    assert held <= received.keys(), "a message held by the killed consumer never came back"
    assert redelivered_twice == 0, "a message the killed consumer acked came back"
    assert lost == 0
