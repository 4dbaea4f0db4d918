"""Bad input at the bus, on the memory broker: refused before sending, and the bus lives on."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest

import unibus
from tests.helpers import NoOffset
from unibus import (
    URL,
    AlreadySettled,
    AuthenticationFailed,
    BrokerError,
    BrokerUnavailable,
    BusClosed,
    Capabilities,
    Delivery,
    DeliveryLost,
    InvalidMessage,
    InvalidName,
    InvalidURL,
    Message,
    MessageTooLarge,
    Ordering,
    RedeliveryOrder,
    Support,
)
from unibus.options import Options
from unibus.spi import Adapter, Consumer

TOPIC = "orders"
GROUP = "billing"
MAX_SIZE = 64


@pytest.fixture
async def bus(memory_url: str) -> AsyncIterator[unibus.Bus]:
    """An open bus whose group ``GROUP`` on ``TOPIC`` retains what is published."""
    async with unibus.connect(f"{memory_url}?max_message_size={MAX_SIZE}") as bus:
        await bus.declare_group(TOPIC, GROUP)
        yield bus


async def received(bus: unibus.Bus) -> list[bytes]:
    """The bodies the group holds, acked; waits at most the declared delivery bound."""
    async with bus.subscribe(TOPIC, group=GROUP) as sub:
        # One fetch returns everything already published: a message sent before the
        # valid one would arrive in the same batch.
        batch = await sub.fetch(100, bus.capabilities.timings.delivery)
        for delivery in batch:
            await delivery.ack()
    return [d.body for d in batch]


# -- message size ------------------------------------------------------------------------------

async def test_adapter_declares_the_max_size_given_in_the_url(bus: unibus.Bus) -> None:
    assert bus.capabilities.max_message_size == MAX_SIZE


async def test_body_over_max_size_is_refused_before_sending_and_the_bus_stays_usable(
        bus: unibus.Bus) -> None:
    with pytest.raises(MessageTooLarge, match=f"{MAX_SIZE + 1} bytes"):
        await bus.publish(TOPIC, b"x" * (MAX_SIZE + 1))

    await bus.publish(TOPIC, b"after")

    assert await received(bus) == [b"after"]


async def test_body_at_max_size_is_delivered_intact(bus: unibus.Bus) -> None:
    body = bytes(range(MAX_SIZE))

    await bus.publish(TOPIC, body)

    assert await received(bus) == [body]


async def test_one_oversized_message_in_a_batch_sends_none_of_it(bus: unibus.Bus) -> None:
    with pytest.raises(MessageTooLarge):
        await bus.publish_many(TOPIC, [b"first", b"x" * (MAX_SIZE + 1), b"third"])

    await bus.publish_many(TOPIC, [b"a", b"b"])

    assert await received(bus) == [b"a", b"b"]


async def test_message_too_large_is_also_an_invalid_message(bus: unibus.Bus) -> None:
    with pytest.raises(InvalidMessage):
        await bus.publish(TOPIC, b"x" * (MAX_SIZE + 1))


# -- message validation ------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["text", 7, None, [b"a"]])
async def test_non_bytes_body_is_refused_and_the_bus_stays_usable(
        bus: unibus.Bus, body: object) -> None:
    with pytest.raises(InvalidMessage, match="body must be bytes"):
        await bus.publish(TOPIC, body)  # type: ignore[arg-type]

    await bus.publish(TOPIC, b"after")

    assert await received(bus) == [b"after"]


async def test_non_bytes_item_in_a_batch_sends_none_of_it(bus: unibus.Bus) -> None:
    with pytest.raises(InvalidMessage):
        await bus.publish_many(TOPIC, [b"ok", "not bytes"])  # type: ignore[list-item]

    assert await received(bus) == []


@pytest.mark.parametrize("shape", [list, tuple, iter])
async def test_publish_many_takes_bodies_and_messages_in_any_iterable_in_order(
        bus: unibus.Bus, shape: type) -> None:
    kept = Message(b"kept")
    items: list[bytes | bytearray | Message] = [b"a", kept, bytearray(b"b"), b"c"]

    sent = await bus.publish_many(TOPIC, shape(items))

    assert [m.body for m in sent] == [b"a", b"kept", b"b", b"c"]
    assert sent[1] is kept
    assert [m.id for m in sent if m is not kept] == sorted(m.id for m in sent if m is not kept)
    assert await received(bus) == [b"a", b"kept", b"b", b"c"]


@pytest.mark.parametrize("body", [b"one body", "one text"])
async def test_publish_many_of_a_single_body_is_refused_pointing_to_publish(
        bus: unibus.Bus, body: bytes | str) -> None:
    with pytest.raises(InvalidMessage, match=r"use publish\(\) for a single body"):
        await bus.publish_many(TOPIC, body)  # type: ignore[arg-type]

    await bus.publish_many(TOPIC, [b"after"])

    assert await received(bus) == [b"after"]


@pytest.mark.parametrize(
    ("headers", "named"),
    [({"kind": 1}, "'kind'"), ({"ok": "v", "n": None}, "'n'"), ({2: "v"}, "2")])
async def test_header_not_str_to_str_is_refused_naming_it(
        bus: unibus.Bus, headers: dict[object, object], named: str) -> None:
    with pytest.raises(InvalidMessage, match=f"header {named}"):
        await bus.publish(TOPIC, b"x", headers=headers)  # type: ignore[arg-type]

    await bus.publish(TOPIC, b"after")

    assert await received(bus) == [b"after"]


async def test_publish_returns_the_message_it_sent(bus: unibus.Bus) -> None:
    sent = await bus.publish(TOPIC, bytearray(b"x"), key="k", headers={"h": "v"})  # type: ignore[arg-type]

    assert (sent.body, sent.key, dict(sent.headers)) == (b"x", "k", {"h": "v"})
    assert sent.timestamp.utcoffset() == timedelta(0)


# -- names -------------------------------------------------------------------------------------

BAD_NAMES = ["", " ", "a b", ".orders", "-orders", "orders/x", "orders*", "orders>", "ördrs",
             "tab\there", "new\nline", "x" * 201, "a:b", "a#b", "a%b"]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_publish_to_an_invalid_topic_name_is_refused(bus: unibus.Bus, name: str) -> None:
    with pytest.raises(InvalidName, match="invalid topic name"):
        await bus.publish(name, b"x")


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_subscribe_to_an_invalid_topic_name_is_refused(bus: unibus.Bus, name: str) -> None:
    with pytest.raises(InvalidName, match="invalid topic name"):
        bus.subscribe(name, group=GROUP)


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_invalid_group_name_is_refused(bus: unibus.Bus, name: str) -> None:
    with pytest.raises(InvalidName, match="invalid group name"):
        bus.subscribe(TOPIC, group=name)
    with pytest.raises(InvalidName, match="invalid group name"):
        await bus.declare_group(TOPIC, name)


async def test_invalid_name_among_several_topics_is_refused(bus: unibus.Bus) -> None:
    with pytest.raises(InvalidName):
        bus.subscribe([TOPIC, "bad name"], group=GROUP)


async def test_invalid_dead_letter_topic_is_refused(bus: unibus.Bus) -> None:
    with pytest.raises(InvalidName, match="dead-letter topic"):
        bus.subscribe(TOPIC, group=GROUP, dead_letter="bad name")


@pytest.mark.parametrize("name", [123, None, b"orders"])
async def test_non_str_topic_name_is_refused(bus: unibus.Bus, name: object) -> None:
    with pytest.raises(InvalidName):
        await bus.publish(name, b"x")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "orders", "orders.eu-1_v2", "_private", "7", "x" * 200])
async def test_valid_topic_names_are_accepted(bus: unibus.Bus, name: str) -> None:
    await bus.declare_group(name, GROUP)
    await bus.publish(name, b"x")


async def test_invalid_name_sends_nothing_and_the_bus_stays_usable(bus: unibus.Bus) -> None:
    with pytest.raises(InvalidName):
        await bus.publish("bad name", b"x")

    await bus.publish(TOPIC, b"after")

    assert await received(bus) == [b"after"]


# -- other bad arguments -----------------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, -1])
async def test_prefetch_below_one_is_refused(bus: unibus.Bus, prefetch: int) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        bus.subscribe(TOPIC, group=GROUP, prefetch=prefetch)


async def test_subscribe_without_topics_is_refused(bus: unibus.Bus) -> None:
    with pytest.raises(ValueError, match="at least one topic"):
        bus.subscribe([], group=GROUP)


async def test_delay_and_not_before_together_are_refused(bus: unibus.Bus) -> None:
    with pytest.raises(ValueError, match="either delay or not_before"):
        await bus.publish(TOPIC, b"x", delay=1, not_before=datetime.now(UTC))


async def test_negative_delay_is_refused(bus: unibus.Bus) -> None:
    with pytest.raises(ValueError, match="delay must be"):
        await bus.publish(TOPIC, b"x", delay=-1)


async def test_naive_not_before_is_refused(bus: unibus.Bus) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await bus.publish(TOPIC, b"x", not_before=datetime(2030, 1, 1))


# -- settlement --------------------------------------------------------------------------------

SETTLEMENTS = [(first, second) for first in ("ack", "nack", "reject")
               for second in ("ack", "nack", "reject")]


@pytest.mark.parametrize(("first", "second"), SETTLEMENTS)
async def test_settling_a_delivery_twice_raises_already_settled(
        bus: unibus.Bus, first: str, second: str) -> None:
    await bus.publish(TOPIC, b"x")
    async with bus.subscribe(TOPIC, group=GROUP) as sub:
        [delivery] = await sub.fetch(1, bus.capabilities.timings.delivery)
        await getattr(delivery, first)()

        with pytest.raises(AlreadySettled):
            await getattr(delivery, second)()


async def test_a_refused_second_settlement_keeps_the_first_and_the_bus_stays_usable(
        bus: unibus.Bus) -> None:
    timings = bus.capabilities.timings
    await bus.publish_many(TOPIC, [b"nacked", b"acked"])
    async with bus.subscribe(TOPIC, group=GROUP) as sub:
        by_body = {d.body: d for d in await sub.fetch(2, timings.delivery)}
        await by_body[b"nacked"].nack()
        with pytest.raises(AlreadySettled, match="each delivery settles exactly once"):
            await by_body[b"nacked"].ack()
        await by_body[b"acked"].ack()
        with pytest.raises(AlreadySettled):
            await by_body[b"acked"].nack()

        again = await sub.fetch(10, timings.redelivery)
        assert [(d.body, d.attempt) for d in again] == [(b"nacked", 2)]
        await again[0].ack()

    await bus.publish(TOPIC, b"after")
    assert await received(bus) == [b"after"]


# -- closed bus --------------------------------------------------------------------------------

@pytest.fixture
async def closed_bus(memory_url: str) -> unibus.Bus:
    bus = await unibus.connect(memory_url)
    await bus.aclose()
    return bus


async def test_publish_after_close_raises_bus_closed(closed_bus: unibus.Bus) -> None:
    with pytest.raises(BusClosed):
        await closed_bus.publish(TOPIC, b"x")


async def test_publish_many_after_close_raises_bus_closed(closed_bus: unibus.Bus) -> None:
    with pytest.raises(BusClosed):
        await closed_bus.publish_many(TOPIC, [Message(b"x")])


async def test_declare_group_after_close_raises_bus_closed(closed_bus: unibus.Bus) -> None:
    with pytest.raises(BusClosed):
        await closed_bus.declare_group(TOPIC, GROUP)


async def test_subscribe_after_close_raises_bus_closed(closed_bus: unibus.Bus) -> None:
    with pytest.raises(BusClosed):
        closed_bus.subscribe(TOPIC, group=GROUP)


async def test_reopening_a_closed_bus_raises_bus_closed(closed_bus: unibus.Bus) -> None:
    with pytest.raises(BusClosed):
        await closed_bus.open()


async def test_subscription_made_before_close_cannot_open_after_it(memory_url: str) -> None:
    bus = await unibus.connect(memory_url)
    sub = bus.subscribe(TOPIC, group=GROUP)
    await bus.aclose()

    with pytest.raises(BusClosed):
        await sub.open()


async def test_aclose_is_idempotent(memory_url: str) -> None:
    bus = await unibus.connect(memory_url)
    await bus.aclose()
    await bus.aclose()

    assert bus.closed


async def test_closing_the_bus_ends_its_subscriptions(bus: unibus.Bus) -> None:
    sub = await bus.subscribe(TOPIC, group=GROUP)
    await bus.aclose()

    assert sub.closed
    assert await sub.fetch(1, 0) == []
    assert [d async for d in sub] == []


async def test_a_closed_bus_loses_nothing_it_published_and_sends_nothing_more(
        memory_url: str) -> None:
    async with unibus.connect(memory_url) as keeper:
        await keeper.declare_group(TOPIC, GROUP)
        publisher = await unibus.connect(memory_url)
        await publisher.publish(TOPIC, b"before close")
        await publisher.aclose()

        with pytest.raises(BusClosed, match="connect a new one"):
            await publisher.publish(TOPIC, b"after close")

        assert await received(keeper) == [b"before close"]


async def test_settling_a_delivery_after_its_bus_closed_raises_delivery_lost_and_it_comes_back(
        memory_url: str) -> None:
    async with unibus.connect(memory_url) as keeper:
        timings = keeper.capabilities.timings
        await keeper.declare_group(TOPIC, GROUP)
        consumer_bus = await unibus.connect(memory_url)
        await keeper.publish(TOPIC, b"held")
        sub = await consumer_bus.subscribe(TOPIC, group=GROUP)
        [delivery] = await sub.fetch(1, timings.delivery)
        await consumer_bus.aclose()

        with pytest.raises(DeliveryLost, match="went back to its group"):
            await delivery.ack()

        async with keeper.subscribe(TOPIC, group=GROUP) as successor:
            [back] = await successor.fetch(1, timings.redelivery)
            await back.ack()
        assert (back.id, back.attempt) == (delivery.id, 2)


async def test_a_memory_delivery_sets_every_field_a_delivery_has(memory_url: str) -> None:
    # The memory consumer builds its deliveries without Delivery's constructor (for
    # speed): every field must still be set.
    from unibus.message import Delivery

    async with unibus.connect(memory_url) as bus:
        await bus.declare_group(TOPIC, GROUP)
        sent = await bus.publish(TOPIC, b"fields", key="k")
        async with bus.subscribe(TOPIC, group=GROUP) as sub:
            [delivery] = await sub.fetch(1, bus.capabilities.timings.delivery)
            for name in Delivery.__slots__:
                getattr(delivery, name)   # AttributeError if left unset
            assert (delivery.topic, delivery.group, delivery.attempt) == (TOPIC, GROUP, 1)
            assert delivery.message == sent
            assert not delivery.settled
            await delivery.ack()
            with pytest.raises(AlreadySettled):
                await delivery.ack()


# -- URL ---------------------------------------------------------------------------------------

def test_unknown_url_option_is_refused_naming_it(memory_url: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        unibus.connect(f"{memory_url}?max_mesage_size=10")

    assert "'max_mesage_size'" in str(caught.value)
    assert "Did you mean 'max_message_size'?" in str(caught.value)


@pytest.mark.parametrize("query", ["max_message_size=big", "max_message_size=-1", "create=perhaps"])
def test_invalid_url_option_value_is_refused_naming_it(memory_url: str, query: str) -> None:
    with pytest.raises(InvalidURL, match=query.partition("=")[0]):
        unibus.connect(f"{memory_url}?{query}")


async def test_a_refused_url_neither_disturbs_nor_keeps_alive_the_broker_it_names(
        memory_url: str) -> None:
    async with unibus.connect(memory_url) as bus:
        await bus.declare_group(TOPIC, GROUP)
        with pytest.raises(InvalidURL, match="Did you mean 'max_message_size'"):
            unibus.connect(f"{memory_url}?max_mesage_size=1")
        with pytest.raises(AuthenticationFailed):
            await unibus.connect(memory_url.replace("://", "://intruder:guess@")).open()

        await bus.publish(TOPIC, b"after")
        assert await received(bus) == [b"after"]

    # The refused buses did not count as users: the broker went with its last real bus.
    with pytest.raises(BrokerUnavailable):
        await unibus.connect(f"{memory_url}?create=false").open()


def test_bus_repr_masks_the_password(memory_url: str) -> None:
    bus = unibus.connect(memory_url.replace("://", "://app:s3cr3t@"))

    assert "s3cr3t" not in repr(bus)
    assert "s3cr3t" not in str(bus.url)


# -- connecting, closing and input edge cases -----------------------------------------------

class FakeConsumer(Consumer):
    """A consumer that delivers nothing and records its close."""

    def __init__(self, capabilities: Capabilities, *, fail_close: bool) -> None:
        self.capabilities = capabilities
        self.fail_close = fail_close
        self.closed = False

    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        return []

    async def ack(self, delivery: Delivery) -> None:
        """Nothing to settle."""

    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Nothing to settle."""

    async def reject(self, delivery: Delivery) -> None:
        """Nothing to settle."""

    async def aclose(self) -> None:
        self.closed = True
        if self.fail_close:
            raise BrokerError("the broker failed while the consumer detached")


class GatedAdapter(Adapter):
    """An adapter whose connect() and open_consumer() block until the test opens a gate."""

    options: ClassVar[Options] = Options()

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        self.options.parse(url)
        self.capabilities = Capabilities(
            name="gated", persistent=False, publish_confirms=True, group_retention=True,
            replay_for_new_groups=False, redelivery=True, nack_delay=Support.NATIVE,
            dead_letter=False, ordering=Ordering.NONE,
            redelivery_order=RedeliveryOrder.MAY_REORDER, delayed_delivery=Support.NATIVE,
            dedup_window=None, max_message_size=MAX_SIZE)
        self.connects = 0
        self.connected = False
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.consumers: list[FakeConsumer] = []
        self.consumer_entered = asyncio.Event()
        self.consumer_gate = asyncio.Event()
        self.fail_close = False

    async def connect(self) -> None:
        self.connects += 1
        self.entered.set()
        await self.gate.wait()
        self.connected = True

    async def aclose(self) -> None:
        self.connected = False

    async def publish(self, topic: str, messages: Sequence[Message], *,
                      not_before: datetime | None = None) -> None:
        """Accept everything."""

    async def declare_group(self, topic: str, group: str) -> None:
        """Nothing to declare."""

    async def open_consumer(self, topics: Sequence[str], group: str | None, *, prefetch: int,
                            dead_letter: str | None) -> Consumer:
        consumer = FakeConsumer(self.capabilities, fail_close=self.fail_close)
        self.consumers.append(consumer)
        self.consumer_entered.set()
        await self.consumer_gate.wait()
        return consumer


@pytest.fixture
def gated_bus() -> Iterator[unibus.Bus]:
    unibus.register("test+gated", GatedAdapter)
    try:
        yield unibus.connect("test+gated://x")
    finally:
        unibus.unregister("test+gated")


def gated(bus: unibus.Bus) -> GatedAdapter:
    assert isinstance(bus.adapter, GatedAdapter)
    return bus.adapter


async def test_concurrent_first_calls_connect_only_once(gated_bus: unibus.Bus) -> None:
    adapter = gated(gated_bus)
    # asyncio runs ready tasks in FIFO order: when the first task has entered
    # connect(), the second has run up to its own first wait as well.
    first = asyncio.create_task(gated_bus.publish(TOPIC, b"1"))
    second = asyncio.create_task(gated_bus.publish(TOPIC, b"2"))
    await adapter.entered.wait()
    adapter.gate.set()
    await asyncio.gather(first, second)

    assert adapter.connects == 1


async def test_aclose_while_connecting_leaves_no_connection_open(gated_bus: unibus.Bus) -> None:
    adapter = gated(gated_bus)
    opening = asyncio.create_task(gated_bus.open())
    await adapter.entered.wait()
    await gated_bus.aclose()
    adapter.gate.set()

    with pytest.raises(BusClosed):
        await opening
    assert not adapter.connected


async def test_publish_after_close_raises_bus_closed_even_for_a_bad_body(
        closed_bus: unibus.Bus) -> None:
    with pytest.raises(BusClosed):
        await closed_bus.publish(TOPIC, "not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("delay", [math.inf, math.nan])
async def test_non_finite_delay_is_refused(bus: unibus.Bus, delay: float) -> None:
    with pytest.raises(ValueError, match="delay must be"):
        await bus.publish(TOPIC, b"x", delay=delay)


@pytest.mark.parametrize("max_count", [0, -1])
async def test_fetch_with_max_count_below_one_is_refused(bus: unibus.Bus, max_count: int) -> None:
    async with bus.subscribe(TOPIC, group=GROUP) as sub:
        with pytest.raises(ValueError, match="max_count"):
            await sub.fetch(max_count, 0)


def test_empty_unibus_url_falls_back_to_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIBUS_URL", "")

    assert unibus.connect().url.scheme == "memory"


@pytest.mark.parametrize("name", ["orders..eu", "orders.", "a.b..c"])
async def test_names_with_empty_dot_segments_are_refused(bus: unibus.Bus, name: str) -> None:
    with pytest.raises(InvalidName):
        await bus.publish(name, b"x")





async def test_a_subscription_opened_by_two_tasks_attaches_one_consumer(
        gated_bus: unibus.Bus) -> None:
    adapter = gated(gated_bus)
    adapter.gate.set()
    sub = gated_bus.subscribe(TOPIC, group=GROUP)
    # FIFO task order: once the first task is inside open_consumer(), the second has
    # run up to its own first wait too.
    first = asyncio.create_task(sub.open())
    second = asyncio.create_task(sub.open())
    await adapter.consumer_entered.wait()
    adapter.consumer_gate.set()
    await asyncio.gather(first, second)

    assert len(adapter.consumers) == 1


async def test_a_bus_closed_while_a_subscription_attaches_leaves_no_consumer_open(
        gated_bus: unibus.Bus) -> None:
    adapter = gated(gated_bus)
    adapter.gate.set()
    opening = asyncio.create_task(gated_bus.subscribe(TOPIC, group=GROUP).open())
    await adapter.consumer_entered.wait()
    await gated_bus.aclose()
    adapter.consumer_gate.set()

    with pytest.raises(BusClosed):
        await opening
    assert [c.closed for c in adapter.consumers] == [True]


async def test_aclose_closes_the_connection_even_when_a_subscription_fails_to_close(
        gated_bus: unibus.Bus) -> None:
    adapter = gated(gated_bus)
    adapter.gate.set()
    adapter.consumer_gate.set()
    adapter.fail_close = True
    await gated_bus.subscribe(TOPIC, group=GROUP)

    with pytest.raises(BrokerError):
        await gated_bus.aclose()
    assert not adapter.connected


async def test_not_before_with_a_tzinfo_that_knows_no_offset_is_refused(bus: unibus.Bus) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await bus.publish(TOPIC, b"x", not_before=datetime(2030, 1, 1, tzinfo=NoOffset()))
