"""B. Groups and fan-out: competing consumers, retention, ephemeral subscriptions."""

from __future__ import annotations

import asyncio

import pytest

from unibus import Message, UnsupportedFeature
from unibus_contract.context import Contract
from unibus_contract.scenarios._support import attached, sentinel_then_quiet

pytestmark = pytest.mark.asyncio


@pytest.mark.contract_property("B1")
async def test_competing_consumers_together_receive_every_message(contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    subs = [await contract.subscribe(bus, topic, group=group, prefetch=8) for _ in range(3)]
    sent = await bus.publish_many(topic, [f"m{i}".encode() for i in range(60)])
    got = await contract.collect(subs, len(sent))
    assert got.missing([m.id for m in sent]) == []
    assert {d.group for d in got.deliveries} == {group}


@pytest.mark.contract_property("B2")
async def test_a_single_consumer_receives_no_duplicates_in_steady_state(
        contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish_many(a.topic, [f"m{i}".encode() for i in range(50)])
    got = await contract.collect(a.sub, len(sent))
    got.arrivals.extend((await sentinel_then_quiet(contract, a.bus, a.topic, a.sub)).arrivals)
    assert got.missing([m.id for m in sent]) == []
    assert got.duplicates == 0


@pytest.mark.contract_property("B2")
async def test_competing_consumers_receive_no_duplicates_in_steady_state(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    subs = [await contract.subscribe(bus, topic, group=group, prefetch=8) for _ in range(3)]
    sent = await bus.publish_many(topic, [f"m{i}".encode() for i in range(60)])
    got = await contract.collect(subs, len(sent))
    got.arrivals.extend((await contract.collect_for(subs)).arrivals)
    assert got.missing([m.id for m in sent]) == []
    assert got.duplicates == 0, f"{got.duplicates} duplicates without any failure"


@pytest.mark.contract_property("B3")
async def test_every_group_receives_every_message(contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    groups = [contract.group(f"fan{i}") for i in range(3)]
    subs = [await contract.subscribe(bus, topic, group=g) for g in groups]
    sent = await bus.publish_many(topic, [f"m{i}".encode() for i in range(20)])
    for group, sub in zip(groups, subs, strict=True):
        got = await contract.collect(sub, len(sent))
        assert got.missing([m.id for m in sent]) == [], f"group {group} missed messages"
        assert got.duplicates == 0
        assert {d.group for d in got.deliveries} == {group}


@pytest.mark.contract_property("B3")
async def test_a_group_and_an_ephemeral_subscription_both_receive_every_message(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    grouped = await contract.subscribe(bus, topic, group=contract.group())
    ephemeral = await contract.subscribe(bus, topic)
    sent = await bus.publish_many(topic, [f"m{i}".encode() for i in range(10)])
    for sub in (grouped, ephemeral):
        got = await contract.collect(sub, len(sent))
        assert got.missing([m.id for m in sent]) == []
    assert all(d.group is None for d in got.deliveries), "an ephemeral delivery named a group"


@pytest.mark.contract_property("B4")
async def test_declared_groups_retain_messages_until_their_first_consumer_attaches(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    groups = [contract.group("early"), contract.group("late")]
    retention = contract.capabilities.group_retention
    try:
        for group in groups:
            await bus.declare_group(topic, group)
    except UnsupportedFeature:
        assert not retention, "declare_group refused although group_retention is declared"
        contract.declared_absent("group_retention=False: declare_group raises UnsupportedFeature")
        return
    sent = await bus.publish_many(topic, [f"kept-{i}".encode() for i in range(10)])
    for group in groups:
        sub = await contract.subscribe(bus, topic, group=group)
        if not retention:
            assert (await contract.collect_for(sub)).ids == []
            contract.declared_absent("group_retention=False: a group keeps nothing while no "
                                     "consumer is attached")
            continue
        got = await contract.collect(sub, len(sent))
        assert got.missing([m.id for m in sent]) == [], f"group {group} lost messages"


@pytest.mark.contract_property("B4")
async def test_a_group_retains_messages_while_its_only_consumer_is_detached(
        contract: Contract) -> None:
    publisher = await contract.bus()
    topic, group = contract.topic(), contract.group()
    consumer_bus = await contract.bus()
    first = await contract.subscribe(consumer_bus, topic, group=group)
    await first.aclose()
    sent = await publisher.publish_many(topic, [f"while-away-{i}".encode() for i in range(10)])
    second = await contract.subscribe(consumer_bus, topic, group=group)
    if not contract.capabilities.group_retention:
        assert (await contract.collect_for(second)).ids == []
        contract.declared_absent("group_retention=False: messages published while no consumer "
                                 "is attached are not kept")
        return
    got = await contract.collect(second, len(sent))
    assert got.missing([m.id for m in sent]) == []


@pytest.mark.contract_property("B5")
async def test_an_ephemeral_subscription_sees_nothing_published_while_it_was_detached(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    # A durable group keeps the topic alive on brokers that drop unrouted messages.
    await contract.subscribe(bus, topic, group=contract.group("keeper"))
    first = await contract.subscribe(bus, topic)
    await first.aclose()
    missed = await bus.publish_many(topic, [b"while detached 1", b"while detached 2"])
    second = await contract.subscribe(bus, topic)
    seen = await bus.publish(topic, b"while attached")
    got = await sentinel_then_quiet(contract, bus, topic, second)
    assert got.ids == [seen.id]
    assert not set(got.ids) & {m.id for m in missed}


@pytest.mark.contract_property("B5")
async def test_an_ephemeral_subscription_starts_with_what_is_published_after_it_attaches(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    await contract.subscribe(bus, topic, group=contract.group("keeper"))
    history = await bus.publish_many(topic, [f"history-{i}".encode() for i in range(5)])
    sub = await contract.subscribe(bus, topic)
    live = await bus.publish_many(topic, [f"live-{i}".encode() for i in range(5)])
    got = await sentinel_then_quiet(contract, bus, topic, sub)
    assert sorted(got.ids) == sorted(m.id for m in live)
    assert not set(got.ids) & {m.id for m in history}


@pytest.mark.contract_property("B6")
async def test_a_new_group_replays_history_exactly_when_declared(contract: Contract) -> None:
    bus = await contract.bus()
    topic = contract.topic()
    # An existing group makes the history durable on every broker that has retention.
    await contract.subscribe(bus, topic, group=contract.group("first"))
    history = await bus.publish_many(topic, [f"history-{i}".encode() for i in range(10)])
    newcomer = await contract.subscribe(bus, topic, group=contract.group("newcomer"))
    if contract.capabilities.replay_for_new_groups:
        got = await contract.collect(newcomer, len(history))
        assert got.missing([m.id for m in history]) == [], "a new group did not replay history"
        assert got.duplicates == 0
        return
    got = await sentinel_then_quiet(contract, bus, topic, newcomer)
    assert got.ids == [], "a new group replayed history although replay_for_new_groups=False"
    contract.declared_absent("replay_for_new_groups=False: a new group starts at the end of "
                             "the topic (asserted: no history delivered, live messages are)")


@pytest.mark.contract_property("B7")
async def test_fifty_concurrent_publishers_lose_nothing(contract: Contract) -> None:
    a = await attached(contract, prefetch=256)

    async def publisher(n: int) -> list[Message]:
        return [await a.bus.publish(a.topic, f"p{n}-m{i}".encode()) for i in range(10)]

    batches = await asyncio.gather(*(publisher(n) for n in range(50)))
    sent = [m.id for batch in batches for m in batch]
    assert len(set(sent)) == 500
    got = await contract.collect(a.sub, len(sent))
    assert got.missing(sent) == []
    assert got.duplicates == 0
