"""The JetStream consumer: pull loops with client-side credit, keepalive and recovery.

One :class:`JetStreamConsumer` consumes one or more topics; for each it runs a
*pull loop* (:class:`_Member`) on one JetStream consumer — the group's durable
pull consumer, shared with the group's other members, or a private ephemeral one.

Credit (prefetch): the deliveries handed out and unsettled, plus those received
and not yet handed out, plus the messages still requested from the server never
exceed ``prefetch``. So the bound holds at this consumer whatever the group's
server-side ``MaxAckPending`` (which all members share) allows.

Keepalive: deliveries held by a live consumer are kept from the server's
``ack_wait`` redelivery with ``+WPI`` every ``ack_wait / 3``; a consumer that
closes returns them at once (``-NAK``); one that dies loses them to the group after
``ack_wait``.

Recovery: every pull request carries an idle heartbeat. A pull loop that hears
nothing for three heartbeats while it has credit outstanding, or whose connection
was re-established, or whose server says the consumer is gone, gets a new inbox,
re-creates its JetStream consumer if it vanished (a memory-storage restart), and
pulls again. Messages sent to the old inbox are redelivered after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from unibus.errors import DeliveryLost, UnibusError
from unibus.message import Delivery, Message
from unibus.spi import Consumer
from unibus_nats import _wire as wire
from unibus_nats._codec import NOT_BEFORE, decode, parse_reply
from unibus_nats._connection import Connection
from unibus_nats._errors import map_errors

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from unibus.capabilities import Capabilities

__all__ = ["JetStreamConsumer", "MemberSpec"]

log = logging.getLogger("unibus.nats")

_ACK, _NAK, _TERM, _WPI = b"+ACK", b"-NAK", b"+TERM", b"+WPI"
_EXPIRES = 30.0            # seconds a pull request waits on the server
_SILENT_HEARTBEATS = 3


class MemberSpec:
    """Where one pull loop pulls from, and how to re-create its JetStream consumer."""

    __slots__ = ("consumer", "create", "durable", "heard", "stream", "topic")

    def __init__(self, topic: str, stream: str, consumer: str,
                 create: Callable[[], Awaitable[str]], *, durable: bool) -> None:
        self.topic = topic
        self.stream = stream
        self.consumer = consumer
        self.create = create      # (re-)creates the JetStream consumer, returns its name
        self.durable = durable
        self.heard = time.time()  # wall clock of the last word from the server (resume point)


class _Member:
    """The pull loop of one topic."""

    __slots__ = ("generation", "inbox", "last_seen", "requested", "spec", "stale", "sub")

    def __init__(self, spec: MemberSpec) -> None:
        self.spec = spec
        self.inbox = ""
        self.sub: Subscription | None = None
        self.requested = 0
        self.last_seen = 0.0
        self.stale = False
        self.generation = 0


class JetStreamConsumer(Consumer):
    """A unibus consumer over JetStream pull consumers (see the module docstring)."""

    def __init__(self, conn: Connection, capabilities: Capabilities, specs: Sequence[MemberSpec],
                 *, group: str | None, prefetch: int, dead_letter: str | None,
                 heartbeat: float, ack_wait: float,
                 publish: Callable[[str, Sequence[Message]], Awaitable[None]],
                 on_close: Callable[[JetStreamConsumer], Awaitable[None]]) -> None:
        self.capabilities = capabilities
        self._conn = conn
        self._members = [_Member(spec) for spec in specs]
        self._group = group
        self._prefetch = prefetch
        self._dead_letter = dead_letter
        self._heartbeat = heartbeat
        self._ack_wait = ack_wait
        self._publish = publish
        self._on_close = on_close
        self._ready: deque[Delivery] = deque()
        self._unsettled: dict[str, _Member] = {}
        self._requested = 0
        self._changed = asyncio.Event()
        self._kick = asyncio.Event()
        self._closed = False
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._remove_listener: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    @property
    def specs(self) -> list[MemberSpec]:
        """What each pull loop pulls from."""
        return [member.spec for member in self._members]

    async def start(self) -> None:
        """Subscribe every pull loop's inbox and issue the first pull requests.

        Raises:
            BrokerError: The server refused.
        """
        for member in self._members:
            await self._subscribe(member)
        await self._pump()
        self._remove_listener = self._conn.on_reconnect(self._on_reconnected)
        self._task = asyncio.get_running_loop().create_task(self._watch(),
                                                            name="unibus-nats-watchdog")

    # -- pull loops -------------------------------------------------------------------------

    async def _subscribe(self, member: _Member) -> None:
        nc = self._conn.nc
        old, member.sub = member.sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        self._requested -= member.requested
        member.requested = 0
        member.inbox = nc.new_inbox()
        member.generation += 1
        generation = member.generation

        async def on_msg(msg: Msg) -> None:
            # Deliveries of an abandoned inbox come back after ack_wait; ignore them.
            if generation == member.generation and not self._closed:
                self._on_msg(member, msg)

        with map_errors(f"subscribe to {member.spec.topic!r}"):
            member.sub = await nc.subscribe(member.inbox, cb=on_msg, pending_msgs_limit=-1,
                                            pending_bytes_limit=-1)
        member.last_seen = time.monotonic()
        member.stale = False

    def _on_msg(self, member: _Member, msg: Msg) -> None:
        member.last_seen = time.monotonic()
        member.spec.heard = time.time()
        reply = msg.reply
        if not reply:
            self._on_status(member, msg.headers or {})
            return
        if member.requested > 0:
            member.requested -= 1
            self._requested -= 1
        try:
            stream, sequence, delivered, server_ns = parse_reply(reply)
            headers = msg.headers
            if headers is not None:
                not_before = headers.get(NOT_BEFORE)
                if not_before is not None and self._hold_back(reply, int(not_before)):
                    return
            message = decode(msg.data, headers, stream, sequence, server_ns)
        except ValueError as exc:
            # Unreadable unibus headers: deliver the body under the stream sequence.
            log.warning("nats: message %s on %r has malformed unibus headers (%s)",
                        reply, member.spec.topic, exc)
            message = Message(msg.data, id=reply)
            delivered = 1
        self._ready.append(Delivery(message, topic=member.spec.topic, group=self._group,
                                    attempt=delivered, consumer=self, token=(reply, member)))
        self._changed.set()

    def _hold_back(self, reply: str, not_before_us: int) -> bool:
        """Nak a delayed message that came early, to come back when due."""
        early = not_before_us / 1e6 - time.time()
        if early <= 0:
            return False
        payload = _NAK + b' {"delay": %d}' % int(early * 1e9 + 1e6)
        self._tasks.add(task := asyncio.get_running_loop().create_task(
            self._send_quietly(reply, payload)))
        task.add_done_callback(self._tasks.discard)
        self._kick.set()
        return True

    async def _send_quietly(self, reply: str, payload: bytes) -> None:
        with contextlib.suppress(UnibusError):
            # Not sent: the server redelivers after ack_wait, and it is held back again.
            await self._send(reply, payload)

    def _on_status(self, member: _Member, headers: dict[str, str]) -> None:
        status = headers.get("Status")
        if status == "100":
            return      # idle heartbeat: the pull loop is alive
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            returned = min(int(pending), member.requested)
            member.requested -= returned
            self._requested -= returned
        elif status in ("404", "408"):
            self._requested -= member.requested
            member.requested = 0
        else:
            # 409 without a count (consumer deleted, leadership change, ...): start over.
            log.warning("nats: pull loop on %r got status %s %s; re-subscribing",
                        member.spec.topic, status, headers.get("Description", ""))
            member.stale = True
        self._kick.set()

    async def _pump(self) -> None:
        """Request as many messages as the credit allows, spread over the pull loops."""
        free = self._prefetch - len(self._unsettled) - len(self._ready) - self._requested
        if free <= 0 or self._closed:
            return
        members = self._members
        idle = [m for m in members if m.requested == 0 and not m.stale]
        if idle:
            share = max(1, free // len(idle))
            for member in idle:
                if free <= 0:
                    break
                batch = min(share, free)
                await self._pull(member, batch)
                free -= batch
        elif free >= max(1, self._prefetch // 2):
            member = members[self._next % len(members)]
            self._next += 1
            if not member.stale:
                await self._pull(member, free)

    async def _pull(self, member: _Member, batch: int) -> None:
        nc = self._conn.nc
        if not nc.is_connected:
            return      # the reconnect listener re-pulls
        request = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (
            batch, int(_EXPIRES * 1e9), int(self._heartbeat * 1e9))
        with map_errors(f"pull from {member.spec.topic!r}"):
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{member.spec.stream}."
                             f"{member.spec.consumer}", request, reply=member.inbox)
        if member.requested == 0:
            member.last_seen = time.monotonic()
        member.requested += batch
        self._requested += batch

    def _on_reconnected(self) -> None:
        for member in self._members:
            member.stale = True
        self._kick.set()

    async def _watch(self) -> None:
        """Keep held deliveries alive, re-pull, and recover silent or stale pull loops."""
        interval = min(self._heartbeat, self._ack_wait / 3)
        keepalive_every = self._ack_wait / 3
        last_keepalive = time.monotonic()
        silent = self._heartbeat * _SILENT_HEARTBEATS + 0.5
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._kick.wait()
            self._kick.clear()
            if self.closed:
                return
            try:
                now = time.monotonic()
                for member in self._members:
                    if member.requested > 0 and now - member.last_seen > silent \
                            and not member.stale:
                        log.warning("nats: pull loop on %r silent for %.1f s; re-subscribing",
                                    member.spec.topic, now - member.last_seen)
                        member.stale = True
                    if member.stale and self._conn.nc.is_connected:
                        await self._recover(member)
                if now - last_keepalive >= keepalive_every:
                    last_keepalive = now
                    await self._keepalive()
                await self._pump()
            except UnibusError as exc:
                # Still disconnected or the server not ready: try again next round.
                log.debug("nats: consumer recovery deferred: %s", exc)
            except Exception:
                # The watchdog must outlive any surprise, or the pull loops go silent.
                log.exception("nats: consumer watchdog round failed; retrying")

    async def _recover(self, member: _Member) -> None:
        member.spec.consumer = await member.spec.create()
        await self._subscribe(member)

    async def _keepalive(self) -> None:
        nc = self._conn.nc
        if not nc.is_connected:
            return
        with map_errors("keep deliveries alive"):
            for reply in list(self._unsettled):
                await nc.publish(reply, _WPI)
            for delivery in list(self._ready):
                await nc.publish(delivery.token[0], _WPI)

    # -- the Consumer SPI -------------------------------------------------------------------

    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ready = self._ready
        unsettled = self._unsettled
        while not self._closed:
            room = min(max_count, self._prefetch - len(unsettled))
            if ready and room > 0:
                out = [ready.popleft() for _ in range(min(room, len(ready)))]
                for delivery in out:
                    unsettled[delivery.token[0]] = delivery.token[1]
                await self._pump_quietly()
                return out
            await self._pump_quietly()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return []
        return []

    async def _pump_quietly(self) -> None:
        try:
            await self._pump()
        except UnibusError:
            self._kick.set()     # the watchdog retries once the connection is back

    def _take(self, delivery: Delivery) -> str:
        reply: str = delivery.token[0]
        if self._unsettled.pop(reply, None) is None:
            raise DeliveryLost(f"message {delivery.id} can no longer be settled: its consumer "
                               "was closed and the message went back to its group")
        self._changed.set()
        return reply

    async def _send(self, reply: str, payload: bytes) -> None:
        try:
            with map_errors("settle a delivery"):
                await self._conn.nc.publish(reply, payload)
        except UnibusError as exc:
            raise DeliveryLost(f"the settlement could not be sent ({exc}); the server "
                               "redelivers the message after ack_wait") from exc

    async def ack(self, delivery: Delivery) -> None:
        await self._send(self._take(delivery), _ACK)
        if self._prefetch - len(self._unsettled) - self._requested >= self._prefetch // 2:
            await self._pump_quietly()

    async def nack(self, delivery: Delivery, delay: float) -> None:
        reply = self._take(delivery)
        payload = _NAK if delay <= 0 else _NAK + b' {"delay": %d}' % int(delay * 1e9)
        await self._send(reply, payload)
        await self._pump_quietly()

    async def reject(self, delivery: Delivery) -> None:
        reply = self._take(delivery)
        if self._dead_letter is not None:
            try:
                await self._publish(self._dead_letter, (delivery.message,))
            except BaseException:
                # Not dead-lettered: still unsettled, as Delivery.reject promises — to be
                # settled again, or given back when this consumer closes (or, if it has
                # closed meanwhile, given back now).
                if self._closed:
                    with contextlib.suppress(UnibusError):
                        await self._send(reply, _NAK)
                else:
                    self._unsettled[reply] = delivery.token[1]
                raise
        await self._send(reply, _TERM)
        await self._pump_quietly()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        self._kick.set()
        if self._remove_listener is not None:
            self._remove_listener()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        held = list(self._unsettled) + [d.token[0] for d in self._ready]
        self._unsettled.clear()
        self._ready.clear()
        with contextlib.suppress(Exception):
            nc = self._conn.nc
            for member in self._members:
                if member.sub is not None:
                    await member.sub.unsubscribe()
                    member.sub = None
            # Back to the group at once, not after ack_wait.
            for reply in held:
                await nc.publish(reply, _NAK)
            await wire.flush(nc, 2)
        await self._on_close(self)

