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
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

from unibus.message import Message

__all__ = ["ID", "NOT_BEFORE", "SAFE", "SCHEDULED_ID", "decode", "encode_headers", "micros",
           "parse_reply"]

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


def micros(when: datetime) -> int:
    """``when`` as integer microseconds since the Unix epoch (exact for datetimes)."""
    return (when - _EPOCH) // _MICRO


def encode_headers(message: Message) -> dict[str, str]:
    """The NATS headers that carry ``message``'s metadata."""
    headers = {ID: quote(message.id, safe=SAFE), TS: str(micros(message.timestamp))}
    if message.key is not None:
        headers[KEY] = "~" + quote(message.key, safe=SAFE)
    if message.headers:
        headers[HEADERS] = json.dumps(dict(message.headers), separators=(",", ":"))
    return headers


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
        return Message(body, id=f"{stream}:{sequence}",
                       timestamp=_EPOCH + timedelta(microseconds=server_ns // 1000))
    raw_id = headers.get(ID) or headers.get(SCHEDULED_ID)
    raw_ts = headers.get(TS)
    raw_key = headers.get(KEY)
    raw_headers = headers.get(HEADERS)
    user_headers: dict[str, str] = json.loads(raw_headers) if raw_headers is not None else {}
    return Message(
        body,
        id=_unescape(raw_id) if raw_id else f"{stream}:{sequence}",
        key=_unescape(raw_key[1:]) if raw_key is not None else None,
        headers=user_headers,
        timestamp=_EPOCH + timedelta(microseconds=int(raw_ts) if raw_ts is not None
                                     else server_ns // 1000))
