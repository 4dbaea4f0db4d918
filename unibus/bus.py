"""The bus: publish, subscribe and settle through one adapter.

:func:`connect` returns a :class:`Bus`; open it with ``async with`` (or ``await``).
The bus validates every message before it reaches the adapter, refuses
everything once closed, and closes its subscriptions when it closes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from unibus.capabilities import Capabilities
from unibus.errors import (
    BusClosed,
    InvalidMessage,
    InvalidName,
    MessageTooLarge,
    UnsupportedFeature,
)
from unibus.message import Delivery, Message
from unibus.registry import resolve
from unibus.spi import DEFAULT_PREFETCH, Adapter, Consumer
from unibus.url import URL, make_url

__all__ = ["DEFAULT_PREFETCH", "Bus", "Subscription", "connect"]

log = logging.getLogger("unibus")

# Dot-separated segments of letters, digits, '_' and '-': valid as a RabbitMQ routing
# key, a Kafka topic and a NATS subject token alike.
_NAME = re.compile(r"(?=.{1,200}$)[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


def connect(url: str | URL | None = None) -> Bus:
    """Return a bus for ``url``; open it with ``async with`` or ``await``.

    Args:
        url: The broker URL. Defaults to ``$UNIBUS_URL``, else ``memory://``.

    Raises:
        InvalidURL: The URL is malformed or has an unknown option.
        UnknownScheme: No adapter serves the scheme.
        AdapterNotInstalled: The scheme's adapter is not installed.
    """
    return Bus(url)


def check_name(kind: str, name: str) -> str:
    """Validate a topic or group name.

    Raises:
        InvalidName: The name is empty, too long, or has other characters than
            letters, digits, ``.``, ``_`` and ``-``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(f"invalid {kind} name {name!r}: use 1-200 letters, digits, '_' "
                          "or '-', in segments separated by single dots, not starting "
                          "with '-'")
    return name


class Bus:
    """A connection to one broker, through its adapter.

    Methods may be called concurrently from tasks of one event loop.
    """

    def __init__(self, url: str | URL | None = None) -> None:
        """Resolve the adapter for ``url``; no I/O until opened.

        Raises:
            InvalidURL: The URL is malformed or has an unknown option.
            UnknownScheme: No adapter serves the scheme.
            AdapterNotInstalled: The scheme's adapter is not installed.
        """
        self.url: URL = make_url(url if url is not None
                                 else os.environ.get("UNIBUS_URL") or "memory://")
        self.adapter: Adapter = resolve(self.url)(self.url)
        self.capabilities: Capabilities = self.adapter.capabilities
        self._max_size = self.capabilities.max_message_size
        self._opened = False
        self._closed = False
        self._opening = asyncio.Lock()
        self._subscriptions: set[Subscription] = set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._opened else "new"
        return f"<Bus {self.url} {state}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    async def open(self) -> Self:
        """Connect to the broker. Idempotent.

        Raises:
            BusClosed: The bus was closed.
            BrokerUnavailable: The broker cannot be reached within the connect timeout.
            AuthenticationFailed: The broker refused the credentials.
        """
        self._check_open()
        if self._opened:
            return self
        async with self._opening:
            self._check_open()
            if not self._opened:
                await self.adapter.connect()
                self._opened = True
        if self._closed:
            # aclose() ran while connect() was in flight: do not leave a connection open.
            await self.adapter.aclose()
            self._check_open()
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every subscription, then the connection. Idempotent; safe while a
        consumer is blocked (its iterator ends)."""
        if self._closed:
            return
        self._closed = True
        try:
            for sub in list(self._subscriptions):
                await sub.aclose()
        finally:
            await self.adapter.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed(f"the bus for {self.url} is closed; connect a new one")

    async def _ready(self) -> None:
        if not self._opened:
            await self.open()
        self._check_open()

    async def publish(self, topic: str, body: bytes, *, id: str | None = None,
                      key: str | None = None, headers: Mapping[str, str] | None = None,
                      delay: float | None = None, not_before: datetime | None = None) -> Message:
        """Publish one message and wait until the broker has accepted it.

        Args:
            topic: The topic.
            body: The payload (bytes).
            id: The message id; a new UUIDv7 when omitted.
            key: The ordering key.
            headers: ``str → str`` metadata.
            delay: Seconds before the message may be delivered.
            not_before: A UTC time before which the message is not delivered.

        Returns:
            The published message (with its id and timestamp).

        Raises:
            BusClosed: The bus is closed.
            InvalidName: The topic name is invalid.
            InvalidMessage: The body is not bytes, or headers are not ``str → str``.
            MessageTooLarge: The body exceeds ``capabilities.max_message_size``.
            UnsupportedFeature: A delay was asked of an adapter without delayed delivery.
            PublishFailed: The broker refused or lost the message.
            BrokerUnavailable: The broker cannot be reached.
        """
        self._check_open()
        message = Message(body, id, key, headers)
        await self.publish_many(topic, (message,), delay=delay, not_before=not_before)
        return message

    async def publish_many(self, topic: str, messages: Iterable[Message | bytes], *,
                           delay: float | None = None,
                           not_before: datetime | None = None) -> list[Message]:
        """Publish messages in order, batched, and wait until all are accepted.

        Every message is validated before any is sent: one bad message sends none.

        Args:
            topic: The topic.
            messages: :class:`Message` objects, or bodies (bytes).
            delay: Seconds before the messages may be delivered.
            not_before: A UTC time before which they are not delivered.

        Returns:
            The published messages.

        Raises:
            BusClosed: The bus is closed.
            InvalidName: The topic name is invalid.
            InvalidMessage: ``messages`` is a single body rather than an iterable of them,
                a body is not bytes, or headers are not ``str → str``.
            MessageTooLarge: A body exceeds ``capabilities.max_message_size``.
            UnsupportedFeature: A delay was asked of an adapter without delayed delivery.
            PublishFailed: The broker refused or lost a message (their ids attached).
            BrokerUnavailable: The broker cannot be reached.
        """
        self._check_open()
        check_name("topic", topic)
        if isinstance(messages, bytes | bytearray | memoryview | str):
            # Iterating one body would yield ints or characters: say what was meant.
            raise InvalidMessage(f"publish_many takes an iterable of messages or bodies, not "
                                 f"one {type(messages).__name__}; use publish() for a single "
                                 "body, or wrap it in a list")
        items = messages if isinstance(messages, list | tuple) else list(messages)
        if items and type(items[0]) is bytes:
            # Bodies (the common case): made at one moment, one id lock for the lot.
            batch = Message._of_bodies(items)
        else:
            batch = [m if type(m) is Message else self._coerce(m) for m in items]
        limit = self._max_size
        for m in batch:
            if len(m.body) > limit:
                raise MessageTooLarge(
                    f"message {m.id} is {len(m.body)} bytes; {self.capabilities.name} accepts "
                    f"at most {limit} bytes (see its max_message_size)")
        due = self._due(delay, not_before)
        if not batch:
            return batch
        await self._ready()
        await self.adapter.publish(topic, batch, not_before=due)
        return batch

    @staticmethod
    def _coerce(item: Message | bytes) -> Message:
        if isinstance(item, Message):
            return item
        return Message(item)

    def _due(self, delay: float | None, not_before: datetime | None) -> datetime | None:
        if delay is None and not_before is None:
            return None
        if delay is not None and not_before is not None:
            raise ValueError("give either delay or not_before, not both")
        if not self.capabilities.delayed_delivery:
            raise UnsupportedFeature(f"{self.capabilities.name} has no delayed delivery; "
                                     "publish without delay")
        if delay is not None:
            if not math.isfinite(delay) or delay < 0:
                raise ValueError(f"delay must be >= 0 seconds, got {delay}")
            return datetime.now(UTC) + timedelta(seconds=delay)
        assert not_before is not None
        # utcoffset(), not tzinfo: a tzinfo that knows no offset still makes a naive time.
        if not isinstance(not_before, datetime) or not_before.utcoffset() is None:
            raise ValueError("not_before must be a timezone-aware datetime (UTC)")
        return not_before

    async def declare_group(self, topic: str, group: str) -> None:
        """Create ``group`` on ``topic`` so that it retains messages from now on.

        Raises:
            BusClosed: The bus is closed.
            InvalidName: The topic or group name is invalid.
            BrokerError: The broker refused.
        """
        self._check_open()
        check_name("topic", topic)
        check_name("group", group)
        await self._ready()
        await self.adapter.declare_group(topic, group)

    def subscribe(self, topics: str | Sequence[str], *, group: str | None = None,
                  prefetch: int | None = None,
                  dead_letter: str | None = None) -> Subscription:
        """Return a subscription; open it with ``async with`` (or ``await``).

        Args:
            topics: One topic or several.
            group: A durable group (created if needed), or ``None`` for an ephemeral
                subscription that sees only what is published while it is open.
            prefetch: The most unsettled deliveries this consumer holds; ``None``: the
                adapter's ``default_prefetch`` (which its URL may set).
            dead_letter: The topic ``reject()`` routes messages to; ``None`` drops them.

        Raises:
            BusClosed: The bus is closed.
            InvalidName: A topic or group name is invalid.
            ValueError: ``prefetch`` is below 1 or no topic was given.
        """
        self._check_open()
        names = [topics] if isinstance(topics, str) else list(topics)
        if not names:
            raise ValueError("subscribe needs at least one topic")
        for name in names:
            check_name("topic", name)
        if group is not None:
            check_name("group", group)
        if dead_letter is not None:
            check_name("dead-letter topic", dead_letter)
            if not self.capabilities.dead_letter:
                raise UnsupportedFeature(f"{self.capabilities.name} has no dead-letter routing "
                                         "for reject(); subscribe without dead_letter")
        if prefetch is None:
            prefetch = self.adapter.default_prefetch
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        return Subscription(self, names, group, prefetch, dead_letter)


class Subscription:
    """An attached consumer: iterate it, or :meth:`fetch` batches.

    Iteration ends cleanly when the subscription or its bus is closed.
    Unsettled deliveries go back to the group on close.
    """

    def __init__(self, bus: Bus, topics: list[str], group: str | None, prefetch: int,
                 dead_letter: str | None) -> None:
        self.bus = bus
        self.topics = tuple(topics)
        self.group = group
        self.prefetch = prefetch
        self.dead_letter = dead_letter
        self._consumer: Consumer | None = None
        self._buffer: deque[Delivery] = deque()
        self._closed = False
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Subscription {','.join(self.topics)} group={self.group!r}>"

    async def open(self) -> Self:
        """Attach the consumer; it receives from the moment this returns.

        Raises:
            BusClosed: The bus or subscription is closed.
            BrokerError: The broker refused.
        """
        if self._consumer is not None and not self._closed:
            return self
        async with self._opening:
            if self._closed:
                raise BusClosed("this subscription is closed; subscribe again")
            if self._consumer is None:
                await self.bus._ready()
                consumer = await self.bus.adapter.open_consumer(
                    self.topics, self.group, prefetch=self.prefetch,
                    dead_letter=self.dead_letter)
                if self.bus.closed or self._closed:
                    # Closed while attaching: do not leave a consumer behind.
                    self._closed = True
                    await consumer.aclose()
                    raise BusClosed("the bus was closed while this subscription attached")
                self._consumer = consumer
                self.bus._subscriptions.add(self)
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Detach; unsettled deliveries return to the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self.bus._subscriptions.discard(self)
        if self._consumer is not None:
            await self._consumer.aclose()

    @property
    def closed(self) -> bool:
        """Whether the subscription was closed."""
        return self._closed

    async def fetch(self, max_count: int | None = None,
                    timeout: float | None = None) -> list[Delivery]:
        """Return up to ``max_count`` deliveries (default: prefetch), waiting up to ``timeout``.

        Returns:
            The deliveries; ``[]`` after the timeout or once closed.

        Raises:
            BusClosed: The subscription was never opened and the bus is closed.
            BrokerError: The broker failed.
        """
        if self._closed:
            return []
        if self._consumer is None:
            await self.open()
        assert self._consumer is not None
        if max_count is not None and max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        count = max_count or self.prefetch
        if self._buffer:
            out = [self._buffer.popleft() for _ in range(min(count, len(self._buffer)))]
            return out
        return await self._consumer.fetch(count, timeout)

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        buffer = self._buffer
        if buffer:
            return buffer.popleft()
        if self._closed:
            raise StopAsyncIteration
        if self._consumer is None:
            await self.open()
        assert self._consumer is not None
        # With no timeout, an adapter returns [] only once its consumer is closed.
        batch = await self._consumer.fetch(self.prefetch, None)
        if self._closed or not batch:
            raise StopAsyncIteration
        buffer.extend(batch)
        return buffer.popleft()
