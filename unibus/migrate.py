"""Move a topic's messages from one broker to another without loss.

::

    report = await unibus.migrate("amqp://guest:guest@old/", "kafka://new:9092",
                                  "orders", checkpoint="orders.ckpt", verify=True)

The migrator reads the source topic through a group (``unibus-migrate`` unless
given), publishes each batch to the target with ``publish_many`` keeping the id,
key, headers and timestamp of every message (the timestamp also travels in the
``unibus-original-timestamp`` header, for brokers that restamp), and acks the batch
on the source only once the target confirmed it: at-least-once, with at most one
batch (``batch`` messages, the in-flight window) unconfirmed at any time.

Killed at any point and started again with the same ``checkpoint``, it continues
from the source group (the durable cursor). Messages read again, which the target
may already hold, are counted as ``duplicates``; a target that deduplicates by id
(JetStream) drops them. ``verify=True`` reads everything written back from a group
declared on the target before the first batch, and compares ids and body hashes
with what was read: lost ids, body mismatches and extra copies.

The engine lives here; :mod:`unibus._migrate_state` keeps the checkpoint files.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from unibus._migrate_state import Checkpoint, CheckpointState, Ledger, TokenBucket
from unibus._migrate_verify import VerifyReport, digest, read_back
from unibus.bus import Bus, Subscription, check_name, connect
from unibus.errors import DeliveryLost, MessageTooLarge, UnibusError
from unibus.message import Delivery, Message
from unibus.url import URL

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_GROUP",
    "DEFAULT_VERIFY_GROUP",
    "ORIGINAL_TIMESTAMP_HEADER",
    "MigrationFailed",
    "MigrationReport",
    "VerifyReport",
    "migrate",
]

DEFAULT_GROUP = "unibus-migrate"
DEFAULT_VERIFY_GROUP = "unibus-migrate-verify"
#: Messages per batch: the in-flight window, and so the bound on duplicates per restart.
DEFAULT_BATCH = 500
#: The most messages a dry run holds unsettled (it acks nothing) without ``limit``.
DRY_RUN_CAP = 10_000
ORIGINAL_TIMESTAMP_HEADER = "unibus-original-timestamp"
#: How long a batch waits for more messages once its first one arrived.
_LINGER = 0.01


@dataclass
class MigrationReport:
    """The outcome of a migration; counts add up over every run of one checkpoint.

    Attributes:
        source: The source URL (password masked).
        target: The target URL (password masked).
        topic: The source topic.
        to_topic: The target topic.
        group: The source group read through.
        read: Deliveries read from the source (re-reads included).
        written: Messages the target confirmed.
        acked: Messages acked on the source.
        duplicates: Messages read again after a restart or redelivery; the target may
            hold them twice (unless it deduplicates by id).
        failed: Messages read but not written by the run that failed; they stay on
            the source, unacked.
        failures: Why they failed.
        seconds: Time spent moving messages, up to the last batch (the idle wait that
            ends a run and the verification excluded), over every run.
        runs: Runs of this checkpoint, this one included.
        dry_run: Nothing was published nor acked.
        verify: The comparison of source and target, when asked for.
    """

    source: str
    target: str
    topic: str
    to_topic: str
    group: str
    read: int = 0
    written: int = 0
    acked: int = 0
    duplicates: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    runs: int = 1
    dry_run: bool = False
    verify: VerifyReport | None = None

    @property
    def rate(self) -> float:
        """Messages per second: written ones, or read ones in a dry run."""
        done = self.read if self.dry_run else self.written
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"source": self.source, "target": self.target, "topic": self.topic,
                "to_topic": self.to_topic, "group": self.group, "read": self.read,
                "written": self.written, "acked": self.acked,
                "duplicates": self.duplicates, "failed": self.failed,
                "failures": self.failures, "seconds": round(self.seconds, 6),
                "rate": round(self.rate, 1), "runs": self.runs, "dry_run": self.dry_run,
                "verify": None if self.verify is None else self.verify.to_dict()}


class MigrationFailed(UnibusError):
    """The target (or source) failed; what was not written stays on the source.

    Attributes:
        report: The counts up to the failure; ``failures`` says why.
    """

    def __init__(self, message: str, report: MigrationReport) -> None:
        super().__init__(message)
        self.report = report


async def migrate(source: str | URL, target: str | URL, topic: str, *,
                  group: str = DEFAULT_GROUP, to_topic: str | None = None,
                  follow: bool = False, limit: int | None = None,
                  rate: float | None = None, batch: int = DEFAULT_BATCH,
                  checkpoint: str | Path | None = None, dry_run: bool = False,
                  verify: bool = False, verify_group: str = DEFAULT_VERIFY_GROUP,
                  declare_groups: Sequence[str] = (),
                  stop: asyncio.Event | None = None,
                  progress: Callable[[MigrationReport], None] | None = None,
                  ) -> MigrationReport:
    """Move the messages of ``topic`` from ``source`` to ``target``.

    Without ``follow`` it stops once the source has had nothing for its declared
    delivery time (``capabilities.timings.delivery``), or, right after a restart,
    until the previous run's in-flight messages came back (``timings.redelivery``).

    Args:
        source: The broker to read from.
        target: The broker to write to.
        topic: The source topic.
        group: The source group to read through: its position is the cursor.
        to_topic: The target topic; the same name by default.
        follow: Keep going until ``stop`` is set instead of stopping when empty.
        limit: Stop after reading this many messages in this run.
        rate: At most this many messages per second (a burst of one batch).
        batch: Messages per batch: the in-flight window.
        checkpoint: A file recording progress so that a later run resumes the counts
            and the verify ledger (``FILE.ledger``, ``FILE.verify`` beside it).
        dry_run: Read and count (and check sizes against the target), but publish
            nothing and ack nothing: the messages go back to the source. Reads at
            most ``limit`` messages, 10,000 without it.
        verify: Read back what was written and compare it with what was read.
        verify_group: The group on the target ``verify`` declares and reads.
        declare_groups: Groups to declare on the target topic before writing, so
            that a broker without replay (RabbitMQ) retains the messages for them.
        stop: Set it to stop after the batch in flight (e.g. on SIGTERM).
        progress: Called with the running report after every batch.

    Returns:
        The report; with ``checkpoint``, its counts add up over every run.

    Raises:
        MigrationFailed: The target refused or lost a batch (down, a message larger
            than its ``max_message_size``): the report says what was written; the
            rest stays unacked on the source.
        InvalidURL: A URL is malformed or has an unknown option.
        InvalidName: A topic or group name is invalid.
        BrokerUnavailable: A broker cannot be reached before anything is moved.
        ValueError: ``batch``, ``limit`` or ``rate`` is out of range, or the
            checkpoint belongs to another migration.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    bucket = TokenBucket(rate, batch) if rate is not None else None
    destination = to_topic or topic
    for kind, name in (("topic", topic), ("topic", destination), ("group", group),
                       ("group", verify_group), *(("group", g) for g in declare_groups)):
        check_name(kind, name)
    async with connect(source) as src, connect(target) as dst:
        engine = _Engine(src, dst, topic, destination, group,
                         None if checkpoint is None else Path(checkpoint),
                         verify=verify, dry_run=dry_run, progress=progress)
        try:
            return await engine.run(follow=follow, limit=limit, bucket=bucket, batch=batch,
                                    verify_group=verify_group,
                                    declare_groups=declare_groups, stop=stop)
        finally:
            engine.close()


def _forward(message: Message) -> Message:
    """The message to publish: same id, key, body, headers and timestamp."""
    headers = message.headers
    if ORIGINAL_TIMESTAMP_HEADER not in headers:
        # The first migration records the time; later hops keep the first one.
        headers = {**headers, ORIGINAL_TIMESTAMP_HEADER: message.timestamp.isoformat()}
    return Message(message.body, message.id, message.key, headers, message.timestamp)


class _Engine:
    """One migration run: the counts, the ledgers and the batch loop."""

    def __init__(self, src: Bus, dst: Bus, topic: str, to_topic: str, group: str,
                 checkpoint: Path | None, *, verify: bool, dry_run: bool,
                 progress: Callable[[MigrationReport], None] | None) -> None:
        self.src, self.dst = src, dst
        self.verify, self.dry_run, self.progress = verify, dry_run, progress
        self.state = CheckpointState(source=str(src.url), target=str(dst.url), topic=topic,
                                     to_topic=to_topic, group=group)
        # A dry run changes nothing, its checkpoint included.
        base = None if dry_run else checkpoint
        self.checkpoint = None if base is None else Checkpoint(base)
        self.ledger = Ledger(None if base is None else base.with_name(base.name + ".ledger"))
        self.verify_ledger = Ledger(None if base is None
                                    else base.with_name(base.name + ".verify"))
        self.read_ids: dict[str, str] = {}
        self.returning: set[str] = set()
        self.report = MigrationReport(source=self.state.source, target=self.state.target,
                                      topic=topic, to_topic=to_topic, group=group,
                                      dry_run=dry_run)
        self._started = time.monotonic()
        self._seconds_before = 0.0
        self._resume()

    def _resume(self) -> None:
        if self.checkpoint is None:
            return
        saved = self.checkpoint.load()
        if saved is None:
            self.state.runs = 1
            return
        if saved.identity() != self.state.identity():
            raise ValueError(
                f"{self.checkpoint.path} records a migration of {saved.topic!r} from "
                f"{saved.source} to {saved.target} ({saved.to_topic!r}, group "
                f"{saved.group!r}); resume it with the same arguments or give another "
                "--checkpoint file")
        saved.runs += 1
        self.state = saved
        self._seconds_before = saved.seconds
        self.returning = set(saved.in_flight)
        self.read_ids = dict(self.ledger.load())
        report = self.report
        report.read, report.written, report.acked = saved.read, saved.written, saved.acked
        report.duplicates, report.runs = saved.duplicates, saved.runs

    def close(self) -> None:
        self.ledger.close()
        self.verify_ledger.close()

    def _tick(self) -> None:
        self.report.seconds = self._seconds_before + time.monotonic() - self._started

    def _save(self, in_flight: list[str], *, tick: bool = True) -> None:
        if tick:
            self._tick()
        if self.checkpoint is None:
            return
        state, report = self.state, self.report
        state.read, state.written, state.acked = report.read, report.written, report.acked
        state.duplicates, state.seconds = report.duplicates, report.seconds
        state.in_flight = in_flight
        self.checkpoint.save(state)

    async def run(self, *, follow: bool, limit: int | None, bucket: TokenBucket | None,
                  batch: int, verify_group: str, declare_groups: Sequence[str],
                  stop: asyncio.Event | None) -> MigrationReport:
        src, dst, state = self.src, self.dst, self.state
        stop = stop or asyncio.Event()
        await src.open()
        await dst.open()
        if not self.dry_run:
            for name in (*declare_groups, *((verify_group,) if self.verify else ())):
                await dst.declare_group(state.to_topic, name)
        if bucket is not None:
            batch = bucket.batch
        if self.dry_run:
            # Nothing is acked, so the prefetch must hold every message it reads.
            limit = limit or DRY_RUN_CAP
            batch = min(batch, limit)
        # Two batches held: the one being written and the next one being read, so that
        # reading overlaps writing. Only the first is ever published and not yet acked.
        prefetch = limit if self.dry_run and limit is not None else 2 * batch
        self._started = time.monotonic()
        self._save(sorted(self.returning), tick=False)
        taken = 0
        async with src.subscribe(state.topic, group=state.group, prefetch=prefetch) as sub:

            def read_next() -> asyncio.Task[list[Delivery]] | None:
                if stop.is_set() or (limit is not None and taken >= limit):
                    return None
                wanted = batch if limit is None else min(batch, limit - taken)
                return asyncio.create_task(self._fetch(sub, wanted, stop))

            reading = read_next()
            try:
                while reading is not None:
                    deliveries = await reading
                    if not deliveries:
                        reading = read_next() if follow else None
                        continue
                    taken += len(deliveries)
                    reading = read_next()
                    if bucket is not None:
                        await bucket.take(len(deliveries))
                    await self._move(deliveries)
            finally:
                if reading is not None and not reading.done():
                    # What it fetched goes back to the source when the subscription closes.
                    reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reading
        # The time ends with the last batch: the idle wait that proved the source
        # empty, and the verification, would only dilute the rate.
        self._save([], tick=False)
        if self.verify and not self.dry_run:
            self.report.verify = await self._verify(verify_group, batch)
        return self.report

    async def _fetch(self, sub: Subscription, wanted: int,
                     stop: asyncio.Event) -> list[Delivery]:
        """One batch: wait for its first message, then top it up while more are ready."""
        timings = self.src.capabilities.timings
        # After a restart the previous run's unacked batch returns within `redelivery`.
        idle = timings.delivery + (timings.redelivery if self.returning else 0.0)
        fetching = asyncio.ensure_future(sub.fetch(wanted, idle))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((fetching, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not fetching.done():
            # Cancelling a blocked fetch loses nothing (the Consumer contract).
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetching
            return []
        deliveries = fetching.result()
        while deliveries and len(deliveries) < wanted:
            more = await sub.fetch(wanted - len(deliveries), _LINGER)
            if not more:
                break
            deliveries.extend(more)
        return deliveries

    def _record(self, deliveries: list[Delivery]) -> None:
        """Count the batch and ledger it before it is published."""
        report, read_ids, returning = self.report, self.read_ids, self.returning
        fresh: list[tuple[str, str]] = []
        keep_hashes = self.verify or self.checkpoint is not None
        for delivery in deliveries:
            message_id = delivery.message.id
            returning.discard(message_id)
            if message_id in read_ids:
                report.duplicates += 1
                continue
            entry = (message_id, digest(delivery.message.body) if keep_hashes else "")
            read_ids[message_id] = entry[1]
            fresh.append(entry)
        report.read += len(deliveries)
        self.ledger.append(fresh)
        self._save([*returning, *(d.message.id for d in deliveries)])

    async def _move(self, deliveries: list[Delivery]) -> None:
        self._record(deliveries)
        limit = self.dst.capabilities.max_message_size
        too_large = next((i for i, d in enumerate(deliveries) if len(d.message.body) > limit),
                         None)
        if self.dry_run:
            if too_large is not None:
                big = [d for d in deliveries if len(d.message.body) > limit]
                self.report.failed += len(big)
                self.report.failures.extend(self._too_large(d, limit) for d in big)
            self._progress()
            return
        writable = deliveries if too_large is None else deliveries[:too_large]
        try:
            if writable:
                await self.dst.publish_many(self.state.to_topic,
                                            [_forward(d.message) for d in writable])
        except UnibusError as exc:
            await self._fail(deliveries, f"{type(exc).__name__}: {exc}", exc)
        self.report.written += len(writable)
        await self._ack(writable)
        if too_large is not None:
            rest = deliveries[too_large:]
            reason = self._too_large(rest[0], limit)
            await self._fail(rest, reason, MessageTooLarge(reason))
        self._save([])
        self._progress()

    def _too_large(self, delivery: Delivery, limit: int) -> str:
        return (f"message {delivery.message.id} is {len(delivery.message.body)} bytes; "
                f"{self.dst.capabilities.name} accepts at most {limit} bytes")

    async def _ack(self, deliveries: list[Delivery]) -> None:
        acked = 0
        for delivery in deliveries:
            try:
                await delivery.ack()
                acked += 1
            except DeliveryLost:
                pass  # redelivered, then counted as a duplicate
        self.report.acked += acked

    async def _fail(self, unwritten: list[Delivery], reason: str,
                    exc: UnibusError) -> NoReturn:
        report = self.report
        report.failed += len(unwritten)
        report.failures.append(f"{len(unwritten)} message(s) not written: {reason}")
        if self.src.capabilities.redelivery:
            # Hand them back now rather than when the subscription closes.
            for delivery in unwritten:
                with contextlib.suppress(UnibusError):
                    await delivery.nack()
        self._save([d.message.id for d in unwritten])
        self._tick()
        raise MigrationFailed(
            f"the target {report.target} failed on {report.to_topic!r}: {reason}; "
            f"{report.written} written, {len(unwritten)} left unacked on the source",
            report) from exc

    def _progress(self) -> None:
        self._tick()
        if self.progress is not None:
            self.progress(self.report)

    async def _verify(self, group: str, batch: int) -> VerifyReport:
        return await read_back(self.dst, self.state.to_topic, group, batch,
                               self.read_ids, self.verify_ledger)
