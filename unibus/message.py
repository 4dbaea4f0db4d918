"""Messages and deliveries: what is published, and what a consumer receives.

A :class:`Message` is immutable: ``id`` (a UUIDv7 string unless given), ``body``
(bytes, exact), ``key`` (optional ordering key), ``headers`` (``str → str``) and
``timestamp`` (UTC). A :class:`Delivery` is one received message plus its
``topic``, ``group`` and ``attempt``, and it is settled exactly once: ``ack()``,
``nack(delay=...)`` or ``reject()``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from unibus.errors import AlreadySettled, InvalidMessage

if TYPE_CHECKING:
    from unibus.spi import Consumer

__all__ = ["Delivery", "Message", "Outcome", "new_message_id"]

_getrandbits = random.getrandbits


class _IdClock:
    """The millisecond and sequence of the last id, so ids of one process sort in order."""

    __slots__ = ("ms", "seq")

    def __init__(self) -> None:
        self.ms = 0
        self.seq = 0


_clock = _IdClock()


class _Keep:
    """The default of ``Message.replace(key=...)``: keep the key (``None`` clears it)."""


_KEEP = _Keep()


def new_message_id() -> str:
    """Return a new UUIDv7 string: unique, 36 characters, time-ordered.

    Ids made by one process sort in the order they were made, also within one
    millisecond (RFC 9562 method 1: a counter in ``rand_a``, seeded at random
    each millisecond) and when the wall clock steps back.
    """
    clock = _clock
    ms = time.time_ns() // 1_000_000
    if ms > clock.ms:
        # A random start leaves room for 2048 or more ids in the same millisecond.
        clock.ms, clock.seq = ms, _getrandbits(11)
    else:
        clock.seq += 1
        if clock.seq > 0xFFF:
            clock.ms, clock.seq = clock.ms + 1, 0
    ms = clock.ms
    rand = _getrandbits(62)
    return "%08x-%04x-7%03x-%04x-%012x" % (  # noqa: UP031 - the fastest formatting here
        ms >> 16, ms & 0xFFFF, clock.seq, 0x8000 | rand >> 48, rand & 0xFFFFFFFFFFFF)


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_set = object.__setattr__


class Message:
    """One message: immutable, validated on construction.

    Attributes:
        body: The payload, delivered byte for byte.
        id: A unique id; defaults to a new UUIDv7. Brokers that deduplicate use it.
        key: Optional ordering key: the same key keeps its order where the
            adapter declares per-key ordering.
        headers: ``str → str`` metadata, delivered exactly (a read-only copy).
        timestamp: UTC time of creation (which is publish time unless given).
    """

    # A hand-written class rather than a frozen dataclass: messages are built on the
    # hot path, and this __init__ costs about half of the generated one.
    __slots__ = ("body", "headers", "id", "key", "timestamp")

    body: bytes
    id: str
    key: str | None
    headers: Mapping[str, str]
    timestamp: datetime

    def __init__(self, body: bytes, id: str | None = None, key: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 timestamp: datetime | None = None) -> None:
        """Build a message.

        Raises:
            InvalidMessage: The body is not bytes, or the id, key, headers or
                timestamp have the wrong types.
        """
        if type(body) is not bytes:
            body = _coerce_body(body)
        if id is None:
            id = new_message_id()
        elif type(id) is not str or not id:
            raise InvalidMessage(f"message id must be a non-empty str, not {id!r}")
        if key is not None and type(key) is not str:
            raise InvalidMessage(f"message key must be a str or None, not {type(key).__name__}")
        # A private read-only copy: one Message fans out to many deliveries, and
        # none of them may change what the others see.
        headers = _NO_HEADERS if headers is None else _check_headers(headers)
        if timestamp is None:
            timestamp = datetime.now(UTC)
        elif not isinstance(timestamp, datetime) or timestamp.utcoffset() is None:
            raise InvalidMessage("message timestamp must be a timezone-aware datetime")
        _set(self, "body", body)
        _set(self, "id", id)
        _set(self, "key", key)
        _set(self, "headers", headers)
        _set(self, "timestamp", timestamp)

    @classmethod
    def trusted(cls, body: bytes, id: str, key: str | None, headers: Mapping[str, str] | None,
                timestamp: datetime) -> Message:
        """Build a message from values an adapter decoded off the wire, unvalidated.

        For adapters' receive paths only: the message was validated when it was
        published, and re-checking every field of every received message costs more
        than the rest of decoding. The caller guarantees the types the constructor
        checks: ``bytes`` body, non-empty ``str`` id, ``str`` or ``None`` key, a
        read-only ``str → str`` mapping (or ``None``) for headers, an aware timestamp.
        """
        message = _new(cls)
        _set_body(message, body)
        _set_id(message, id)
        _set_key(message, key)
        _set_headers(message, _NO_HEADERS if headers is None else headers)
        _set_timestamp(message, timestamp)
        return message

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"Message is immutable: cannot set {name!r}; "
                                  "use message.replace(...)")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"Message is immutable: cannot delete {name!r}")

    def replace(self, *, body: bytes | None = None, id: str | None = None,
                key: str | _Keep | None = _KEEP, headers: Mapping[str, str] | None = None,
                timestamp: datetime | None = None) -> Message:
        """Return a copy with the given fields changed (``key=None`` clears the key).

        Raises:
            InvalidMessage: A new value has the wrong type.
        """
        return Message(self.body if body is None else body, self.id if id is None else id,
                       self.key if isinstance(key, _Keep) else key,
                       self.headers if headers is None else headers,
                       self.timestamp if timestamp is None else timestamp)

    def _fields(self) -> tuple[object, ...]:
        return (self.body, self.id, self.key, dict(self.headers), self.timestamp)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # equal messages may carry unhashable headers

    def __repr__(self) -> str:
        return (f"Message(id={self.id!r}, key={self.key!r}, headers={dict(self.headers)!r}, "
                f"body={self.body[:64]!r}{'...' if len(self.body) > 64 else ''}, "
                f"timestamp={self.timestamp.isoformat()!r})")

    def __reduce__(self) -> tuple[object, ...]:
        return (Message, (self.body, self.id, self.key, dict(self.headers), self.timestamp))


_new = object.__new__
# The slots' own descriptors: setting through them skips __setattr__ (which refuses).
_set_body = Message.__dict__["body"].__set__
_set_id = Message.__dict__["id"].__set__
_set_key = Message.__dict__["key"].__set__
_set_headers = Message.__dict__["headers"].__set__
_set_timestamp = Message.__dict__["timestamp"].__set__


def _coerce_body(body: object) -> bytes:
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    raise InvalidMessage(f"message body must be bytes, not {type(body).__name__}; "
                         "encode text first (body.encode()) or use a codec")


def _check_headers(headers: object) -> Mapping[str, str]:
    if not isinstance(headers, Mapping):
        raise InvalidMessage(f"headers must be a mapping of str to str, "
                             f"not {type(headers).__name__}")
    for name, value in headers.items():
        if type(name) is not str or type(value) is not str:
            raise InvalidMessage(
                f"header {name!r}: headers must map str to str, got "
                f"{type(name).__name__} → {type(value).__name__}")
    return MappingProxyType(dict(headers)) if headers else _NO_HEADERS


class Outcome(Enum):
    """How a delivery was settled."""

    ACK = "ack"
    NACK = "nack"
    REJECT = "reject"


class Delivery:
    """A received message, to be settled exactly once.

    Attributes:
        message: The message as published.
        topic: The topic it was published to.
        group: The group it was delivered through, or ``None`` for an ephemeral
            subscription.
        attempt: 1 on first delivery, incremented by each redelivery.
        token: Adapter-private bookkeeping (a delivery tag, an offset, ...).
    """

    __slots__ = ("_consumer", "attempt", "group", "message", "outcome", "token", "topic")

    def __init__(self, message: Message, *, topic: str, group: str | None, attempt: int,
                 consumer: Consumer, token: Any = None) -> None:
        self.message = message
        self.topic = topic
        self.group = group
        self.attempt = attempt
        self.token = token
        self.outcome: Outcome | None = None
        self._consumer = consumer

    @property
    def id(self) -> str:
        """The message id."""
        return self.message.id

    @property
    def body(self) -> bytes:
        """The message body."""
        return self.message.body

    @property
    def key(self) -> str | None:
        """The message key."""
        return self.message.key

    @property
    def headers(self) -> Mapping[str, str]:
        """The message headers."""
        return self.message.headers

    @property
    def settled(self) -> bool:
        """Whether ``ack``, ``nack`` or ``reject`` was called."""
        return self.outcome is not None

    def _settle(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            raise AlreadySettled(
                f"delivery of message {self.message.id} on {self.topic!r} was already "
                f"{self.outcome.value}ed; each delivery settles exactly once")
        self.outcome = outcome

    async def ack(self) -> None:
        """Confirm the message: it is never delivered to this group again.

        Raises:
            AlreadySettled: The delivery was settled before.
            DeliveryLost: The channel it came on is gone; the broker redelivers it.
        """
        self._settle(Outcome.ACK)
        await self._consumer.ack(self)

    async def nack(self, delay: float = 0.0) -> None:
        """Give the message back: it is delivered again, not before ``delay`` seconds.

        Raises:
            AlreadySettled: The delivery was settled before.
            UnsupportedFeature: The adapter cannot redeliver (see its capabilities).
            DeliveryLost: The channel it came on is gone; the broker redelivers it.
            ValueError: ``delay`` is negative or not finite.
        """
        if not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"nack delay must be a finite number >= 0 of seconds, got {delay}")
        self._consumer.check_nack(delay)
        self._settle(Outcome.NACK)
        await self._consumer.nack(self, delay)

    async def reject(self) -> None:
        """Refuse the message: never delivered again; dead-lettered where configured.

        Raises:
            AlreadySettled: The delivery was settled before.
            DeliveryLost: The channel it came on is gone; the broker redelivers it.
        """
        self._settle(Outcome.REJECT)
        await self._consumer.reject(self)

    def __repr__(self) -> str:
        state = self.outcome.value if self.outcome else "unsettled"
        return (f"<Delivery {self.message.id} topic={self.topic!r} group={self.group!r} "
                f"attempt={self.attempt} {state}>")
