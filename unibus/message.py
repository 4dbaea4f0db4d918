"""Messages and deliveries: what is published, and what a consumer receives.

A :class:`Message` is immutable: ``id`` (a UUIDv7 string unless given), ``body``
(bytes, exact), ``key`` (optional ordering key), ``headers`` (``str → str``) and
``timestamp`` (UTC). A :class:`Delivery` is one received message plus its
``topic``, ``group`` and ``attempt``, and it is settled exactly once: ``ack()``,
``nack(delay=...)`` or ``reject()``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from unibus.errors import AlreadySettled, InvalidMessage

if TYPE_CHECKING:
    from unibus.spi import Consumer

__all__ = ["Delivery", "Message", "Outcome", "new_message_id"]

_getrandbits = random.getrandbits


def new_message_id() -> str:
    """Return a new UUIDv7 string: time-ordered, unique, 36 characters."""
    value = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | _getrandbits(12) << 64
    value |= 0b10 << 62 | _getrandbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Message:
    """One message. Construct it freely; unibus validates it on publish.

    Attributes:
        body: The payload, delivered byte for byte.
        id: A unique id; defaults to a new UUIDv7. Brokers that deduplicate use it.
        key: Optional ordering key: the same key keeps its order where the
            adapter declares per-key ordering.
        headers: ``str → str`` metadata, delivered exactly.
        timestamp: UTC time of creation (which is publish time unless given).

    Raises:
        InvalidMessage: The body is not bytes, or the id, key or headers have the
            wrong types.
    """

    body: bytes
    id: str = field(default_factory=new_message_id)
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timestamp: datetime = field(default_factory=_utcnow)

    def __post_init__(self) -> None:
        body: object = self.body   # typed bytes, but callers are not always typed
        if type(body) is not bytes:
            if isinstance(body, bytearray | memoryview):
                object.__setattr__(self, "body", bytes(body))
            else:
                raise InvalidMessage(
                    f"message body must be bytes, not {type(body).__name__}; "
                    "encode text first (body.encode()) or use a codec")
        if type(self.id) is not str or not self.id:
            raise InvalidMessage(f"message id must be a non-empty str, not {self.id!r}")
        if self.key is not None and type(self.key) is not str:
            raise InvalidMessage(
                f"message key must be a str or None, not {type(self.key).__name__}")
        headers = self.headers
        if headers:
            if not isinstance(headers, Mapping):
                raise InvalidMessage(f"headers must be a mapping of str to str, "
                                     f"not {type(headers).__name__}")
            for name, value in headers.items():
                if type(name) is not str or type(value) is not str:
                    raise InvalidMessage(
                        f"header {name!r}: headers must map str to str, got "
                        f"{type(name).__name__} → {type(value).__name__}")
            object.__setattr__(self, "headers", dict(headers))
        ts = self.timestamp
        if not isinstance(ts, datetime) or ts.tzinfo is None:
            raise InvalidMessage("message timestamp must be a timezone-aware datetime")


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
            ValueError: ``delay`` is negative.
        """
        if delay < 0:
            raise ValueError(f"nack delay must be >= 0 seconds, got {delay}")
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
