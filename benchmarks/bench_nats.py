"""Throughput of unibus on NATS (JetStream and core) against raw nats-py, one process.

Run::

    uv run python benchmarks/bench_nats.py --url nats://127.0.0.1:PORT
    uv run python benchmarks/bench_nats.py          # starts its own server container

Without ``--url`` it starts a NATS container through ``unibus_contract.provision``
(set ``UNIBUS_IMAGE_NATS=unibus-local/nats:2.15.1`` where no registry is reachable)
and removes it at the end.

Same guarantees on both sides, ``--body-size`` random bytes per message:

- JetStream publish: a file stream, every message with a ``Nats-Msg-Id``, at most
  ``--window`` PubAcks outstanding, done when every PubAck came back (raw:
  ``JetStreamContext.publish_async`` + ``publish_async_completed``; unibus:
  ``publish_many`` in batches of ``--batch``).
- JetStream consume: the retained messages drained from a durable pull consumer
  with explicit acks, ``--prefetch`` per pull (raw: ``pull_subscribe`` +
  ``fetch(prefetch)`` + ``Msg.ack``; unibus: ``Subscription.fetch`` + ``Delivery.ack``).
- Core publish / subscribe: fire-and-forget publishes then one flush, with a
  subscriber attached; publish rate until the flush, subscribe rate until the
  last message arrived (raw: ``Client.publish`` + a subscription callback;
  unibus: ``publish_many`` on ``nats+core://`` + ``Subscription.fetch``). Raw core
  runs twice: bare bodies, and ``+hdr`` with an id and a timestamp header per
  message — the metadata a unibus message always carries.

Each phase runs for raw then unibus, ``--rounds`` times; the best round of each is
reported with the ratio unibus / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

import unibus


@dataclass(frozen=True)
class Config:
    url: str
    messages: int
    body_size: int
    window: int
    prefetch: int
    batch: int
    rounds: int


def _bodies(config: Config) -> list[bytes]:
    return [os.urandom(config.body_size) for _ in range(config.messages)]


async def raw_js_publish(config: Config, bodies: list[bytes]) -> tuple[float, str, str]:
    """Windowed JetStream publish with nats-py alone; returns (seconds, stream, subject)."""
    nc = await nats.connect(config.url)
    try:
        js = nc.jetstream(publish_async_max_pending=config.window)
        name = f"raw-{uuid.uuid4().hex[:12]}"
        subject = f"raw.{name}"
        await js.add_stream(StreamConfig(name=name, subjects=[subject], duplicate_window=120))
        ids = [uuid.uuid4().hex for _ in bodies]
        started = time.perf_counter()
        for body, msg_id in zip(bodies, ids, strict=True):
            await js.publish_async(subject, body, headers={"Nats-Msg-Id": msg_id})
        await js.publish_async_completed()
        return time.perf_counter() - started, name, subject
    finally:
        await nc.close()


async def raw_js_consume(config: Config, stream: str, subject: str) -> float:
    """Drain the stream through a durable pull consumer, acking each message."""
    nc = await nats.connect(config.url)
    try:
        js = nc.jetstream()
        await js.add_consumer(stream, ConsumerConfig(
            durable_name="bench", deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, max_ack_pending=8 * config.prefetch,
            filter_subject=subject))
        sub = await js.pull_subscribe_bind(durable="bench", stream=stream)
        received = 0
        started = time.perf_counter()
        while received < config.messages:
            for msg in await sub.fetch(config.prefetch, timeout=5):
                msg.data  # noqa: B018 - read the body, as the unibus side does
                await msg.ack()
                received += 1
        return time.perf_counter() - started
    finally:
        await nc.close()


async def unibus_js_publish(config: Config, bodies: list[bytes]) -> tuple[float, str]:
    """The same publish through unibus; returns (seconds, topic)."""
    url = f"{config.url}?publish_window={config.window}"
    async with unibus.connect(url) as bus:
        topic = f"bench.{uuid.uuid4().hex[:12]}"
        await bus.declare_group(topic, "bench")
        # Each Message (its id and timestamp) is built inside the timed region; the
        # raw side's ids are made before its clock starts.
        started = time.perf_counter()
        for i in range(0, len(bodies), config.batch):
            await bus.publish_many(topic, bodies[i:i + config.batch])
        return time.perf_counter() - started, topic


async def unibus_js_consume(config: Config, topic: str) -> float:
    async with unibus.connect(config.url) as bus, \
            bus.subscribe(topic, group="bench", prefetch=config.prefetch) as sub:
        received = 0
        started = time.perf_counter()
        while received < config.messages:
            for delivery in await sub.fetch(config.prefetch, timeout=5):
                delivery.body  # noqa: B018 - read the body, as the raw side does
                await delivery.ack()
                received += 1
        return time.perf_counter() - started


async def raw_core(config: Config, bodies: list[bytes],
                   with_headers: bool = False) -> tuple[float, float]:
    """Core publish with a subscriber attached; returns (publish s, subscribe s).

    ``with_headers``: each message also carries an id and a timestamp header, the
    metadata every unibus message carries (the bare variant carries none).
    """
    nc = await nats.connect(config.url)
    try:
        subject = f"raw.core.{uuid.uuid4().hex[:12]}"
        done = asyncio.Event()
        count = 0

        async def on_msg(msg: Msg) -> None:
            nonlocal count
            msg.data  # noqa: B018 - read the body, as the unibus side does
            count += 1
            if count >= config.messages:
                done.set()

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        headers: list[dict[str, str] | None] = [
            {"Nats-Msg-Id": uuid.uuid4().hex, "Unibus-Ts": str(time.time_ns() // 1000)}
            if with_headers else None for _ in bodies]
        started = time.perf_counter()
        for body, header in zip(bodies, headers, strict=True):
            await nc.publish(subject, body, headers=header)
        await nc.flush()
        published = time.perf_counter() - started
        await asyncio.wait_for(done.wait(), 60)
        return published, time.perf_counter() - started
    finally:
        await nc.close()


async def unibus_core(config: Config, bodies: list[bytes]) -> tuple[float, float]:
    url = config.url.replace("nats://", "nats+core://", 1) + f"?buffer={config.messages}"
    async with unibus.connect(url) as bus:
        topic = f"bench.core.{uuid.uuid4().hex[:12]}"
        sub = await bus.subscribe(topic, prefetch=config.prefetch).open()
        done = asyncio.Event()

        async def drain() -> None:
            received = 0
            while received < config.messages:
                for delivery in await sub.fetch(config.prefetch, timeout=10):
                    delivery.body  # noqa: B018 - read the body, as the raw side does
                    await delivery.ack()
                    received += 1
            done.set()

        draining = asyncio.create_task(drain())
        started = time.perf_counter()
        await bus.publish_many(topic, bodies)   # each Message built inside the timed region
        published = time.perf_counter() - started
        await asyncio.wait_for(draining, 60)
        return published, time.perf_counter() - started


@dataclass
class Best:
    raw: float = float("inf")
    unibus: float = float("inf")


async def run(config: Config) -> dict[str, Best]:
    bodies = _bodies(config)
    best = {name: Best() for name in ("jetstream publish", "jetstream consume",
                                      "core publish", "core subscribe",
                                      "core publish +hdr", "core subscribe +hdr")}

    def keep(name: str, side: str, seconds: float) -> None:
        entry = best[name]
        setattr(entry, side, min(getattr(entry, side), seconds))

    for _ in range(config.rounds):
        seconds, stream, subject = await raw_js_publish(config, bodies)
        keep("jetstream publish", "raw", seconds)
        keep("jetstream consume", "raw", await raw_js_consume(config, stream, subject))
        seconds, topic = await unibus_js_publish(config, bodies)
        keep("jetstream publish", "unibus", seconds)
        keep("jetstream consume", "unibus", await unibus_js_consume(config, topic))
        published, subscribed = await raw_core(config, bodies)
        keep("core publish", "raw", published)
        keep("core subscribe", "raw", subscribed)
        published, subscribed = await raw_core(config, bodies, with_headers=True)
        keep("core publish +hdr", "raw", published)
        keep("core subscribe +hdr", "raw", subscribed)
        published, subscribed = await unibus_core(config, bodies)
        for suffix in ("", " +hdr"):
            keep(f"core publish{suffix}", "unibus", published)
            keep(f"core subscribe{suffix}", "unibus", subscribed)
    return best


def report(config: Config, best: dict[str, Best]) -> None:
    print(f"NATS {config.url}: {config.messages} messages of {config.body_size} bytes, "
          f"window {config.window}, prefetch {config.prefetch}, best of {config.rounds}")
    print(f"{'phase':<20}{'raw msg/s':>12}{'unibus msg/s':>14}{'ratio':>8}")
    for name, entry in best.items():
        raw = config.messages / entry.raw
        uni = config.messages / entry.unibus
        print(f"{name:<20}{raw:>12,.0f}{uni:>14,.0f}{uni / raw:>8.2f}")


@contextlib.contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from unibus_contract.provision import NATS, engine_info, launch, network_mode

    with launch(NATS, mode=network_mode(has_bridge=engine_info().has_bridge)) as broker:
        yield str(broker.url)


def main(argv: list[str] | None = None, runner: Callable[[Awaitable[None]], None] | None = None,
         ) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="nats://HOST:PORT (default: start a container)")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--body-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with _server(args.url) as url:
        config = Config(url=url, messages=args.messages, body_size=args.body_size,
                        window=args.window, prefetch=args.prefetch, batch=args.batch,
                        rounds=args.rounds)
        best = asyncio.run(run(config))
        report(config, best)


if __name__ == "__main__":
    main()
