"""How a unibus message travels as a Kafka record.

- ``body`` → the record value (an empty body stays ``b""``);
- ``key`` → the record key, UTF-8 (``None`` → no key); it chooses the partition;
- ``headers`` → record headers, UTF-8 values, in order;
- ``id``, the exact ``timestamp`` (µs), and unibus's own bookkeeping travel in
  headers named ``unibus.*``:

  ==================  ==============================================================
  header              meaning
  ==================  ==============================================================
  ``unibus.msg``      the timestamp (integer microseconds since the epoch, UTC), one
                      space, and the message id: ``1764241200123456 01JF...``
  ``unibus.attempt``  the delivery attempt this record starts at (retry lane; absent: 1)
  ``unibus.due``      not to be delivered before this time (µs since the epoch; lanes)
  ``unibus.topic``    the topic a lane's record belongs to
  ==================  ==============================================================

  Only a lane's records (a group's retry lane, a topic's delay lane) are read for
  ``attempt``, ``due`` and ``topic``: a record of a subscribed topic itself is
  delivered as it came, first attempt, whatever its headers.

  A user header whose name starts with ``unibus.`` is stored as ``unibus.h.<name>``
  and restored on receipt, so no user header can be mistaken for bookkeeping.

  The id and the timestamp share one header because each header costs the producer:
  measured against the local broker, it sent 250,000 records a second with two
  headers, 320,000 with one, 370,000 with none. (A consumer pays for a header mostly
  when it reads it, which unibus does only when a delivery's message is read.)
  Records written with the earlier pair of headers (``unibus.id``, ``unibus.ts``)
  still decode.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from unibus.message import MAX_TIMESTAMP_US, MIN_TIMESTAMP_US, Message

__all__ = ["META_HEADER", "decode", "decode_plain", "encode_headers", "meta",
           "record_id", "stamp", "timestamp_us"]

_META = META_HEADER = "unibus.msg"
# The pair of headers records carried before (still decoded).
_ID = "unibus.id"
_TS = "unibus.ts"
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
    headers: list[tuple[str, bytes]] = [(_META, meta(message))]
    if extra:
        headers.extend((name, value.encode()) for name, value in extra)
    for name, value in message.headers.items():
        if name.startswith(_PREFIX):
            name = _ESCAPE + name
        headers.append((name, value.encode()))
    return headers


def meta(message: Message) -> bytes:
    """The value of the ``unibus.msg`` header: ``b"<timestamp µs> <id>"``."""
    return stamp(message.timestamp_us) + message.id.encode()


def stamp(timestamp_us: int) -> bytes:
    """The front of a ``unibus.msg`` value, up to the id: messages made at one moment
    (a ``publish_many`` of bodies) share it, so the producer makes it once for them."""
    return b"%d " % timestamp_us


def _split_meta(raw: bytes | None) -> tuple[int | None, str | None]:
    """``(timestamp µs, id)`` of a ``unibus.msg`` value; ``None`` for a part that is
    missing or malformed (a foreign producer's header: ignored, never fatal)."""
    if not raw:
        return None, None
    ts_raw, _, id_raw = bytes(raw).partition(b" ")
    return _int(ts_raw), (_utf8(id_raw) or None)


def record_id(record: Any) -> str:
    """The unibus id a record carries, or ``"?"`` (for error messages)."""
    for name, value in record.headers() or ():
        if name == _META:
            return _split_meta(value)[1] or "?"
        if name == _ID:
            return _utf8(value) or "?"
    return "?"


def _utf8(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "surrogateescape")


def _int(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None   # a foreign producer's header: ignored, never fatal


def decode_plain(record: Any) -> Message:
    """The message of a record of a subscribed topic itself (not of a lane).

    Such a record is delivered as it came (its topic, attempt 1, never held): only
    its message is decoded, when first read. This runs once per received record that
    is read: a record as unibus writes it (just the ``unibus.msg`` header) is decoded
    without the general loop.
    """
    headers = record.headers()
    if headers is not None and len(headers) == 1:
        name, raw = headers[0]
        if name == _META and raw:
            ts_raw, _, id_raw = raw.partition(b" ")
            # At most 19 digits: a foreign header's longer run of digits is never an
            # int() to compute (Python refuses past 4,300 of them) nor a timestamp.
            if id_raw and len(ts_raw) <= 19 and ts_raw.isdigit():
                ts_us = int(ts_raw)
                if ts_us <= MAX_TIMESTAMP_US:
                    key = record.key()
                    value = record.value()
                    return _message(
                        b"" if value is None else value,
                        id_raw.decode("utf-8", "surrogateescape"),
                        None if key is None else key.decode("utf-8", "surrogateescape"),
                        None, ts_us)
    return decode(record)[0]


def decode(record: Any) -> tuple[Message, str, int, float]:
    """Decode a ``confluent_kafka.Message``, whatever its headers.

    A record published by another client (no ``unibus.msg``) gets an id derived from
    its position, and the broker's timestamp.

    Returns:
        ``(message, topic, attempt, due)``: the message as published, the topic it
        belongs to (the origin topic for retry-lane records), the attempt it is
        delivered as, and the epoch seconds before which it must not be delivered
        (``0.0``: none).
    """
    raw_headers = record.headers()
    topic: str = record.topic()
    message_id: str | None = None
    ts_us: int | None = None
    attempt = 1
    due = 0.0
    origin = topic
    user: dict[str, str] | None = None
    for name, value in raw_headers or ():
        if name.startswith(_PREFIX):
            if name == _META:
                meta_us, meta_id = _split_meta(value)
                # A malformed value takes nothing away from what other headers said.
                ts_us = ts_us if meta_us is None else meta_us
                message_id = meta_id or message_id
            elif name == _ID:
                message_id = _utf8(value) or None
            elif name == _TS:
                ts_us = _int(value)
            elif name == ATTEMPT:
                attempt = _int(value) or 1
            elif name == DUE:
                due = (_int(value) or 0) / 1_000_000
            elif name == ORIGIN:
                origin = _utf8(value)
            elif name.startswith(_ESCAPE):
                if user is None:
                    user = {}
                user[name[_ESCAPE_LEN:]] = _utf8(value)
            continue
        if user is None:
            user = {}
        user[name] = _utf8(value)
    if message_id is None:
        message_id = f"{topic}/{record.partition()}/{record.offset()}"
    if ts_us is None or not MIN_TIMESTAMP_US <= ts_us <= MAX_TIMESTAMP_US:
        ts_us = record.timestamp()[1] * 1000
    key = record.key()
    value = record.value()
    # The message was validated when it was published: build it without re-checking
    # every header.
    message = _message(b"" if value is None else value, message_id,
                       None if key is None else _utf8(key),
                       None if user is None else MappingProxyType(user), ts_us)
    return message, origin, attempt, due
