"""The event-loop side of a subscription: fetch, hold, settle (the SPI ``Consumer``).

A :class:`~unibus_kafka._poller.Poller` thread owns the driver consumer and appends
batches of raw records, each bound to its partition's state, to its inbox. Here,
on the event loop, ``fetch`` decodes them, hands out at most ``prefetch`` unsettled
deliveries, and holds records whose due time has not come (delayed publish,
``nack(delay)``) until then on the wall clock — never early, and uncommitted while
held, so they survive a restart. Settling advances the partition's contiguous
commit point (:class:`~unibus_kafka._offsets.PartitionState`), which the thread
commits. ``nack`` copies the message to the group's retry lane before settling it;
``reject`` publishes it to the dead-letter topic first when one is configured.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from unibus.capabilities import Capabilities
from unibus.errors import DeliveryLost
from unibus.message import Delivery
from unibus.spi import Consumer
from unibus_kafka._codec import ATTEMPT, DUE, ORIGIN, Record, decode
from unibus_kafka._errors import Scrubber
from unibus_kafka._poller import Poller

if TYPE_CHECKING:
    from unibus_kafka._producer import Producer
    from unibus_kafka._url import Settings

__all__ = ["KafkaConsumer"]


class KafkaConsumer(Consumer):
    """One subscription's consumer (see the module docstring)."""

    def __init__(self, *, settings: Settings, producer: Producer, scrub: Scrubber,
                 capabilities: Capabilities, topics: Sequence[str], group: str | None,
                 retry_topics: dict[str, str], prefetch: int, dead_letter: str | None,
                 on_close: Callable[[KafkaConsumer], None]) -> None:
        self.capabilities = capabilities
        self._producer = producer
        self._topics = list(topics)
        self._group = group
        self._retry_topics = retry_topics          # origin topic → its retry lane
        self._prefetch = prefetch
        self._dead_letter = dead_letter
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        # Decoded records to deliver first, records held until due, and the records
        # handed out and not settled (a record is its delivery's token).
        self._ready: deque[Record] = deque()
        self._held: list[tuple[float, int, Record]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._unsettled: set[Record] = set()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._poller = Poller(settings=settings, scrub=scrub, group=group,
                              high=max(8 * prefetch, 10_000),
                              waiting=lambda: self._waiter is not None, wake=self._wake,
                              forget_revoked=self._forget_revoked)
        self._inbox = self._poller.inbox
        self._room = self._poller.room
        self._high = self._poller.high

    async def start(self) -> None:
        """Join the group (or assign every partition at its end); see ``Poller.start``.

        Raises:
            BrokerError: The broker refused.
        """
        await self._poller.start(self._topics, [self._retry_topics[t] for t in self._topics
                                                if t in self._retry_topics],
                                 self._producer)

    # -- the event loop side -----------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _forget_revoked(self) -> None:
        self._unsettled = {r for r in self._unsettled if not r.state.revoked}
        self._ready = deque(r for r in self._ready if not r.state.revoked)
        self._held = [h for h in self._held if not h[2].state.revoked]
        heapq.heapify(self._held)
        self._wake()

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
                return out
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            self._waiter = waiter = loop.create_future()
            if (self._inbox or self._ready) and len(self._unsettled) < self._prefetch:
                self._waiter = None   # a batch landed while this waiter was not yet visible
                continue
            try:
                if remaining is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return []
            finally:
                self._waiter = None
        return []

    def _take(self, max_count: int) -> list[Delivery]:
        unsettled = self._unsettled
        room = min(max_count, self._prefetch - len(unsettled))
        if room <= 0:
            return []
        out: list[Delivery] = []
        group = self._group
        ready = self._ready
        while room > 0 and ready:   # redeliveries and records whose time has come
            record = ready.popleft()
            if record.state.revoked:
                continue
            unsettled.add(record)
            out.append(Delivery(record.message, topic=record.topic, group=group,
                                attempt=record.attempt, consumer=self, token=record))
            room -= 1
        inbox = self._inbox
        if len(inbox) <= self._high // 2 and not self._room.is_set():
            self._room.set()
        tracked = group is not None
        now = 0.0
        while room > 0 and inbox:
            state, raw = inbox.popleft()
            if state.revoked:
                continue
            record = decode(raw, state)
            if tracked:
                state.fetched(record.offset)
            if record.due:
                now = now or time.time()
                if record.due > now:
                    self._hold(record)
                    continue
            unsettled.add(record)
            out.append(Delivery(record.message, topic=record.topic, group=group,
                                attempt=record.attempt, consumer=self, token=record))
            room -= 1
        return out

    def _hold(self, record: Record) -> None:
        """Keep ``record`` (uncommitted) until its due time on the wall clock."""
        heapq.heappush(self._held, (record.due, next(self._seq), record))
        if self._held[0][2] is record:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(max(0.0, record.due - time.time()),
                                                self._release_due)

    def _release_due(self) -> None:
        self._timer = None
        held = self._held
        # The timer runs on the monotonic clock; "not before" is the wall clock's,
        # so the due time is checked again here.
        now = time.time()
        while held and held[0][0] <= now:
            record = heapq.heappop(held)[2]
            if not record.state.revoked:
                self._ready.append(record)
        if held:
            self._timer = self._loop.call_later(max(0.0, held[0][0] - now),
                                                self._release_due)
        if self._ready:
            self._wake()

    def _release(self, delivery: Delivery) -> Record:
        record: Record = delivery.token
        try:
            self._unsettled.remove(record)
        except KeyError:
            raise DeliveryLost(
                f"message {delivery.id} can no longer be settled: its partition was "
                "revoked or its consumer closed; the group redelivers it") from None
        return record

    def _settle(self, record: Record) -> None:
        state = record.state
        if self._group is not None and not state.revoked:
            state.settle(record.offset)
        if self._waiter is not None:
            self._wake()

    async def ack(self, delivery: Delivery) -> None:
        """Settle as done; committed once every earlier offset is settled too.

        Raises:
            DeliveryLost: The partition was revoked or the consumer closed.
        """
        self._settle(self._release(delivery))

    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Redeliver no sooner than ``delay`` s, through the group's retry lane.

        Raises:
            DeliveryLost: The partition was revoked or the consumer closed.
            PublishFailed: The retry lane did not accept the message.
        """
        record: Record = delivery.token
        if record not in self._unsettled:
            self._release(delivery)   # raises DeliveryLost
        due_us = time.time_ns() // 1000 + int(delay * 1_000_000)
        if self._group is None:
            # An ephemeral subscription dies with its consumer: redeliver from memory.
            self._release(delivery)
            record.attempt += 1
            record.due = due_us / 1_000_000
            self._hold(record)
            return
        extra = [(ATTEMPT, str(delivery.attempt + 1)), (DUE, str(due_us)),
                 (ORIGIN, delivery.topic)]
        await self._producer.publish(self._retry_topics[delivery.topic], (delivery.message,),
                                     extra=extra)
        self._settle(self._release(delivery))

    async def reject(self, delivery: Delivery) -> None:
        """Drop for good; publish to the dead-letter topic first when configured.

        Raises:
            DeliveryLost: The partition was revoked or the consumer closed.
            PublishFailed: The dead-letter topic did not accept the message.
        """
        if delivery.token not in self._unsettled:
            self._release(delivery)   # raises DeliveryLost
        if self._dead_letter is not None:
            await self._producer.publish(self._dead_letter, (delivery.message,))
        self._settle(self._release(delivery))

    async def aclose(self) -> None:
        """Commit what is settled, leave the group; unsettled deliveries return to it."""
        if self._closed:
            return
        self._closed = True
        self._unsettled.clear()
        self._ready.clear()
        self._held.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._wake()
        self._on_close(self)
        await self._poller.stop()
