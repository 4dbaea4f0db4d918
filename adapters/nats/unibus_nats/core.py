"""The core NATS adapter: ``nats+core://`` — subjects and queue groups, at-most-once.

Maps to
    topic → subject ``<prefix>.<topic>`` (``.`` in names carried as ``~``);
    group → a queue group on that subject (competing consumers inside a group,
    every group gets every message) that exists only while members are attached;
    ephemeral subscription → a plain subscription; ack → nothing to do;
    nack → ``UnsupportedFeature``; reject → dropped; delay, dedup → absent.

URL
    ``nats+core://[user:password@]host[:port][,host[:port]...][?option=value&...]``

    Options: ``prefix`` (``unibus``), ``token``, ``nkeys_seed`` (seed file), ``creds``
    (credentials file), ``tls`` (false), ``tls_ca``, ``tls_cert``, ``tls_key``,
    ``tls_hostname``, ``name`` (``unibus``), ``connect_timeout`` (5 s),
    ``reconnect_wait`` (0.5 s), ``retry_for`` (30 s: how long a publish waits for a
    lost connection), ``max_message_size`` (1000000), ``buffer`` (65536 messages per
    consumer; beyond it the oldest are dropped and a warning logged).

Driver
    nats-py (``nats``), imported lazily.

Capabilities
    Honestly at-most-once: not persistent; publish not confirmed (``publish`` flushes
    to the server, so a dead connection raises, but the server may still drop the
    message); no group retention (``declare_group`` only validates: a message
    published while a group has no member is gone); no replay; no redelivery (``nack``
    raises ``UnsupportedFeature``; unsettled deliveries of a closed consumer are gone);
    no dead letters (``subscribe(dead_letter=...)`` raises ``UnsupportedFeature``); no
    delayed delivery; no dedup; publish order kept for one consumer; prefetch bounds
    the unsettled deliveries handed to one consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

from unibus.capabilities import Capabilities, Ordering, RedeliveryOrder, Support, Timings
from unibus.errors import (
    BrokerError,
    BrokerUnavailable,
    DeliveryLost,
    UnsupportedFeature,
)
from unibus.message import Delivery, Message
from unibus.options import Options
from unibus.spi import Adapter, Consumer
from unibus.url import URL
from unibus_nats import _wire as wire
from unibus_nats._codec import decode, decode_block, decode_plain, encode_headers, header_block
from unibus_nats._connection import Connection
from unibus_nats._errors import map_errors
from unibus_nats._url import CORE_OPTIONS, Settings, parse_settings, token

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["CoreNatsAdapter"]

log = logging.getLogger("unibus.nats")

_HEADER_ROOM = 1024
# Messages written to the client's buffer at once: one write instead of one per message.
_CHUNK = 256


class _CoreDelivery(Delivery):
    """A core delivery: the message is decoded from what arrived when first read."""

    __slots__ = ("_block", "_data", "_received_ns", "_subject")

    def __init__(self, data: bytes, block: bytes | dict[str, str] | None,
                 subject: str | bytes, topic: str, group: str | None, seq: int,
                 consumer: _CoreConsumer) -> None:
        self._setup(None, topic, group, 1, consumer, seq)
        self._data = data
        self._block = block
        self._subject = subject
        # A message without a timestamp header gets the time it arrived.
        self._received_ns = time.time_ns()

    def _decode(self) -> Message:
        data, block = self._data, self._block
        try:
            message = decode_plain(data, block) if type(block) is bytes else None
            if message is None:
                subject = self._subject
                stream = subject if isinstance(subject, str) else subject.decode()
                if isinstance(block, bytes):
                    return decode_block(data, block, stream, self.token, self._received_ns)
                return decode(data, block, stream, self.token, self._received_ns)
        except Exception as exc:
            # A message we cannot decode arrives as a new message with its body intact.
            log.warning("nats+core: message on %r has malformed unibus headers (%s)",
                        self.topic, exc)
            return Message(data)
        return message

    @property
    def body(self) -> bytes:
        """The message body (read without decoding the rest of the message)."""
        return self._data


class _CoreConsumer(Consumer):
    """Subscriptions on core subjects; deliveries handed out within the prefetch."""

    def __init__(self, adapter: CoreNatsAdapter, topics: Sequence[str], group: str | None,
                 prefetch: int, buffer: int) -> None:
        self.capabilities = adapter.capabilities
        self._adapter = adapter
        self._topics = list(dict.fromkeys(topics))
        self._group = group
        self._prefetch = prefetch
        self._buffer = buffer
        self._ready: deque[Delivery] = deque()
        self._unsettled: set[int] = set()
        self._subs: list[Subscription] = []
        self._nc: Client | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self._count = 0
        self._dropped = 0

    async def start(self) -> None:
        """Subscribe, and make sure the server registered the interest.

        Raises:
            BrokerError: The server refused.
        """
        self._nc = nc = self._adapter.conn.nc
        queue = token(self._group) if self._group is not None else ""
        with map_errors(f"subscribe to {', '.join(map(repr, self._topics))}"):
            for topic in self._topics:
                async def on_msg(msg: Msg, topic: str = topic) -> None:
                    self._receive(topic, msg.subject, msg.data, msg.headers)
                sub = await nc.subscribe(
                    self._adapter.subject(topic), queue=queue, cb=on_msg,
                    pending_msgs_limit=-1, pending_bytes_limit=-1)
                self._subs.append(sub)
                # Straight from the protocol parser, skipping nats-py's Msg, queue and
                # task hop; where that is not possible, on_msg keeps receiving.
                wire.route(nc, sub, functools.partial(self._receive, topic))
            # Receiving from the moment open_consumer returns: the server has the SUBs.
            await wire.flush(nc, self._adapter.settings["connect_timeout"])

    def _receive(self, topic: str, subject: str | bytes, data: bytes,
                 headers: bytes | dict[str, str] | None) -> None:
        if self._closed:
            return
        self._count += 1
        # Decoded when first read: this runs inside nats-py's read loop, once per message.
        ready = self._ready
        ready.append(_CoreDelivery(data, headers, subject, topic, self._group, self._count,
                                   self))
        if len(ready) > self._buffer:
            ready.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 10_000 == 0:
                log.warning("nats+core: consumer of %r fell behind; %d message(s) dropped "
                            "(buffer=%d)", topic, self._dropped, self._buffer)
        self._changed.set()

    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ready = self._ready
        while not self._closed:
            room = min(max_count, self._prefetch - len(self._unsettled))
            if ready and room > 0:
                out = [ready.popleft() for _ in range(min(room, len(ready)))]
                self._unsettled.update(d.token for d in out)
                return out
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return []
        return []

    def _take(self, delivery: Delivery) -> None:
        try:
            self._unsettled.remove(delivery.token)
        except KeyError:
            raise DeliveryLost(f"message {delivery.id} can no longer be settled: its consumer "
                               "was closed") from None
        self._changed.set()

    async def ack(self, delivery: Delivery) -> None:
        self._take(delivery)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        raise UnsupportedFeature("nats+core does not redeliver: nack is not supported; "
                                 "ack or reject the delivery (or use nats:// for JetStream)")

    async def reject(self, delivery: Delivery) -> None:
        self._take(delivery)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        self._ready.clear()
        self._unsettled.clear()
        for sub in self._subs:
            if self._nc is not None:
                wire.unroute(self._nc, sub)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        self._adapter.consumers.discard(self)


class CoreNatsAdapter(Adapter):
    """The ``nats+core://`` adapter (see the module docstring)."""

    options: ClassVar[Options] = CORE_OPTIONS

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        self._settings = settings = parse_settings(url, self.options)
        self._prefix: str = settings["prefix"]
        self.capabilities = Capabilities(
            name="nats+core", persistent=False, publish_confirms=False, group_retention=False,
            replay_for_new_groups=False, redelivery=False, nack_delay=Support.ABSENT,
            dead_letter=False, ordering=Ordering.SINGLE_CONSUMER,
            redelivery_order=RedeliveryOrder.NOT_APPLICABLE, delayed_delivery=Support.ABSENT,
            dedup_window=None, max_message_size=settings["max_message_size"],
            timings=Timings(delivery=1.0, redelivery=1.0, delay_slack=1.0,
                            connect_timeout=settings["connect_timeout"] + 1.0,
                            recovery=max(5.0, settings["reconnect_wait"] + 3.0)))
        self._conn: Connection | None = None
        self.consumers: set[_CoreConsumer] = set()

    def __repr__(self) -> str:
        return f"<CoreNatsAdapter {self.url}>"

    @property
    def settings(self) -> Settings:
        """The parsed URL options."""
        return self._settings

    def subject(self, topic: str) -> str:
        """The subject that carries ``topic``."""
        return f"{self._prefix}.{token(topic)}"

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise BrokerUnavailable("the nats+core adapter is not connected")
        return self._conn

    async def connect(self) -> None:
        if self._conn is not None:
            return
        conn = Connection(self._settings)
        await conn.open()
        max_payload = int(conn.server_info.get("max_payload", 0))
        wanted = self._settings["max_message_size"] + _HEADER_ROOM
        if max_payload < wanted:
            await conn.close()
            raise BrokerError(
                f"{self.url}: the server's max_payload is {max_payload} bytes; "
                f"max_message_size={self._settings['max_message_size']} needs {wanted} "
                f"(lower max_message_size to {max_payload - _HEADER_ROOM})")
        self._conn = conn

    async def aclose(self) -> None:
        for consumer in list(self.consumers):
            await consumer.aclose()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def publish(self, topic: str, messages: Sequence[Message], *,
                      not_before: datetime | None = None) -> None:
        if not_before is not None:
            raise UnsupportedFeature("nats+core has no delayed delivery; publish without delay")
        conn = self.conn
        nc = conn.nc
        subject = self.subject(topic)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings["retry_for"]
        with map_errors(f"publish to {topic!r}"):
            if wire.can_write_directly(nc):
                for start in range(0, len(messages), _CHUNK):
                    if not nc.is_connected:
                        await conn.wait_up(deadline)
                    await wire.publish_blocks(nc, subject, [
                        (header_block(m), m.body) for m in messages[start:start + _CHUNK]])
            else:
                for message in messages:
                    if not nc.is_connected:
                        await conn.wait_up(deadline)
                    await wire.publish(nc, subject, message.body, encode_headers(message))
            # Not a confirmation: it only proves the server read what was written.
            await wire.flush(nc, self._settings["connect_timeout"])

    async def declare_group(self, topic: str, group: str) -> None:
        """Nothing to create: a queue group exists only while members are attached."""
        self.conn.nc  # noqa: B018 - raises BrokerUnavailable when not connected

    async def open_consumer(self, topics: Sequence[str], group: str | None, *, prefetch: int,
                            dead_letter: str | None) -> Consumer:
        if dead_letter is not None:
            raise UnsupportedFeature("nats+core has no dead letters: subscribe without "
                                     "dead_letter (or use nats:// for JetStream)")
        consumer = _CoreConsumer(self, topics, group, prefetch, self._settings["buffer"])
        self.consumers.add(consumer)
        try:
            await consumer.start()
        except BaseException:
            await consumer.aclose()
            raise
        return consumer
