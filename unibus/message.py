"""Messages and deliveries: what is published, and what a consumer receives.

A :class:`Message` is immutable: ``id`` (a UUIDv7 string unless given), ``body``
(bytes, exact), ``key`` (optional ordering key), ``headers`` (``str → str``) and
``timestamp`` (UTC). A :class:`Delivery` is one received message plus its
``topic``, ``group`` and ``attempt``, and it is settled exactly once: ``ack()``,
``nack(delay=...)`` or ``reject()``.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from enum import Enum
from operator import attrgetter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from unibus.errors import AlreadySettled, DeliveryLost, InvalidMessage

if TYPE_CHECKING:
    from unibus.spi import Consumer

__all__ = ["Delivery", "Message", "Outcome", "new_message_id"]

_getrandbits = random.getrandbits


class _IdClock:
    """The millisecond and sequence of the last id, so ids of one process sort in order.

    ``prefix`` is the id's text up to the sequence and ``tail`` its text after it,
    both made once per millisecond. ``lock`` serializes threads: two ids of one
    millisecond differ only by their sequence.
    """

    __slots__ = ("lock", "ms", "prefix", "seq", "tail")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ms = 0
        self.seq = 0
        self.prefix = ""
        self.tail = ""

    def tick(self, ms: int) -> int:
        """Move to millisecond ``ms``: a random sequence start, a random ``rand_b``."""
        self.ms = ms
        # A random start leaves room for 2048 or more ids in the same millisecond.
        self.seq = seq = _getrandbits(11)
        self.prefix = "%08x-%04x-7" % (ms >> 16, ms & 0xFFFF)  # noqa: UP031 - fastest
        # The variant bits (0b10), then 62 random bits.
        rand_b = "%016x" % (_VARIANT | _getrandbits(62))
        self.tail = rand_b[:4] + "-" + rand_b[4:]
        return seq


_clock = _IdClock()


def _forget_clock_in_child() -> None:
    # A forked child shares the parent's millisecond, sequence and rand_b: it starts
    # afresh (and with a new lock, which a parent thread may have held at the fork).
    global _clock
    _clock = _IdClock()


os.register_at_fork(after_in_child=_forget_clock_in_child)
# The sequence field as text (three hex digits and the dash after it), by value.
_SEQ_TEXT = tuple("%03x-" % n for n in range(0x1000))  # noqa: UP031 - mirrors the id format
_VARIANT = 0x8000_0000_0000_0000


class _Keep:
    """The default of ``Message.replace(key=...)``: keep the key (``None`` clears it)."""


_KEEP = _Keep()


def new_message_id() -> str:
    """Return a new UUIDv7 string: unique, 36 characters, time-ordered.

    Ids made by one process sort in the order they were made, also within one
    millisecond and when the wall clock steps back (RFC 9562 method 1: a counter in
    ``rand_a``, seeded at random each millisecond). ``rand_b`` is drawn at random
    each millisecond: within one, the ids of a process differ by their counter.
    """
    return _id_at(time.time_ns() // 1_000_000)


def _id_at(ms: int) -> str:
    # This runs once per published message: the text around the counter is made
    # once per millisecond, leaving one lookup and two concatenations per id.
    clock = _clock
    with clock.lock:
        if ms > clock.ms:
            seq = clock.tick(ms)
        else:
            seq = clock.seq = clock.seq + 1
            if seq > 0xFFF:
                seq = clock.tick(clock.ms + 1)
        return clock.prefix + _SEQ_TEXT[seq] + clock.tail


def _ids_at(ms: int, count: int) -> list[str]:
    """``count`` new ids, the same as ``count`` calls of ``_id_at(ms)`` would make.

    One lock and one comprehension per millisecond's worth of sequence numbers,
    instead of a lock and a call per id.
    """
    clock = _clock
    ids: list[str] = []
    with clock.lock:
        # On a new millisecond the first id takes the fresh (random) sequence.
        seq = clock.tick(ms) - 1 if ms > clock.ms else clock.seq
        while len(ids) < count:
            room = min(count - len(ids), 0xFFF - seq)
            if room <= 0:                     # this millisecond's sequence is used up
                seq = clock.tick(clock.ms + 1) - 1
                continue
            prefix, tail = clock.prefix, clock.tail
            ids += [prefix + _SEQ_TEXT[n] + tail for n in range(seq + 1, seq + 1 + room)]
            seq += room
        clock.seq = seq
    return ids


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


#: The range of ``Message.timestamp_us`` that a datetime can carry (years 1 to 9999).
MIN_TIMESTAMP_US = _micros(datetime.min.replace(tzinfo=UTC))
MAX_TIMESTAMP_US = _micros(datetime.max.replace(tzinfo=UTC))


class Message:
    """One message: immutable, validated on construction.

    Attributes:
        body: The payload, delivered byte for byte.
        id: A unique id; defaults to a new UUIDv7. Brokers that deduplicate use it.
        key: Optional ordering key: the same key keeps its order where the
            adapter declares per-key ordering.
        headers: ``str → str`` metadata, delivered exactly (a read-only copy).
    """

    # A hand-written class rather than a frozen dataclass: messages are built on the
    # hot path. The fields live in private slots, set directly (no __setattr__ hook
    # to bypass), behind read-only properties; the time is kept as integer
    # microseconds (what every adapter puts on the wire) and the datetime made when
    # ``timestamp`` is first read.
    __slots__ = ("_at", "_body", "_headers", "_id", "_key", "_us")

    _body: bytes
    _id: str
    _key: str | None
    _headers: Mapping[str, str]
    _us: int
    _at: datetime | None

    if TYPE_CHECKING:
        @property
        def body(self) -> bytes: ...
        @property
        def id(self) -> str: ...
        @property
        def key(self) -> str | None: ...
        @property
        def headers(self) -> Mapping[str, str]: ...
        @property
        def timestamp_us(self) -> int:
            """``timestamp`` as integer microseconds since the epoch, exactly."""

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
        if timestamp is None:
            ns = time.time_ns()
            self._us = ns // 1000
            self._at = None
            if id is None:
                id = _id_at(ns // 1_000_000)
        else:
            if not isinstance(timestamp, datetime) or timestamp.utcoffset() is None:
                raise InvalidMessage("message timestamp must be a timezone-aware datetime")
            self._us = _micros(timestamp)
            self._at = timestamp
        if id is None:
            id = new_message_id()
        elif type(id) is not str or not id:
            raise InvalidMessage(f"message id must be a non-empty str, not {id!r}")
        if key is not None and type(key) is not str:
            raise InvalidMessage(f"message key must be a str or None, not {type(key).__name__}")
        self._body = body
        self._id = id
        self._key = key
        # A private read-only copy: one Message fans out to many deliveries, and
        # none of them may change what the others see.
        self._headers = _NO_HEADERS if headers is None else _check_headers(headers)

    @classmethod
    def _of_bodies(cls, items: Sequence[object]) -> list[Message]:
        """Messages for ``items``, made at one moment: what ``publish_many`` builds.

        A ``bytes`` item becomes a message as ``Message(item)`` would make it, at
        a third of the cost (one clock read and one id lock for the lot); a
        ``Message`` is kept; anything else goes through ``Message(item)`` with the
        id of its place (which coerces buffers and raises ``InvalidMessage`` for the
        rest). Ids follow the order of ``items``.
        """
        ns = time.time_ns()
        us = ns // 1000
        messages: list[Message] = []
        append = messages.append
        trusted = cls.trusted
        for item, id in zip(items, _ids_at(ns // 1_000_000, len(items)), strict=True):
            if type(item) is bytes:
                append(trusted(item, id, None, None, us))   # valid by construction
            elif isinstance(item, Message):
                append(item)
            else:
                append(cls(item, id=id))   # type: ignore[arg-type]  # coerced or refused
        return messages

    @classmethod
    def trusted(cls, body: bytes, id: str, key: str | None, headers: Mapping[str, str] | None,
                timestamp_us: int) -> Message:
        """Build a message from values an adapter decoded off the wire, unvalidated.

        For adapters' receive paths only: the message was validated when it was
        published, and re-checking every field of every received message costs more
        than the rest of decoding. The caller guarantees the types the constructor
        checks: ``bytes`` body, non-empty ``str`` id, ``str`` or ``None`` key, a
        read-only ``str → str`` mapping (or ``None``) for headers, and the time in
        integer microseconds since the epoch, within ``MIN_TIMESTAMP_US`` and
        ``MAX_TIMESTAMP_US``.
        """
        message = _new(cls)
        message._body = body
        message._id = id
        message._key = key
        message._headers = _NO_HEADERS if headers is None else headers
        message._us = timestamp_us
        message._at = None
        return message

    @property
    def timestamp(self) -> datetime:
        """The time of creation (which is publish time unless given): UTC unless given."""
        at = self._at
        if at is None:
            at = self._at = _EPOCH + timedelta(microseconds=self._us)
        return at

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
        return (self.body, self.id, self.key, dict(self.headers), self._us)

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


def _read_only(name: str, slot: str = "", doc: str = "") -> property:
    """A property reading the private slot of field ``name`` (``_<name>`` unless
    ``slot`` says), refusing to change it."""
    def refuse(message: Message, value: object = None) -> None:
        raise FrozenInstanceError(f"Message is immutable: cannot change {name!r}; "
                                  "use message.replace(...)")
    # attrgetter reads in C: these are read once or more per message on every path.
    return property(attrgetter(slot or "_" + name), refuse, refuse,
                    doc or f"The message's {name} (read-only).")


if not TYPE_CHECKING:
    Message.body = _read_only("body")
    Message.id = _read_only("id")
    Message.key = _read_only("key")
    Message.headers = _read_only("headers")
    Message.timestamp_us = _read_only(
        "timestamp_us", "_us", "``timestamp`` as integer microseconds since the epoch, "
        "exactly (read-only).")


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


# Read once: an enum member looked up on its class costs ~75 ns on Python 3.11, and
# ack runs once per message (an adapter overriding Delivery.ack imports _ACK too).
_ACK, _NACK, _REJECT = Outcome.ACK, Outcome.NACK, Outcome.REJECT


class Delivery:
    """A received message, to be settled exactly once.

    Attributes:
        topic: The topic it was published to.
        group: The group it was delivered through, or ``None`` for an ephemeral
            subscription.
        attempt: 1 on first delivery, incremented by each redelivery.
        token: Adapter-private bookkeeping (a delivery tag, an offset, ...).
    """

    __slots__ = ("_consumer", "_message", "attempt", "group", "outcome", "token", "topic")

    def __init__(self, message: Message, *, topic: str, group: str | None, attempt: int,
                 consumer: Consumer, token: Any = None) -> None:
        self._setup(message, topic, group, attempt, consumer, token)

    def _setup(self, message: Message | None, topic: str, group: str | None, attempt: int,
               consumer: Consumer, token: Any) -> None:
        """Set every field: what ``__init__`` does, for subclasses' own constructors.

        ``message`` is ``None`` for a delivery that decodes it on first read
        (see :meth:`_decode`).
        """
        self._message: Message | None = message
        self.topic = topic
        self.group = group
        self.attempt = attempt
        self.token = token
        self.outcome: Outcome | None = None
        self._consumer = consumer

    @property
    def message(self) -> Message:
        """The message as published."""
        message = self._message
        if message is None:
            message = self._message = self._decode()
        return message

    def _decode(self) -> Message:
        """Build the message of a delivery made without one (``_message`` left ``None``).

        An adapter whose deliveries decode their message only when it is first read
        subclasses :class:`Delivery`, sets its fields with :meth:`_setup` (message
        ``None``) and overrides this; it is called at most once.
        """
        raise TypeError(f"{type(self).__name__} was made without a message and "
                        "does not override Delivery._decode")

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
        if self.outcome is None:
            self.outcome = _ACK
        else:
            self._settle(_ACK)   # raises AlreadySettled
        await self._consumer.ack(self)

    async def nack(self, delay: float = 0.0) -> None:
        """Give the message back: it is delivered again, not before ``delay`` seconds.

        A nack that fails otherwise — the adapter could not republish the message
        (a retry lane or queue refused it), or the call was cancelled — leaves the
        delivery unsettled, to be settled again. (A call cancelled after its copy was
        sent: settling again can deliver the message twice, never lose it.)

        Raises:
            AlreadySettled: The delivery was settled before.
            UnsupportedFeature: The adapter cannot redeliver (see its capabilities).
            DeliveryLost: The channel it came on is gone; the broker redelivers it.
            PublishFailed: The adapter's retry path refused the message; the delivery
                stays unsettled.
            ValueError: ``delay`` is negative or not finite.
        """
        if not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"nack delay must be a finite number >= 0 of seconds, got {delay}")
        self._consumer.check_nack(delay)
        self._settle(_NACK)
        await self._through(self._consumer.nack(self, delay))

    async def reject(self) -> None:
        """Refuse the message: never delivered again; dead-lettered where configured.

        A reject that fails otherwise — the dead-letter topic refused the message, or
        the call was cancelled — leaves the delivery unsettled, to be settled again.

        Raises:
            AlreadySettled: The delivery was settled before.
            DeliveryLost: The channel it came on is gone; the broker redelivers it.
            PublishFailed: The dead-letter topic refused the message; the delivery
                stays unsettled.
        """
        self._settle(_REJECT)
        await self._through(self._consumer.reject(self))

    async def _through(self, settling: Awaitable[None]) -> None:
        """Await an adapter's nack or reject; on failure the delivery is unsettled again.

        A settlement that republishes (to a retry lane, a dead-letter topic) can fail
        before it has done anything. Left marked settled, the delivery could be settled
        neither by its caller nor by anyone else, and would hold its place in the
        prefetch (and, on Kafka, its partition's commit point) until the consumer
        closed. Only a lost delivery stays marked: it is gone from this consumer.
        """
        try:
            await settling
        except DeliveryLost:
            raise
        except BaseException:
            self.outcome = None
            raise

    def __repr__(self) -> str:
        state = self.outcome.value if self.outcome else "unsettled"
        return (f"<Delivery {self.message.id} topic={self.topic!r} group={self.group!r} "
                f"attempt={self.attempt} {state}>")
