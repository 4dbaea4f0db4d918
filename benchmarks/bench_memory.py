"""Throughput of the memory broker: ``publish_many``, and end to end through ``unibus.App``.

Run::

    uv run python benchmarks/bench_memory.py [--messages N] [--body-size B] [--concurrency C]

It measures, on one ``memory://`` broker in this process, each phase twice: with
bodies (``bytes``, so ``publish_many`` builds each :class:`unibus.Message`: id,
timestamp, validation) and with messages built before the clock starts (the
broker and scheduler alone):

1. ``publish_many``: N messages of B bytes, in batches, into a topic with one group.
2. drain: the N messages of (1) consumed by an App handler that returns at once, so
   every message is acked — the consumer side alone.
3. end to end: a producer publishing N messages in batches, keeping at most WINDOW
   in flight, while the App consumes and acks them — from the first publish to the
   last ack.

Each figure is messages per second by the wall clock and by this process's CPU
time (on a busy machine the second is what one free core would give); see
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence

import unibus

BATCH = 1000
WINDOW = 10_000
GROUP = "bench"


class Clock:
    """Wall-clock and process CPU time of one measured phase."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def rate(self, count: int) -> str:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        return (f"{count / wall:>10,.0f} msgs/s wall {count / cpu:>10,.0f} msgs/s CPU "
                f"({count:,} in {wall:.3f} s)")


async def bench_publish(bus: unibus.Bus, topic: str,
                        items: Sequence[bytes] | Sequence[unibus.Message]) -> str:
    """Publish ``items`` in batches into ``topic``, whose group retains them."""
    await bus.declare_group(topic, GROUP)
    clock = Clock()
    for i in range(0, len(items), BATCH):
        await bus.publish_many(topic, items[i:i + BATCH])
    return clock.rate(len(items))


class Progress:
    """What the handler saw: a count, an event per BATCH and one at the end."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.batch = asyncio.Event()
        self.done = asyncio.Event()


def counting_app(bus: unibus.Bus, topic: str, count: int, concurrency: int,
                 prefetch: int | None) -> tuple[unibus.App, Progress]:
    """An App whose handler only counts."""
    app = unibus.App(bus)
    progress = Progress(count)

    @app.handler(topic, group=GROUP, concurrency=concurrency, prefetch=prefetch)
    async def handle(delivery: unibus.Delivery) -> None:
        progress.seen += 1
        if progress.seen % BATCH == 0:
            progress.batch.set()
        if progress.seen == count:
            progress.done.set()

    return app, progress


async def bench_drain(bus: unibus.Bus, topic: str, count: int, concurrency: int,
                      prefetch: int | None) -> str:
    """Consume the backlog of ``topic`` through an App."""
    app, progress = counting_app(bus, topic, count, concurrency, prefetch)
    clock = Clock()
    async with app:
        await progress.done.wait()
        rate = clock.rate(count)
    assert app.stats.acked == count, app.stats
    return rate


async def bench_end_to_end(bus: unibus.Bus, topic: str,
                           items: Sequence[bytes] | Sequence[unibus.Message],
                           concurrency: int, prefetch: int | None) -> str:
    """Publish while an App consumes; from the first publish to the last ack."""
    await bus.declare_group(topic, GROUP)
    count = len(items)
    app, progress = counting_app(bus, topic, count, concurrency, prefetch)
    async with app:
        clock = Clock()
        for i in range(0, count, BATCH):
            await bus.publish_many(topic, items[i:i + BATCH])
            # Flow control, as a producer that waits for its consumers would; without
            # it an in-process producer never yields and only piles up a backlog.
            while i + BATCH - progress.seen > WINDOW:
                progress.batch.clear()
                await progress.batch.wait()
        await progress.done.wait()
        rate = clock.rate(count)
    assert app.stats.acked == count, app.stats
    return rate


async def main(messages: int, body_size: int, concurrency: int, prefetch: int | None,
               dedup_window: float | None) -> None:
    query = "" if dedup_window is None else f"?dedup_window={dedup_window}"
    url = f"memory://bench-{uuid.uuid4().hex[:8]}{query}"
    bodies = [bytes([i % 256]) * body_size for i in range(messages)]
    print(f"memory broker, {messages:,} messages of {body_size} bytes, App concurrency "
          f"{concurrency}, prefetch {prefetch or 'default'}, dedup_window "
          f"{'default' if dedup_window is None else dedup_window}")
    async with unibus.connect(url) as bus:
        for label, build in (("bodies", False), ("pre-built messages", True)):
            print(f"-- {label}")
            # Fresh objects per phase: the broker deduplicates ids per topic.
            items = [unibus.Message(b) for b in bodies] if build else bodies
            rate = await bench_publish(bus, f"bench.publish.{build}", items)
            print(f"publish_many (batches of {BATCH}):  {rate}")
            rate = await bench_drain(bus, f"bench.publish.{build}", messages, concurrency,
                                     prefetch)
            print(f"App drain of the backlog, ack:     {rate}")
            items = [unibus.Message(b) for b in bodies] if build else bodies
            rate = await bench_end_to_end(bus, f"bench.e2e.{build}", items, concurrency,
                                          prefetch)
            print(f"end to end (publish → App → ack):  {rate}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run")
    parser.add_argument("--body-size", type=int, default=256, help="body size in bytes")
    parser.add_argument("--concurrency", type=int, default=1, help="App handler concurrency")
    parser.add_argument("--prefetch", type=int, default=None, help="App handler prefetch")
    parser.add_argument("--dedup-window", type=float, default=None,
                        help="memory:// dedup_window option (seconds; 0 turns dedup off)")
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.body_size, args.concurrency, args.prefetch,
                     args.dedup_window))


if __name__ == "__main__":
    cli()
