"""How a unibus message travels as a Kafka record.

- ``body`` → the record value (an empty body stays ``b""``);
- ``key`` → the record key, UTF-8 (``None`` → no key); it chooses the partition;
- ``headers`` → record headers, UTF-8 values, in order;
- ``id``, the exact ``timestamp`` (µs), and unibus's own bookkeeping travel in
  headers named ``unibus.*``:

  ==================  ==============================================================
  header              meaning
  ==================  ==============================================================
  ``unibus.id``       the message id
  ``unibus.ts``       the timestamp, integer microseconds since the epoch (UTC)
  ``unibus.attempt``  the delivery attempt this record starts at (retry lane; absent: 1)
  ``unibus.due``      not to be delivered before this time (µs since the epoch)
  ``unibus.topic``    the topic a retry-lane record belongs to
  ==================  ==============================================================

  A user header whose name starts with ``unibus.`` is stored as ``unibus.h.<name>``
  and restored on receipt, so no user header can be mistaken for bookkeeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from unibus.message import Message

__all__ = ["ID_HEADER", "TS_HEADER", "Record", "decode", "encode_headers", "timestamp_us"]

_ID = ID_HEADER = "unibus.id"
_TS = TS_HEADER = "unibus.ts"
ATTEMPT = "unibus.attempt"
DUE = "unibus.due"
ORIGIN = "unibus.topic"
_PREFIX = "unibus."
_ESCAPE = "unibus.h."
_ESCAPE_LEN = len(_ESCAPE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# Values decoded from a record already have the types Message validates.
_message = Message.trusted
_fromtimestamp = datetime.fromtimestamp


def timestamp_us(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


def encode_headers(message: Message, extra: list[tuple[str, str]] | None = None
                   ) -> list[tuple[str, bytes]]:
    """The record headers for ``message``, bookkeeping first.

    Args:
        message: The message.
        extra: Bookkeeping headers (attempt, due, origin topic) to add.
    """
    headers: list[tuple[str, bytes]] = [
        (_ID, message.id.encode()), (_TS, b"%d" % timestamp_us(message.timestamp))]
    if extra:
        headers.extend((name, value.encode()) for name, value in extra)
    for name, value in message.headers.items():
        if name.startswith(_PREFIX):
            name = _ESCAPE + name
        headers.append((name, value.encode()))
    return headers


class Record:
    """A received record, decoded: the message plus unibus's bookkeeping.

    Attributes:
        message: The message as published.
        topic: The topic it belongs to (the origin topic for retry-lane records).
        attempt: The attempt this record is delivered as.
        due: Epoch seconds before which it must not be delivered, or ``0.0``.
        source: ``(topic, partition, offset)`` of the record itself, for commits.
        offset: The record's offset (``source[2]``).
        state: The consumer's bookkeeping of the record's partition (set by the consumer).
    """

    __slots__ = ("attempt", "due", "message", "offset", "source", "state", "topic")

    def __init__(self, message: Message, topic: str, attempt: int, due: float,
                 source: tuple[str, int, int], state: Any = None) -> None:
        self.message = message
        self.topic = topic
        self.attempt = attempt
        self.due = due
        self.source = source
        self.offset = source[2]
        self.state: Any = state


def _utf8(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "surrogateescape")


def _int(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None   # a foreign producer's header: ignored, never fatal


def decode(record: Any, state: Any = None) -> Record:
    """Decode a ``confluent_kafka.Message`` into a :class:`Record`.

    A record published by another client (no ``unibus.id``) gets an id derived from
    its position, and the broker's timestamp. This runs once per received record:
    it is written for speed, with a fast path for the common record (exactly the id
    and timestamp headers, as unibus writes them for a message without headers).

    Args:
        record: The driver's record.
        state: The consumer's bookkeeping of the record's partition, bound to it.
    """
    raw_headers = record.headers()
    if raw_headers is not None and len(raw_headers) == 2:
        (id_name, id_raw), (ts_name, ts_raw) = raw_headers
        if (id_name == _ID and ts_name == _TS and id_raw is not None
                and ts_raw is not None and ts_raw.isdigit()):
            topic: str = record.topic()
            offset: int = record.offset()
            key = record.key()
            value = record.value()
            message = _message(
                b"" if value is None else value, id_raw.decode("utf-8", "surrogateescape"),
                None if key is None else key.decode("utf-8", "surrogateescape"), None,
                _fromtimestamp(int(ts_raw) / 1_000_000, UTC))
            return Record(message, topic, 1, 0.0, (topic, record.partition(), offset), state)
    return _decode_any(record, raw_headers, state)


def _decode_any(record: Any, raw_headers: list[tuple[str, bytes | None]] | None,
                state: Any) -> Record:
    topic: str = record.topic()
    offset: int = record.offset()
    message_id: str | None = None
    ts_us: int | None = None
    attempt = 1
    due = 0.0
    origin = topic
    user: dict[str, str] | None = None
    if raw_headers:
        rest = raw_headers
        # unibus writes the id and the timestamp first.
        if (len(raw_headers) >= 2 and raw_headers[0][0] == _ID
                and raw_headers[1][0] == _TS):
            message_id = _utf8(raw_headers[0][1])
            ts_us = _int(raw_headers[1][1])
            rest = raw_headers[2:]
        for name, value in rest:
            if name.startswith(_PREFIX):
                if name == ATTEMPT:
                    attempt = _int(value) or 1
                elif name == DUE:
                    due = (_int(value) or 0) / 1_000_000
                elif name == ORIGIN:
                    origin = _utf8(value)
                elif name == _ID:
                    message_id = _utf8(value)
                elif name == _TS:
                    ts_us = _int(value)
                elif name.startswith(_ESCAPE):
                    if user is None:
                        user = {}
                    user[name[_ESCAPE_LEN:]] = _utf8(value)
                continue
            if user is None:
                user = {}
            user[name] = "" if value is None else value.decode("utf-8", "surrogateescape")
    if message_id is None:
        message_id = f"{topic}/{record.partition()}/{offset}"
    if ts_us is None:
        ts_us = record.timestamp()[1] * 1000
    key = record.key()
    value = record.value()
    # The message was validated when it was published: build it without re-checking
    # every header.
    # Exact to the microsecond: a double holds µs since the epoch to well under
    # 0.5 µs until the year 2100, and fromtimestamp rounds to the nearest µs.
    message = _message(b"" if value is None else value, message_id,
                       None if key is None else _utf8(key),
                       None if user is None else MappingProxyType(user),
                       _fromtimestamp(ts_us / 1_000_000, UTC))
    return Record(message, origin, attempt, due, (topic, record.partition(), offset), state)
