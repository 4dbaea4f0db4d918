"""The per-scenario ``contract`` fixture: one target, fresh names, buses, collectors.

Every scenario gets a :class:`Contract` for its target. It knows the target's
declared :class:`~unibus.Capabilities` (and their timings, from which every wait
derives), hands out fresh uuid topic and group names, opens buses that it closes
after the scenario, and collects deliveries against a deadline while counting
duplicates apart from unique messages::

    async def test_something(contract: Contract) -> None:
        bus = await contract.bus()
        topic, group = contract.topic(), contract.group()
        sub = await contract.subscribe(bus, topic, group=group)
        sent = await bus.publish_many(topic, [b"a", b"b"])
        got = await contract.collect(sub, len(sent))
        assert got.ids == [m.id for m in sent] and got.duplicates == 0

A scenario that checks a declared absence (the adapter says it cannot, and the
scenario asserted the declared failure) calls :meth:`Contract.declared_absent`,
which the semantics report shows instead of "held".
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from unibus_contract.report import DECLARED_ABSENT_KEY
from unibus_contract.targets import Target

if TYPE_CHECKING:
    from unibus import Bus, Capabilities, Delivery, Subscription, Timings
    from unibus.url import URL

__all__ = ["Arrival", "Collected", "Contract", "Handler", "ack", "keep"]

#: What a collector does with each delivery it receives.
Handler = Callable[["Delivery"], Awaitable[None]]

#: Collectors poll their subscriptions in slices this long, so that several
#: consumers can stop together without cancelling a fetch.
_POLL = 0.1


async def ack(delivery: Delivery) -> None:
    """Acknowledge the delivery (the default handler)."""
    await delivery.ack()


async def keep(delivery: Delivery) -> None:
    """Leave the delivery unsettled."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One delivery as a collector saw it.

    Attributes:
        delivery: The delivery.
        consumer: The index of the subscription it came from.
        at: ``loop.time()`` when the fetch returned it.
    """

    delivery: Delivery
    consumer: int
    at: float


@dataclass(slots=True)
class Collected:
    """Everything a collector received, in arrival order."""

    arrivals: list[Arrival] = field(default_factory=list)

    @property
    def deliveries(self) -> list[Delivery]:
        """Every delivery, in arrival order (redeliveries and duplicates included)."""
        return [a.delivery for a in self.arrivals]

    @property
    def ids(self) -> list[str]:
        """The unique message ids, in order of first arrival."""
        return list(dict.fromkeys(a.delivery.id for a in self.arrivals))

    @property
    def bodies(self) -> list[bytes]:
        """The bodies of the unique messages, in order of first arrival."""
        first: dict[str, bytes] = {}
        for a in self.arrivals:
            first.setdefault(a.delivery.id, a.delivery.body)
        return list(first.values())

    @property
    def duplicates(self) -> int:
        """Deliveries beyond the first of their message id."""
        return len(self.arrivals) - len(self.ids)

    def count(self, message_id: str) -> int:
        """How often ``message_id`` was delivered."""
        return sum(1 for a in self.arrivals if a.delivery.id == message_id)

    def per_consumer(self) -> Counter[int]:
        """How many deliveries each subscription received."""
        return Counter(a.consumer for a in self.arrivals)

    def missing(self, expected: Sequence[str]) -> list[str]:
        """The ids of ``expected`` that never arrived."""
        seen = set(self.ids)
        return [i for i in expected if i not in seen]


class Contract:
    """One scenario's view of its target (see the module docstring)."""

    def __init__(self, target: Target, url: str, node: pytest.Item) -> None:
        from unibus import Bus
        from unibus.url import make_url

        self.target = target
        self.url: URL = make_url(url)
        self._node = node
        # Resolving the adapter does no I/O: it only reads the declared capabilities.
        self.capabilities: Capabilities = Bus(self.url).capabilities
        self._buses: list[Bus] = []
        self._sockets: list[socket.socket] = []
        self.absences: list[str] = []

    def __repr__(self) -> str:
        return f"<Contract {self.target.name} {self.url}>"

    @property
    def name(self) -> str:
        """The target's name."""
        return self.target.name

    @property
    def timings(self) -> Timings:
        """The timings the adapter declares; every wait of the suite derives from them."""
        return self.capabilities.timings

    @property
    def quiet_window(self) -> float:
        """How long "nothing arrives" is watched: a message that were coming would
        reach an attached consumer within the declared delivery time."""
        return self.timings.delivery

    # -- names -------------------------------------------------------------------

    @staticmethod
    def topic(label: str = "t") -> str:
        """A fresh topic name."""
        return f"contract.{label}.{uuid.uuid4().hex[:16]}"

    @staticmethod
    def group(label: str = "g") -> str:
        """A fresh group name."""
        return f"contract-{label}-{uuid.uuid4().hex[:16]}"

    # -- buses -------------------------------------------------------------------

    def new_bus(self, url: str | URL | None = None) -> Bus:
        """An unopened bus (closed after the scenario).

        Raises:
            InvalidURL: The URL is invalid for the adapter.
        """
        from unibus import Bus

        bus = Bus(self.url if url is None else url)
        self._buses.append(bus)
        return bus

    async def bus(self, url: str | URL | None = None) -> Bus:
        """An opened bus on the target (or ``url``), closed after the scenario.

        Raises:
            BrokerError: The broker could not be reached.
        """
        return await self.new_bus(url).open()

    async def subscribe(self, bus: Bus, topics: str | Sequence[str], *,
                        group: str | None = None, prefetch: int | None = None,
                        dead_letter: str | None = None) -> Subscription:
        """An opened subscription: it is receiving when this returns.

        Raises:
            BrokerError: The broker refused.
        """
        sub = bus.subscribe(topics, group=group, prefetch=prefetch, dead_letter=dead_letter)
        return await sub.open()

    async def aclose(self) -> None:
        """Close every bus this scenario opened (idempotent)."""
        buses, self._buses = self._buses, []
        for bus in reversed(buses):
            await bus.aclose()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    # -- collecting --------------------------------------------------------------

    async def collect(self, subs: Subscription | Sequence[Subscription],
                      count: int | None = None, *,
                      until: Callable[[Collected], bool] | None = None,
                      timeout: float | None = None, handle: Handler = ack,
                      max_count: int | None = None) -> Collected:
        """Receive from ``subs`` until ``count`` unique messages (or ``until``) or timeout.

        Deliveries are handled (acked by default) as they arrive. The result is
        returned at the deadline whether or not the goal was reached: the scenario
        asserts on it.

        Args:
            subs: One subscription or several competing ones.
            count: Stop after this many unique message ids.
            until: Stop when this returns true (instead of ``count``).
            timeout: Seconds; defaults to the declared delivery time.
            handle: Awaited for each delivery as it arrives.
            max_count: The most deliveries per fetch (default: the prefetch).
        """
        sources = [subs] if not isinstance(subs, Sequence) else list(subs)
        if until is None and count is None:
            raise ValueError("collect needs count= or until=")
        goal = count or 0

        def check(c: Collected) -> bool:
            return until(c) if until is not None else len(c.ids) >= goal

        got = Collected()
        if check(got):
            return got
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timings.delivery if timeout is None else timeout)
        done = asyncio.Event()

        async def pump(index: int, sub: Subscription) -> None:
            while not done.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                wait = remaining if len(sources) == 1 else min(remaining, _POLL)
                batch = await sub.fetch(max_count, timeout=wait)
                now = loop.time()
                for delivery in batch:
                    got.arrivals.append(Arrival(delivery, index, now))
                    await handle(delivery)
                    if check(got):
                        done.set()
                if not batch and sub.closed:
                    return

        async with asyncio.TaskGroup() as tasks:
            for index, sub in enumerate(sources):
                tasks.create_task(pump(index, sub))
        return got

    async def collect_for(self, subs: Subscription | Sequence[Subscription],
                          window: float | None = None, *, handle: Handler = ack) -> Collected:
        """Everything that arrives within ``window`` (default: :attr:`quiet_window`).

        The bounded negative check: a scenario asserts the result is empty.
        """
        return await self.collect(subs, until=lambda _: False,
                                  timeout=self.quiet_window if window is None else window,
                                  handle=handle)

    # -- declarations ------------------------------------------------------------

    def declared_absent(self, reason: str) -> None:
        """Record that this scenario asserted a declared absence, and why.

        The semantics report shows the property as "declared absent" for this
        target (unless another scenario of the property proved it held).
        """
        self.absences.append(reason)
        self._node.user_properties.append((DECLARED_ABSENT_KEY, reason))

    # -- failure paths -----------------------------------------------------------

    def closed_port(self) -> int:
        """A local port bound by this scenario but not listening: connecting is refused."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._sockets.append(sock)
        port: int = sock.getsockname()[1]
        return port

    def unreachable_url(self) -> URL:
        """A URL for the target's scheme that cannot connect (see :class:`Target`)."""
        return self.target.unreachable(self.url, self.closed_port())

    @asynccontextmanager
    async def silent_peer(self) -> AsyncIterator[int]:
        """A local TCP server that accepts connections and never says a word.

        Yields:
            Its port.
        """
        held: list[asyncio.StreamWriter] = []

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for writer in held:
                writer.close()
            await server.wait_closed()
