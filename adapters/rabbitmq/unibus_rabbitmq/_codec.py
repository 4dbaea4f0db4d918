"""How a unibus message travels as an AMQP 0-9-1 message, and back.

Maps to
    ``id`` → the ``message_id`` property (ids over 255 bytes, which a shortstr cannot
    hold, travel in the ``x-unibus-id`` header); ``headers`` → the AMQP header table,
    as long strings; ``key`` → the ``x-unibus-key`` header; ``timestamp`` → the
    ``timestamp`` property (whole seconds, for other AMQP tools) plus the exact UTC
    microseconds in ``x-unibus-ts``; ``body`` → the body, byte for byte; every
    message is persistent (``delivery_mode=2``).

    Header names RabbitMQ writes itself (``x-death``, ``x-delivery-count``,
    ``x-first-death-*``, ``x-last-death-*``) and the ``x-unibus-*`` names are reserved:
    publishing them is an :class:`~unibus.errors.InvalidMessage`, and they are
    stripped from received messages.

URL
    Not used here.

Driver
    pamqp (aio-pika's codec), imported lazily by :func:`properties`.

Capabilities
    ``attempt`` = the ``x-unibus-attempt`` header (deliveries before a republish:
    delayed nack, classic nack) + the quorum queue's ``x-delivery-count`` + 1. On a
    classic queue, which counts nothing, a broker redelivery (consumer loss) counts
    as one more attempt however often it happened.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from unibus.errors import InvalidMessage
from unibus.message import Message

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage
    from pamqp.commands import Basic

__all__ = ["decode", "encode_headers", "properties"]

ID = "x-unibus-id"
KEY = "x-unibus-key"
TS = "x-unibus-ts"
ATTEMPT = "x-unibus-attempt"
DELAY = "x-unibus-delay"
RETRY = "x-unibus-retry"
DELIVERY_COUNT = "x-delivery-count"
_RESERVED_PREFIXES = ("x-unibus-", "x-first-death-", "x-last-death-")
_RESERVED = frozenset({"x-death", DELIVERY_COUNT})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_SHORTSTR = 255


def _reserved(name: str) -> bool:
    return name in _RESERVED or name.startswith(_RESERVED_PREFIXES)


def encode_headers(message: Message, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the AMQP header table carrying ``message``'s headers, key, timestamp and id.

    Args:
        message: The message.
        extra: Adapter headers to add (``x-unibus-attempt``, delay routing).

    Raises:
        InvalidMessage: A header uses a reserved name or is too long for AMQP.
    """
    table: dict[str, Any] = {}
    if message.headers:
        for name, value in message.headers.items():
            if _reserved(name):
                raise InvalidMessage(
                    f"header {name!r} is reserved on RabbitMQ (x-death, x-delivery-count, "
                    "x-first-death-*, x-last-death-* and x-unibus-* are written by the "
                    "broker or the adapter); rename it")
            if len(name.encode()) > _MAX_SHORTSTR:
                raise InvalidMessage(f"header name {name[:40]!r}... is over {_MAX_SHORTSTR} "
                                     "bytes, the AMQP limit")
            table[name] = value
    table[TS] = message.timestamp_us
    if message.key is not None:
        table[KEY] = message.key
    if len(message.id.encode()) > _MAX_SHORTSTR:
        table[ID] = message.id
    if extra:
        table.update(extra)
    return table


def properties(message: Message, headers: dict[str, Any]) -> Basic.Properties:
    """Return the persistent AMQP properties of ``message`` with ``headers``."""
    from pamqp.commands import Basic

    message_id = message.id if ID not in headers else None
    return Basic.Properties(
        headers=headers, delivery_mode=2, message_id=message_id,
        timestamp=message.timestamp.replace(microsecond=0))


def decode(raw: DeliveredMessage) -> tuple[Message, int]:
    """Return the message carried by ``raw`` and the deliveries before this one.

    Messages from other AMQP publishers decode too: without an id they get a new one,
    without ``x-unibus-ts`` the ``timestamp`` property (or the time of receipt).
    """
    props = raw.header.properties
    table = props.headers or {}
    headers: dict[str, str] = {}
    key: str | None = None
    stamp: datetime | None = None
    message_id: str | None = props.message_id
    before = 0
    for name, value in table.items():
        if name == TS and type(value) is int:
            stamp = _EPOCH + value * _MICROSECOND
        elif name == KEY:
            key = str(value)
        elif name == ID:
            message_id = str(value)
        elif name in (ATTEMPT, DELIVERY_COUNT):
            before += value if type(value) is int else 0
        elif not _reserved(name):
            # Messages from other AMQP publishers may carry typed values: shown as text.
            headers[name] = value if type(value) is str else _text(value)
    if stamp is None:
        ts = props.timestamp
        stamp = ts.replace(tzinfo=UTC) if isinstance(ts, datetime) else datetime.now(UTC)
    if DELIVERY_COUNT not in table and getattr(raw.delivery, "redelivered", False):
        before += 1
    body = raw.body
    message = (Message(body, id=message_id, key=key, headers=headers, timestamp=stamp)
               if message_id else Message(body, key=key, headers=headers, timestamp=stamp))
    return message, before


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
