"""Throughput of unibus on Kafka against raw confluent-kafka, same guarantees, one process.

Run::

    uv run python benchmarks/bench_kafka.py --url kafka://127.0.0.1:PORT
    uv run python benchmarks/bench_kafka.py          # starts its own broker container

Without ``--url`` it starts a Kafka container through ``unibus_contract.provision``
(set ``UNIBUS_IMAGE_KAFKA=unibus-local/kafka:4.1.1`` where no registry is reachable)
and removes it at the end.

Both sides get the same guarantees: an idempotent producer with ``acks=all`` whose
every delivery report is checked; a consumer group with manual offset commits
(no auto-commit, offsets committed only for processed messages). Topics have
``--partitions`` partitions; bodies are ``--body-size`` random bytes. Phases, raw
confluent-kafka first, then unibus, in one run:

1. publish: N messages, every delivery report awaited (raw: ``produce`` with a
   delivery callback, then ``flush``; unibus: ``publish_many`` of bodies in batches
   of ``--batch``, ``--window`` batches in flight); then again with the
   ``Message`` objects built before the clock starts (the adapter's own cost);
2. consume: the N retained messages read by a new group and acked/committed (raw:
   ``consume`` batches of 500 on a thread, commit of the last offsets every 0.2 s and
   at the end; unibus: ``Subscription.fetch`` of ``--fetch`` (250) + ``Delivery.ack``),
   each side reading every body, from subscribing to the last commit (unibus's group
   is declared before the clock starts, as applications declare theirs: that creates
   its retry lane, a topic raw has no use for). A batch of 250 deliveries keeps as
   many tracked objects alive as raw's 500 records (a delivery and its record each),
   under the garbage collector's threshold of 700; the row ``consume, 2,000 a
   fetch`` takes the whole prefetch at once instead, which wakes the collector;
3. raw again with the header every unibus record carries (timestamp and id, the
   values made before its clock starts), published and consumed (the value read,
   not the header, as the unibus side reads only bodies): the ``vs raw +hdr`` rows
   compare unibus with that;
4. end to end: a publisher and a consumer running together, from the first
   publish to the last ack; the consumer has its partitions before the clock starts
   (unibus's ``subscribe`` returns then; raw waits for ``on_assign``); then raw end
   to end with the header (``end to end, vs raw +hdr``).

The last three rows, ``raw +hdr, vs raw``, put raw with the header in the unibus
column: what the header alone costs confluent-kafka, so the most any client that
carries unibus's id and timestamp on this driver can reach against bare raw.

Prints msgs/s for each side and the ratio unibus / raw, and the CPU time the process
spent per message on each side (all its threads: Python's and librdkafka's) with
its ratio raw / unibus. Throughput is the goal's measure; the CPU figures say the
same without the machine's noise (another tenant's steal time, the broker's
pauses), which moves throughput by a third from one round to the next but leaves
the CPU a message costs nearly alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

import unibus
from unibus.url import make_url
from unibus_kafka._codec import META_HEADER, meta
from unibus_kafka._url import parse_settings


@dataclass(frozen=True)
class Config:
    url: str
    messages: int
    body_size: int
    partitions: int
    batch: int
    window: int
    prefetch: int
    fetch: int


def fresh(label: str) -> str:
    return f"bench-{label}-{uuid.uuid4().hex[:10]}"


class Raw:
    """The same work with confluent-kafka alone (its blocking API, as users write it)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        settings = parse_settings(make_url(config.url))
        self.bootstrap = settings.bootstrap

    def producer(self) -> Any:
        return Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5,
                         "queue.buffering.max.messages": 200_000})

    def warm_producer(self, warmup_topic: str) -> Any:
        """A producer that has its connection and idempotence id, as unibus's has."""
        producer = self.producer()
        producer.produce(warmup_topic, b"warm-up")
        producer.flush()
        return producer

    def publish(self, producer: Any, topic: str, body: bytes,
                metas: list[bytes] | None = None,
                more: Sequence[tuple[str, bytes]] = ()) -> None:
        """Produce N records of ``body``; with ``metas``, record i carries the header
        unibus records carry, valued ``metas[i]``, then the headers ``more``. Each
        record's list is made as it is produced, as unibus makes it: N lists made
        before would be live objects that every garbage collection walks."""
        failed: list[Any] = []

        def report(error: Any, _record: Any) -> None:
            if error is not None:
                failed.append(error)

        for i in range(self.config.messages):
            while True:
                try:
                    producer.produce(topic, body, on_delivery=report,
                                     headers=None if metas is None
                                     else [(META_HEADER, metas[i]), *more])
                    break
                except BufferError:
                    producer.poll(0.001)
            producer.poll(0)
        producer.flush()
        if failed:
            raise KafkaException(failed[0])

    def consumer(self) -> Any:
        """A consumer of a new group: manual commits, from the earliest offset."""
        return Consumer({"bootstrap.servers": self.bootstrap, "group.id": fresh("raw"),
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "partition.assignment.strategy": "cooperative-sticky",
                         # As unibus sets it: at librdkafka's 1 s default a consumer
                         # past the prefetch thresholds (100,000 records a partition)
                         # stands idle, and raw would look slower than it can be.
                         "fetch.queue.backoff.ms": 20})

    def consume(self, topic: str, count: int, started: threading.Event | None = None) -> None:
        """Read (the value) and commit ``count`` records.

        ``started`` is set once the group has given this consumer its partitions.
        """
        consumer = self.consumer()

        def assigned(_consumer: Any, _partitions: Any) -> None:
            if started is not None:
                started.set()

        consumer.subscribe([topic], on_assign=assigned)
        seen = 0
        last: dict[tuple[str, int], int] = {}
        next_commit = time.monotonic() + 0.2
        while seen < count:
            seen += read_records(consumer.consume(num_messages=500, timeout=0.1), last)
            if time.monotonic() >= next_commit and last:
                consumer.commit(offsets=[TopicPartition(t, p, o + 1)
                                         for (t, p), o in last.items()], asynchronous=True)
                next_commit = time.monotonic() + 0.2
        consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()],
                        asynchronous=False)
        consumer.close()


def read_records(records: list[Any], last: dict[tuple[str, int], int]) -> int:
    """Raw's work on a batch of records: read each value, keep each partition's last
    offset (for the commit). Returns how many records were read (events skipped)."""
    seen = 0
    for record in records:
        if record.error() is not None:
            continue
        record.value()
        name, partition, offset = record.topic(), record.partition(), record.offset()
        if name is None or partition is None or offset is None:
            continue
        last[(name, partition)] = offset
        seen += 1
    return seen


class Unibus:
    """The same work through unibus."""

    def __init__(self, config: Config) -> None:
        self.config = config

    async def publish(self, bus: unibus.Bus, topic: str, body: bytes,
                      prebuilt: list[unibus.Message] | None = None) -> None:
        config = self.config
        window = asyncio.Semaphore(config.window)

        async def one(start: int, count: int) -> None:
            async with window:
                if prebuilt is None:
                    await bus.publish_many(topic, [body] * count)
                else:
                    await bus.publish_many(topic, prebuilt[start:start + count])

        async with asyncio.TaskGroup() as tasks:
            for start in range(0, config.messages, config.batch):
                await window.acquire()   # at most `window` batches queued at once
                window.release()
                tasks.create_task(one(start, min(config.batch, config.messages - start)))

    async def consume(self, bus: unibus.Bus, topic: str, group: str, count: int,
                      started: asyncio.Event | None = None, fetch: int | None = None) -> None:
        """Read and ack ``count`` deliveries, ``fetch`` (default ``--fetch``) at a time."""
        most = fetch or self.config.fetch
        async with bus.subscribe(topic, group=group, prefetch=self.config.prefetch) as sub:
            if started is not None:
                started.set()
            seen = 0
            while seen < count:
                for delivery in await sub.fetch(most, timeout=1.0):
                    delivery.body   # noqa: B018 - read, as raw reads record.value()
                    await delivery.ack()
                    seen += 1


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


# A phase's (wall seconds, CPU seconds of the whole process).
Timing = tuple[float, float]
Clock = Callable[[], Awaitable[Timing]]
# A phase's result: (name, raw msgs/s, unibus msgs/s, raw CPU µs/msg, unibus CPU µs/msg).
Result = tuple[str, float, float, float, float]


async def paired(raw_first: bool, raw: Clock, ub: Clock) -> tuple[Timing, Timing]:
    """Both sides' timings, in the order asked (rounds alternate it against drift)."""
    if raw_first:
        raw_s = await raw()
        return raw_s, await ub()
    ub_s = await ub()
    return await raw(), ub_s


async def one_round(config: Config, bus: unibus.Bus, producer: Any, body: bytes,
                    raw_first: bool) -> list[Result]:
    """Every phase once."""
    raw, ub = Raw(config), Unibus(config)
    n = config.messages
    results: list[Result] = []

    async def declared(label: str) -> str:
        topic = fresh(label)   # created by unibus (same partitions) for both sides
        await bus.adapter.declare_group(topic, "unused")
        return topic

    async def clock(work: Awaitable[object]) -> Timing:
        start, cpu = time.perf_counter(), time.process_time()
        await work
        return time.perf_counter() - start, time.process_time() - cpu

    def record(name: str, raw_t: Timing, ub_t: Timing) -> None:
        results.append((name, rate(n, raw_t[0]), rate(n, ub_t[0]), raw_t[1] / n * 1e6,
                        ub_t[1] / n * 1e6))

    raw_topic, ub_topic = await declared("raw"), await declared("ub")
    raw_pub_t, ub_pub_t = await paired(
        raw_first,
        lambda: clock(asyncio.to_thread(raw.publish, producer, raw_topic, body)),
        lambda: clock(ub.publish(bus, ub_topic, body)))
    record("publish (acks=all, idempotent)", raw_pub_t, ub_pub_t)
    # The same, with the Message objects built before the clock starts: what the
    # adapter itself costs, without the core's Message construction.
    prebuilt = [unibus.Message(body) for _ in range(n)]
    extra_topic = await declared("ub-prebuilt")
    record("  publish, Messages pre-built", raw_pub_t,
           await clock(ub.publish(bus, extra_topic, body, prebuilt)))
    # Not kept alive through the later phases: N live objects make every full
    # garbage collection of the consuming side walk them all.
    del prebuilt

    # Declared as an application declares its groups, before the clock: that creates
    # the group's retry lane (a topic); raw has no lane to create.
    group = fresh("ubg")
    await bus.declare_group(ub_topic, group)
    raw_con_t, ub_con_t = await paired(
        raw_first,
        lambda: clock(asyncio.to_thread(raw.consume, raw_topic, n)),
        lambda: clock(ub.consume(bus, ub_topic, group, n)))
    record("consume retained (manual commits)", raw_con_t, ub_con_t)
    # The same with the whole prefetch in one fetch: what the collector costs when a
    # batch keeps more tracked objects alive than its threshold (see --fetch).
    big_topic, group = fresh("ub-big"), fresh("ubg")
    await bus.declare_group(big_topic, group)
    await ub.publish(bus, big_topic, body)
    record(f"  consume, {config.prefetch:,} a fetch", raw_con_t,
           await clock(ub.consume(bus, big_topic, group, n, fetch=config.prefetch)))

    # Raw again, each record carrying the header every unibus record carries (its
    # timestamp and id, the values made before the clock starts); the consumer reads
    # the value only, as the unibus side does.
    metas = [meta(unibus.Message(b"")) for _ in range(n)]
    hdr_topic = await declared("raw-hdr")
    raw_hdr_pub_t = await clock(asyncio.to_thread(raw.publish, producer, hdr_topic, body, metas))
    record("publish, vs raw +hdr", raw_hdr_pub_t, ub_pub_t)
    raw_hdr_con_t = await clock(asyncio.to_thread(raw.consume, hdr_topic, n))
    record("consume, vs raw +hdr", raw_hdr_con_t, ub_con_t)

    # Both clocks start at the first publish, once the consumer has its partitions
    # (unibus's subscribe returns then; raw's on_assign says so).
    raw_topic, ub_topic = await declared("raw2"), await declared("ub2")

    async def raw_e2e(topic: str, with_metas: list[bytes] | None = None) -> Timing:
        started = threading.Event()
        consumer = asyncio.create_task(asyncio.to_thread(raw.consume, topic, n, started))
        await asyncio.to_thread(started.wait)

        async def both() -> None:
            await asyncio.to_thread(raw.publish, producer, topic, body, with_metas)
            await consumer
        return await clock(both())

    async def ub_e2e() -> Timing:
        ready = asyncio.Event()
        group = fresh("ubg2")
        await bus.declare_group(ub_topic, group)
        consumer = asyncio.create_task(ub.consume(bus, ub_topic, group, n, ready))
        await ready.wait()

        async def both() -> None:
            await ub.publish(bus, ub_topic, body)
            await consumer
        return await clock(both())

    raw_e2e_t, ub_e2e_t = await paired(raw_first, lambda: raw_e2e(raw_topic), ub_e2e)
    record("end to end (publish + consume)", raw_e2e_t, ub_e2e_t)
    raw_hdr_e2e_t = await raw_e2e(await declared("raw2-hdr"), metas)
    del metas
    record("end to end, vs raw +hdr", raw_hdr_e2e_t, ub_e2e_t)
    # What the header alone costs raw confluent-kafka: the most any client carrying
    # unibus's model on this driver can reach against the bare raw rows.
    record("raw +hdr, vs raw: publish", raw_pub_t, raw_hdr_pub_t)
    record("raw +hdr, vs raw: consume", raw_con_t, raw_hdr_con_t)
    record("raw +hdr, vs raw: end to end", raw_e2e_t, raw_hdr_e2e_t)
    return results


async def run(config: Config, rounds: int) -> None:
    body = os.urandom(config.body_size)
    per_round: list[list[Result]] = []
    async with unibus.connect(config.url) as bus:
        # Both producers connected and warm before any clock starts.
        warmup = fresh("warmup")
        await bus.adapter.declare_group(warmup, "unused")
        producer = await asyncio.to_thread(Raw(config).warm_producer, warmup)
        await bus.publish(warmup, b"warm-up")
        for number in range(rounds):
            results = await one_round(config, bus, producer, body, raw_first=number % 2 == 0)
            per_round.append(results)
            print(f"round {number + 1} ({'raw' if number % 2 == 0 else 'unibus'} first): "
                  + ", ".join(f"{name.strip()} {u / r:.2f}" for name, r, u, _, _ in results),
                  flush=True)

    print(f"\nKafka: {config.messages} messages of {config.body_size} bytes, "
          f"{config.partitions} partitions, unibus batch {config.batch} x window "
          f"{config.window}, prefetch {config.prefetch}, fetch {config.fetch}; "
          f"{rounds} round(s), medians; CPU: µs of the process's CPU time a message")
    print(f"{'phase':<36}{'raw msgs/s':>12}{'unibus msgs/s':>15}{'ratio':>7}"
          f"{'min-max':>11}{'raw CPU':>9}{'unibus CPU':>12}{'CPU ratio':>11}")
    median = statistics.median
    for i, (name, *_) in enumerate(per_round[0]):
        rows = [results[i] for results in per_round]
        raws, ubs = [row[1] for row in rows], [row[2] for row in rows]
        raw_cpu, ub_cpu = [row[3] for row in rows], [row[4] for row in rows]
        ratios = [u / r for r, u in zip(raws, ubs, strict=True)]
        cpu_ratios = [r / u for r, u in zip(raw_cpu, ub_cpu, strict=True)]
        print(f"{name:<36}{median(raws):>12,.0f}{median(ubs):>15,.0f}{median(ratios):>7.2f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>11}{median(raw_cpu):>9.2f}"
              f"{median(ub_cpu):>12.2f}{median(cpu_ratios):>11.2f}")


@contextlib.contextmanager
def broker(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    from unibus_contract.provision import KAFKA, engine_info, launch, network_mode

    with launch(KAFKA, mode=network_mode(has_bridge=engine_info().has_bridge)) as started:
        yield started.url


def arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every Kafka benchmark takes: the broker, the count,
    the body size and the partitions."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", help="kafka://HOST:PORT (default: start a container)")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--body-size", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=4)
    return parser


def main() -> None:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=2_000)
    parser.add_argument("--fetch", type=int, default=250,
                        help="most deliveries one unibus fetch returns (raw takes 500 "
                             "records a consume call)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every phase; raw goes first in odd rounds, unibus "
                             "in even ones; the table gives medians and the median of the "
                             "rounds' ratios")
    args = parser.parse_args()
    with broker(args.url) as url:
        target = make_url(url).with_query(partitions=str(args.partitions))
        config = Config(url=str(target.render(hide_password=False)), messages=args.messages,
                        body_size=args.body_size, partitions=args.partitions,
                        batch=args.batch, window=args.window, prefetch=args.prefetch,
                        fetch=args.fetch)
        asyncio.run(run(config, args.rounds))


if __name__ == "__main__":
    main()
