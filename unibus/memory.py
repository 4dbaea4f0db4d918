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
import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar

from unibus.capabilities import Capabilities, Ordering, RedeliveryOrder, Support, Timings
from unibus.errors import AuthenticationFailed, BrokerUnavailable, DeliveryLost, InvalidURL
from unibus.message import Delivery, Message
from unibus.options import Option, Options
from unibus.spi import Adapter, Consumer
from unibus.url import URL

__all__ = ["MemoryAdapter", "MemoryBroker"]

_TIMINGS = Timings(delivery=1.0, redelivery=1.0, delay_slack=0.5, connect_timeout=0.5,
                   recovery=1.0)


class _Entry:
    """One message queued in one group (each group counts its own deliveries)."""

    __slots__ = ("deliveries", "message", "seq", "topic")

    def __init__(self, message: Message, topic: str, seq: int) -> None:
        self.message = message
        self.topic = topic
        self.seq = seq
        self.deliveries = 0


class _Group:
    """A group on one topic: ready entries, members, and which member owns each key."""

    __slots__ = ("durable", "members", "name", "owners", "ready", "topic")

    def __init__(self, topic: str, name: str, *, durable: bool) -> None:
        self.topic = topic
        self.name = name
        self.durable = durable
        self.ready: deque[_Entry] = deque()
        self.members: list[_Member] = []
        # A key belongs to the member holding (in flight or assigned) entries of it,
        # so messages of one key are never processed by two consumers at once.
        self.owners: dict[str, _Member] = {}

    def wake(self) -> None:
        for member in self.members:
            member.consumer.wake()


class _Member:
    """One consumer's attachment to one group."""

    __slots__ = ("assigned", "consumer", "group", "held")

    def __init__(self, consumer: _MemoryConsumer, group: _Group) -> None:
        self.consumer = consumer
        self.group = group
        self.assigned: deque[_Entry] = deque()   # entries of keys this member owns
        self.held: dict[str, int] = {}          # key → entries held (in flight + assigned)

    def release(self, key: str) -> None:
        count = self.held[key] - 1
        if count:
            self.held[key] = count
        else:
            del self.held[key]
            del self.group.owners[key]


class _Topic:
    __slots__ = ("dedup", "groups")

    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}
        self.dedup: dict[str, float] = {}   # message id → expiry; insertion order = expiry order


class MemoryBroker:
    """The broker behind every ``memory://NAME`` bus of one NAME."""

    _brokers: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self, name: str, credentials: tuple[str | None, str | None]) -> None:
        self.name = name
        self.credentials = credentials
        self.topics: dict[str, _Topic] = {}
        self.buses = 0
        self._seq = itertools.count()
        self._delayed: list[tuple[float, int, _Group, _Entry]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = float("inf")

    @classmethod
    def attach(cls, name: str, credentials: tuple[str | None, str | None], *,
               create: bool) -> MemoryBroker:
        """Return the broker ``name``, creating it if allowed; count one more bus.

        Raises:
            BrokerUnavailable: It does not exist and ``create`` is false.
            AuthenticationFailed: It exists with other credentials.
        """
        broker = cls._brokers.get(name)
        if broker is None:
            if not create:
                raise BrokerUnavailable(f"no memory broker named {name!r} is running "
                                        "(create=false); connect one without create=false first")
            broker = cls._brokers[name] = MemoryBroker(name, credentials)
        elif broker.credentials != credentials:
            raise AuthenticationFailed(f"memory broker {name!r} refused the credentials of "
                                       f"user {credentials[0]!r}")
        broker.buses += 1
        return broker

    def detach(self) -> None:
        """Count one bus less; the last one tears the broker down."""
        self.buses -= 1
        if self.buses <= 0:
            if self._timer is not None:
                self._timer.cancel()
            if MemoryBroker._brokers.get(self.name) is self:
                del MemoryBroker._brokers[self.name]

    def topic(self, name: str) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = _Topic()
        return topic

    def group(self, topic: str, name: str) -> _Group:
        groups = self.topic(topic).groups
        group = groups.get(name)
        if group is None:
            group = groups[name] = _Group(topic, name, durable=True)
        return group

    def publish(self, topic_name: str, messages: Sequence[Message], due: float | None,
                dedup_window: float) -> None:
        topic = self.topic(topic_name)
        if dedup_window > 0:
            messages = self._dedup(topic, messages, dedup_window)
        groups = topic.groups.values()
        if not groups or not messages:
            return
        seq = self._seq
        if due is not None and due > time.time():
            for group in groups:
                for message in messages:
                    self._schedule(due, group, _Entry(message, topic_name, next(seq)))
            return
        for group in groups:
            group.ready.extend([_Entry(m, topic_name, next(seq)) for m in messages])
            group.wake()

    @staticmethod
    def _dedup(topic: _Topic, messages: Sequence[Message], window: float) -> list[Message]:
        seen = topic.dedup
        now = time.monotonic()
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > now:
                break
            del seen[oldest]
        fresh = []
        expiry = now + window
        for message in messages:
            if message.id not in seen:
                seen[message.id] = expiry
                fresh.append(message)
        return fresh

    def requeue(self, group: _Group, entry: _Entry, delay: float) -> None:
        if delay > 0:
            self._schedule(time.time() + delay, group, entry)
        else:
            group.ready.append(entry)
            group.wake()

    def _schedule(self, due: float, group: _Group, entry: _Entry) -> None:
        heapq.heappush(self._delayed, (due, entry.seq, group, entry))
        if due < self._timer_due:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        # The timer may fire a hair early on the monotonic clock: _fire re-checks the
        # wall clock, which is what "not before" is measured against.
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, due - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_due = float("inf")
        now = time.time()
        delayed = self._delayed
        woken: set[_Group] = set()
        while delayed and delayed[0][0] <= now:
            _, _, group, entry = heapq.heappop(delayed)
            if group.durable or group.members:
                group.ready.append(entry)
                woken.add(group)
        for group in woken:
            group.wake()
        if delayed:
            self._arm(delayed[0][0])


class _MemoryConsumer(Consumer):
    def __init__(self, adapter: MemoryAdapter, groups: list[_Group], prefetch: int,
                 dead_letter: str | None) -> None:
        self.capabilities = adapter.capabilities
        self._adapter = adapter
        self._broker = adapter.broker
        self._prefetch = prefetch
        self._dead_letter = dead_letter
        self._members = [_Member(self, g) for g in groups]
        self._unsettled: dict[_Entry, _Member] = {}
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

    def _take_from(self, member: _Member, room: int, out: list[Delivery]) -> int:
        group = member.group
        unsettled = self._unsettled
        taken = 0
        assigned = member.assigned
        while assigned and taken < room:
            entry = assigned.popleft()
            entry.deliveries += 1
            unsettled[entry] = member
            out.append(Delivery(entry.message, topic=entry.topic, group=self._group_name(group),
                                attempt=entry.deliveries, consumer=self, token=entry))
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
            out.append(Delivery(entry.message, topic=entry.topic, group=name,
                                attempt=entry.deliveries, consumer=self, token=entry))
            taken += 1
        return taken

    @staticmethod
    def _group_name(group: _Group) -> str | None:
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

    def _settle(self, delivery: Delivery) -> tuple[_Entry, _Member]:
        entry: _Entry = delivery.token
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
        returned: dict[_Group, list[_Entry]] = {}
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
                self._broker.topic(group.topic).groups.pop(group.name, None)
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
        groups: list[_Group] = []
        for topic in topics:
            if group is None:
                ephemeral = _Group(topic, f"~{next(broker._seq)}", durable=False)
                broker.topic(topic).groups[ephemeral.name] = ephemeral
                groups.append(ephemeral)
            else:
                groups.append(broker.group(topic, group))
        consumer = _MemoryConsumer(self, groups, prefetch, dead_letter)
        self.consumers.add(consumer)
        return consumer

    def __repr__(self) -> str:
        return f"<MemoryAdapter {self.url}>"
