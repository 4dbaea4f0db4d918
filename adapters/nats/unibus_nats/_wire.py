"""Publishing with headers at the speed of a plain publish.

nats-py validates and re-encodes every header of every message (a regular
expression per name, strip and translate per value): with unibus's two to four
metadata headers that costs more than the rest of a publish. The adapter builds
its header values itself, ASCII-safe by construction (percent-encoding, digits,
ASCII JSON), so :func:`publish` writes the ``HPUB`` command directly into the
client's write buffer, with the same checks nats-py's ``publish`` makes (closed,
reconnect buffer full, max_payload).

It relies on three private attributes of nats-py's client (``_send_command``,
``_flush_pending``, ``_flush_queue``, checked once per client): where they are
missing, :func:`publish` falls back to the public ``Client.publish``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["publish"]

_HEAD = b"NATS/1.0\r\n"
_INTERNALS = ("_send_command", "_flush_pending", "_flush_queue", "_pending_data_size",
              "_max_pending_size", "_max_payload", "stats")
_fast: dict[int, bool] = {}


def _can_write_directly(nc: Client) -> bool:
    key = id(type(nc))
    known = _fast.get(key)
    if known is None:
        known = _fast[key] = all(hasattr(nc, name) for name in _INTERNALS)
    return known


async def publish(nc: Client, subject: str, payload: bytes, headers: dict[str, str],
                  reply: str = "") -> None:
    """Publish ``payload`` with ``headers`` (ASCII, no CR/LF) to ``subject``.

    Raises:
        nats.errors.ConnectionClosedError: The client is closed.
        nats.errors.OutboundBufferLimitError: Disconnected and the reconnect buffer is full.
        nats.errors.MaxPayloadError: Headers and payload exceed the server's max_payload.
    """
    if not _can_write_directly(nc):
        await nc.publish(subject, payload, reply=reply, headers=headers)
        return
    import nats.errors

    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    header = _HEAD + "".join([f"{k}: {v}\r\n" for k, v in headers.items()]).encode() + b"\r\n"
    size = len(payload)
    total = len(header) + size
    if not nc.is_connected and (nc._max_pending_size <= 0
                                or size + nc._pending_data_size > nc._max_pending_size):
        raise nats.errors.OutboundBufferLimitError
    if total > nc._max_payload:
        raise nats.errors.MaxPayloadError
    if reply:
        command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
            subject.encode(), reply.encode(), len(header), total, header, payload)
    else:
        command = b"HPUB %s %d %d\r\n%s%s\r\n" % (
            subject.encode(), len(header), total, header, payload)
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += size
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()
