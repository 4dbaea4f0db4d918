"""Throughput of ``unibus.migrate`` against the raw clients of both of its brokers.

Run, from the repository root (it imports the raw clients of the other benchmarks)::

    uv run python -m benchmarks.bench_migrate --from rabbitmq --to kafka
    uv run python -m benchmarks.bench_migrate --from kafka://127.0.0.1:9092 --to nats
    uv run python -m benchmarks.bench_migrate --pairs all --runs 3

A side is a URL, or one of ``memory``, ``rabbitmq``, ``kafka``, ``nats``: a broker
name starts a container through ``unibus_contract.provision`` (set
``UNIBUS_IMAGE_*`` where no registry is reachable), once per process, removed at
the end. ``--pairs all`` runs RabbitMQ → Kafka, Kafka → NATS, NATS → RabbitMQ,
Kafka → RabbitMQ and memory → RabbitMQ / Kafka / NATS.

Each run, for N messages of ``--body-size`` random bytes:

1. raw: the source broker's raw consume rate and the target broker's raw publish
   rate, with the raw client code of ``bench_rabbitmq.py`` (aio-pika, publisher
   confirms, manual acks), ``bench_kafka.py`` (confluent-kafka, ``acks=all``,
   idempotent, manual commits) and ``bench_nats.py`` (nats-py, JetStream PubAcks,
   explicit acks). Memory has no raw client: its "raw" is unibus's own
   ``publish_many`` / ``fetch`` + ``ack``.
2. migrate: a source topic filled through unibus (untimed), then
   ``unibus.migrate(..., batch, window)`` until the source is empty; its rate is the
   report's (written messages over the time spent moving them: the idle wait that
   proves the source empty is excluded). ``--checkpoint`` adds a checkpoint file, as
   the CLI's resumable runs have.

Prints each run and the ratio migrate / min(raw source consume, raw target publish).
For a Kafka target it also times raw publishing records that carry the two headers a
migrated record carries there (``unibus.msg``: the id and timestamp; and
``unibus-original-timestamp``, which ``migrate`` promises), made before its clock
starts, and prints the ratio to that (``dst +headers``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from math import isnan, nan
from pathlib import Path

import aio_pika

import unibus
from benchmarks import bench_kafka, bench_nats, bench_rabbitmq
from unibus.migrate import DEFAULT_BATCH, DEFAULT_GROUP, DEFAULT_WINDOW, _forward
from unibus.url import make_url
from unibus_kafka._codec import encode_headers, meta

NAMES = ("memory", "rabbitmq", "kafka", "nats")
ALL_PAIRS = [("rabbitmq", "kafka"), ("kafka", "nats"), ("nats", "rabbitmq"),
             ("kafka", "rabbitmq"), ("memory", "rabbitmq"), ("memory", "kafka"),
             ("memory", "nats")]
FILL_BATCH = 5_000


@dataclass(frozen=True)
class Side:
    """One broker of a pair: its kind (scheme family) and URL."""

    kind: str
    url: str


def kind_of(url: str) -> str:
    scheme = make_url(url).scheme
    for kind, schemes in (("rabbitmq", ("amqp", "amqps")), ("kafka", ("kafka",)),
                          ("nats", ("nats", "tls")), ("memory", ("memory",))):
        if scheme in schemes:
            return kind
    raise SystemExit(f"no raw client for {url!r}: give memory, amqp, kafka or nats")


class Brokers:
    """Resolves names to URLs, starting each named broker's container once."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.started: dict[str, str] = {}

    def side(self, given: str) -> Side:
        if given not in NAMES:
            return Side(kind_of(given), given)
        if given == "memory":
            return Side("memory", f"memory://bench-{uuid.uuid4().hex[:8]}")
        if given not in self.started:
            os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
            from unibus_contract.provision import SPECS, engine_info, launch, network_mode

            broker = self.stack.enter_context(
                launch(SPECS[given], mode=network_mode(has_bridge=engine_info().has_bridge)))
            self.started[given] = str(broker.url)
        return Side(given, self.started[given])


# ------------------------------------------------------------------ raw rates


async def raw_rates(side: Side, count: int, body_size: int, *,
                    consume: bool) -> tuple[float, float, float]:
    """The raw client's publish rate, then (or NaN) its consume rate of what it published,
    then (Kafka only, else NaN) its publish rate of records with the headers a migrated
    record carries on Kafka (``unibus.msg`` and ``unibus-original-timestamp``, made
    before the clock starts)."""
    bodies = [os.urandom(body_size) for _ in range(count)]
    if side.kind == "rabbitmq":
        cfg = bench_rabbitmq.Config(side.url, count, body_size, window=1024, prefetch=256,
                                    batch=FILL_BATCH, rounds=1)
        conn = await aio_pika.connect(side.url)
        try:
            raw = bench_rabbitmq.Raw(cfg, conn)
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            queue = await raw.setup(topic)
            published = await timed(raw.publish(topic, bodies))
            consumed = await timed(raw.consume(queue, count)) if consume else nan
        finally:
            await conn.close()
        return count / published, count / consumed, nan
    if side.kind == "kafka":
        config = bench_kafka.Config(url=side.url, messages=count, body_size=body_size,
                                    partitions=4, batch=FILL_BATCH, window=4, prefetch=2_000,
                                    fetch=250)
        kafka = bench_kafka.Raw(config)
        topic, warmup = bench_kafka.fresh("raw"), bench_kafka.fresh("warmup")
        async with unibus.connect(side.url) as bus:
            for name in (topic, warmup):  # created by unibus: its partition count
                await bus.declare_group(name, "unused")
        producer = await asyncio.to_thread(kafka.warm_producer, warmup)
        published = await timed(asyncio.to_thread(kafka.publish, producer, topic, bodies[0]))
        consumed = (await timed(asyncio.to_thread(kafka.consume, topic, count)) if consume
                    else nan)
        # The headers the Kafka adapter writes for a message migrate forwarded: its
        # own (id and timestamp) and the original timestamp.
        metas = [meta(unibus.Message(b"")) for _ in range(count)]
        more = encode_headers(_forward(unibus.Message(b"")))[1:]
        topic = bench_kafka.fresh("raw-hdrs")
        async with unibus.connect(side.url) as bus:
            await bus.declare_group(topic, "unused")
        with_headers = await timed(asyncio.to_thread(kafka.publish, producer, topic,
                                                     bodies[0], metas, more))
        return count / published, count / consumed, count / with_headers
    if side.kind == "nats":
        nats_config = bench_nats.Config(url=side.url, messages=count, body_size=body_size,
                                        window=1024, prefetch=256, batch=FILL_BATCH, rounds=1)
        published, stream, subject = await bench_nats.raw_js_publish(nats_config, bodies)
        consumed = (await bench_nats.raw_js_consume(nats_config, stream, subject) if consume
                    else nan)
        return count / published, count / consumed, nan
    # Memory has no client of its own: unibus is its raw client.
    async with unibus.connect(side.url) as bus:
        topic = f"bench.{uuid.uuid4().hex[:8]}"
        await bus.declare_group(topic, "bench")
        started = time.perf_counter()
        for first in range(0, count, 1000):
            await bus.publish_many(topic, bodies[first:first + 1000])
        published = time.perf_counter() - started
        started = time.perf_counter()
        seen = 0
        async with bus.subscribe(topic, group="bench", prefetch=2000) as sub:
            while seen < count:
                for delivery in await sub.fetch(1000, 5.0):
                    await delivery.ack()
                    seen += 1
        consumed = time.perf_counter() - started
    return count / published, count / consumed, nan


async def timed(work: Awaitable[object]) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


# ------------------------------------------------------------------- migrate


async def migrate_rate(source: Side, target: Side, count: int, body_size: int, batch: int,
                       window: int, checkpoint: bool) -> unibus.MigrationReport:
    """Fill a source topic (untimed), then migrate it; return the migration's report."""
    topic = f"bench-migrate-{uuid.uuid4().hex[:8]}"
    bodies = [os.urandom(body_size) for _ in range(count)]
    # Memory brokers live while a bus is open: both stay open over the migration.
    async with unibus.connect(source.url) as src, unibus.connect(target.url) as dst:
        await src.declare_group(topic, DEFAULT_GROUP)  # RabbitMQ retains only for groups
        await dst.declare_group(topic, "bench")
        for first in range(0, count, FILL_BATCH):
            await src.publish_many(topic, bodies[first:first + FILL_BATCH])
        with tempfile.TemporaryDirectory() as folder:
            report = await unibus.migrate(
                src.url, dst.url, topic, batch=batch, window=window,
                checkpoint=Path(folder) / "bench.ckpt" if checkpoint else None)
    if report.written != count:
        raise SystemExit(f"migrated {report.written} of {count}: {report.failures}")
    return report


# ----------------------------------------------------------------------- run


async def run_pair(source: Side, target: Side, args: argparse.Namespace) -> list[str]:
    rows = []
    for run in range(1, args.runs + 1):
        _, consume, _ = await raw_rates(source, args.messages, args.body_size, consume=True)
        publish, _, publish_headers = await raw_rates(target, args.messages, args.body_size,
                                                      consume=False)
        report = await migrate_rate(source, target, args.messages, args.body_size,
                                    args.batch, args.window, args.checkpoint)
        slower = min(consume, publish)
        # Kafka: also against raw publishing the records with the headers they carry.
        headers = (f"{publish_headers:>14,.0f}{report.rate / min(consume, publish_headers):>8.2f}"
                   if not isnan(publish_headers) else f"{'-':>14}{'-':>8}")
        row = (f"{source.kind + ' → ' + target.kind:<22}{run:>4}{consume:>14,.0f}"
               f"{publish:>14,.0f}{report.rate:>14,.0f}{report.rate / slower:>8.2f}{headers}")
        print(row, flush=True)
        rows.append(row)
    return rows


def header(args: argparse.Namespace) -> str:
    return (f"{args.messages:,} messages of {args.body_size} bytes, batch {args.batch} x "
            f"window {args.window}{', checkpoint' if args.checkpoint else ''}\n"
            f"{'pair':<22}{'run':>4}{'src consume':>14}{'dst publish':>14}"
            f"{'migrate':>14}{'ratio':>8}{'dst +headers':>14}{'ratio':>8}")


@contextlib.contextmanager
def brokers() -> Iterator[Brokers]:
    with contextlib.ExitStack() as stack:
        yield Brokers(stack)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--from", dest="source", help="source URL or broker name")
    parser.add_argument("--to", dest="target", help="target URL or broker name")
    parser.add_argument("--pairs", choices=["all"], help="every pair of the README table")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--body-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", action="store_true",
                        help="migrate with a checkpoint file, as a resumable CLI run does")
    args = parser.parse_args()
    if args.pairs is None and (args.source is None or args.target is None):
        parser.error("give --from and --to, or --pairs all")
    wanted = ALL_PAIRS if args.pairs == "all" else [(args.source, args.target)]
    with brokers() as registry:
        resolved = [(registry.side(s), registry.side(t)) for s, t in wanted]
        print(header(args), flush=True)
        rows: list[str] = []
        for source, target in resolved:
            rows += asyncio.run(run_pair(source, target, args))
    print(f"\n{header(args)}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
