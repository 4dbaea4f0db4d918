"""Throughput of unibus on RabbitMQ against raw aio-pika, same guarantees, one process.

Run::

    uv run python benchmarks/bench_rabbitmq.py --url amqp://guest:guest@127.0.0.1:PORT/
    uv run python benchmarks/bench_rabbitmq.py          # starts its own broker container

Without ``--url`` it starts a RabbitMQ container through
``unibus_contract.provision`` (set ``UNIBUS_IMAGE_RABBITMQ=unibus-local/rabbitmq:4.0``
where no registry is reachable) and removes it at the end.

Both sides get the same guarantees: a durable quorum queue bound to a durable
topic exchange, persistent messages, the mandatory flag, publisher confirms with
a sliding window of ``--window`` unconfirmed publishes, consumers with
``basic.qos(--prefetch)`` and a manual ack per message. Bodies are ``--body-size``
random bytes. Phases, for raw aio-pika and unibus (who goes first alternates),
``--rounds`` times (best round reported):

1. publish: N messages into a queue that retains them (raw: ``Exchange.publish``
   tasks in a window; unibus: ``publish_many`` in batches of ``--batch``);
2. consume: the N retained messages drained and acked (raw: ``Queue.consume`` with
   a callback that acks; unibus: ``Subscription.fetch`` + ``Delivery.ack``);
3. end to end: a publisher and a consumer running together, from the first
   publish to the last ack.

Prints, for each side, msgs/s by the wall clock and per second of this process's CPU
time (the client's own cost, which on a busy machine or a slow disk the wall clock
hides behind the broker), and the ratios unibus / raw.
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
from functools import partial

import aio_pika

import unibus

Phase = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Config:
    url: str
    messages: int
    body_size: int
    window: int
    prefetch: int
    batch: int
    rounds: int


class Raw:
    """The same work with aio-pika alone."""

    def __init__(self, cfg: Config, conn: aio_pika.abc.AbstractConnection) -> None:
        self.cfg = cfg
        self.conn = conn
        self.exchange_name = f"bench-raw-{uuid.uuid4().hex[:8]}"

    async def setup(self, topic: str) -> str:
        channel = await self.conn.channel()
        exchange = await channel.declare_exchange(self.exchange_name, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(f"{topic}:raw", durable=True, arguments={
            "x-queue-type": "quorum", "x-delivery-limit": -1})
        await queue.bind(exchange, routing_key=topic)
        await channel.close()
        return queue.name

    async def publish(self, topic: str, bodies: list[bytes]) -> None:
        channel = await self.conn.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.exchange_name)
        window = asyncio.Semaphore(self.cfg.window)
        tasks = []

        async def one(body: bytes) -> None:
            try:
                await exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                     message_id=uuid.uuid4().hex),
                    routing_key=topic, mandatory=True)
            finally:
                window.release()

        for body in bodies:
            await window.acquire()
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        await channel.close()

    async def consume(self, queue_name: str, count: int) -> None:
        channel = await self.conn.channel()
        await channel.set_qos(prefetch_count=self.cfg.prefetch)
        queue = await channel.get_queue(queue_name)
        done = asyncio.Event()
        seen = 0

        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen >= count:
                done.set()

        tag = await queue.consume(handle)
        await done.wait()
        await queue.cancel(tag)
        await channel.close()


class Unibus:
    """The same work through unibus."""

    def __init__(self, cfg: Config, bus: unibus.Bus) -> None:
        self.cfg = cfg
        self.bus = bus

    async def setup(self, topic: str) -> str:
        await self.bus.declare_group(topic, "bench")
        return topic

    async def publish(self, topic: str, bodies: list[bytes]) -> None:
        batch = self.cfg.batch
        for i in range(0, len(bodies), batch):
            await self.bus.publish_many(topic, bodies[i:i + batch])

    async def consume(self, topic: str, count: int) -> None:
        seen = 0
        async with self.bus.subscribe(topic, group="bench", prefetch=self.cfg.prefetch) as sub:
            while seen < count:
                for delivery in await sub.fetch():
                    await delivery.ack()
                    seen += 1


async def timed(phase: Phase, count: int) -> tuple[float, float]:
    """Run ``phase``; return msgs/s by the wall clock and per second of this process's CPU."""
    start, cpu = time.perf_counter(), time.process_time()
    await phase()
    return (count / (time.perf_counter() - start),
            count / max(time.process_time() - cpu, 1e-9))


async def run(cfg: Config) -> None:
    bodies = [os.urandom(cfg.body_size) for _ in range(cfg.messages)]
    n = cfg.messages
    conn = await aio_pika.connect(cfg.url)
    raw = Raw(cfg, conn)
    best: dict[tuple[str, str], tuple[float, float]] = {}
    async with unibus.connect(cfg.url) as bus:
        uni = Unibus(cfg, bus)
        sides: list[tuple[str, Raw | Unibus]] = [("raw aio-pika", raw), ("unibus", uni)]
        for round_no in range(1, cfg.rounds + 1):
            # Alternate who goes first, so that neither always meets a warmer broker.
            for name, side in sides if round_no % 2 else sides[::-1]:
                topic = f"bench-{uuid.uuid4().hex[:8]}"
                queue = await side.setup(topic)
                rates = {
                    "publish": await timed(partial(side.publish, topic, bodies), n),
                    "consume": await timed(partial(side.consume, queue, n), n),
                }
                topic = f"bench-{uuid.uuid4().hex[:8]}"
                queue = await side.setup(topic)

                async def both(s: Raw | Unibus = side, t: str = topic, q: str = queue) -> None:
                    await asyncio.gather(s.publish(t, bodies), s.consume(q, n))

                rates["end to end"] = await timed(both, n)
                for phase, (wall, cpu) in rates.items():
                    old = best.get((name, phase), (0.0, 0.0))
                    best[(name, phase)] = (max(old[0], wall), max(old[1], cpu))
                    print(f"round {round_no} {name:<13} {phase:<11} {wall:>10,.0f} msgs/s wall "
                          f"{cpu:>10,.0f} msgs/s client CPU", flush=True)
    await conn.close()
    print(f"\n{n:,} messages of {cfg.body_size} bytes, window {cfg.window}, prefetch "
          f"{cfg.prefetch}, best of {cfg.rounds} round(s):")
    for phase in ("publish", "consume", "end to end"):
        (rw, rc), (uw, uc) = best[("raw aio-pika", phase)], best[("unibus", phase)]
        print(f"  {phase:<11} wall: raw {rw:>9,.0f}  unibus {uw:>9,.0f} msgs/s  ratio "
              f"{uw / rw:.2f}x | client CPU: raw {rc:>9,.0f}  unibus {uc:>9,.0f} msgs/s  "
              f"ratio {uc / rc:.2f}x")


@contextlib.contextmanager
def broker(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from unibus_contract.provision import RABBITMQ, engine_info, launch, network_mode

    with launch(RABBITMQ, mode=network_mode(has_bridge=engine_info().has_bridge)) as started:
        yield started.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="the broker (default: start a container)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--body-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with broker(args.url) as url:
        asyncio.run(run(Config(url, args.messages, args.body_size, args.window, args.prefetch,
                               args.batch, args.rounds)))


if __name__ == "__main__":
    main()
