"""D. Ordering: publish order for one consumer, per key across consumers, on redelivery."""

from __future__ import annotations

from collections import defaultdict

import pytest

from unibus import Delivery, Message, Ordering, RedeliveryOrder, UnsupportedFeature
from unibus_contract.context import Collected, Contract, keep
from unibus_contract.scenarios._support import attached

pytestmark = pytest.mark.asyncio


def _per_key(messages: list[Message] | list[Delivery]) -> dict[str | None, list[str]]:
    lanes: dict[str | None, list[str]] = defaultdict(list)
    for message in messages:
        lanes[message.key].append(message.id)
    return dict(lanes)


def _first_arrivals(got: Collected) -> list[Delivery]:
    seen: set[str] = set()
    firsts: list[Delivery] = []
    for delivery in got.deliveries:
        if delivery.id not in seen:
            seen.add(delivery.id)
            firsts.append(delivery)
    return firsts


@pytest.mark.contract_property("D1")
async def test_a_single_consumer_receives_one_key_in_publish_order(contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish_many(a.topic, [Message(f"m{i:03d}".encode(), key="one-key")
                                              for i in range(100)])
    got = await contract.collect(a.sub, len(sent))
    assert got.missing([m.id for m in sent]) == []
    if contract.capabilities.ordering is Ordering.NONE:
        contract.declared_absent("ordering=none: no publish order is kept (asserted: every "
                                 "message arrives)")
        return
    assert got.ids == [m.id for m in sent], "a single consumer saw the messages out of order"


@pytest.mark.contract_property("D1")
async def test_a_single_consumer_keeps_the_order_of_separate_publishes(
        contract: Contract) -> None:
    a = await attached(contract)
    sent = [await a.bus.publish(a.topic, f"m{i:02d}".encode(), key=f"k{i % 3}")
            for i in range(60)]
    got = await contract.collect(a.sub, len(sent))
    assert got.missing([m.id for m in sent]) == []
    ordering = contract.capabilities.ordering
    if ordering is Ordering.NONE:
        contract.declared_absent("ordering=none: no publish order is kept")
        return
    firsts = _first_arrivals(got)
    assert _per_key(firsts) == _per_key(sent), "per-key publish order was not kept"
    if ordering is Ordering.SINGLE_CONSUMER:
        assert got.ids == [m.id for m in sent], "publish order across keys was not kept"


@pytest.mark.contract_property("D2")
async def test_per_key_order_holds_across_competing_consumers(contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    subs = [await contract.subscribe(bus, topic, group=group, prefetch=4) for _ in range(3)]
    keys = [f"key-{k}" for k in range(5)]
    sent = await bus.publish_many(topic, [Message(f"{key}/{i:02d}".encode(), key=key)
                                          for i in range(20) for key in keys])
    # The collector records each delivery before acking it, so one shared arrival
    # list is the order in which the group handed out each key's messages.
    got = await contract.collect(subs, len(sent))
    assert got.missing([m.id for m in sent]) == []
    if contract.capabilities.ordering is not Ordering.PER_KEY:
        contract.declared_absent(f"ordering={contract.capabilities.ordering.value}: no per-key "
                                 "order across competing consumers (asserted: nothing lost)")
        return
    assert _per_key(_first_arrivals(got)) == _per_key(sent), (
        "messages of one key were handed out out of order across consumers")


@pytest.mark.contract_property("D3")
async def test_the_redelivery_order_declaration_is_consistent(contract: Contract) -> None:
    caps = contract.capabilities
    if not caps.redelivery:
        assert caps.redelivery_order is RedeliveryOrder.NOT_APPLICABLE, (
            "an adapter that never redelivers must declare redelivery_order n/a")
        contract.declared_absent("redelivery=False: redelivery_order is n/a")
        return
    assert caps.redelivery_order is not RedeliveryOrder.NOT_APPLICABLE, (
        "an adapter that redelivers must declare what redelivery does to order")
    if caps.redelivery_order is RedeliveryOrder.KEY_ORDER_KEPT:
        assert caps.ordering is Ordering.PER_KEY or caps.ordering is Ordering.SINGLE_CONSUMER


@pytest.mark.contract_property("D3")
async def test_a_nacked_message_is_ordered_as_declared(contract: Contract) -> None:
    a = await attached(contract, prefetch=1)
    sent = await a.bus.publish_many(a.topic, [Message(f"m{i}".encode(), key="lane")
                                              for i in range(3)])
    first = (await contract.collect(a.sub, 1, handle=keep)).deliveries[0]
    assert first.id == sent[0].id
    caps = contract.capabilities
    if not caps.redelivery:
        with pytest.raises(UnsupportedFeature):
            await first.nack()
        await first.ack()
        contract.declared_absent("redelivery=False: nothing is redelivered, order is n/a")
        return
    await first.nack()
    got = await contract.collect(a.sub, len(sent),
                                 timeout=contract.timings.delivery + contract.timings.redelivery)
    assert got.missing([m.id for m in sent]) == [], "a nacked message was lost"
    assert got.duplicates == 0
    retried = next(d for d in got.deliveries if d.id == sent[0].id)
    assert retried.attempt == 2
    if caps.redelivery_order is RedeliveryOrder.KEY_ORDER_KEPT:
        assert got.ids == [m.id for m in sent], (
            "redelivery_order=key-order-kept, but later messages of the key overtook the "
            "nacked one")


@pytest.mark.contract_property("D3")
async def test_deliveries_of_a_lost_consumer_are_ordered_as_declared(
        contract: Contract) -> None:
    publisher = await contract.bus()
    topic, group = contract.topic(), contract.group()
    first = await contract.subscribe(await contract.bus(), topic, group=group, prefetch=1)
    sent = await publisher.publish_many(topic, [Message(f"m{i}".encode(), key="lane")
                                                for i in range(4)])
    held = await contract.collect(first, 1, handle=keep)
    assert held.ids == [sent[0].id]
    await first.aclose()
    second = await contract.subscribe(await contract.bus(), topic, group=group)
    caps = contract.capabilities
    window = contract.timings.delivery + contract.timings.redelivery
    if not caps.redelivery:
        got = await contract.collect(second, len(sent) - 1, timeout=window)
        assert sent[0].id not in got.ids
        contract.declared_absent("redelivery=False: a lost consumer's delivery is not "
                                 "redelivered")
        return
    got = await contract.collect(second, len(sent), timeout=window)
    assert got.missing([m.id for m in sent]) == [], "a lost consumer's delivery was lost"
    if caps.redelivery_order is RedeliveryOrder.KEY_ORDER_KEPT:
        assert got.ids == [m.id for m in sent], "key order broke after a consumer loss"
