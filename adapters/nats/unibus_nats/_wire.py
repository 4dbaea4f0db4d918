"""Publishing and receiving with headers at the speed of plain messages.

nats-py validates and re-encodes every header of every message (a regular
expression per name, strip and translate per value): with unibus's two to four
metadata headers that costs more than the rest of a publish. The adapter builds
its header values itself, ASCII-safe by construction (percent-encoding, digits,
ASCII JSON), so :func:`publish` writes the ``HPUB`` command directly into the
client's write buffer, with the same checks nats-py's ``publish`` makes (closed,
reconnect buffer full, max_payload).

It relies on private attributes of nats-py's client (``_send_command``,
``_flush_pending``, ``_flush_queue``, ..., checked once per client class): where
they are missing, :func:`publish` falls back to the public ``Client.publish``.

Receiving, nats-py builds a ``Msg`` per message, parses its headers with a
per-character scan of every header name, queues it on the subscription and
awaits the callback from the subscription's task: more than the rest of a core
delivery. :func:`route` hands the messages of a subscription to a plain function
straight from nats-py's protocol parser instead (``Client._process_msg``, replaced
on that one client instance; other subscriptions keep nats-py's path), with the
raw header block, which ``_codec.decode_block`` reads. Where the internals are
missing, or a message already took the subscription's own path, it routes
nothing and the subscription's callback keeps receiving.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription

__all__ = ["Handler", "can_write_directly", "flush", "publish", "publish_block", "publish_blocks",
           "route", "unroute"]

#: Receives ``(subject, payload, headers)`` of each message of a routed subscription;
#: ``headers`` is the raw header block as received, ``None`` without headers, or for a
#: block with an inline status (``NATS/1.0 503``) nats-py's parse of it.
Handler = Callable[[bytes, bytes, "bytes | dict[str, str] | None"], None]
_ProcessMsg = Callable[[int, bytes, bytes, bytes, "bytes | None"], Awaitable[None]]

_HEAD = b"NATS/1.0\r\n"
_INTERNALS = ("_send_command", "_flush_pending", "_flush_queue", "_pending_data_size",
              "_max_pending_size", "_max_payload", "stats")
_fast: dict[int, bool] = {}


def can_write_directly(nc: Client) -> bool:
    """Whether :func:`publish_block` can write to ``nc``'s buffer (else use ``publish``)."""
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
    if not can_write_directly(nc):
        await nc.publish(subject, payload, reply=reply, headers=headers)
        return
    header = _HEAD + "".join([f"{k}: {v}\r\n" for k, v in headers.items()]).encode() + b"\r\n"
    await publish_block(nc, subject, payload, header, reply)


async def publish_block(nc: Client, subject: str, payload: bytes, header: bytes,
                        reply: str = "") -> None:
    """Publish ``payload`` with a ready header block; only where :func:`can_write_directly`.

    Raises:
        nats.errors.ConnectionClosedError: The client is closed.
        nats.errors.OutboundBufferLimitError: Disconnected and the reconnect buffer is full.
        nats.errors.MaxPayloadError: Headers and payload exceed the server's max_payload.
    """
    await publish_blocks(nc, subject, [(header, payload)], reply)


async def publish_blocks(nc: Client, subject: str, items: list[tuple[bytes, bytes]],
                         reply: str = "") -> None:
    """Publish ``(header block, payload)`` pairs in order, as one write to the buffer.

    The checks nats-py's ``publish`` makes, made once for the lot where they concern
    the connection (nothing can change it between two messages of one call); only where
    :func:`can_write_directly`. The messages before one that is too large still go out.
    ``reply``, when given, is the reply subject of every message.

    Raises:
        nats.errors.ConnectionClosedError: The client is closed.
        nats.errors.OutboundBufferLimitError: Disconnected and the reconnect buffer is full.
        nats.errors.MaxPayloadError: Headers and payload exceed the server's max_payload.
    """
    if nc.is_closed or nc.is_draining_pubs:
        import nats.errors

        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        raise nats.errors.ConnectionDrainingError
    max_payload = nc._max_payload
    prefix = b"HPUB " + subject.encode() + (b" " + reply.encode() if reply else b"")
    commands = []
    size = 0
    too_large = False
    for header, payload in items:
        total = len(header) + len(payload)
        if total > max_payload:
            too_large = True
            break
        size += len(payload)
        commands.append(b"%s %d %d\r\n%s%s\r\n" % (prefix, len(header), total, header, payload))
    if not nc.is_connected and (nc._max_pending_size <= 0
                                or size + nc._pending_data_size > nc._max_pending_size):
        import nats.errors

        raise nats.errors.OutboundBufferLimitError
    if commands:
        nc.stats["out_msgs"] += len(commands)
        nc.stats["out_bytes"] += size
        await nc._send_command(b"".join(commands))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
    if too_large:
        import nats.errors

        raise nats.errors.MaxPayloadError


async def flush(nc: Client, timeout: float) -> None:
    """Return once the server has read everything written to ``nc`` before this call.

    nats-py's ``Client.flush`` writes its ``PING`` straight to the socket while
    the commands before it (``PUB``, ``SUB``, ``UNSUB``) may still wait in the
    client's write buffer for its flusher task: the ``PONG`` then proves nothing
    about them (it made a queue group look like it kept messages published
    "before" a member attached). The buffer is written first here, as the
    flusher would, so the ``PING`` follows it on the wire.

    Raises:
        nats.errors.ConnectionClosedError: The client is closed.
        nats.errors.FlushTimeoutError: No ``PONG`` within ``timeout``.
    """
    pending = getattr(nc, "_pending", None)
    transport = getattr(nc, "_transport", None)
    if pending and transport is not None and nc.is_connected:
        transport.writelines(pending[:])
        nc._pending = []
        nc._pending_data_size = 0
    # Nothing awaits between the write above and the PING's.
    await nc.flush(timeout=max(1, round(timeout)))


_ROUTING_INTERNALS = ("_process_msg", "_process_headers", "_subs", "stats")
_routes: weakref.WeakKeyDictionary[Client, dict[int, Handler]] = weakref.WeakKeyDictionary()


def _install(nc: Client) -> dict[int, Handler] | None:
    """Put the router in front of ``nc``'s message processing (once per client)."""
    routes = _routes.get(nc)
    if routes is not None:
        return routes
    if not all(hasattr(nc, name) for name in _ROUTING_INTERNALS):
        return None
    routes = _routes[nc] = {}
    # nats-py annotates headers as bytes; its parser passes None for a plain MSG.
    original = cast(_ProcessMsg, nc._process_msg)
    process_headers = nc._process_headers
    stats = nc.stats

    async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes,
                          headers: bytes | None) -> None:
        handler = routes.get(sid)
        if handler is None:
            await original(sid, subject, reply, data, headers)
            return
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        if not headers or headers.startswith(b"\r\n", 8):
            handler(subject, data, headers)
        else:
            # An inline status (NATS/1.0 503 ...): nats-py's own parser.
            handler(subject, data, await process_headers(headers))

    # An instance attribute: only this client (the adapter's own) is affected.
    setattr(nc, "_process_msg", process_msg)  # noqa: B010 - shadowing a method on purpose
    return routes


def route(nc: Client, sub: Subscription, handler: Handler) -> bool:
    """Hand ``sub``'s messages to ``handler`` straight from the protocol parser.

    Returns:
        Whether they are routed; if not, ``sub``'s callback keeps receiving them.
    """
    # A message that already took the subscription's queue would be overtaken.
    if getattr(sub, "_received", None) != 0:
        return False
    sid = getattr(sub, "_id", None)
    routes = _install(nc)
    if routes is None or not isinstance(sid, int):
        return False
    routes[sid] = handler
    return True


def unroute(nc: Client, sub: Subscription) -> None:
    """Stop routing ``sub``'s messages (before unsubscribing it)."""
    routes = _routes.get(nc)
    if routes is not None:
        routes.pop(getattr(sub, "_id", -1), None)
