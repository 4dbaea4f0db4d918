"""How close to raw confluent-kafka *any* adapter with unibus's API could come.

Run::

    uv run python -m benchmarks.bench_kafka_floor --url kafka://127.0.0.1:PORT
    uv run python -m benchmarks.bench_kafka_floor        # starts its own broker container

``bench_kafka.py`` compares the adapter with raw confluent-kafka. This one asks what
the API alone costs, with none of the adapter's bookkeeping: the least work an adapter
must do per message to keep unibus's model, timed beside the raw client in the same
process, rounds interleaved. It does not use the adapter at all.

Publishing (every delivery report awaited, ``acks=all``, idempotent, one warm producer):

- ``raw``: ``produce`` of bare bodies with a delivery callback and ``poll(0)`` after
  each, then ``flush`` (as ``bench_kafka.py``'s raw side);
- ``API-shaped``: what unibus must do at least for ``publish_many`` of bodies — a
  ``Message`` per body (its UUIDv7 id, its timestamp: the core's own bulk path), the
  one ``unibus.msg`` header that carries the id and the exact timestamp (contract
  property A6), a positional ``produce``, one callback counting the reports, ``poll``
  once per 1,024 records, then ``flush``;
- ``API-shaped, no header``: the same without the header (what A6 costs);
- ``adapter``: the adapter itself, ``bus.publish_many(topic, bodies)`` of the same N
  bodies in one call (every report awaited): how far the adapter's publish sits
  from the floor, in the same rounds.

Consuming, over the same records already in memory (taken once from the driver, the
driver's cost timed apart):

- ``raw loop``: ``bench_kafka.py``'s raw per-record work — ``value()``, topic,
  partition, offset, the last offset kept for the commit;
- ``API-shaped loop``: the least a unibus consumer does per record — a delivery object
  (record, offset, its partition's log, outcome), ``delivery.body`` and
  ``await delivery.ack()`` logging the offset for the commit; no prefetch accounting,
  no revocation checks, no lanes;
- ``adapter loop``: the adapter's own ``KafkaConsumer.fetch(250)``, ``body`` and
  ``ack()`` over the same records, handed to it as its driver thread hands them over
  (its poller replaced by one that only holds the batches): the adapter's per-record
  work with everything it keeps (prefetch, revocation, lanes, the commit log);
- ``driver``: the process CPU a record costs in ``consume(250)`` alone (the
  driver's threads included), records dropped as they are read, which both sides pay.

The consuming floor is ``(driver + raw loop) / (driver + API-shaped loop)``: what
the ratio to raw would be if the adapter did nothing but what the API asks; the
adapter's is ``(driver + raw loop) / (driver + adapter loop)``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import unibus
from benchmarks.bench_kafka import Config, Raw, arguments, broker, fresh, read_records
from unibus.message import Message
from unibus.url import make_url
from unibus_kafka._codec import META_HEADER, stamp
from unibus_kafka._consumer import KafkaConsumer
from unibus_kafka._errors import Scrubber
from unibus_kafka._offsets import PartitionState
from unibus_kafka._url import parse_settings

_ANY_PARTITION = -1
_SERVE_PER = 1024


def publish_shaped(producer: Any, topic: str, body: bytes, count: int, *, header: bool) -> None:
    """The least work unibus's ``publish_many(topic, bodies)`` can do (module docstring)."""
    reports = [0]
    failed: list[Any] = []

    def report(error: Any, _record: Any) -> None:
        if error is not None:
            failed.append(error)
        reports[0] += 1

    messages = Message._of_bodies([body] * count)
    front = stamp(messages[0].timestamp_us)
    produce = producer.produce
    for sent, message in enumerate(messages, 1):
        headers = [(META_HEADER, front + message.id.encode())] if header else None
        while True:
            try:
                produce(topic, message.body, None, _ANY_PARTITION, report, None, 0, headers)
                break
            except BufferError:
                producer.poll(0.001)
        if not sent % _SERVE_PER:
            producer.poll(0)
    producer.flush()
    if failed or reports[0] != count:
        raise RuntimeError(f"{len(failed)} failed, {reports[0]} of {count} reported")


class _Delivery:
    """The least state a delivery carries: its record, offset, log and outcome."""

    __slots__ = ("log", "offset", "outcome", "record")

    record: Any
    offset: int
    log: list[int]
    outcome: str | None

    @property
    def body(self) -> bytes:
        value: bytes | None = self.record.value()
        return b"" if value is None else value

    async def ack(self) -> None:
        if self.outcome is not None:
            raise RuntimeError("settled twice")
        self.outcome = "ack"
        self.log.append(self.offset)


def raw_loop(batches: list[list[Any]]) -> int:
    """``bench_kafka.py``'s raw per-record work."""
    last: dict[tuple[str, int], int] = {}
    return sum(read_records(batch, last) for batch in batches)


async def shaped_loop(batches: list[list[Any]]) -> int:
    """The least per-record work of a unibus consumer: a delivery, its body, its ack."""
    logs: dict[tuple[str, int], list[int]] = {}
    new = object.__new__
    seen = 0
    for batch in batches:
        out: list[_Delivery] = []
        for record in batch:
            if record.error() is not None:
                continue
            where = (record.topic(), record.partition())
            log = logs.get(where)
            if log is None:
                log = logs[where] = []
            delivery = new(_Delivery)
            delivery.record = record
            delivery.offset = record.offset()
            delivery.log = log
            delivery.outcome = None
            out.append(delivery)
        for delivery in out:
            delivery.body  # noqa: B018 - read, as raw reads record.value()
            await delivery.ack()
            seen += 1
    return seen


class _Holder:
    """Stands in for the adapter's poller: it holds batches already taken from the
    driver, as the poller's thread hands them over, and takes nothing more."""

    def __init__(self, parts: dict[tuple[str, int], PartitionState]) -> None:
        self.inbox: deque[tuple[dict[tuple[str, int], PartitionState], list[Any]]] = deque()
        self.parts = parts
        self.revocations = 0
        self.failure = None
        self.hungry = False

    def drain(self, limit: int) -> None:
        """Nothing more to take: the batches are all in the inbox."""

    def want(self, room: int) -> None:
        raise RuntimeError("the adapter loop ran out of records")

    def on_error(self, error: Any) -> None:
        raise RuntimeError(f"an event among the records: {error}")


async def adapter_loop(bus: unibus.Bus, batches: list[list[Any]]) -> int:
    """The adapter's per-record work: its own fetch, ``body`` and ``ack()``."""
    parts: dict[tuple[str, int], PartitionState] = {}
    for batch in batches:
        for record in batch:
            where = (record.topic(), record.partition())
            if where not in parts:
                parts[where] = PartitionState(*where)
    holder = _Holder(parts)
    holder.inbox.extend((parts, batch) for batch in batches)
    # Made as the adapter makes it (no driver or thread starts before ``start``), then
    # given the holder for its poller.
    consumer = KafkaConsumer(
        settings=parse_settings(bus.url), producer=None,  # type: ignore[arg-type]  # unused
        scrub=Scrubber(), capabilities=bus.capabilities, topics=[], lanes=[], group="floor",
        retry_topics={}, prefetch=2_000, dead_letter=None, on_close=lambda _: None)
    consumer._poller = holder  # type: ignore[assignment]
    consumer._inbox = holder.inbox
    count = sum(len(batch) for batch in batches)
    seen = 0
    while seen < count:
        for delivery in await consumer.fetch(250, 1.0):
            delivery.body  # noqa: B018 - read, as raw reads record.value()
            await delivery.ack()
            seen += 1
    return seen


def read(raw: Raw, topic: str, count: int, *, keep: bool) -> tuple[list[list[Any]], float]:
    """Every record of ``topic`` in batches of 250 (``keep``: returned, else dropped as
    read), and the process CPU µs a record cost from the first record on (the group
    join is not counted). Dropped as read, the records' memory is reused, as in a
    consumer that keeps up: the driver's cost alone."""
    consumer = raw.consumer()
    consumer.subscribe([topic])
    kept: list[list[Any]] = []
    got = 0
    while not got:
        batch = consumer.consume(num_messages=250, timeout=1.0)
        got = len(batch)
    if keep:
        kept.append(batch)
    first, cpu = got, time.process_time()
    while got < count:
        batch = consumer.consume(num_messages=250, timeout=1.0)
        got += len(batch)
        if keep:
            kept.append(batch)
    per_record = (time.process_time() - cpu) / (got - first) * 1e6
    consumer.close()
    return kept, per_record


async def best_cpu_us(loop: Callable[[list[list[Any]]], Awaitable[int]],
                      batches: list[list[Any]], count: int) -> float:
    """The least process CPU µs a record of three runs of ``loop`` over ``batches``."""
    runs: list[float] = []
    for _ in range(3):
        cpu = time.process_time()
        await loop(batches)
        runs.append((time.process_time() - cpu) / count * 1e6)
    return min(runs)


def cpu_us(work: Callable[[], object], count: int) -> tuple[float, float]:
    """(msgs/s by the wall clock, process CPU µs a message) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return count / (time.perf_counter() - wall), (time.process_time() - cpu) / count * 1e6


async def cpu_us_of(work: Awaitable[object], count: int) -> tuple[float, float]:
    """:func:`cpu_us` of a coroutine."""
    wall, cpu = time.perf_counter(), time.process_time()
    await work
    return count / (time.perf_counter() - wall), (time.process_time() - cpu) / count * 1e6


async def blocking(work: Callable[[], object]) -> None:
    """Blocking work, run on the event loop itself (nothing else runs meanwhile)."""
    work()


def main() -> None:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with broker(args.url) as url:
        target = make_url(url).with_query(partitions=str(args.partitions))
        config = Config(url=str(target.render(hide_password=False)), messages=args.messages,
                        body_size=args.body_size, partitions=args.partitions,
                        batch=args.messages, window=1, prefetch=250, fetch=250)
        asyncio.run(measure(config, args.rounds))


async def measure(config: Config, rounds: int) -> None:
    """Every round; the raw work runs on the event loop itself (nothing else does)."""
    n = config.messages
    body = os.urandom(config.body_size)
    raw = Raw(config)
    async with unibus.connect(config.url) as bus:

        async def topic() -> str:
            # Created by unibus, with the partitions asked, as bench_kafka.py does.
            name = fresh("floor")
            await bus.adapter.declare_group(name, "unused")
            return name

        # bench_kafka.py's raw producer (idempotent, acks=all, linger 5 ms), warm.
        producer = raw.warm_producer(await topic())
        publish: dict[str, list[tuple[float, float]]] = {
            "raw": [], "API-shaped": [], "API-shaped, no header": [], "adapter": []}
        # (driver, raw loop, API-shaped loop, adapter loop), µs a record
        floors: list[tuple[float, float, float, float]] = []
        for number in range(rounds):
            phases: list[tuple[str, Callable[[str], Awaitable[object]]]] = [
                ("raw", lambda name: blocking(partial(raw.publish, producer, name, body))),
                ("API-shaped", lambda name: blocking(partial(
                    publish_shaped, producer, name, body, n, header=True))),
                ("API-shaped, no header", lambda name: blocking(partial(
                    publish_shaped, producer, name, body, n, header=False))),
                ("adapter", lambda name: bus.publish_many(name, [body] * n))]
            if number % 2:
                phases.reverse()   # against drift
            topics: dict[str, str] = {}
            for name, work in phases:
                topics[name] = await topic()
                publish[name].append(await cpu_us_of(work(topics[name]), n))
            driver = read(raw, topics["API-shaped"], n, keep=False)[1]
            batches = read(raw, topics["API-shaped"], n, keep=True)[0]
            # Best of three: the records are in memory, nothing waits but the CPU.
            raw_us = min(cpu_us(partial(raw_loop, batches), n)[1] for _ in range(3))
            shaped_us = await best_cpu_us(shaped_loop, batches, n)
            adapter_us = await best_cpu_us(partial(adapter_loop, bus), batches, n)
            batches = []   # freed before the next round publishes
            floors.append((driver, raw_us, shaped_us, adapter_us))
            print(f"round {number + 1}: " + ", ".join(
                f"{name} {rows[-1][0]:,.0f} msgs/s" for name, rows in publish.items())
                + f"; consuming floor {(driver + raw_us) / (driver + shaped_us):.2f}, "
                f"adapter {(driver + raw_us) / (driver + adapter_us):.2f}", flush=True)
    report(publish, floors, f"{n} messages of {config.body_size} bytes, "
                            f"{config.partitions} partitions, {rounds} rounds")


def report(publish: dict[str, list[tuple[float, float]]],
           floors: list[tuple[float, float, float, float]], what: str) -> None:
    """Medians of the rounds, and the median and range of each round's own ratio."""
    median = statistics.median

    def spread(values: list[float]) -> str:
        return f"{median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    print(f"\nKafka floor: {what}; medians, and per-round ratios as median (min-max); "
          "CPU = process CPU µs a message")
    raw_rows = publish["raw"]
    for name, rows in publish.items():
        rates = [rate / raw[0] for (rate, _), raw in zip(rows, raw_rows, strict=True)]
        cpus = [raw[1] / cpu for (_, cpu), raw in zip(rows, raw_rows, strict=True)]
        print(f"publish {name:<23}{median(r for r, _ in rows):>10,.0f} msgs/s  "
              f"ratio {spread(rates)}  CPU {median(c for _, c in rows):.2f}  "
              f"CPU ratio {spread(cpus)}")
    print(f"consume: driver {median(f[0] for f in floors):.2f} µs a record, raw loop "
          f"{median(f[1] for f in floors):.2f}, API-shaped loop "
          f"{median(f[2] for f in floors):.2f}, adapter loop "
          f"{median(f[3] for f in floors):.2f}; floor (driver + raw loop) / (driver + "
          f"API-shaped loop) {spread([(d + r) / (d + a) for d, r, a, _ in floors])}; "
          f"adapter {spread([(d + r) / (d + a) for d, r, _, a in floors])}")

if __name__ == "__main__":
    main()
