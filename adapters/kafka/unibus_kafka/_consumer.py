"""The event-loop side of a subscription: fetch, hold, settle (the SPI ``Consumer``).

A :class:`~unibus_kafka._poller.Poller` owns the driver consumer and appends batches
of raw records, each with its partitions' states as of when it was taken, to its
inbox. Here, on the event loop, ``fetch`` turns them into deliveries, hands out at
most ``prefetch`` unsettled ones, and holds records whose due time has not come
(delayed publish, ``nack(delay)``) until then on the wall clock — never early, and
uncommitted while held, so they survive a restart. Settling logs the offset in its
partition's state (:class:`~unibus_kafka._offsets.PartitionState`); whoever commits
folds the log into the contiguous commit point first. ``nack`` copies the message
to the group's retry lane before settling it; ``reject`` publishes it to the
dead-letter topic first when one is configured.

The hot path does the least Python work per record it can: one loop per record
splits a batch by partition as it goes; a record of a subscribed topic itself
becomes a delivery from its offset alone (only the lanes' records are read for
bookkeeping headers: delayed publishes wait in the topic's delay lane), its fields
set directly and its body read as it is handed out, and decodes its message only
when it is read; ``KafkaDelivery.ack`` settles in one
coroutine with a flag check and a list append; no task and no thread hop per record.

A subscription's prefetch counts its unsettled deliveries per partition
(``PartitionState.open``: handed out, less settled), so a delivery of a revoked
partition stops counting with it; settling it raises ``DeliveryLost`` because its
state says revoked — closing the consumer marks its partitions' states so too. An
``ack`` looks at one flag of its state, ``alert``, before it takes the short way:
set once the partition is revoked, and while a fetch waits for room in the prefetch
(the slow way then wakes it).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, cast

from unibus.capabilities import Capabilities
from unibus.errors import DeliveryLost
from unibus.message import _ACK, Delivery, Message, _new
from unibus.spi import Consumer
from unibus_kafka._codec import (
    ATTEMPT,
    DUE,
    ORIGIN,
    decode,
    decode_plain,
)
from unibus_kafka._errors import Scrubber
from unibus_kafka._offsets import PartitionState
from unibus_kafka._poller import Poller

if TYPE_CHECKING:
    from unibus_kafka._producer import Producer
    from unibus_kafka._url import Settings

__all__ = ["KafkaConsumer", "KafkaDelivery"]

_NO_RECORDS: list[Any] = []
_NO_PARTS: Mapping[tuple[str, int], PartitionState] = MappingProxyType({})


class KafkaDelivery(Delivery):
    """A delivery bound to its record and its partition's bookkeeping.

    A record of a subscribed topic itself is handed out without decoding: its
    message is built when first read, and its ``body`` read without building the
    message at all. A lane's record comes decoded (its headers decide when and as
    which attempt it is delivered).

    Attributes:
        token: The driver's record.
        state: The consumer's bookkeeping of the record's partition.
        offset: The record's offset.
        due: Epoch seconds before which it must not be delivered, or ``0.0``.
    """

    __slots__ = ("due", "offset", "state")

    def __init__(self, record: Any, state: PartitionState, offset: int, topic: str,
                 group: str | None, attempt: int, consumer: KafkaConsumer,
                 message: Message | None, due: float = 0.0) -> None:
        # Delivery._setup, written out. KafkaConsumer._take writes this out once more
        # for a record of a subscribed topic (a _Plain delivery, once per record): a
        # field added here goes there too (a broker test checks that path sets every
        # field).
        self._message = message
        self.topic = topic
        self.group = group
        self.attempt = attempt
        self.token = record
        self.outcome = None
        self._consumer = consumer
        self.state = state
        self.offset = offset
        self.due = due

    def _decode(self) -> Message:
        return decode_plain(self.token)

    @property
    def body(self) -> bytes:
        """The message body (read without decoding the rest of the message)."""
        message = self._message
        if message is not None:
            return message.body
        value: bytes | None = self.token.value()
        return b"" if value is None else value

    async def ack(self) -> None:
        """Confirm the message (see :meth:`unibus.Delivery.ack`).

        Settled here, without the consumer's own coroutine: this runs once per record.
        While its state is alerted (revoked, or a fetch waits for room) it goes through
        ``KafkaConsumer.settle``, which raises or wakes the fetch.

        Raises:
            AlreadySettled: The delivery was settled before.
            DeliveryLost: The partition was revoked or the consumer closed.
        """
        state = self.state
        if self.outcome is not None or state.alert:
            self._settle(_ACK)   # raises AlreadySettled
            self._consumer.settle(self)  # type: ignore[attr-defined]  # a KafkaConsumer
            return
        self.outcome = _ACK
        state.settled(self.offset)


class _Plain(KafkaDelivery):
    """A record of a subscribed topic itself, delivered as it came (first attempt,
    never held), its body read from the record as it is handed out."""

    __slots__ = ("body",)


def _lost(delivery: Delivery) -> NoReturn:
    raise DeliveryLost(
        f"message {delivery.id} can no longer be settled: its partition was revoked or "
        "its consumer closed; the group redelivers it")


class KafkaConsumer(Consumer):
    """One subscription's consumer (see the module docstring)."""

    def __init__(self, *, settings: Settings, producer: Producer, scrub: Scrubber,
                 capabilities: Capabilities, topics: Sequence[str], lanes: Sequence[str],
                 group: str | None, retry_topics: dict[str, str], prefetch: int,
                 dead_letter: str | None, on_close: Callable[[KafkaConsumer], None]) -> None:
        self.capabilities = capabilities
        self._producer = producer
        self._topics = list(topics)
        self._group = group
        self._retry_topics = retry_topics          # origin topic → its retry lane
        self._prefetch = prefetch
        self._dead_letter = dead_letter
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        # Deliveries to hand out first, deliveries held until due, and the ones
        # handed out and not settled.
        self._ready: deque[KafkaDelivery] = deque()
        self._held: list[tuple[float, int, KafkaDelivery]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._poller = Poller(settings=settings, scrub=scrub, group=group, lanes=lanes,
                              waiting=lambda: self._waiter is not None, wake=self._wake,
                              forget_revoked=self._forget_revoked)
        self._inbox = self._poller.inbox
        # The batch of records being handed out, the position of the next one, and
        # the partitions' states when the batch was taken from the driver.
        self._run: list[Any] = _NO_RECORDS
        self._pos = 0
        self._run_parts: Mapping[tuple[str, int], PartitionState] = _NO_PARTS

    async def start(self) -> None:
        """Join the group (or assign every partition at its end); see ``Poller.start``.

        Raises:
            BrokerError: The broker refused.
        """
        await self._poller.start(self._topics, self._producer)

    # -- the event loop side -----------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _forget_revoked(self) -> None:
        self._ready = deque(d for d in self._ready if not d.state.revoked)
        self._held = [h for h in self._held if not h[2].state.revoked]
        heapq.heapify(self._held)
        self._wake()

    def _open(self) -> int:
        """How many deliveries are handed out and not settled (of partitions still owned)."""
        return sum(s.open() for s in self._poller.parts.values() if not s.revoked)

    def _pending(self) -> bool:
        return bool(self._inbox or self._ready or self._pos < len(self._run))

    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        """Return 1 to ``max_count`` deliveries, waiting up to ``timeout``.

        Raises:
            BrokerError: The consumer failed for good (refused credentials, fatal error).
        """
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        while not self._closed:
            if self._poller.failure is not None:
                raise self._poller.failure
            out = self._take(max_count)
            if out:
                return cast("list[Delivery]", out)   # a list of this adapter's deliveries
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            self._waiter = waiter = loop.create_future()
            room = self._prefetch - self._open()
            alerted: list[PartitionState] = []
            if room > 0:
                if self._pending():
                    self._waiter = None   # a batch landed while this waiter was not visible
                    continue
                # The thread waits for records on the driver, as many as there is room for.
                self._poller.want(room)
            else:
                # No room: the next settlement of a delivery handed out wakes this fetch
                # (KafkaDelivery.ack takes the slow way while its state is alerted).
                alerted = [s for s in self._poller.parts.values() if not s.alert]
                for state in alerted:
                    state.alert = True
            try:
                if remaining is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return []
            finally:
                self._waiter = None
                self._poller.hungry = False
                for state in alerted:
                    state.calm()
        return []

    def _take(self, max_count: int) -> list[KafkaDelivery]:
        # This runs once per fetched batch and loops once per record: it is written for
        # speed. A record of a subscribed topic becomes a delivery without decoding.
        room = min(max_count, self._prefetch - self._open())
        if room <= 0:
            return []
        out: list[KafkaDelivery] = []
        ready = self._ready
        while room > 0 and ready:   # redeliveries and records whose time has come
            delivery = ready.popleft()
            if delivery.state.revoked:
                continue
            delivery.state.handed += 1
            out.append(delivery)
            room -= 1
        group = self._group
        poller = self._poller
        revocations = poller.revocations
        run, pos, parts = self._run, self._pos, self._run_parts
        now = 0.0
        inbox = self._inbox
        drained = False
        # The partition of the record before, and its state: None when unknown, no
        # longer owned, or revoked (its records are dropped).
        last_topic: str | None = None
        last_partition = -1
        state: PartitionState | None = None
        topic = ""
        fetched: Callable[[int], None]   # set with each state
        new = _new
        plain = True
        # Deliveries before this index in `out` are counted handed out by their state.
        counted = len(out)
        while room > 0:
            if pos >= len(run):
                if not inbox and not drained:
                    # Take what the driver has, on the loop, as much as there is room for.
                    # The batch before is let go of first: its records (those already
                    # settled) die before the driver makes the next ones, rather than
                    # being live, and promoted by a garbage collection, while it does.
                    run = self._run = _NO_RECORDS
                    drained = True
                    poller.drain(room)
                if not inbox:
                    run, pos, parts = _NO_RECORDS, 0, _NO_PARTS
                    break
                parts, run = inbox.popleft()
                pos = 0
                last_topic, last_partition = None, -1
                continue
            # At most `room` records looked at per pass: those skipped (events, revoked
            # partitions, held lane records) leave room for another pass.
            end = min(len(run), pos + room)
            chunk = run[pos:end]
            pos = end
            handed = len(out)
            for raw in chunk:
                if raw.error() is not None:   # an event, not a record
                    poller.on_error(raw.error())
                    continue
                partition = raw.partition()
                name = raw.topic()
                if partition != last_partition or name != last_topic:
                    if state is not None:
                        state.handed += len(out) - counted
                    counted = len(out)
                    last_topic, last_partition = name, partition
                    state = parts.get((name, partition))
                    if state is None or state.revoked:
                        state = None   # its records die with the assignment they came in
                        continue
                    topic, plain = state.topic, state.plain
                    fetched = state.fetched
                elif state is None:
                    continue
                offset: int = raw.offset()
                fetched(offset)
                if plain:
                    # A record of the topic itself: delivered as it came, decoded when read.
                    # KafkaDelivery(raw, state, offset, topic, group, 1, self, None),
                    # written out: without the call, in ~60 % of its time.
                    delivery = new(_Plain)
                    value = raw.value()
                    delivery.body = b"" if value is None else value  # type: ignore[misc]
                    delivery._message = None
                    delivery.topic = topic
                    delivery.group = group
                    delivery.attempt = 1
                    delivery.token = raw
                    delivery.outcome = None
                    delivery._consumer = self
                    delivery.state = state
                    delivery.offset = offset
                    delivery.due = 0.0
                else:   # a lane's record: its bookkeeping headers say when and as what
                    message, origin, attempt, due = decode(raw)
                    delivery = KafkaDelivery(raw, state, offset, origin, group, attempt, self,
                                             message, due)
                    if due:
                        now = now or time.time()
                        if due > now:
                            self._hold(delivery)
                            continue
                out.append(delivery)
            # Counted handed out per pass and partition, not once per record.
            if state is not None:
                state.handed += len(out) - counted
            counted = len(out)
            room -= len(out) - handed
        self._run, self._pos, self._run_parts = run, pos, parts
        if poller.revocations != revocations:
            # The drain served a revocation: what this fetch took of those partitions
            # is the next owner's now (_forget_revoked, scheduled, cleans up the rest).
            out = [d for d in out if not d.state.revoked]
        return out

    def _hold(self, delivery: KafkaDelivery) -> None:
        """Keep ``delivery`` (uncommitted) until its due time on the wall clock."""
        heapq.heappush(self._held, (delivery.due, next(self._seq), delivery))
        if self._held[0][2] is delivery:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(max(0.0, delivery.due - time.time()),
                                                self._release_due)

    def _release_due(self) -> None:
        self._timer = None
        held = self._held
        # The timer runs on the monotonic clock; "not before" is the wall clock's,
        # so the due time is checked again here.
        now = time.time()
        while held and held[0][0] <= now:
            delivery = heapq.heappop(held)[2]
            if not delivery.state.revoked:
                self._ready.append(delivery)
        if held:
            self._timer = self._loop.call_later(max(0.0, held[0][0] - now),
                                                self._release_due)
        if self._ready:
            self._wake()

    def settle(self, delivery: KafkaDelivery) -> None:
        """Log ``delivery`` settled (committed once every earlier offset is settled too).

        Raises:
            DeliveryLost: The partition was revoked or the consumer closed.
        """
        state = delivery.state
        if state.revoked:
            # Taken away before this settlement: not committed here, the partition's
            # next owner gets the message.
            _lost(delivery)
        state.settled(delivery.offset)
        if self._waiter is not None:
            self._wake()

    async def ack(self, delivery: Delivery) -> None:
        """Settle as done (what :meth:`KafkaDelivery.ack` does).

        Raises:
            DeliveryLost: The partition was revoked or the consumer closed.
        """
        self.settle(cast(KafkaDelivery, delivery))   # only this consumer's deliveries

    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Redeliver no sooner than ``delay`` s, through the group's retry lane.

        Raises:
            DeliveryLost: The partition was revoked or the consumer closed.
            PublishFailed: The retry lane did not accept the message.
        """
        held = cast(KafkaDelivery, delivery)   # only this consumer's deliveries
        if held.state.revoked:
            _lost(held)
        due_us = time.time_ns() // 1000 + int(delay * 1_000_000)
        if self._group is None:
            # An ephemeral subscription dies with its consumer: redeliver from memory.
            self._hold(KafkaDelivery(held.token, held.state, held.offset, held.topic, None,
                                     held.attempt + 1, self, held.message,
                                     due_us / 1_000_000))
            self.settle(held)   # this one is done: its copy is handed out again when due
            return
        extra = [(ATTEMPT, str(held.attempt + 1)), (DUE, str(due_us)), (ORIGIN, held.topic)]
        await self._producer.publish(self._retry_topics[held.topic], (held.message,),
                                     extra=extra)
        self.settle(held)

    async def reject(self, delivery: Delivery) -> None:
        """Drop for good; publish to the dead-letter topic first when configured.

        Raises:
            DeliveryLost: The partition was revoked or the consumer closed.
            PublishFailed: The dead-letter topic did not accept the message.
        """
        rejected = cast(KafkaDelivery, delivery)   # only this consumer's deliveries
        if rejected.state.revoked:
            _lost(rejected)
        if self._dead_letter is not None:
            await self._producer.publish(self._dead_letter, (rejected.message,))
        self.settle(rejected)

    async def aclose(self) -> None:
        """Commit what is settled, leave the group; unsettled deliveries return to it."""
        if self._closed:
            return
        self._closed = True
        # Its deliveries can no longer be settled: their partitions go back to the group.
        self._poller.freeze_all()
        self._ready.clear()
        self._held.clear()
        self._run, self._pos, self._run_parts = _NO_RECORDS, 0, _NO_PARTS
        if self._timer is not None:
            self._timer.cancel()
        self._wake()
        self._on_close(self)
        await self._poller.stop()
