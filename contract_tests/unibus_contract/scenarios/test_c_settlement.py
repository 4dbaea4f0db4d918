"""C. Settlement and redelivery: ack, nack, reject, consumer loss, prefetch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from unibus import AlreadySettled, Delivery, UnsupportedFeature
from unibus_contract.context import Contract, keep
from unibus_contract.scenarios._support import (
    SCHEDULING_SLACK,
    attached,
    returned_to,
    sentinel_then_quiet,
)

pytestmark = pytest.mark.asyncio

_NOT_RETURNED = ("redelivery=False: unsettled deliveries of a closed consumer are not "
                 "redelivered")
_NO_REDELIVERY = ("redelivery=False: nack raises UnsupportedFeature and leaves the delivery "
                  "unsettled")


async def _assert_nack_unsupported(contract: Contract, delivery: Delivery,
                                   delay: float = 0.0) -> None:
    with pytest.raises(UnsupportedFeature):
        await delivery.nack(delay=delay)
    assert not delivery.settled, "a refused nack settled the delivery"
    await delivery.ack()


@pytest.mark.contract_property("C1")
async def test_acked_messages_are_never_delivered_again(contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish_many(a.topic, [f"m{i}".encode() for i in range(10)])
    got = await contract.collect(a.sub, len(sent))
    assert got.missing([m.id for m in sent]) == []
    again = await contract.collect_for(a.sub, contract.timings.redelivery)
    assert again.ids == [], "acked messages were delivered again"


@pytest.mark.contract_property("C1")
async def test_acked_messages_are_not_delivered_again_after_a_consumer_restart(
        contract: Contract) -> None:
    publisher = await contract.bus()
    topic, group = contract.topic(), contract.group()
    consumer_bus = await contract.bus()
    first = await contract.subscribe(consumer_bus, topic, group=group)
    sent = await publisher.publish_many(topic, [f"m{i}".encode() for i in range(10)])
    got = await contract.collect(first, len(sent))
    assert got.missing([m.id for m in sent]) == []
    await consumer_bus.aclose()
    restarted = await contract.subscribe(await contract.bus(), topic, group=group)
    again = await sentinel_then_quiet(contract, publisher, topic, restarted)
    assert again.ids == [], "acked messages came back after the consumer restarted"


@pytest.mark.contract_property("C2")
async def test_nack_redelivers_with_the_attempt_incremented(contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish(a.topic, b"again", key="k", headers={"h": "v"})
    first = (await contract.collect(a.sub, 1, handle=keep)).deliveries
    assert [d.id for d in first] == [sent.id]
    assert first[0].attempt == 1
    if not contract.capabilities.redelivery:
        await _assert_nack_unsupported(contract, first[0])
        contract.declared_absent(_NO_REDELIVERY)
        return
    await first[0].nack()
    assert first[0].settled
    for expected_attempt in (2, 3):
        got = await contract.collect(a.sub, 1, handle=keep,
                                     timeout=contract.timings.redelivery)
        assert got.ids == [sent.id], f"attempt {expected_attempt} did not arrive"
        redelivered = got.deliveries[0]
        assert redelivered.attempt == expected_attempt
        assert (redelivered.body, redelivered.key, dict(redelivered.headers)) == (
            b"again", "k", {"h": "v"})
        if expected_attempt == 2:
            await redelivered.nack()
        else:
            await redelivered.ack()


@pytest.mark.contract_property("C3")
async def test_nack_with_delay_is_not_redelivered_early(contract: Contract) -> None:
    a = await attached(contract)
    caps = contract.capabilities
    delay = 1.0
    sent = await a.bus.publish(a.topic, b"later")
    delivery = (await contract.collect(a.sub, 1, handle=keep)).deliveries[0]
    if not caps.redelivery or not caps.nack_delay:
        await _assert_nack_unsupported(contract, delivery, delay)
        contract.declared_absent(f"nack_delay={caps.nack_delay.value}, redelivery="
                                 f"{caps.redelivery}: nack(delay) raises UnsupportedFeature")
        return
    loop = asyncio.get_running_loop()
    nacked_at = loop.time()
    await delivery.nack(delay=delay)
    got = await contract.collect(a.sub, 1, timeout=delay + contract.timings.delay_slack
                                 + contract.timings.delivery)
    assert got.ids == [sent.id], "the delayed nack was not redelivered"
    waited = got.arrivals[0].at - nacked_at
    assert waited >= delay, f"redelivered after {waited:.3f}s, before the {delay}s delay"
    assert waited <= delay + contract.timings.delay_slack + SCHEDULING_SLACK
    assert got.deliveries[0].attempt == 2


@pytest.mark.contract_property("C4")
async def test_repeated_nacks_keep_redelivering_until_the_policy_gives_up(
        contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish(a.topic, b"stubborn")
    max_attempts = 5
    attempts: list[int] = []

    async def policy(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < max_attempts:
            await delivery.nack()
        else:
            await delivery.reject()

    if not contract.capabilities.redelivery:
        delivery = (await contract.collect(a.sub, 1, handle=keep)).deliveries[0]
        await _assert_nack_unsupported(contract, delivery)
        contract.declared_absent(_NO_REDELIVERY)
        return
    await contract.collect(a.sub, until=lambda c: len(c.arrivals) >= max_attempts,
                           handle=policy,
                           timeout=contract.timings.delivery
                           + max_attempts * contract.timings.redelivery)
    assert attempts == list(range(1, max_attempts + 1))
    after = await sentinel_then_quiet(contract, a.bus, a.topic, a.sub)
    assert sent.id not in after.ids, "a rejected message came back"


@pytest.mark.contract_property("C5")
async def test_a_rejected_message_is_never_redelivered(contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish(a.topic, b"refused")

    async def reject(delivery: Delivery) -> None:
        await delivery.reject()

    got = await contract.collect(a.sub, 1, handle=reject)
    assert got.ids == [sent.id]
    after = await sentinel_then_quiet(contract, a.bus, a.topic, a.sub)
    if contract.capabilities.redelivery:
        after.arrivals.extend((await contract.collect_for(
            a.sub, contract.timings.redelivery)).arrivals)
    assert sent.id not in after.ids, "a rejected message was redelivered"


@pytest.mark.contract_property("C5")
async def test_a_rejected_message_lands_in_the_dead_letter_topic(contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    dead = contract.topic("dead")
    graveyard = await contract.subscribe(bus, dead, group=contract.group("dead"))
    if not contract.capabilities.dead_letter:
        with pytest.raises(UnsupportedFeature):
            await contract.subscribe(bus, topic, group=group, dead_letter=dead)
        contract.declared_absent("dead_letter=False: subscribing with dead_letter= raises "
                                 "UnsupportedFeature")
        return
    sub = await contract.subscribe(bus, topic, group=group, dead_letter=dead)
    sent = await bus.publish(topic, b"to the graveyard", key="k1", headers={"why": "test"})

    async def reject(delivery: Delivery) -> None:
        await delivery.reject()

    assert (await contract.collect(sub, 1, handle=reject)).ids == [sent.id]
    got = await contract.collect(graveyard, 1)
    assert got.ids == [sent.id], "the rejected message did not reach the dead-letter topic"
    corpse = got.deliveries[0]
    assert corpse.body == sent.body
    assert corpse.key == "k1"
    assert corpse.headers.get("why") == "test"
    assert corpse.topic == dead


@pytest.mark.contract_property("C6")
async def test_acking_twice_raises_already_settled(contract: Contract) -> None:
    a = await attached(contract)
    await a.bus.publish(a.topic, b"once")
    delivery = (await contract.collect(a.sub, 1, handle=keep)).deliveries[0]
    await delivery.ack()
    with pytest.raises(AlreadySettled):
        await delivery.ack()


@pytest.mark.contract_property("C6")
async def test_any_second_settlement_raises_already_settled(contract: Contract) -> None:
    redelivery = contract.capabilities.redelivery
    firsts = ["ack", "reject", *(["nack"] if redelivery else [])]
    seconds = ["ack", "reject", *(["nack"] if redelivery else [])]
    a = await attached(contract, prefetch=len(firsts))
    sent = await a.bus.publish_many(a.topic, [f"m-{f}".encode() for f in firsts])
    deliveries = (await contract.collect(a.sub, len(sent), handle=keep)).deliveries
    by_body = {d.body: d for d in deliveries}
    settle: dict[str, Callable[[Delivery], Awaitable[None]]] = {
        "ack": lambda d: d.ack(), "reject": lambda d: d.reject(), "nack": lambda d: d.nack()}
    for first in firsts:
        delivery = by_body[f"m-{first}".encode()]
        await settle[first](delivery)
        for second in seconds:
            with pytest.raises(AlreadySettled):
                await settle[second](delivery)


@pytest.mark.contract_property("C7")
async def test_unsettled_deliveries_of_a_closed_consumer_go_to_the_next_consumer(
        contract: Contract) -> None:
    publisher = await contract.bus()
    topic, group = contract.topic(), contract.group()
    first = await contract.subscribe(await contract.bus(), topic, group=group)
    sent = await publisher.publish_many(topic, [f"m{i}".encode() for i in range(5)])
    held = await contract.collect(first, len(sent), handle=keep)
    assert held.missing([m.id for m in sent]) == []
    await first.aclose()
    second = await contract.subscribe(await contract.bus(), topic, group=group)
    got = await returned_to(contract, second, len(sent), absence=_NOT_RETURNED)
    if got is None:
        return
    assert got.missing([m.id for m in sent]) == [], "unsettled deliveries were lost"


@pytest.mark.contract_property("C7")
async def test_unsettled_deliveries_go_to_a_consumer_already_attached(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    first = await contract.subscribe(bus, topic, group=group, prefetch=5)
    sent = await bus.publish_many(topic, [f"m{i}".encode() for i in range(5)])
    held = await contract.collect(first, len(sent), handle=keep)
    assert held.missing([m.id for m in sent]) == []
    second = await contract.subscribe(bus, topic, group=group)
    await first.aclose()
    got = await returned_to(contract, second, len(sent), absence=_NOT_RETURNED)
    if got is None:
        return
    assert got.missing([m.id for m in sent]) == []


@pytest.mark.contract_property("C8")
async def test_a_message_that_keeps_failing_does_not_block_the_others(
        contract: Contract) -> None:
    a = await attached(contract, prefetch=4)
    messages = [(f"k{i}", f"m{i}".encode()) for i in range(10)]
    poison = await a.bus.publish(a.topic, b"poison", key="poison-key")
    for key, body in messages:
        await a.bus.publish(a.topic, body, key=key)
    redelivery = contract.capabilities.redelivery

    async def handle(delivery: Delivery) -> None:
        if delivery.id != poison.id:
            await delivery.ack()
        elif redelivery and delivery.attempt < 1000:
            await delivery.nack()
        else:
            await delivery.reject()

    got = await contract.collect(a.sub, until=lambda c: len(c.ids) == len(messages) + 1,
                                 handle=handle)
    assert sorted(got.bodies) == sorted([b"poison", *(body for _, body in messages)])


@pytest.mark.contract_property("C8")
async def test_a_held_unsettled_message_does_not_block_the_others(contract: Contract) -> None:
    a = await attached(contract, prefetch=4)
    slow = await a.bus.publish(a.topic, b"slow", key="slow")
    first = await contract.collect(a.sub, 1, handle=keep)
    assert first.ids == [slow.id]
    rest = [await a.bus.publish(a.topic, f"m{i}".encode(), key=f"k{i}") for i in range(10)]
    got = await contract.collect(a.sub, len(rest))
    assert got.missing([m.id for m in rest]) == [], "a held message blocked the others"
    await first.deliveries[0].ack()


@pytest.mark.contract_property("C9")
async def test_a_consumer_never_holds_more_unsettled_deliveries_than_its_prefetch(
        contract: Contract) -> None:
    prefetch = 3
    a = await attached(contract, prefetch=prefetch)
    sent = await a.bus.publish_many(a.topic, [f"m{i}".encode() for i in range(10)])
    held = await contract.collect(a.sub, prefetch, handle=keep, max_count=10)
    if not contract.capabilities.prefetch:
        rest = await contract.collect(a.sub, len(sent) - len(held.ids))
        assert len(held.ids) + len(rest.ids) == len(sent)
        contract.declared_absent("prefetch=False: the adapter does not bound unsettled "
                                 "deliveries (asserted: every message still arrives)")
        return
    assert len(held.deliveries) == prefetch
    extra = await a.sub.fetch(10, timeout=contract.quiet_window)
    assert extra == [], f"got {len(extra)} deliveries beyond prefetch={prefetch}"
    await held.deliveries[0].ack()
    more = await a.sub.fetch(10, timeout=contract.timings.delivery)
    assert len(more) == 1, f"after one ack, {len(more)} more deliveries came (prefetch=3)"
    for delivery in [*held.deliveries[1:], *more]:
        await delivery.ack()
    rest = await contract.collect(a.sub, len(sent) - prefetch - 1, max_count=10)
    assert len(set(rest.ids) | set(held.ids) | {more[0].id}) == len(sent)


@pytest.mark.contract_property("C9")
async def test_prefetch_one_hands_out_one_delivery_at_a_time(contract: Contract) -> None:
    a = await attached(contract, prefetch=1)
    sent = await a.bus.publish_many(a.topic, [f"m{i}".encode() for i in range(5)])
    if not contract.capabilities.prefetch:
        got = await contract.collect(a.sub, len(sent))
        assert got.missing([m.id for m in sent]) == []
        contract.declared_absent("prefetch=False: deliveries are not bounded by prefetch")
        return
    seen: list[str] = []
    for _ in sent:
        batch = await a.sub.fetch(10, timeout=contract.timings.delivery)
        assert len(batch) == 1, f"prefetch=1 handed out {len(batch)} deliveries at once"
        seen.append(batch[0].id)
        await batch[0].ack()
    assert sorted(seen) == sorted(m.id for m in sent)
