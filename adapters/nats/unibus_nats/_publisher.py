"""JetStream publishing: a bounded window of outstanding PubAcks, retried until confirmed.

Each message goes out as a plain NATS publish whose reply subject is a token under
one wildcard inbox this publisher subscribes to once; the JetStream server answers
there with the PubAck. ``publish`` keeps at most ``publish_window`` PubAcks
outstanding, and returns once every message is confirmed.

Nothing vanishes: a message whose PubAck does not come within ``publish_timeout``
(a reconnect lost it, the server restarted) is published again with the same
``Nats-Msg-Id`` — the stream's dedup window makes the retry harmless — until
``retry_for`` has passed; while the connection is down the publisher waits for it.
What is still unconfirmed then fails with :class:`~unibus.errors.PublishFailed`
naming the message ids; a refusal by the server (stream limits, wrong stream)
fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from unibus.errors import BrokerError, BrokerUnavailable, MessageTooLarge, PublishFailed
from unibus.message import Message
from unibus_nats import _wire as wire
from unibus_nats._codec import encode_headers, header_block
from unibus_nats._connection import Connection
from unibus_nats._errors import map_errors

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["Publisher", "Route"]

#: For a delayed message: the subject to publish it to and the headers to add.
Route = Callable[[Message], tuple[str, dict[str, str]]]

_PENDING, _OK, _RETRY, _FAILED = 0, 1, 2, 3
# Server answers that mean "try again shortly": no stream yet / no JetStream leader.
_RETRYABLE_CODES = {503, 504}


class _Batch:
    """The confirmation state of one ``publish`` call."""

    __slots__ = ("confirmed", "errors", "low_water", "outstanding", "state", "target", "waiter")

    def __init__(self, count: int, window: int) -> None:
        self.state = bytearray(count)
        self.errors: dict[int, str] = {}
        self.outstanding = 0
        self.confirmed = 0
        self.low_water = window // 2
        self.target = 0
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Publisher:
    """Publishes to JetStream subjects and waits for the PubAcks."""

    def __init__(self, conn: Connection, *, window: int, timeout: float, retry_for: float,
                 ensure_stream: Callable[[str, bool], Awaitable[None]]) -> None:
        self._conn = conn
        self._window = window
        self._timeout = timeout
        self._retry_for = retry_for
        self._ensure_stream = ensure_stream
        self._prefix = ""
        self._counter = 0
        self._pending: dict[str, tuple[_Batch, int]] = {}
        self._sub: Subscription | None = None
        self._closed = False

    async def start(self) -> None:
        """Subscribe to the PubAck inbox.

        Raises:
            BrokerUnavailable: Not connected.
        """
        nc = self._conn.nc
        self._prefix = f"{nc.new_inbox()}."
        with map_errors("subscribe to the PubAck inbox"):
            self._sub = sub = await nc.subscribe(f"{self._prefix}*", cb=self._on_ack,
                                                 pending_msgs_limit=-1,
                                                 pending_bytes_limit=-1)
        # PubAcks straight from the protocol parser, skipping nats-py's Msg, queue and
        # task hop (one PubAck per message); where that is not possible, _on_ack keeps
        # receiving them.
        wire.route(nc, sub, self._on_routed_ack)

    async def _on_ack(self, msg: Msg) -> None:
        self._settle(msg.subject, msg.data, msg.headers)

    def _on_routed_ack(self, subject: bytes, data: bytes,
                       headers: bytes | dict[str, str] | None) -> None:
        self._settle(subject.decode(), data, headers if isinstance(headers, dict) else None)

    def _settle(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        entry = self._pending.pop(subject[len(self._prefix):], None)
        if entry is None:
            return      # the answer to a retried publish that was confirmed already
        batch, index = entry
        if data and b'"error"' not in data:
            batch.state[index] = _OK
            batch.confirmed += 1
        else:
            status = (headers or {}).get("Status")
            if status == "503" or not data:
                batch.state[index] = _RETRY
                batch.errors[index] = "no stream answered (503)"
            else:
                try:
                    error = json.loads(data)["error"]
                    code = int(error.get("code", 0))
                    text = f"{error.get('description', 'refused')} (err_code " \
                           f"{error.get('err_code')})"
                except (ValueError, KeyError, TypeError, AttributeError):
                    code, text = 0, f"unreadable PubAck {data[:100]!r}"
                batch.state[index] = _RETRY if code in _RETRYABLE_CODES else _FAILED
                batch.errors[index] = text
        # A PubAck after a timeout gave up waiting (outstanding reset) counts no lower.
        batch.outstanding = max(0, batch.outstanding - 1)
        if batch.outstanding <= batch.target:
            batch.wake()

    async def publish(self, topic: str, subject: str, messages: Sequence[Message],
                      route: Route | None = None) -> None:
        """Publish ``messages`` to ``subject`` and wait for every PubAck.

        Args:
            topic: The topic (for errors and stream re-creation).
            subject: The stream subject to publish to.
            messages: The messages, in order.
            route: For delayed delivery: per message, the subject to publish to instead
                and the headers to add.

        Raises:
            PublishFailed: A message was refused, or not confirmed within ``retry_for`` (also
                when the connection stayed down that long); the unconfirmed ids attached.
            BrokerUnavailable: The adapter's connection was closed.
            MessageTooLarge: Body and headers exceed the server's max_payload.
        """
        loop = asyncio.get_running_loop()
        count = len(messages)
        batch = _Batch(count, self._window)
        direct = wire.can_write_directly(self._conn.nc)
        encoded = [self._encode(subject, m, route, direct) for m in messages]
        todo = list(range(count))
        tokens: list[str | None] = [None] * count
        deadline = loop.time() + self._retry_for
        progress = 0
        try:
            while todo:
                sent = await self._send(batch, encoded, todo, tokens, deadline)
                await self._wait(batch, 0)
                failed = [i for i in todo[:sent] if batch.state[i] == _FAILED]
                if failed:
                    raise PublishFailed(
                        f"publish to {topic!r}: the server refused {len(failed)} message(s): "
                        f"{batch.errors[failed[0]]}",
                        message_ids=tuple(messages[i].id for i in failed))
                # Unanswered after the wait, or answered "try again": publish those again.
                retry = [i for i in todo[:sent] if batch.state[i] != _OK]
                refused = False
                for i in retry:
                    if batch.state[i] == _RETRY:
                        refused = True
                        token = tokens[i]
                        if token is not None:
                            self._pending.pop(token, None)
                        tokens[i] = None
                        batch.state[i] = _PENDING
                todo = retry + todo[sent:]
                if batch.confirmed > progress:
                    progress = batch.confirmed
                    deadline = loop.time() + self._retry_for
                if todo and loop.time() >= deadline:
                    reason = batch.errors.get(todo[0], "no PubAck")
                    raise PublishFailed(
                        f"publish to {topic!r}: {len(todo)} message(s) unconfirmed after "
                        f"retry_for={self._retry_for:g} s ({reason})",
                        message_ids=tuple(messages[i].id for i in todo))
                if refused:
                    await self._recreate_stream(topic)
        except BrokerUnavailable as exc:
            if self._conn.closed:
                raise
            lost = tuple(messages[i].id for i in range(count) if batch.state[i] != _OK)
            raise PublishFailed(f"publish to {topic!r}: {len(lost)} message(s) unconfirmed: "
                                f"{exc}", message_ids=lost) from exc
        finally:
            for token in tokens:
                if token is not None:
                    self._pending.pop(token, None)

    async def _recreate_stream(self, topic: str) -> None:
        """The stream did not answer: re-create it (memory storage lost by a restart)."""
        try:
            await self._ensure_stream(topic, True)
        except (BrokerError, BrokerUnavailable):
            # Not back yet: the publish loop retries until retry_for runs out.
            await asyncio.sleep(min(self._timeout, 0.25))

    def _encode(self, subject: str, message: Message, route: Route | None, direct: bool,
                ) -> tuple[str, bytes, bytes | dict[str, str]]:
        """The subject, body and headers of ``message``: a ready header block if ``direct``.

        Raises:
            MessageTooLarge: Body and headers exceed the server's ``max_payload``.
        """
        body = message.body
        limit = self._conn.server_info.get("max_payload", 1_048_576)
        headers: bytes | dict[str, str]
        if direct and route is None:
            # The common message: its header block built in one go (see header_block).
            headers = header_block(message)
            size = len(body) + len(headers)
        else:
            headers = encode_headers(message)
            if route is not None:
                subject, extra = route(message)
                headers.update(extra)
            size = len(body) + 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if size > limit:
            raise MessageTooLarge(
                f"message {message.id}: {len(body)} bytes of body plus headers exceed the "
                f"server's max_payload of {limit} bytes")
        return subject, body, headers

    async def _send(self, batch: _Batch,
                    encoded: list[tuple[str, bytes, bytes | dict[str, str]]],
                    todo: list[int], tokens: list[str | None], deadline: float) -> int:
        """Publish ``todo`` in order within the window; return how many went out."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        pending = self._pending
        prefix = self._prefix
        window = self._window
        sent = 0
        nc = conn.nc
        for index in todo:
            if batch.outstanding >= window and not await self._wait(batch, batch.low_water):
                break       # PubAcks stopped coming: check what is confirmed, resend the rest
            if not nc.is_connected:
                await conn.wait_up(deadline)
            token = tokens[index]
            if token is None:
                self._counter += 1
                token = tokens[index] = str(self._counter)
                pending[token] = (batch, index)
            subject, body, headers = encoded[index]
            while True:
                try:
                    with map_errors(f"publish to {subject!r}"):
                        if isinstance(headers, bytes):
                            await wire.publish_block(nc, subject, body, headers, prefix + token)
                        else:
                            await wire.publish(nc, subject, body, headers, prefix + token)
                    break
                except BrokerUnavailable:
                    if nc.is_closed or conn.closed or loop.time() >= deadline:
                        raise
                    # Disconnected with a full reconnect buffer: wait for the connection.
                    await conn.wait_up(deadline)
                    if nc.is_connected:
                        await asyncio.sleep(0.01)
            batch.outstanding += 1
            sent += 1
        return sent

    async def _wait(self, batch: _Batch, level: int) -> bool:
        """Wait until at most ``level`` PubAcks are outstanding; ``False`` on timeout."""
        batch.target = level
        while batch.outstanding > level:
            previous = batch.outstanding
            batch.waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await batch.waiter
                if self._closed:
                    raise BrokerUnavailable("the nats adapter was closed while publishing")
            except TimeoutError:
                if batch.outstanding >= previous:
                    # Nothing came back for a whole timeout: the unanswered are lost.
                    batch.outstanding = 0
                    return False
            finally:
                batch.waiter = None
        return True

    async def close(self) -> None:
        """Unsubscribe the PubAck inbox; publishes still waiting fail at once."""
        self._closed = True
        for batch, _ in list(self._pending.values()):
            batch.wake()
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                wire.unroute(self._conn.nc, sub)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
