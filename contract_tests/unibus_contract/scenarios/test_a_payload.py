"""A. Payload fidelity: what is published arrives exactly."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest

from unibus import Message, MessageTooLarge, UnsupportedFeature
from unibus_contract.context import Contract
from unibus_contract.scenarios._support import attached, sentinel_then_quiet

pytestmark = pytest.mark.asyncio


@pytest.mark.contract_property("A1")
async def test_messages_published_before_the_consumer_attaches_arrive_in_a_declared_group(
        contract: Contract) -> None:
    bus = await contract.bus()
    topic, group = contract.topic(), contract.group()
    retention = contract.capabilities.group_retention
    try:
        await bus.declare_group(topic, group)
    except UnsupportedFeature:
        assert not retention, "declare_group refused although group_retention is declared"
        contract.declared_absent("group_retention=False: declare_group raises UnsupportedFeature")
        return
    sent = await bus.publish_many(topic, [f"early-{i}".encode() for i in range(20)])
    sub = await contract.subscribe(bus, topic, group=group)
    if not retention:
        got = await contract.collect_for(sub)
        assert got.ids == [], "messages were retained although group_retention=False"
        contract.declared_absent("group_retention=False: messages published before the first "
                                 "consumer attaches are not kept")
        return
    got = await contract.collect(sub, len(sent))
    assert got.missing([m.id for m in sent]) == []
    assert sorted(got.bodies) == sorted(m.body for m in sent)
    assert got.duplicates == 0


@pytest.mark.contract_property("A2")
async def test_every_byte_value_and_invalid_utf8_arrive_byte_exact(contract: Contract) -> None:
    a = await attached(contract)
    bodies = [
        bytes(range(256)),
        bytes(range(255, -1, -1)),
        b"\xff\xfe\xfd",                 # not UTF-8 at all
        b"\xc3\x28\xa0\xa1",             # a broken two-byte sequence
        b"\xed\xa0\x80",                 # an encoded surrogate
        b"\x00",
        b"\x00" * 1000 + b"\x80",
        "ünïcødé ✓".encode() + b"\xff",
    ]
    sent = await a.bus.publish_many(a.topic, bodies)
    got = await contract.collect(a.sub, len(sent))
    received = {d.id: d.body for d in got.deliveries}
    for message in sent:
        assert message.id in received, f"message {message.id} did not arrive"
        assert type(received[message.id]) is bytes
        assert received[message.id] == message.body


@pytest.mark.contract_property("A2")
async def test_random_binary_body_arrives_byte_exact(contract: Contract) -> None:
    a = await attached(contract)
    body = os.urandom(min(64 * 1024, contract.capabilities.max_message_size))
    sent = await a.bus.publish(a.topic, body)
    got = await contract.collect(a.sub, 1)
    assert got.ids == [sent.id]
    assert got.deliveries[0].body == body


@pytest.mark.contract_property("A3")
async def test_empty_body_arrives_as_empty_bytes(contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish(a.topic, b"")
    got = await contract.collect(a.sub, 1)
    assert got.ids == [sent.id]
    body = got.deliveries[0].body
    assert type(body) is bytes
    assert body == b""


@pytest.mark.contract_property("A4")
async def test_body_at_the_declared_maximum_size_arrives_intact(contract: Contract) -> None:
    a = await attached(contract)
    size = contract.capabilities.max_message_size
    body = os.urandom(size)
    sent = await a.bus.publish(a.topic, body)
    got = await contract.collect(a.sub, 1)
    assert got.ids == [sent.id]
    received = got.deliveries[0].body
    assert len(received) == size
    assert received == body


@pytest.mark.contract_property("A4")
async def test_body_one_byte_over_the_maximum_raises_message_too_large_and_sends_nothing(
        contract: Contract) -> None:
    a = await attached(contract)
    size = contract.capabilities.max_message_size
    with pytest.raises(MessageTooLarge):
        await a.bus.publish(a.topic, b"x" * (size + 1))
    got = await sentinel_then_quiet(contract, a.bus, a.topic, a.sub)
    assert got.ids == [], "an oversized message was delivered"


@pytest.mark.contract_property("A4")
async def test_batch_with_one_oversized_body_sends_none_of_the_batch(contract: Contract) -> None:
    a = await attached(contract)
    size = contract.capabilities.max_message_size
    with pytest.raises(MessageTooLarge):
        await a.bus.publish_many(a.topic, [b"fine", b"x" * (size + 1), b"also fine"])
    got = await sentinel_then_quiet(contract, a.bus, a.topic, a.sub)
    assert got.bodies == [], "part of a refused batch was delivered"


@pytest.mark.contract_property("A5")
async def test_unicode_empty_and_special_headers_are_preserved_exactly(
        contract: Contract) -> None:
    a = await attached(contract)
    headers = {
        "ключ": "значение",
        "emoji-🙂": "✓ ü ß 中文",
        "Mixed-Case-Key": "Mixed Case Value",
        "empty": "",
        "colon": "a: b; c=d",
        "spaces": "  leading and trailing  ",
        "newline": "line one\nline two",
        "x-number-like": "0012",
    }
    sent = await a.bus.publish(a.topic, b"h", headers=headers)
    got = await contract.collect(a.sub, 1)
    assert got.ids == [sent.id]
    assert dict(got.deliveries[0].headers) == headers


@pytest.mark.contract_property("A5")
async def test_sixty_headers_are_all_preserved(contract: Contract) -> None:
    a = await attached(contract)
    headers = {f"header-{i:02d}": f"value {i} " + "v" * i for i in range(60)}
    sent = await a.bus.publish(a.topic, b"many headers", headers=headers)
    got = await contract.collect(a.sub, 1)
    assert got.ids == [sent.id]
    assert dict(got.deliveries[0].headers) == headers


@pytest.mark.contract_property("A6")
async def test_explicit_id_key_and_timestamp_are_preserved(contract: Contract) -> None:
    a = await attached(contract)
    # Whole milliseconds: the precision every broker's timestamp carries.
    stamp = datetime(2021, 3, 4, 5, 6, 7, 123_000, tzinfo=UTC)
    message = Message(b"payload", id=f"contract-id-{contract.topic('id')}", key="kéy-7",
                      timestamp=stamp)
    await a.bus.publish_many(a.topic, [message])
    got = await contract.collect(a.sub, 1)
    assert got.ids == [message.id]
    delivered = got.deliveries[0].message
    assert delivered.key == "kéy-7"
    assert delivered.timestamp == stamp
    assert delivered.timestamp.utcoffset() == timedelta(0)


@pytest.mark.contract_property("A6")
async def test_generated_id_and_publish_timestamp_are_preserved_and_no_key_stays_none(
        contract: Contract) -> None:
    a = await attached(contract)
    sent = await a.bus.publish(a.topic, b"defaults")
    got = await contract.collect(a.sub, 1)
    assert got.ids == [sent.id]
    delivered = got.deliveries[0].message
    assert delivered.key is None
    assert delivered.timestamp.tzinfo is not None
    # Brokers keep milliseconds; the publish timestamp may be truncated to them.
    assert abs(delivered.timestamp - sent.timestamp) < timedelta(milliseconds=1)


@pytest.mark.contract_property("A7")
async def test_nothing_crosses_between_topics(contract: Contract) -> None:
    bus = await contract.bus()
    first, second = contract.topic("first"), contract.topic("second")
    sub_first = await contract.subscribe(bus, first, group=contract.group())
    sub_second = await contract.subscribe(bus, second, group=contract.group())
    sent_first = await bus.publish_many(first, [b"1-a", b"1-b", b"1-c"])
    sent_second = await bus.publish_many(second, [b"2-a", b"2-b"])
    got_first = await sentinel_then_quiet(contract, bus, first, sub_first)
    got_second = await sentinel_then_quiet(contract, bus, second, sub_second)
    assert sorted(got_first.ids) == sorted(m.id for m in sent_first)
    assert sorted(got_second.ids) == sorted(m.id for m in sent_second)
    assert {d.topic for d in got_first.deliveries} == {first}
    assert {d.topic for d in got_second.deliveries} == {second}


@pytest.mark.contract_property("A7")
async def test_one_consumer_on_many_topics_receives_each_with_its_topic(
        contract: Contract) -> None:
    bus = await contract.bus()
    topics = [contract.topic(f"multi{i}") for i in range(3)]
    sub = await contract.subscribe(bus, topics, group=contract.group())
    expected: dict[str, str] = {}
    for topic in topics:
        for message in await bus.publish_many(topic, [f"{topic}-{i}".encode() for i in range(3)]):
            expected[message.id] = topic
    got = await contract.collect(sub, len(expected))
    assert got.missing(list(expected)) == []
    assert got.duplicates == 0
    for delivery in got.deliveries:
        assert delivery.topic == expected[delivery.id]
        assert delivery.body.startswith(delivery.topic.encode())
