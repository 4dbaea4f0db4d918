"""The state of the in-memory broker: topics, groups, their members, the delay timer.

:mod:`unibus.memory` (whose docstring describes the broker's model, URL and
capabilities) builds its adapter and consumers on these structures. Nothing here
awaits: every operation runs to completion on the event loop, which is what makes
the broker's state consistent without locks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import ClassVar, Protocol

from unibus.errors import AuthenticationFailed, BrokerUnavailable
from unibus.message import Message

__all__ = ["Entry", "Group", "Member", "MemoryBroker", "Topic", "Waker"]


class Waker(Protocol):
    """A consumer as the broker sees it: something to wake when it has work."""

    def wake(self) -> None:
        """Wake the consumer's waiting fetches."""


class Entry:
    """One message queued in one group (each group counts its own deliveries)."""

    __slots__ = ("deliveries", "message", "seq", "topic")

    def __init__(self, message: Message, topic: str, seq: int) -> None:
        self.message = message
        self.topic = topic
        self.seq = seq
        self.deliveries = 0


class Group:
    """A group on one topic: ready entries, members, and which member owns each key."""

    __slots__ = ("durable", "members", "name", "owners", "ready", "topic")

    def __init__(self, topic: str, name: str, *, durable: bool) -> None:
        self.topic = topic
        self.name = name
        self.durable = durable
        self.ready: deque[Entry] = deque()
        self.members: list[Member] = []
        # A key belongs to the member holding (in flight or assigned) entries of it,
        # so messages of one key are never processed by two consumers at once.
        self.owners: dict[str, Member] = {}

    def wake(self) -> None:
        for member in self.members:
            member.consumer.wake()


class Member:
    """One consumer's attachment to one group."""

    __slots__ = ("assigned", "consumer", "group", "held")

    def __init__(self, consumer: Waker, group: Group) -> None:
        self.consumer = consumer
        self.group = group
        self.assigned: deque[Entry] = deque()   # entries of keys this member owns
        self.held: dict[str, int] = {}          # key → entries held (in flight + assigned)

    def release(self, key: str) -> None:
        count = self.held[key] - 1
        if count:
            self.held[key] = count
        else:
            del self.held[key]
            del self.group.owners[key]


class Topic:
    """A topic: its groups, and the message ids its dedup window remembers."""

    __slots__ = ("dedup", "groups")

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.dedup: dict[str, float] = {}   # message id → expiry; insertion order = expiry order


class MemoryBroker:
    """The broker behind every ``memory://NAME`` bus of one NAME."""

    _brokers: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self, name: str, credentials: tuple[str | None, str | None]) -> None:
        self.name = name
        self.credentials = credentials
        self.topics: dict[str, Topic] = {}
        self.buses = 0
        self._seq = itertools.count()
        self._delayed: list[tuple[float, int, Group, Entry]] = []
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

    def topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic()
        return topic

    def group(self, topic: str, name: str) -> Group:
        groups = self.topic(topic).groups
        group = groups.get(name)
        if group is None:
            group = groups[name] = Group(topic, name, durable=True)
        return group

    def ephemeral_group(self, topic: str) -> Group:
        """Create the private group of one subscription without a group."""
        group = Group(topic, f"~{next(self._seq)}", durable=False)
        self.topic(topic).groups[group.name] = group
        return group

    def drop_group(self, group: Group) -> None:
        """Forget an ephemeral group once its consumer closed."""
        self.topic(group.topic).groups.pop(group.name, None)

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
                    self._schedule(due, group, Entry(message, topic_name, next(seq)))
            return
        for group in groups:
            group.ready.extend([Entry(m, topic_name, next(seq)) for m in messages])
            group.wake()

    @staticmethod
    def _dedup(topic: Topic, messages: Sequence[Message], window: float) -> list[Message]:
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

    def requeue(self, group: Group, entry: Entry, delay: float) -> None:
        if delay > 0:
            self._schedule(time.time() + delay, group, entry)
        else:
            group.ready.append(entry)
            group.wake()

    def _schedule(self, due: float, group: Group, entry: Entry) -> None:
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
        woken: set[Group] = set()
        while delayed and delayed[0][0] <= now:
            _, _, group, entry = heapq.heappop(delayed)
            if group.durable or group.members:
                group.ready.append(entry)
                woken.add(group)
        for group in woken:
            group.wake()
        if delayed:
            self._arm(delayed[0][0])
