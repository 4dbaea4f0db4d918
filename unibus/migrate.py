"""Move a topic's messages from one broker to another without loss.

::

    report = await unibus.migrate("amqp://guest:guest@old/", "kafka://new:9092",
                                  "orders", checkpoint="orders.ckpt", verify=True)

The migrator reads the source topic through a group (``unibus-migrate`` unless
given), publishes each batch to the target with ``publish_many`` keeping the id,
key, headers and timestamp of every message (the timestamp also travels in the
``unibus-original-timestamp`` header, for brokers that restamp), and acks a batch
on the source only once the target confirmed it: at-least-once. Up to ``window``
batches are published and not yet confirmed at once (the pipeline: the target
confirms earlier batches while the next one is read and sent); their publish calls
start in source order, and their acks follow each batch's own confirmation.

Killed at any point and started again with the same ``checkpoint``, it continues
from the source group (the durable cursor). Before a batch is published, the
checkpoint records its ids among the ``in_flight`` ones (every batch not yet
confirmed), then the ledger ``FILE.ledger`` records them. So a message read again
after a restart (``duplicates``) is either in an earlier run's ledger, not in flight
and with the same body hash — the target confirmed it: it is acked without being
published again — or not — the target may hold it: it is published again and
counted in ``republished``. The checkpoint reaches the disk before the ledger line.
Copies on the target are therefore bounded by ``window`` x ``batch`` per restart,
even from a source whose acks lag (Kafka commits offsets every ``commit_interval``).
A target that deduplicates by id (JetStream) drops those too. ``verify=True`` reads
everything written back from a group declared on the target before the first
batch, and compares ids and body hashes with what was read: lost ids, body
mismatches and extra copies.

The engine lives here; :mod:`unibus._migrate_state` keeps the checkpoint files.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from unibus._migrate_state import (
    KEPT_FAILURES,
    Checkpoint,
    CheckpointState,
    Ledger,
    TokenBucket,
)
from unibus._migrate_verify import VerifyReport, digest, read_back
from unibus.bus import Bus, Subscription, check_name, connect
from unibus.errors import DeliveryLost, MessageTooLarge, UnibusError
from unibus.message import Delivery, Message
from unibus.url import URL, make_url

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_GROUP",
    "DEFAULT_VERIFY_GROUP",
    "DEFAULT_WINDOW",
    "ORIGINAL_TIMESTAMP_HEADER",
    "MigrationFailed",
    "MigrationReport",
    "VerifyReport",
    "migrate",
]

DEFAULT_GROUP = "unibus-migrate"
DEFAULT_VERIFY_GROUP = "unibus-migrate-verify"
#: Messages per batch.
DEFAULT_BATCH = 500
#: Batches published and not yet confirmed at once: ``window`` x ``batch`` bounds the
#: copies a restart may write twice.
DEFAULT_WINDOW = 4
#: The most messages a dry run holds unsettled (it acks nothing) without ``limit``.
DRY_RUN_CAP = 10_000
ORIGINAL_TIMESTAMP_HEADER = "unibus-original-timestamp"
#: How long a batch waits for more messages once its first one arrived.
_LINGER = 0.01
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
        acked: Messages acked on the source once the target confirmed them, each
            counted once: when its batch is confirmed, in the checkpoint saved before
            its acks are sent, so that a kill cannot lose the count. A message counted
            whose ack a kill then cut off comes back; the next run acks it without
            counting it again (it is in ``duplicates``). One whose ack the source
            refuses as lost (``DeliveryLost``) comes back in the same run, is moved
            again and counted again.
        duplicates: Messages read again after a restart or redelivery (counted in
            ``read``). Those the target had confirmed are acked, not published again.
        republished: The duplicates that were in flight (published, not confirmed)
            when they were read before, so published again: the target may hold them
            twice (unless it deduplicates by id). At most ``window`` x ``batch`` per
            restart.
        failed: Messages read but not written by the runs that failed; each failed
            run gave them back to the source, unacked (a later run moves them).
        failures: Why they failed (a checkpoint keeps the latest 20).
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
    republished: int = 0
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
                "duplicates": self.duplicates, "republished": self.republished,
                "failed": self.failed,
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
                  window: int = DEFAULT_WINDOW,
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
        batch: Messages per batch: one ``publish_many`` on the target, then one ack
            per message on the source.
        window: Batches published and not yet confirmed by the target at once;
            ``window`` x ``batch`` bounds what a restart may write twice. Batches are
            published in source order; ``1`` also waits for each batch's
            confirmation before the next is published (strict order on every target).
        checkpoint: A file recording progress so that a later run resumes the counts
            and the verify ledger (``FILE.ledger``, ``FILE.verify`` beside it).
        dry_run: Read and count (and check sizes against the target), but publish
            nothing and ack nothing: the messages go back to the source. Reads at
            most ``limit`` messages, 10,000 without it.
        verify: Read back what was written and compare it with what was read.
        verify_group: The group on the target ``verify`` declares and reads.
        declare_groups: Groups to declare on the target topic before writing, so
            that a broker without replay (RabbitMQ) retains the messages for them.
        stop: Set it to stop after the batches in flight (e.g. on SIGTERM).
        progress: Called with the running report once before the first batch (with a
            checkpoint, the counts of the earlier runs) and after every batch.

    Returns:
        The report; with ``checkpoint``, its counts add up over every run.

    Raises:
        MigrationFailed: The target refused or lost a batch (down, a message larger
            than its ``max_message_size``): the batches it confirmed are acked, the
            report says what was written; the rest stays unacked on the source.
        InvalidURL: A URL is malformed or has an unknown option.
        InvalidName: A topic or group name is invalid.
        BrokerUnavailable: A broker cannot be reached before anything is moved.
        ValueError: ``batch``, ``window``, ``limit`` or ``rate`` is out of range, the
            checkpoint belongs to another migration, or the target is the source's
            broker and topic.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if window < 1:
        raise ValueError(f"window must be >= 1 batch in flight, got {window}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    bucket = TokenBucket(rate, batch) if rate is not None else None
    destination = topic if to_topic is None else to_topic
    if destination == topic and _same_broker(make_url(source), make_url(target)):
        raise ValueError(
            f"the source and the target are the same broker and topic ({topic!r}): every "
            "copy would be read back and copied again, without end; give another "
            "--to-topic, or another target")
    for kind, name in (("topic", topic), ("topic", destination), ("group", group),
                       ("group", verify_group), *(("group", g) for g in declare_groups)):
        check_name(kind, name)
    async with connect(source) as src, connect(target) as dst:
        engine = _Engine(src, dst, topic, destination, group,
                         None if checkpoint is None else Path(checkpoint),
                         verify=verify, dry_run=dry_run, progress=progress)
        try:
            return await engine.run(follow=follow, limit=limit, bucket=bucket, batch=batch,
                                    window=window,
                                    verify_group=verify_group,
                                    declare_groups=declare_groups, stop=stop)
        finally:
            engine.close()


_trusted = Message.trusted


def _same_broker(a: URL, b: URL) -> bool:
    """Whether two URLs surely name one broker's same set of topics.

    The password does not matter; everything else does: the order-free list of hosts,
    the path (a RabbitMQ virtual host), the user and the options — a NATS account
    (user, ``token``, ``creds``), a NATS subject ``prefix`` or a RabbitMQ ``exchange``
    name topics of their own on one server. Refusing a migration that is not a loop
    would leave no way round; missing a loop written another way (a default port
    spelled out) only leaves what was there before.
    """
    return (a.scheme == b.scheme and set(a.hosts) == set(b.hosts) and a.path == b.path
            and a.username == b.username and dict(a.query) == dict(b.query))


def _forward(message: Message) -> Message:
    """The message to publish: same id, key, body, headers and timestamp."""
    headers = message.headers
    if ORIGINAL_TIMESTAMP_HEADER in headers:
        return message   # a later hop keeps the time the first migration recorded
    us = message.timestamp_us
    stamp = _iso(message._at, us)
    if headers:
        # A read-only view's copy is its dict's, in C: {**headers} would walk the view.
        copied = (headers.copy() if type(headers) is MappingProxyType else dict(headers))
        copied[ORIGINAL_TIMESTAMP_HEADER] = stamp
    else:
        copied = {ORIGINAL_TIMESTAMP_HEADER: stamp}
    # A message received is valid, and one more str header keeps it so: no need to
    # validate it again (this runs once per message moved).
    return _trusted(message.body, message.id, message.key, MappingProxyType(copied), us)


_last_second: tuple[int, str] = (-1, "")   # a whole second and its ISO 8601 text


def _iso(given: datetime | None, us: int) -> str:
    """``timestamp.isoformat()`` of a message, from its microseconds where that is UTC.

    ``given`` is the message's datetime when it was given (or already read). Messages
    read from a source share their second by the thousand: its text is made once, and
    each message adds its microseconds (as isoformat does, not when 0).
    """
    global _last_second
    if given is not None and given.utcoffset():
        return given.isoformat()   # keeps the offset it was given with
    seconds, micros = divmod(us, 1_000_000)
    second, text = _last_second
    if second != seconds:
        text = (_EPOCH + timedelta(seconds=seconds)).isoformat()[:-6]
        _last_second = (seconds, text)   # one assignment: threads see a matching pair
    if micros:
        return text + "." + str(micros).zfill(6) + "+00:00"   # faster than formatting
    return text + "+00:00"


class _Flight:
    """A batch published to the target and not yet settled on the source."""

    __slots__ = ("ids", "rest", "sent", "task")

    def __init__(self, sent: list[Delivery], rest: list[Delivery],
                 task: asyncio.Task[list[Message]] | None) -> None:
        #: What was published; acked once the target confirmed it.
        self.sent = sent
        #: The tail from an oversized message on: never published, fails the migration.
        self.rest = rest
        self.task = task
        self.ids = {d.message.id for d in sent} | {d.message.id for d in rest}

    def done(self) -> bool:
        return self.task is None or self.task.done()

    def error(self) -> BaseException | None:
        """The publish's exception; only once :meth:`done`."""
        return None if self.task is None else self.task.exception()


class _Engine:
    """One migration run: the counts, the ledgers and the pipeline of batches."""

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
        #: Every id read, and the hash of the first body read with it: the ledger, also
        #: what verify compares.
        self.read_ids: dict[str, str] = {}
        #: Ids read with more than one body: the hashes of the others. Kept apart so
        #: that the common case, one body per id, stays one dict entry.
        self.other_bodies: dict[str, set[str]] = {}
        #: Ids in flight when the previous run stopped that have not come back yet.
        self.returning: set[str] = set()
        #: Ids the ledger of earlier runs lists (read before this run started).
        self.read_before: set[str] = set()
        #: Batches published and not yet settled, oldest first.
        self.flights: deque[_Flight] = deque()
        #: The source proved empty (not a stop, a limit or --follow's end): what an
        #: earlier run left in flight had its redelivery time to come back.
        self.drained = False
        self.report = MigrationReport(source=self.state.source, target=self.state.target,
                                      topic=topic, to_topic=to_topic, group=group,
                                      dry_run=dry_run)
        self._started = time.monotonic()
        self._seconds_before = 0.0
        if self.checkpoint is not None:
            self.checkpoint.lock()
        try:
            self._resume()
        except BaseException:
            self.close()
            raise

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
        read_ids, other_bodies = self.read_ids, self.other_bodies
        for message_id, body_hash in self.ledger.load():
            if read_ids.setdefault(message_id, body_hash) != body_hash:
                other_bodies.setdefault(message_id, set()).add(body_hash)
        self.read_before = set(read_ids)
        report = self.report
        report.read, report.written, report.acked = saved.read, saved.written, saved.acked
        report.duplicates, report.republished = saved.duplicates, saved.republished
        report.failed, report.failures = saved.failed, list(saved.failures)
        report.runs = saved.runs

    def close(self) -> None:
        self.ledger.close()
        self.verify_ledger.close()
        if self.checkpoint is not None:
            self.checkpoint.unlock()

    def _tick(self) -> None:
        self.report.seconds = self._seconds_before + time.monotonic() - self._started

    def _in_flight(self, *more: list[Delivery]) -> list[str]:
        """What the target may hold unconfirmed: returning ids and unsettled batches."""
        ids = [*self.returning]
        for flight in self.flights:
            ids.extend(flight.ids)
        for deliveries in more:
            ids.extend(d.message.id for d in deliveries)
        return ids

    def _state_for(self, in_flight: list[str]) -> CheckpointState:
        state, report = self.state, self.report
        state.read, state.written, state.acked = report.read, report.written, report.acked
        state.duplicates, state.republished = report.duplicates, report.republished
        state.failed, state.failures = report.failed, report.failures[-KEPT_FAILURES:]
        state.seconds = report.seconds
        state.in_flight = in_flight
        return state

    def _save(self, in_flight: list[str], *, tick: bool = True) -> None:
        if tick:
            self._tick()
        if self.checkpoint is not None:
            self.checkpoint.save(self._state_for(in_flight))

    async def run(self, *, follow: bool, limit: int | None, bucket: TokenBucket | None,
                  batch: int, window: int, verify_group: str,
                  declare_groups: Sequence[str], stop: asyncio.Event | None
                  ) -> MigrationReport:
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
        # The batches in flight plus the next one being read, so that reading overlaps
        # writing; only the `window` published ones are ever unacked for long.
        prefetch = limit if self.dry_run and limit is not None else (window + 1) * batch
        self._started = time.monotonic()
        self._save(sorted(self.returning), tick=False)
        if self.progress is not None:
            self.progress(self.report)   # where earlier runs left the counts
        taken = 0
        written_before = self.report.written
        flights = self.flights
        async with src.subscribe(state.topic, group=state.group, prefetch=prefetch) as sub:

            def read_next() -> asyncio.Task[list[Delivery]] | None:
                if stop.is_set() or (limit is not None and taken >= limit):
                    return None
                wanted = batch if limit is None else min(batch, limit - taken)
                return asyncio.create_task(self._fetch(sub, wanted, stop))

            reading = read_next()
            try:
                while reading is not None:
                    # Ack what the target confirms while the next batch is read (or,
                    # following an idle source, waited for).
                    while flights and not reading.done():
                        head = flights[0].task
                        if head is not None and not head.done():
                            await asyncio.wait((reading, head),
                                               return_when=asyncio.FIRST_COMPLETED)
                        if flights[0].done():
                            await self._settle()
                    deliveries = await reading
                    if not deliveries:
                        self.drained = not follow and not stop.is_set()
                        reading = read_next() if follow else None
                        continue
                    taken += len(deliveries)
                    reading = read_next()
                    if bucket is not None and not await bucket.take(len(deliveries), stop):
                        # Stopped while pacing: this batch goes back to the source
                        # unsettled, as does one read ahead meanwhile.
                        break
                    if self.dry_run:
                        self._count_dry(deliveries)
                        continue
                    # Make room, and settle whatever the target confirmed meanwhile. The
                    # first batch goes alone: its publish may create the topic or stream
                    # on the target, and a second one racing it could overtake it.
                    room = window if self.report.written > written_before else 1
                    while flights and (len(flights) >= room or flights[0].done()
                                       or any(f.done() and f.error() for f in flights)):
                        await self._settle()
                        room = window
                    flight = await self._launch(deliveries)
                    if flight is not None and flight.rest:
                        break  # an oversized message: nothing after it is published
                while flights:
                    await self._settle()
            finally:
                if reading is not None and not reading.done():
                    # What it fetched goes back to the source when the subscription closes.
                    reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reading
                await self._abandon()
        # The time ends with the last batch: the idle wait that proved the source
        # empty, and the verification, would only dilute the rate.
        self._save(sorted(self.returning), tick=False)
        if self.verify and not self.dry_run:
            self.report.verify = await self._verify(verify_group, batch)
        return self.report

    async def _abandon(self) -> None:
        """Cancelled or failing with batches still publishing: stop them, await them.

        Their ids stay in the checkpoint's ``in_flight`` (saved before they were
        published), and their deliveries go back to the source unacked.
        """
        flights = [f.task for f in self.flights if f.task is not None]
        self.flights.clear()
        for task in flights:
            task.cancel()
        if flights:
            await asyncio.wait(flights)
        for task in flights:
            if not task.cancelled():
                task.exception()  # retrieved: no "exception was never retrieved" warning

    async def _fetch(self, sub: Subscription, wanted: int,
                     stop: asyncio.Event) -> list[Delivery]:
        """One batch: wait for its first message, then top it up while more are ready."""
        timings = self.src.capabilities.timings
        # After a restart the previous run's unacked batches return within `redelivery`.
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

    def _count_dry(self, deliveries: list[Delivery]) -> None:
        """A dry run: count, and check the sizes; nothing is published nor acked."""
        report, read_ids = self.report, self.read_ids
        for delivery in deliveries:
            if delivery.message.id in read_ids:
                report.duplicates += 1
            read_ids[delivery.message.id] = ""
        report.read += len(deliveries)
        limit = self.dst.capabilities.max_message_size
        big = [d for d in deliveries if len(d.message.body) > limit]
        report.failed += len(big)
        report.failures.extend(self._too_large(d, limit) for d in big)
        self._progress()

    def _flying(self, message_id: str) -> bool:
        return message_id in self.returning or any(message_id in f.ids for f in self.flights)

    def _confirmed_before(self, message_id: str, body_hash: str) -> bool:
        """Whether an earlier run's target confirmed this very message (same id, same body).

        Ledgered by an earlier run and no longer in flight: its batch was confirmed. The
        body's hash must be the one ledgered with the id too — another message that
        reuses the id is published. An id ledgered with several bodies is never trusted:
        what is in flight is kept by id, so once one of its bodies came back and was
        published, the id no longer says whether the others were confirmed.
        """
        if (message_id not in self.read_before or self._flying(message_id)
                or message_id in self.other_bodies):
            return False
        return bool(body_hash) and body_hash == self.read_ids[message_id]

    def _another_body(self, message_id: str, body_hash: str) -> bool:
        """Record ``body_hash`` for an id read before; whether it is a new body for it."""
        if body_hash == self.read_ids[message_id]:
            return False
        others = self.other_bodies.setdefault(message_id, set())
        if body_hash in others:
            return False
        others.add(body_hash)
        return True

    async def _launch(self, deliveries: list[Delivery]) -> _Flight | None:
        """Record a batch, then start publishing it; ack at once what the target holds."""
        report, read_ids, returning = self.report, self.read_ids, self.returning
        trust_ledger = self.state.skips_confirmed
        keep_hashes = self.verify or self.checkpoint is not None
        fresh: list[tuple[str, str]] = []
        publish: list[Delivery] = []
        launching: set[str] = set()   # this batch's ids: in flight from now on
        confirmed: list[Delivery] = []
        for delivery in deliveries:
            message_id = delivery.message.id
            if message_id in read_ids:
                report.duplicates += 1
                body_hash = digest(delivery.message.body) if keep_hashes else ""
                if (trust_ledger and message_id not in launching
                        and self._confirmed_before(message_id, body_hash)):
                    confirmed.append(delivery)
                    continue
                report.republished += 1
                returning.discard(message_id)
                publish.append(delivery)
                launching.add(message_id)
                if keep_hashes and self._another_body(message_id, body_hash):
                    # Another message reusing the id: ledgered too, so that verify
                    # expects both bodies and a resume knows both were moved.
                    fresh.append((message_id, body_hash))
                continue
            if message_id in returning:
                # In flight when the last run stopped, which was killed before the
                # ledger listed it: read before (and counted), maybe written.
                report.duplicates += 1
                report.republished += 1
                returning.discard(message_id)
            entry = (message_id, digest(delivery.message.body) if keep_hashes else "")
            read_ids[message_id] = entry[1]
            fresh.append(entry)
            publish.append(delivery)
            launching.add(message_id)
        report.read += len(deliveries)
        # The checkpoint names them in flight, on disk, before the ledger lists them: an
        # id in the ledger and not in flight is then always one the target confirmed,
        # also after a power loss.
        self._tick()
        if self.checkpoint is not None:
            await self.checkpoint.save_durably(self._state_for(self._in_flight(publish)))
        self.ledger.append(fresh)
        if confirmed:
            # Not counted in `acked` again: it was when their batch was confirmed.
            await self._ack(confirmed)
        if not publish:
            self._progress()
            return None
        limit = self.dst.capabilities.max_message_size
        cut = next((i for i, d in enumerate(publish) if len(d.message.body) > limit),
                   len(publish))
        sent, rest = publish[:cut], publish[cut:]
        task = None
        if sent:
            # Tasks start in creation order: this batch's publish call is issued
            # before the next batch's.
            task = asyncio.create_task(self.dst.publish_many(
                self.state.to_topic, [_forward(d.message) for d in sent]))
        flight = _Flight(sent, rest, task)
        self.flights.append(flight)
        return flight

    async def _settle(self) -> None:
        """Wait for the oldest batch; ack it once confirmed, or fail the migration."""
        flight = self.flights[0]
        if flight.task is not None and not flight.task.done():
            await asyncio.wait((flight.task,))
        if flight.rest or any(f.done() and f.error() for f in self.flights):
            await self._fail()
        self.flights.popleft()
        self.report.written += len(flight.sent)
        # Counted before the acks, in the save that says the batch is confirmed: a kill
        # while acking leaves it counted, and its unacked part, read again, is acked
        # uncounted (confirmed before). Counted after, a kill would lose the count.
        self.report.acked += len(flight.sent)
        self._save(self._in_flight())
        await self._ack(flight.sent)
        self._progress()

    def _too_large(self, delivery: Delivery, limit: int) -> str:
        return (f"message {delivery.message.id} is {len(delivery.message.body)} bytes; "
                f"{self.dst.capabilities.name} accepts at most {limit} bytes")

    async def _ack(self, deliveries: list[Delivery]) -> None:
        """Ack confirmed messages; ``acked`` counted them when they were confirmed."""
        for delivery in deliveries:
            with contextlib.suppress(DeliveryLost):
                await delivery.ack()   # lost: redelivered, then counted as a duplicate

    async def _fail(self) -> NoReturn:
        """A batch failed: let the others finish, ack the confirmed ones, stop.

        Every batch in flight either confirms or fails on its own (none is cut off
        half-way, which would leave the target holding an unknown part of it); those
        confirmed are acked, the rest stays unacked on the source and in the
        checkpoint's ``in_flight``.
        """
        flights = list(self.flights)
        self.flights.clear()
        tasks = [f.task for f in flights if f.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        report = self.report
        unwritten: list[Delivery] = []
        confirmed: list[Delivery] = []
        # Why, in order, with how many messages each (window batches failing for one
        # reason, a target down, make one line).
        reasons: dict[str, int] = {}
        first: BaseException | None = None
        for flight in flights:
            error = flight.error()
            if error is None:
                report.written += len(flight.sent)
                report.acked += len(flight.sent)
                confirmed.extend(flight.sent)
            else:
                if not isinstance(error, UnibusError):
                    raise error  # a bug, not a broker failure
                unwritten.extend(flight.sent)
                reason = f"{type(error).__name__}: {error}"
                reasons[reason] = reasons.get(reason, 0) + len(flight.sent)
                first = first or error
            if flight.rest:
                reason = self._too_large(flight.rest[0], self.dst.capabilities.max_message_size)
                unwritten.extend(flight.rest)
                reasons[reason] = reasons.get(reason, 0) + len(flight.rest)
                first = first or MessageTooLarge(reason)
        report.failed += len(unwritten)
        report.failures.extend(f"{count} message(s) not written: {reason}"
                               for reason, count in reasons.items())
        # As in _settle: the confirmed batches are counted, and saved, before their acks.
        self._save([*self.returning, *(d.message.id for d in unwritten)])
        await self._ack(confirmed)
        # Not nacked: the subscription closes with them unsettled, which gives them back
        # where they were (a nack would queue them behind the rest, and on Kafka copy
        # them to the retry lane and commit the originals).
        raise MigrationFailed(
            f"the target {report.target} failed on {report.to_topic!r}: "
            f"{next(iter(reasons), 'no batch confirmed')}; "
            f"{report.written} written, {len(unwritten)} left unacked on the source",
            report) from first

    def _progress(self) -> None:
        self._tick()
        if self.progress is not None:
            self.progress(self.report)

    async def _verify(self, group: str, batch: int) -> VerifyReport:
        # Ids still returning were never confirmed and are unacked on the source (their
        # run failed or was killed): owed by the source, not lost by the target — while
        # this run stopped before it could read them. Once it found the source empty,
        # having waited the source's redelivery time, they are not coming back: lost.
        owed = () if self.drained else self.returning
        report = await read_back(self.dst, self.state.to_topic, group, batch,
                                 self.read_ids, self.verify_ledger, owed, self.other_bodies)
        if self.drained and self.returning:
            report.notes.append(
                f"{len(self.returning)} message(s) in flight when an earlier run stopped "
                "never came back from the source, though it was found empty after its "
                "redelivery time: counted lost where the target lacks them")
        return report
