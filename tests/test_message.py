"""Message validation and ids, and Delivery's settle-exactly-once rule."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import pickle
import random
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType

import pytest

import unibus.message
from tests.helpers import NoOffset
from unibus import (
    AlreadySettled,
    Capabilities,
    Delivery,
    DeliveryLost,
    InvalidMessage,
    Message,
    Ordering,
    Outcome,
    PublishFailed,
    RedeliveryOrder,
    Support,
    UnsupportedFeature,
    new_message_id,
)
from unibus.message import MAX_TIMESTAMP_US, MIN_TIMESTAMP_US
from unibus.spi import Consumer


def capabilities(*, redelivery: bool = True, nack_delay: Support = Support.NATIVE) -> Capabilities:
    return Capabilities(
        name="fake", persistent=False, publish_confirms=True, group_retention=True,
        replay_for_new_groups=False, redelivery=redelivery, nack_delay=nack_delay,
        dead_letter=False, ordering=Ordering.NONE, redelivery_order=RedeliveryOrder.MAY_REORDER,
        delayed_delivery=Support.ABSENT, dedup_window=None, max_message_size=1024)


class RecordingConsumer(Consumer):
    """A consumer that records the settlements the core hands it."""

    def __init__(self, caps: Capabilities | None = None) -> None:
        self.capabilities = caps or capabilities()
        self.calls: list[tuple[str, str, float | None]] = []

    async def fetch(self, max_count: int, timeout: float | None) -> list[Delivery]:
        return []

    async def ack(self, delivery: Delivery) -> None:
        self.calls.append(("ack", delivery.id, None))

    async def nack(self, delivery: Delivery, delay: float) -> None:
        self.calls.append(("nack", delivery.id, delay))

    async def reject(self, delivery: Delivery) -> None:
        self.calls.append(("reject", delivery.id, None))

    async def aclose(self) -> None:
        self.calls.append(("aclose", "", None))


def delivery(consumer: Consumer) -> Delivery:
    return Delivery(Message(b"payload", id="m-1"), topic="orders", group="billing", attempt=1,
                    consumer=consumer)


# -- body --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["text", 42, None, [1, 2], {"a": 1}, 1.5])
def test_non_bytes_body_is_invalid(body: object) -> None:
    with pytest.raises(InvalidMessage, match=f"body must be bytes, not {type(body).__name__}"):
        Message(body)  # type: ignore[arg-type]


def test_invalid_message_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Message("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body", [bytearray(b"\x00\xffab"), memoryview(b"\x00\xffab"), memoryview(b"xx\x00\xffab")[2:]])
def test_bytearray_and_memoryview_bodies_are_copied_to_bytes(body: bytearray | memoryview) -> None:
    message = Message(body)  # type: ignore[arg-type]

    assert type(message.body) is bytes
    assert message.body == b"\x00\xffab"


def test_bytearray_body_changed_later_does_not_change_the_message() -> None:
    body = bytearray(b"abc")
    message = Message(body)  # type: ignore[arg-type]
    body[0] = ord("z")

    assert message.body == b"abc"


def test_bytes_subclass_body_is_accepted_as_plain_bytes() -> None:
    class Payload(bytes):
        pass

    message = Message(Payload(b"abc"))

    assert type(message.body) is bytes
    assert message.body == b"abc"


@pytest.mark.parametrize("body", [b"", bytes(range(256)), b"\xc3\x28 not utf-8"])
def test_any_bytes_body_is_kept_exactly(body: bytes) -> None:
    assert Message(body).body == body


# -- headers -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("headers", "named"),
    [({"kind": 1}, "'kind'"), ({"kind": None}, "'kind'"), ({"kind": b"x"}, "'kind'"),
     ({"ok": "x", "bad": 2.0}, "'bad'"), ({1: "x"}, "1"), ({b"k": "x"}, "b'k'")],
)
def test_headers_not_str_to_str_are_invalid_and_name_the_header(
        headers: dict[object, object], named: str) -> None:
    with pytest.raises(InvalidMessage, match=f"header {named}"):
        Message(b"", headers=headers)  # type: ignore[arg-type]


@pytest.mark.parametrize("headers", [[("a", "b")], "a=b", 5, {"a", "b"}])
def test_headers_that_are_not_a_mapping_are_invalid(headers: object) -> None:
    with pytest.raises(InvalidMessage, match="headers must be a mapping"):
        Message(b"", headers=headers)  # type: ignore[arg-type]


@pytest.mark.parametrize("headers", [[], ""])
def test_empty_headers_that_are_not_a_mapping_are_invalid(headers: object) -> None:
    with pytest.raises(InvalidMessage, match="headers must be a mapping"):
        Message(b"", headers=headers)  # type: ignore[arg-type]


def test_headers_none_means_no_headers() -> None:
    assert dict(Message(b"", headers=None).headers) == {}


def test_headers_are_a_private_copy() -> None:
    given = {"a": "1"}
    message = Message(b"", headers=given)
    given["a"] = "2"

    assert dict(message.headers) == {"a": "1"}


def test_headers_are_read_only() -> None:
    message = Message(b"", headers={"a": "1"})

    with pytest.raises(TypeError):
        message.headers["a"] = "2"  # type: ignore[index]


def test_default_headers_are_empty_and_not_shared() -> None:
    first, second = Message(b""), Message(b"")

    assert dict(first.headers) == {}
    with pytest.raises(TypeError):
        first.headers["x"] = "y"  # type: ignore[index]
    assert dict(second.headers) == {}


def test_headers_compare_equal_to_a_plain_dict() -> None:
    headers = {"ключ": "значение", "": "", "emoji": "🦀"}

    assert Message(b"", headers=headers).headers == headers


# -- id, key, timestamp ------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", ["", 5, b"id", 1.5])
def test_id_must_be_a_non_empty_str(bad_id: object) -> None:
    with pytest.raises(InvalidMessage, match="id must be a non-empty str"):
        Message(b"", id=bad_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_key", [5, b"key", ("a",)])
def test_key_must_be_a_str_or_none(bad_key: object) -> None:
    with pytest.raises(InvalidMessage, match="key must be a str or None"):
        Message(b"", key=bad_key)  # type: ignore[arg-type]


def test_id_none_means_a_new_id() -> None:
    assert uuid.UUID(Message(b"", id=None).id).version == 7


def test_default_id_is_a_uuid_version_7() -> None:
    parsed = uuid.UUID(Message(b"").id)

    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_new_message_ids_are_unique() -> None:
    ids = [new_message_id() for _ in range(20_000)]

    assert len(set(ids)) == len(ids)


def test_new_message_ids_sort_in_creation_order() -> None:
    # Thousands per millisecond: the order must hold inside one millisecond too.
    ids = [new_message_id() for _ in range(20_000)]

    assert ids == sorted(ids)


def test_new_message_id_carries_the_creation_time_in_milliseconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh clock: the shared one may run ahead of time after thousands of ids in a
    # millisecond (earlier tests make 20,000), by design, to keep ids ordered.
    monkeypatch.setattr(unibus.message, "_clock", unibus.message._IdClock())
    before = time.time_ns() // 1_000_000
    made = new_message_id()
    after = time.time_ns() // 1_000_000

    assert before <= uuid.UUID(made).int >> 80 <= after


def test_default_timestamp_is_timezone_aware_utc_now() -> None:
    before = datetime.now(UTC)
    message = Message(b"")
    after = datetime.now(UTC)

    assert message.timestamp.utcoffset() == timedelta(0)
    assert before <= message.timestamp <= after


def test_timestamp_us_is_the_timestamp_in_exact_microseconds() -> None:
    stamp = datetime(2026, 11, 27, 9, 54, 22, 123457, tzinfo=UTC)
    assert Message(b"", timestamp=stamp).timestamp_us == 1_795_773_262_123_457
    made = Message(b"")
    assert made.timestamp == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        microseconds=made.timestamp_us)
    assert Message.trusted(b"", "i", None, None, MAX_TIMESTAMP_US).timestamp.year == 9999
    assert Message.trusted(b"", "i", None, None, MIN_TIMESTAMP_US).timestamp.year == 1


def test_ids_stay_ordered_past_4096_in_one_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: frozen)
    # A clock of its own: running ahead of time here must not reach other tests.
    monkeypatch.setattr(unibus.message, "_clock", unibus.message._IdClock())
    ids = [new_message_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i[14] == "7" and i[19] in "89ab" for i in ids)


def test_given_aware_timestamp_is_kept() -> None:
    stamp = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))

    assert Message(b"", timestamp=stamp).timestamp == stamp


@pytest.mark.parametrize(
    "stamp", [datetime(2030, 1, 1), datetime(2030, 1, 1, tzinfo=NoOffset()), "2030-01-01", 0])
def test_naive_or_non_datetime_timestamp_is_invalid(stamp: object) -> None:
    with pytest.raises(InvalidMessage, match="timezone-aware"):
        Message(b"", timestamp=stamp)  # type: ignore[arg-type]


def test_message_is_immutable() -> None:
    message = Message(b"x")

    with pytest.raises(dataclasses.FrozenInstanceError):
        message.body = b"y"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del message.key
    assert message.body == b"x"


def test_equal_messages_compare_equal() -> None:
    stamp = datetime.now(UTC)

    assert Message(b"x", id="1", key="k", headers={"a": "b"}, timestamp=stamp) == Message(
        b"x", id="1", key="k", headers={"a": "b"}, timestamp=stamp)


# -- Delivery settlement -----------------------------------------------------------------------

async def test_ack_settles_once_and_reaches_the_consumer() -> None:
    consumer = RecordingConsumer()
    received = delivery(consumer)

    await received.ack()

    assert received.settled
    assert received.outcome is Outcome.ACK
    assert consumer.calls == [("ack", "m-1", None)]


async def test_nack_passes_its_delay_to_the_consumer() -> None:
    consumer = RecordingConsumer()
    received = delivery(consumer)

    await received.nack(delay=2.5)

    assert received.outcome is Outcome.NACK
    assert consumer.calls == [("nack", "m-1", 2.5)]


FIRST_AND_SECOND = [(first, second) for first in ("ack", "nack", "reject")
                    for second in ("ack", "nack", "reject")]


@pytest.mark.parametrize(("first", "second"), FIRST_AND_SECOND)
async def test_settling_twice_raises_already_settled(first: str, second: str) -> None:
    consumer = RecordingConsumer()
    received = delivery(consumer)
    await getattr(received, first)()

    with pytest.raises(AlreadySettled, match=f"already {first}ed"):
        await getattr(received, second)()

    assert [call[0] for call in consumer.calls] == [first]
    assert received.outcome is Outcome(first)


@pytest.mark.parametrize("delay", [-0.001, -1, math.nan, math.inf])
async def test_nack_with_a_bad_delay_fails_and_leaves_the_delivery_unsettled(delay: float) -> None:
    consumer = RecordingConsumer()
    received = delivery(consumer)

    with pytest.raises(ValueError, match="nack delay"):
        await received.nack(delay=delay)

    assert not received.settled
    await received.ack()
    assert consumer.calls == [("ack", "m-1", None)]


async def test_nack_on_an_adapter_without_redelivery_is_unsupported_and_settles_nothing() -> None:
    consumer = RecordingConsumer(capabilities(redelivery=False, nack_delay=Support.ABSENT))
    received = delivery(consumer)

    with pytest.raises(UnsupportedFeature, match="does not redeliver"):
        await received.nack()

    assert not received.settled
    await received.reject()
    assert consumer.calls == [("reject", "m-1", None)]


async def test_delayed_nack_without_delay_support_is_unsupported_but_plain_nack_works() -> None:
    consumer = RecordingConsumer(capabilities(nack_delay=Support.ABSENT))
    received = delivery(consumer)

    with pytest.raises(UnsupportedFeature, match="cannot delay"):
        await received.nack(delay=1)
    await received.nack()

    assert consumer.calls == [("nack", "m-1", 0.0)]


class FailingConsumer(RecordingConsumer):
    """A consumer whose nack and reject fail as a refused republish does (Kafka's retry
    lane, RabbitMQ's retry queue or a dead-letter topic refusing the copy), or whose
    republish never ends (to be cancelled), or whose delivery is gone."""

    def __init__(self, failure: BaseException | None) -> None:
        super().__init__()
        self.failure = failure
        self.republishing = asyncio.Event()

    async def _republish(self, what: str, delivery: Delivery) -> None:
        self.calls.append((what, delivery.id, None))
        self.republishing.set()
        if self.failure is not None:
            raise self.failure
        await asyncio.Event().wait()   # never confirmed: the caller cancels

    async def nack(self, delivery: Delivery, delay: float) -> None:
        await self._republish("nack", delivery)

    async def reject(self, delivery: Delivery) -> None:
        await self._republish("reject", delivery)


@pytest.mark.parametrize("settle", ["nack", "reject"])
async def test_a_nack_or_reject_that_fails_leaves_the_delivery_unsettled(settle: str) -> None:
    consumer = FailingConsumer(PublishFailed("the retry lane refused it", message_ids=("m-1",)))
    received = delivery(consumer)

    with pytest.raises(PublishFailed):
        await getattr(received, settle)()

    assert not received.settled
    await received.ack()   # settled another way: not AlreadySettled
    assert consumer.calls == [(settle, "m-1", None), ("ack", "m-1", None)]
    assert received.outcome is Outcome.ACK


@pytest.mark.parametrize("settle", ["nack", "reject"])
async def test_a_cancelled_nack_or_reject_leaves_the_delivery_unsettled(settle: str) -> None:
    consumer = FailingConsumer(None)
    received = delivery(consumer)
    settling = asyncio.ensure_future(getattr(received, settle)())
    await consumer.republishing.wait()
    assert received.settled   # while it runs, nothing else may settle it

    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling

    assert not received.settled


async def test_a_nack_of_a_lost_delivery_keeps_it_settled() -> None:
    received = delivery(FailingConsumer(DeliveryLost("the channel closed")))

    with pytest.raises(DeliveryLost):
        await received.nack()

    with pytest.raises(AlreadySettled):
        await received.ack()


def test_delivery_exposes_its_message() -> None:
    message = Message(b"body", id="m-2", key="k", headers={"h": "v"})
    received = Delivery(message, topic="t", group=None, attempt=3, consumer=RecordingConsumer())

    assert (received.id, received.body, received.key, dict(received.headers)) == (
        "m-2", b"body", "k", {"h": "v"})
    assert (received.topic, received.group, received.attempt) == ("t", None, 3)


def test_delivery_repr_shows_state_but_not_the_body() -> None:
    received = delivery(RecordingConsumer())

    assert "unsettled" in repr(received)
    assert "payload" not in repr(received)


# -- copies ------------------------------------------------------------------------------------

def test_replace_changes_only_the_given_fields() -> None:
    original = Message(b"x", key="k", headers={"a": "1"})
    copy = original.replace(body=b"y", headers={"b": "2"})

    assert (copy.body, copy.id, copy.key, dict(copy.headers), copy.timestamp) == (
        b"y", original.id, "k", {"b": "2"}, original.timestamp)
    assert original.body == b"x"


def test_replace_with_key_none_clears_the_key() -> None:
    assert Message(b"x", key="k").replace(key=None).key is None


def test_replace_validates_the_new_values() -> None:
    with pytest.raises(InvalidMessage, match="header 'a'"):
        Message(b"x").replace(headers={"a": 1})  # type: ignore[dict-item]


def test_message_survives_pickling() -> None:
    message = Message(b"\x00body", key="k", headers={"a": "1"})
    copy: Message = pickle.loads(pickle.dumps(message))

    assert copy == message
    with pytest.raises(TypeError):
        copy.headers["a"] = "2"  # type: ignore[index]


def test_message_repr_shows_a_large_body_shortened() -> None:
    text = repr(Message(b"x" * 10_000))

    assert len(text) < 400
    assert "..." in text


def test_a_trusted_message_equals_the_validated_one_and_stays_immutable() -> None:
    checked = Message(b"body", "id-1", "k", {"h": "v"})
    trusted = Message.trusted(b"body", "id-1", "k", MappingProxyType({"h": "v"}),
                              checked.timestamp_us)

    assert trusted == checked
    assert trusted.timestamp == checked.timestamp
    assert dict(Message.trusted(b"", "id-2", None, None, checked.timestamp_us).headers) == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        trusted.body = b"other"  # type: ignore[misc]


def test_ids_made_on_several_threads_at_once_are_unique_and_ordered_per_thread() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_message_id() for _ in range(50_000))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # threads interleave between any two bytecodes
    try:
        threads = [threading.Thread(target=make, args=(out,)) for out in made]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    every = [i for out in made for i in out]
    assert len(set(every)) == len(every)
    assert all(out == sorted(out) for out in made)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_does_not_repeat_its_parents_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: frozen)   # one millisecond for both
    new_message_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: one id, through the pipe, and out
        os.close(read)
        os.write(write, new_message_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 36
    assert child != new_message_id()


def test_ids_made_by_the_lot_are_those_made_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Same millisecond and the same random draws: the lot is the one-by-one sequence,
    # across the end of a millisecond's 4096 sequence numbers too.
    frozen = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: frozen)
    ms = frozen // 1_000_000
    for count in (1, 7, 5000, 9000):
        monkeypatch.setattr(unibus.message, "_clock", unibus.message._IdClock())
        monkeypatch.setattr(unibus.message, "_getrandbits", random.Random(count).getrandbits)
        one_by_one = [unibus.message._id_at(ms) for _ in range(count)]
        monkeypatch.setattr(unibus.message, "_clock", unibus.message._IdClock())
        monkeypatch.setattr(unibus.message, "_getrandbits", random.Random(count).getrandbits)
        assert unibus.message._ids_at(ms, count) == one_by_one


def test_ids_by_the_lot_and_one_by_one_interleave_in_order() -> None:
    ids = [new_message_id()]
    for count in (3, 4100, 1):
        ids += unibus.message._ids_at(time.time_ns() // 1_000_000, count)
        ids.append(new_message_id())
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_messages_of_bodies_are_those_message_makes() -> None:
    before = time.time_ns() // 1000
    kept = Message(b"kept", key="k")
    made = Message._of_bodies([b"a", bytearray(b"b"), kept, memoryview(b"c"), b""])
    after = time.time_ns() // 1000
    assert [m.body for m in made] == [b"a", b"b", b"kept", b"c", b""]
    assert made[2] is kept
    for message in (made[0], made[1], made[3], made[4]):
        assert type(message.body) is bytes
        assert message.key is None
        assert message.headers == {}
        assert before <= message.timestamp_us <= after
        assert uuid.UUID(message.id).version == 7
    assert made[0] == Message(b"a", id=made[0].id, timestamp=made[0].timestamp)
    assert made[0].id < made[1].id < made[3].id < made[4].id
    with pytest.raises(dataclasses.FrozenInstanceError):
        made[0].body = b"changed"   # type: ignore[misc]
    with pytest.raises(InvalidMessage):
        Message._of_bodies([b"ok", "text"])
