"""Fault scenarios on a real Kafka broker: G1 (broker restart) and G3 (consumer SIGKILL),
and a publish that a paused broker never confirms (it must fail, not claim success).

Each prints its figures — published, confirmed, received unique, duplicates, lost,
recovery seconds — and asserts that no confirmed message is lost.
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
from pathlib import Path
from typing import Any

import pytest

import unibus
from unibus.errors import BrokerError, DeliveryLost
from unibus_contract.faults import fault_figures

pytestmark = [pytest.mark.fault, pytest.mark.broker]

CHILD = Path(__file__).with_name("g3_consumer.py")



async def test_g1_broker_restart_mid_stream_loses_no_confirmed_message(
        kafka_broker: Any, kafka_url: str) -> None:
    topic, group = f"g1-{uuid.uuid4().hex[:12]}", f"g1-{uuid.uuid4().hex[:12]}"
    total, batch = 20_000, 250
    url = f"{kafka_url}&publish_timeout=90"
    received: Counter[str] = Counter()
    confirmed: set[str] = set()
    published = 0
    marks: dict[str, float] = {}
    publishing_done = asyncio.Event()
    quarter = asyncio.Event()
    retries: Counter[str] = Counter()

    async with unibus.connect(url) as pub_bus, unibus.connect(url) as sub_bus:
        await pub_bus.declare_group(topic, group)

        async def publisher() -> None:
            nonlocal published
            sent = after = 0
            # Mid-stream: keep publishing until the restart is over and some batches
            # went through the restarted broker.
            while sent < total or after < 10:
                messages = [unibus.Message(f"{sent + i}".encode() * 8) for i in range(batch)]
                published += len(messages)
                while True:   # a publisher retries what was not confirmed
                    try:
                        await pub_bus.publish_many(topic, messages)
                        break
                    except BrokerError as exc:
                        retries[f"{type(exc).__name__}: {exc}"[:160]] += 1
                        await asyncio.sleep(0.5)
                confirmed.update(m.id for m in messages)
                if len(confirmed) >= total // 4:
                    quarter.set()
                if "restart_done" in marks:
                    after += 1
                    marks.setdefault("published_after", time.monotonic())
                sent += batch
                await asyncio.sleep(0.01)
            publishing_done.set()

        async def consumer() -> None:
            async with sub_bus.subscribe(topic, group=group, prefetch=1000) as sub:
                while not (publishing_done.is_set() and confirmed <= set(received)):
                    for delivery in await sub.fetch(timeout=0.5):
                        if "restart_done" in marks and "received_after" not in marks:
                            marks["received_after"] = time.monotonic()
                        received[delivery.id] += 1
                        # Revoked during the outage: the group redelivers it.
                        with contextlib.suppress(DeliveryLost):
                            await delivery.ack()

        async def fault() -> None:
            await quarter.wait()
            marks["restart"] = time.monotonic()
            await asyncio.to_thread(kafka_broker.restart)
            marks["restart_done"] = time.monotonic()

        recovery_bound = pub_bus.capabilities.timings.recovery
        await asyncio.wait_for(asyncio.gather(publisher(), consumer(), fault()),
                               timeout=recovery_bound + 120)

    recovery = max(marks.get("published_after", float("inf")),
                   marks.get("received_after", float("inf"))) - marks["restart"]
    lost = fault_figures("kafka G1 broker restarted", published=published,
                         confirmed=confirmed,
                   received=received, recovery=recovery,
                   extra=f"broker_restart_s={marks['restart_done'] - marks['restart']:.2f} "
                         f"publish_retries={sum(retries.values())}").lost
    for reason, count in retries.items():
        print(f"  retried {count}x after {reason}")
    assert lost == 0
    assert recovery <= (marks["restart_done"] - marks["restart"]) + recovery_bound


async def test_g3_consumer_sigkilled_mid_batch_loses_nothing(kafka_url: str,
                                                             tmp_path: Path) -> None:
    topic, group = f"g3-{uuid.uuid4().hex[:12]}", f"g3-{uuid.uuid4().hex[:12]}"
    total = 20_000
    log = tmp_path / "child.log"
    async with unibus.connect(kafka_url) as bus:
        await bus.declare_group(topic, group)
        sent = await bus.publish_many(topic, [unibus.Message(f"m{i}".encode() * 32,
                                                             key=f"k{i % 50}")
                                              for i in range(total)])
        confirmed = {m.id for m in sent}
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), kafka_url, topic, group, str(log),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            acked = 0
            while acked < total // 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if log.exists():
                    acked = log.read_text().count("\nA ")
            assert acked >= total // 3, "the child consumer made no progress"
            os.kill(child.pid, signal.SIGKILL)
            killed = time.monotonic()
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
        lines = log.read_text().splitlines()
        child_received = {line[2:] for line in lines if line.startswith("R ")}
        child_acked = {line[2:] for line in lines if line.startswith("A ")}
        unsettled_at_kill = child_received - child_acked

        received: Counter[str] = Counter(child_acked)
        first_after: float | None = None
        redelivery = bus.capabilities.timings.redelivery
        async with bus.subscribe(topic, group=group, prefetch=1000) as sub:
            deadline = time.monotonic() + redelivery + 60
            while not confirmed <= set(received) and time.monotonic() < deadline:
                for delivery in await sub.fetch(timeout=0.5):
                    first_after = first_after or time.monotonic()
                    received[delivery.id] += 1
                    await delivery.ack()
    lost = fault_figures("kafka G3 consumer SIGKILL", published=total, confirmed=confirmed,
                   received=received,
                   recovery=(first_after or float("inf")) - killed,
                   extra=f"child_acked={len(child_acked)} "
                         f"unsettled_at_kill={len(unsettled_at_kill)} "
                         f"unsettled_redelivered={len(unsettled_at_kill & set(received))}").lost
    assert lost == 0
    assert unsettled_at_kill <= set(received)


async def test_a_publish_the_paused_broker_never_confirms_fails_and_claims_nothing(
        kafka_broker: Any, kafka_url: str) -> None:
    # G1's publisher outlives the restart, so librdkafka delivers whatever it queued:
    # a publish that returned before its reports would pass it. This one gives up.
    topic = f"unconfirmed-{uuid.uuid4().hex[:12]}"
    async with unibus.connect(f"{kafka_url}&publish_timeout=3") as bus:
        await bus.publish(topic, b"the topic exists")
        await asyncio.to_thread(kafka_broker.pause)
        try:
            with pytest.raises(BrokerError) as refused:
                await bus.publish_many(topic, [b"never confirmed"] * 100)
        finally:
            await asyncio.to_thread(kafka_broker.unpause)
    assert len(getattr(refused.value, "message_ids", ())) == 100

