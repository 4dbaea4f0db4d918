"""How a unibus message travels as a NATS message, and back.

The body is the NATS payload, byte for byte. The metadata rides in headers, each
value kept to printable ASCII because NATS header values cannot carry CR/LF and
nats-py strips their surrounding whitespace:

- ``Nats-Msg-Id``: the message id (JetStream deduplicates on it), percent-encoded
  where it holds anything but URL-safe characters.
- ``Unibus-Ts``: the timestamp, integer microseconds since the Unix epoch (exact).
- ``Unibus-Key``: ``~`` + the percent-encoded key (present only with a key; the
  ``~`` lets an empty key survive).
- ``Unibus-Headers``: the user's headers as ASCII JSON (present only when any):
  unicode, empty values and any count survive exactly.
- ``Unibus-Id``: the id again on scheduled messages (the server drops ``Nats-Msg-Id``
  from the message a schedule produces).
- ``Unibus-Not-Before``: for delayed messages, microseconds since the epoch; the
  consumer holds back a message that arrives before it (never early, even with a
  server clock ahead of ours).

A message published by another NATS client (no ``Unibus-*`` headers) is still
delivered: its id is ``<stream>:<sequence>`` and its timestamp the server's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from urllib.parse import quote, unquote

from unibus.message import MAX_TIMESTAMP_US, MIN_TIMESTAMP_US, Message

__all__ = ["ID", "NOT_BEFORE", "SAFE", "SCHEDULED_ID", "decode", "decode_block", "decode_plain",
           "encode_headers", "header_block", "micros", "parse_header_block", "parse_reply"]

ID = "Nats-Msg-Id"
#: The id again, for scheduled messages: the server drops ``Nats-Msg-Id`` from the copy
#: a schedule produces.
SCHEDULED_ID = "Unibus-Id"
TS = "Unibus-Ts"
KEY = "Unibus-Key"
HEADERS = "Unibus-Headers"
NOT_BEFORE = "Unibus-Not-Before"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
SAFE = "-._~:@!$&'()*+,;=/"
# What ``quote(text, safe=SAFE)`` leaves unchanged: most ids (UUIDs) need no quoting,
# and a match costs a fraction of ``quote``.
_UNQUOTED = re.compile(r"[A-Za-z0-9_.\-~:@!$&'()*+,;=/]*")
_WHITESPACE = re.compile(r"\s")
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
# The block header_block writes for a message without key and headers: values
# without whitespace or CR/LF, so nats-py's parser would yield exactly these two.
_PLAIN_BLOCK = re.compile(
    rb"NATS/1\.0\r\nNats-Msg-Id: ([!-~]+)\r\nUnibus-Ts: ([0-9]{1,18})\r\n\r\n")
_plain_block = _PLAIN_BLOCK.fullmatch

# Values decoded from the wire already have the types Message validates.
_message = Message.trusted


def micros(when: datetime) -> int:
    """``when`` as integer microseconds since the Unix epoch (exact for datetimes)."""
    return (when - _EPOCH) // _MICRO


def _checked(value: int) -> int:
    """``value`` (µs since the epoch), if a datetime can carry it.

    Raises:
        ValueError: ``value`` is outside the years datetime can carry (a foreign or
            corrupt header).
    """
    if MIN_TIMESTAMP_US <= value <= MAX_TIMESTAMP_US:
        return value
    raise ValueError(f"timestamp of {value} µs is out of range")


def _quote(text: str) -> str:
    return text if _UNQUOTED.fullmatch(text) else quote(text, safe=SAFE)


def encode_headers(message: Message) -> dict[str, str]:
    """The NATS headers that carry ``message``'s metadata."""
    headers = {ID: _quote(message.id), TS: str(message.timestamp_us)}
    if message.key is not None:
        headers[KEY] = "~" + _quote(message.key)
    if message.headers:
        headers[HEADERS] = json.dumps(dict(message.headers), separators=(",", ":"))
    return headers


def header_block(message: Message) -> bytes:
    """The NATS header block (``NATS/1.0`` line to blank line) of :func:`encode_headers`.

    Byte for byte what nats-py would write for those headers, built in one go.
    """
    block = f"NATS/1.0\r\n{ID}: {_quote(message.id)}\r\n{TS}: {message.timestamp_us}\r\n"
    if message.key is not None:
        block += f"{KEY}: ~{_quote(message.key)}\r\n"
    if message.headers:
        block += f"{HEADERS}: {json.dumps(dict(message.headers), separators=(',', ':'))}\r\n"
    return (block + "\r\n").encode()


def parse_header_block(block: bytes) -> dict[str, str] | None:
    """The headers of a status-free NATS header block, as nats-py parses them.

    The same result as nats-py's parser (names ASCII and without whitespace, values
    stripped and decoded leniently), without its per-character scan of every name.
    The caller routes blocks with an inline status (``NATS/1.0 503``) to nats-py.
    """
    out: dict[str, str] = {}
    for line in block[10:].split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out or None


def _unescape(text: str) -> str:
    return unquote(text, errors="strict") if "%" in text else text


def parse_reply(reply: str) -> tuple[str, int, int, int]:
    """Parse a JetStream ack subject.

    Returns:
        ``(stream, stream sequence, delivery count, timestamp ns)``.

    Raises:
        ValueError: Not a JetStream ack subject.
    """
    tokens = reply.split(".")
    count = len(tokens)
    if count == 9:        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        base = 2
    elif count >= 11:     # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>...
        base = 4
    else:
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    return tokens[base], int(tokens[base + 3]), int(tokens[base + 2]), int(tokens[base + 5])


def decode(body: bytes, headers: dict[str, str] | None, stream: str, sequence: int,
           server_ns: int) -> Message:
    """Rebuild the published message from a received NATS message.

    Raises:
        ValueError: A ``Unibus-*`` header is malformed.
    """
    if not headers:
        return _message(body, f"{stream}:{sequence}", None, _NO_HEADERS,
                        _checked(server_ns // 1000))
    raw_id = headers.get(ID) or headers.get(SCHEDULED_ID)
    raw_ts = headers.get(TS)
    raw_key = headers.get(KEY)
    raw_headers = headers.get(HEADERS)
    return _message(
        body,
        _unescape(raw_id) if raw_id else f"{stream}:{sequence}",
        _unescape(raw_key[1:]) if raw_key is not None else None,
        _user_headers(raw_headers) if raw_headers is not None else _NO_HEADERS,
        _checked(int(raw_ts) if raw_ts is not None else server_ns // 1000))


def decode_block(body: bytes, block: bytes | None, stream: str, sequence: int,
                 server_ns: int) -> Message:
    """:func:`decode` from a status-free NATS header block as received.

    Raises:
        ValueError: A ``Unibus-*`` header is malformed.
    """
    if block:
        message = decode_plain(body, block)
        if message is not None:
            return message
        return decode(body, parse_header_block(block), stream, sequence, server_ns)
    return decode(body, None, stream, sequence, server_ns)


def decode_plain(body: bytes, block: bytes) -> Message | None:
    """:func:`decode_block` for the common block of just an id and a timestamp, else ``None``.

    The hot path of a core delivery, hence written out.

    Raises:
        ValueError: The id is malformed.
    """
    found = _plain_block(block)
    if found is None:
        return None
    raw_id, raw_ts = found.groups()
    id = raw_id.decode()
    if "%" in id:
        id = unquote(id, errors="strict")
    return _message(body, id, None, None, _checked(int(raw_ts)))


def _user_headers(text: str) -> Mapping[str, str]:
    parsed = json.loads(text)
    if not isinstance(parsed, dict) or not all(
            type(k) is str and type(v) is str for k, v in parsed.items()):
        raise ValueError(f"{HEADERS} is not a JSON object of strings")
    return MappingProxyType(parsed) if parsed else _NO_HEADERS
