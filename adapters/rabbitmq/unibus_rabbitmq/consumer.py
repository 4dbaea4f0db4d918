"""A RabbitMQ consumer: one channel, one ``basic.consume`` per topic, settled in batches.

Maps to
    a channel with ``basic.qos(prefetch)`` and a consumer on each queue of the
    subscription (a group's durable queue per topic, or an exclusive auto-delete
    queue per topic for an ephemeral subscription). Deliveries wait in a local
    buffer; ``fetch`` hands out at most ``prefetch`` unsettled ones in total, even
    across topics (RabbitMQ's prefetch counts per queue).

    - ``ack`` → ``basic.ack``, coalesced: the acks of one event-loop turn go out as
      one ``multiple`` ack up to the oldest delivery still held, plus single acks
      above it;
    - ``nack(0)`` → ``basic.nack(requeue)`` on quorum queues (the broker counts the
      delivery in ``x-delivery-count``); on classic queues, which count nothing, the
      message is republished to its queue with its attempt count, then acked;
    - ``nack(delay)`` → republished (confirmed) to the retry queue of its delay
      bucket, which dead-letters it back to this group's queue when its TTL expires,
      then acked: never redelivered early;
    - ``reject`` → republished (confirmed) to the dead-letter topic when the
      subscription has one, then acked; else ``basic.reject`` without requeue.

    When the channel dies (connection loss, broker-closed channel), every delivery
    from it is void: settling one raises :class:`~unibus.errors.DeliveryLost` (the
    broker redelivers it) and the consumer resumes on a new channel once the
    connection is back. Closing the consumer sends its pending acks, then closes the
    channel: the broker requeues everything unsettled.

URL
    Uses ``queue_type``, ``exchange`` and ``prefetch`` (see :mod:`unibus_rabbitmq.adapter`).

Driver
    aio-pika for the channel and declarations; aiormq (its protocol layer) for
    ``basic.consume`` / ``basic.ack``, which runs one task per delivery.

Capabilities
    ``redelivery``, ``nack_delay`` (emulated with TTL queues), ``dead_letter``,
    ``prefetch``; order is publish order for a single consumer, and a redelivery may
    let later messages overtake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from unibus.errors import BrokerError, BrokerUnavailable, DeliveryLost, UnibusError
from unibus.message import Delivery
from unibus.spi import Consumer
from unibus_rabbitmq._codec import ATTEMPT, RETRY, decode, encode_headers, properties
from unibus_rabbitmq._errors import map_errors
from unibus_rabbitmq._topology import bucket_ms

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel
    from aiormq.abc import DeliveredMessage
    from pamqp.commands import Basic

    from unibus_rabbitmq.adapter import RabbitMQAdapter

__all__ = ["RabbitMQConsumer"]


@dataclass(slots=True)
class _Token:
    generation: int
    tag: int
    queue: str


class RabbitMQConsumer(Consumer):
    """One subscription's consumer (see the module docstring)."""

    def __init__(self, adapter: RabbitMQAdapter, topics: Sequence[str], group: str | None,
                 prefetch: int, dead_letter: str | None) -> None:
        self.capabilities = adapter.capabilities
        self._adapter = adapter
        self._topics = tuple(topics)
        self._group = group
        self._prefetch = prefetch
        self._dead_letter = dead_letter
        self._password = adapter.settings.password
        # Classic queues (ephemeral ones always are) count no deliveries: nack republishes.
        self._count_by_republish = adapter.settings.queue_type == "classic" or group is None
        self._generation = 0
        self._channel: AbstractChannel | None = None
        self._raw: Any = None              # its aiormq channel, for consume / ack
        self._ready: deque[tuple[int, str, str, DeliveredMessage]] = deque()
        self._held: set[int] = set()       # tags handed out, not yet settled at the broker
        self._acks: list[int] = []         # tags acked, not yet sent
        self._flush: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._failure: UnibusError | None = None
        self._resuming = asyncio.Lock()
        self._resume_task: asyncio.Task[None] | None = None
        self._consuming = False
        self._closed = False

    async def start(self) -> None:
        """Open a channel, declare the queues and start consuming.

        Raises:
            BrokerError: The broker refused a declaration or the consumer.
            BrokerUnavailable: The connection is not usable.
        """
        adapter = self._adapter
        channel = await adapter.connection.channel(confirms=False)
        self._generation += 1
        generation = self._generation
        self._channel = channel
        self._consuming = False
        channel.close_callbacks.add(self._on_channel_close)
        try:
            with map_errors(f"consuming {', '.join(self._topics)}", self._password):
                await channel.set_qos(prefetch_count=self._prefetch)
                raw = self._raw = await channel.get_underlay_channel()
                for topic in self._topics:
                    if self._group is None:
                        queue = await adapter.topology.ephemeral(channel, topic)
                    else:
                        queue = await adapter.topology.group(topic, self._group)
                    await raw.basic_consume(queue, self._receiver(generation, topic, queue),
                                            no_ack=False)
        except BaseException:
            # A half-started channel is of no use: drop it (the broker requeues anything
            # it delivered), so that a later resume starts afresh.
            self._channel = None
            self._generation += 1
            adapter.topology.reset()   # a queue may have been deleted: declare it again
            if not channel.is_closed:
                with contextlib.suppress(UnibusError), map_errors("closing a channel"):
                    await channel.close()
            raise
        self._consuming = True
        self._failure = None
        if self._closed:
            # Closed while starting: give back what this channel may already hold.
            await self._close_channel()

    def _receiver(self, generation: int, topic: str, queue: str) -> Any:
        ready = self._ready

        async def receive(raw: DeliveredMessage) -> None:
            if generation == self._generation:
                ready.append((generation, topic, queue, raw))
                self._wake()

        return receive

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_channel_close(self, sender: Any, _exc: BaseException | None) -> None:
        if sender is not self._channel:
            return
        # Everything delivered on that channel is void: the broker requeues it.
        self._generation += 1
        self._ready.clear()
        self._held.clear()
        self._acks.clear()
        self._channel = None
        if self._flush is not None:
            # A write to a dead connection can block for ever in aiormq.
            self._flush.cancel()
        was_consuming, self._consuming = self._consuming, False
        if was_consuming and not self._closed and self._adapter.connection.is_open:
            # Only this channel died (e.g. the broker closed it): resume at once;
            # after a connection loss the adapter resumes every consumer instead.
            self._resume_task = asyncio.get_running_loop().create_task(self.resume())

    async def resume(self) -> None:
        """Resume on a new channel after a loss; record the failure if that fails."""
        async with self._resuming:
            if self._closed or self._channel is not None:
                return
            connection = self._adapter.connection
            failure = connection.failure
            if failure is None:
                try:
                    await self.start()
                    return
                except BrokerUnavailable:
                    if connection.failure is None:
                        # Lost again while resuming: the next recovery resumes us.
                        return
                    failure = connection.failure
                except UnibusError as exc:
                    failure = exc
            self._failure = failure
            self._wake()

    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        """Hand out up to ``max_count`` buffered deliveries, within the prefetch.

        Raises:
            BrokerError: The connection did not come back within ``recovery``, or the
                consumer could not resume on it.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ready = self._ready
        while not self._closed:
            failure = self._failure
            if failure is not None:
                if isinstance(failure, BrokerError):
                    raise failure
                raise BrokerError(f"the consumer of {', '.join(self._topics)} could not "
                                  f"recover: {failure}")
            room = min(max_count, self._prefetch - len(self._held))
            if room > 0 and ready:
                out = self._hand_out(room)
                if out:
                    return out
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            self._waiter = waiter = loop.create_future()
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return []
            finally:
                self._waiter = None
        return []

    def _hand_out(self, room: int) -> list[Delivery]:
        ready = self._ready
        held = self._held
        generation = self._generation
        group = self._group
        out: list[Delivery] = []
        while ready and len(out) < room:
            gen, topic, queue, raw = ready.popleft()
            if gen != generation:
                continue
            message, before = decode(raw)
            tag = cast("Basic.Deliver", raw.delivery).delivery_tag or 0
            held.add(tag)
            out.append(Delivery(message, topic=topic, group=group, attempt=before + 1,
                                consumer=self, token=_Token(gen, tag, queue)))
        return out

    def _take(self, delivery: Delivery) -> _Token:
        token: _Token = delivery.token
        if token.generation != self._generation or token.tag not in self._held:
            raise DeliveryLost(
                f"message {delivery.id} can no longer be settled: the channel it came on "
                "closed (connection loss or consumer close) and RabbitMQ redelivers it")
        return token

    def _release(self, token: _Token) -> None:
        self._held.discard(token.tag)
        if self._waiter is not None:
            self._wake()

    async def ack(self, delivery: Delivery) -> None:
        """Ack ``delivery``; the ack goes out with the others of this event-loop turn.

        Raises:
            DeliveryLost: Its channel closed; RabbitMQ redelivers it.
        """
        token = self._take(delivery)
        self._release(token)
        self._queue_ack(token.tag)

    def _queue_ack(self, tag: int) -> None:
        self._acks.append(tag)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send_acks())

    async def _send_acks(self) -> None:
        try:
            await self._flush_acks()
        finally:
            self._flush = None

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        channel = self._channel
        if not acks or channel is None:
            return
        acks.sort()
        # One multiple ack covers every tag up to the oldest still held (later tags are
        # still buffered or held, so never acked by mistake); the rest go singly.
        floor = min(self._held) if self._held else None
        below = [t for t in acks if floor is None or t < floor]
        above = acks[len(below):]
        raw = self._raw
        with contextlib.suppress(UnibusError), map_errors("acking", self._password):
            if below:
                await raw.basic_ack(below[-1], multiple=len(below) > 1, wait=False)
            for tag in above:
                await raw.basic_ack(tag, wait=False)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Requeue ``delivery``, or republish it through the retry queue of ``delay``.

        Raises:
            DeliveryLost: Its channel closed; RabbitMQ redelivers it.
            PublishFailed: The republished copy was not confirmed (the original stays
                unacked and comes back when the consumer closes).
        """
        token = self._take(delivery)
        if delay <= 0 and not self._count_by_republish:
            self._release(token)
            await self._basic("nacking", "basic_nack", token.tag, requeue=True)
            return
        extra: dict[str, Any] = {ATTEMPT: delivery.attempt}
        ms = bucket_ms(delay)
        if ms:
            extra[RETRY] = str(ms)
        await self._republish(delivery, token, "", token.queue, extra, retry=ms)

    async def reject(self, delivery: Delivery) -> None:
        """Drop ``delivery``, or republish it to the dead-letter topic, then ack it.

        Raises:
            DeliveryLost: Its channel closed; RabbitMQ redelivers it.
            PublishFailed: The dead-letter copy was not confirmed (as for ``nack``).
        """
        token = self._take(delivery)
        if self._dead_letter is None:
            self._release(token)
            await self._basic("rejecting", "basic_reject", token.tag, requeue=False)
            return
        await self._republish(delivery, token, self._adapter.topology.exchange,
                              self._dead_letter, None, retry=0)

    async def _republish(self, delivery: Delivery, token: _Token, exchange: str,
                         routing_key: str, extra: dict[str, Any] | None, *, retry: int) -> None:
        # The original stays held (so no multiple ack covers it) until its copy is
        # confirmed; if the copy fails, it stays unacked and the broker redelivers it
        # when this consumer closes.
        message = delivery.message
        item = (message.id, message.body, properties(message, encode_headers(message, extra)))
        adapter = self._adapter
        if retry:
            await adapter.send_delayed("retry", retry, routing_key, [item])
        else:
            with map_errors(f"settling message {message.id}", self._password):
                await adapter.publisher.send(exchange, routing_key, [item],
                                             must_route=exchange != adapter.topology.exchange)
        if token.generation == self._generation and token.tag in self._held:
            self._release(token)
            self._queue_ack(token.tag)

    async def _basic(self, what: str, method: str, tag: int, *, requeue: bool) -> None:
        channel = self._channel
        try:
            if channel is None:
                raise DeliveryLost("no channel")
            with map_errors(what, self._password):
                # Bounded: a write to a connection that just died can block in aiormq.
                async with asyncio.timeout(self._adapter.settings.connect_timeout):
                    await getattr(self._raw, method)(tag, requeue=requeue, wait=False)
        except UnibusError as exc:
            raise DeliveryLost(f"{what} failed: the channel closed ({exc}); RabbitMQ "
                               "redelivers the message") from None

    async def aclose(self) -> None:
        """Send the pending acks, then close the channel: RabbitMQ requeues the rest."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._adapter.forget(self)
        if self._resume_task is not None:
            self._resume_task.cancel()
        # Bounded: writes to a connection that died unnoticed can block in aiormq; the
        # broker then redelivers what these acks were for.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._adapter.settings.connect_timeout):
                if self._flush is not None:
                    await asyncio.wait((self._flush,))
                await self._flush_acks()
        await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._generation += 1
        self._ready.clear()
        self._held.clear()
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(UnibusError), map_errors("closing a consumer",
                                                              self._password):
                await channel.close()
