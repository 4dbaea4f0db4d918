"""The in-memory broker: ``memory://NAME``, a real broker inside the process.

It is the reference implementation of the unibus model and passes the same
contract suite as the network brokers. Buses that connect to the same NAME
share one broker; the broker lives while at least one of its buses is open, so
nothing leaks between tests that use different names (or close their buses).

Maps to
    topic → an in-process topic; group → a queue of entries with its own cursor,
    pending set and key ownership; ack → mark settled; nack(delay) → re-enqueue at
    the due time; reject → the subscription's dead-letter topic; delay → a timer.

URL
    ``memory://[user:password@]NAME[?option=value&...]`` — every bus naming the same
    NAME shares one broker. The first bus to connect fixes the credentials; a later
    bus with other credentials gets ``AuthenticationFailed``.

    ===================  =========  ==========================================================
    option               default    meaning
    ===================  =========  ==========================================================
    ``max_message_size``  1048576   largest body in bytes
    ``dedup_window``      0         seconds a message id is remembered per topic (0: off;
                                    every id in the window is held in memory)
    ``create``            true      ``false``: connect only to a broker that already exists,
                                    else ``BrokerUnavailable`` (how memory is "unreachable")
    ===================  =========  ==========================================================

Driver
    None; pure asyncio. All buses of one broker must share one event loop.

Capabilities
    Not persistent (the process is the broker); publish confirmed on return; groups
    retain messages; a new group does not replay history; nack with native delay;
    reject to the dead-letter topic; per-key order across competing consumers (a key
    belongs to one consumer while it holds messages of that key — a single consumer
    sees total publish order); a consumer's loss keeps key order, a nack may let
    later messages of its key overtake it; native delayed delivery; dedup on message
    id within ``dedup_window`` when it is set (off by default, like RabbitMQ: a
    window holds every id published in it, which at high rates costs memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar

from unibus._memory_broker import Entry, Group, Member, MemoryBroker
from unibus.capabilities import Capabilities, Ordering, RedeliveryOrder, Support, Timings
from unibus.errors import BrokerUnavailable, DeliveryLost, InvalidURL
from unibus.message import _ACK, Delivery, Message, _new
from unibus.options import Option, Options
from unibus.spi import Adapter, Consumer
from unibus.url import URL

__all__ = ["MemoryAdapter", "MemoryBroker"]

_TIMINGS = Timings(delivery=1.0, redelivery=1.0, delay_slack=0.5, connect_timeout=0.5,
                   recovery=1.0)


class _MemoryDelivery(Delivery):
    """A delivery of the memory broker: settled by its consumer without a second
    coroutine (``ack`` runs once per message)."""

    __slots__ = ()

    async def ack(self) -> None:
        """Confirm the message (see :meth:`unibus.Delivery.ack`).

        Raises:
            AlreadySettled: The delivery was settled before.
            DeliveryLost: Its consumer was closed; the message went back to its group.
        """
        if self.outcome is not None:
            self._settle(_ACK)   # raises AlreadySettled
        self.outcome = _ACK
        self._consumer._settle(self)  # type: ignore[attr-defined]  # a _MemoryConsumer


def _delivery(entry: Entry, group: str | None, consumer: _MemoryConsumer) -> Delivery:
    """The delivery of ``entry`` (once per message handed out): ``_setup`` called
    positionally, without the keyword-parsing constructor."""
    delivery: Delivery = _new(_MemoryDelivery)
    delivery._setup(entry.message, entry.topic, group, entry.deliveries, consumer, entry)
    return delivery


class _MemoryConsumer(Consumer):
    def __init__(self, adapter: MemoryAdapter, groups: list[Group], prefetch: int,
                 dead_letter: str | None) -> None:
        self.capabilities = adapter.capabilities
        self._adapter = adapter
        self._broker = adapter.broker
        self._prefetch = prefetch
        self._dead_letter = dead_letter
        self._members = [Member(self, g) for g in groups]
        self._unsettled: dict[Entry, Member] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._next = 0
        for member in self._members:
            member.group.members.append(member)

    def wake(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    def _take(self, max_count: int) -> list[Delivery]:
        room = min(max_count, self._prefetch - len(self._unsettled))
        out: list[Delivery] = []
        members = self._members
        count = len(members)
        for i in range(count):
            if room <= 0:
                break
            member = members[(self._next + i) % count]
            taken = self._take_from(member, room, out)
            room -= taken
        self._next = (self._next + 1) % count
        return out

    def _take_from(self, member: Member, room: int, out: list[Delivery]) -> int:
        group = member.group
        unsettled = self._unsettled
        taken = 0
        assigned = member.assigned
        while assigned and taken < room:
            entry = assigned.popleft()
            entry.deliveries += 1
            unsettled[entry] = member
            out.append(_delivery(entry, self._group_name(group), self))
            taken += 1
        ready = group.ready
        owners = group.owners
        held = member.held
        name = self._group_name(group)
        while ready and taken < room:
            entry = ready.popleft()
            key = entry.message.key
            if key is not None:
                owner = owners.get(key)
                if owner is None:
                    owners[key] = member
                    held[key] = 1
                elif owner is member:
                    held[key] += 1
                else:
                    # Another consumer holds this key: the entry waits for it, in order.
                    owner.assigned.append(entry)
                    owner.held[key] += 1
                    owner.consumer.wake()
                    continue
            entry.deliveries += 1
            unsettled[entry] = member
            out.append(_delivery(entry, name, self))
            taken += 1
        return taken

    @staticmethod
    def _group_name(group: Group) -> str | None:
        return group.name if group.durable else None

    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._closed:
            out = self._take(max_count)
            if out:
                return out
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                if remaining is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return []
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return []

    def _settle(self, delivery: Delivery) -> tuple[Entry, Member]:
        entry: Entry = delivery.token
        member = self._unsettled.pop(entry, None)
        if member is None:
            raise DeliveryLost(f"message {delivery.id} can no longer be settled: its consumer "
                               "was closed and the message went back to its group")
        key = entry.message.key
        if key is not None:
            member.release(key)
        if self._waiters and len(self._unsettled) < self._prefetch:
            self.wake()
        return entry, member

    async def ack(self, delivery: Delivery) -> None:
        self._settle(delivery)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        entry, member = self._settle(delivery)
        self._broker.requeue(member.group, entry, delay)

    async def reject(self, delivery: Delivery) -> None:
        entry, _ = self._settle(delivery)
        if self._dead_letter is not None:
            self._broker.publish(self._dead_letter, (entry.message,), None, 0.0)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.wake()
        returned: dict[Group, list[Entry]] = {}
        for entry, member in self._unsettled.items():
            returned.setdefault(member.group, []).append(entry)
        self._unsettled.clear()
        for member in self._members:
            group = member.group
            group.members.remove(member)
            for key in member.held:
                del group.owners[key]
            member.held.clear()
            entries = returned.setdefault(group, [])
            entries.extend(member.assigned)
            member.assigned.clear()
            if not group.durable:
                self._broker.drop_group(group)
                continue
            # Back to the front, oldest first, so a lost consumer keeps key order.
            entries.sort(key=lambda e: e.seq)
            group.ready.extendleft(reversed(entries))
            if entries:
                group.wake()
        self._adapter.consumers.discard(self)


class MemoryAdapter(Adapter):
    """The ``memory://`` adapter (see the module docstring)."""

    options: ClassVar[Options] = Options(
        Option("max_message_size", int, 1_048_576, "largest body in bytes", minimum=0),
        Option("dedup_window", float, 0.0,
               "seconds a message id is remembered per topic (0: off)"),
        Option("create", bool, True,
               "false: connect only to an existing broker, else BrokerUnavailable"),
    )

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        settings = self.options.parse(url)
        if len(url.hosts) > 1 or url.port is not None or url.path not in ("", "/"):
            raise InvalidURL(f"memory:// takes one broker name (memory://NAME), "
                             f"not {url.render()!r}")
        self.name = url.host or ""
        self._create: bool = settings["create"]
        self._dedup_window: float = settings["dedup_window"]
        self.capabilities = Capabilities(
            name="memory", persistent=False, publish_confirms=True, group_retention=True,
            replay_for_new_groups=False, redelivery=True, nack_delay=Support.NATIVE,
            dead_letter=True, ordering=Ordering.PER_KEY,
            redelivery_order=RedeliveryOrder.MAY_REORDER, delayed_delivery=Support.NATIVE,
            dedup_window=self._dedup_window or None,
            max_message_size=settings["max_message_size"], timings=_TIMINGS)
        self._broker: MemoryBroker | None = None
        self.consumers: set[_MemoryConsumer] = set()

    @property
    def broker(self) -> MemoryBroker:
        if self._broker is None:
            raise BrokerUnavailable("the memory adapter is not connected")
        return self._broker

    async def connect(self) -> None:
        if self._broker is None:
            self._broker = MemoryBroker.attach(
                self.name, (self.url.username, self.url.password), create=self._create)

    async def aclose(self) -> None:
        for consumer in list(self.consumers):
            await consumer.aclose()
        if self._broker is not None:
            self._broker.detach()
            self._broker = None

    async def publish(self, topic: str, messages: Sequence[Message], *,
                      not_before: datetime | None = None) -> None:
        due = None if not_before is None else not_before.timestamp()
        self.broker.publish(topic, messages, due, self._dedup_window)
        # A network broker always yields here; so does memory, or a publish loop would
        # starve every other task of the process.
        await asyncio.sleep(0)

    async def declare_group(self, topic: str, group: str) -> None:
        self.broker.group(topic, group)

    async def open_consumer(self, topics: Sequence[str], group: str | None, *, prefetch: int,
                            dead_letter: str | None) -> Consumer:
        broker = self.broker
        groups: list[Group] = []
        for topic in topics:
            if group is None:
                groups.append(broker.ephemeral_group(topic))
            else:
                groups.append(broker.group(topic, group))
        consumer = _MemoryConsumer(self, groups, prefetch, dead_letter)
        self.consumers.add(consumer)
        return consumer

    def __repr__(self) -> str:
        return f"<MemoryAdapter {self.url}>"
