"""How messages travel as AMQP messages: exact round trip, reserved headers, attempts,
delay buckets and queue names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from unibus.errors import InvalidMessage
from unibus.message import Message
from unibus_rabbitmq._codec import ATTEMPT, decode, encode_headers, properties
from unibus_rabbitmq._topology import bucket_ms, group_queue


def delivered(message: Message, *, extra: dict[str, object] | None = None,
              redelivered: bool = False) -> DeliveredMessage:
    headers = encode_headers(message)
    headers.update(extra or {})
    props = properties(message, headers)
    # Through the wire codec, so types come back as the broker sends them.
    raw = ContentHeader(0, len(message.body), props).marshal()
    header = ContentHeader()
    header.unmarshal(raw)
    return DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="c", delivery_tag=1, redelivered=redelivered,
                               exchange="unibus", routing_key="t"),
        header=header, body=message.body, channel=None)  # type: ignore[arg-type]


def test_message_round_trips_exactly() -> None:
    sent = Message(bytes(range(256)), key="k-é", headers={"ü": "✓", "": "", "a": "b"},
                   timestamp=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    got, before = decode(delivered(sent))
    assert got == sent
    assert before == 0


def test_timestamp_in_another_zone_keeps_its_instant() -> None:
    zone = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC).astimezone(
        __import__("datetime").timezone(timedelta(hours=5)))
    got, _ = decode(delivered(Message(b"x", timestamp=zone)))
    assert got.timestamp == zone


def test_id_longer_than_a_shortstr_travels_in_a_header() -> None:
    sent = Message(b"x", id="i" * 300)
    assert properties(sent, encode_headers(sent)).message_id is None
    assert decode(delivered(sent))[0].id == sent.id


@pytest.mark.parametrize("name", ["x-death", "x-delivery-count", "x-unibus-ts",
                                  "x-first-death-queue", "x-last-death-reason"])
def test_reserved_header_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidMessage, match="reserved"):
        encode_headers(Message(b"x", headers={name: "v"}))


def test_header_name_over_255_bytes_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="255"):
        encode_headers(Message(b"x", headers={"h" * 256: "v"}))


def test_broker_headers_are_stripped_and_counted_as_attempts() -> None:
    sent = Message(b"x", headers={"keep": "me"})
    got, before = decode(delivered(sent, extra={"x-delivery-count": 3, ATTEMPT: 2,
                                                "x-first-death-queue": "q"}))
    assert dict(got.headers) == {"keep": "me"}
    assert before == 5


def test_classic_redelivery_counts_one_more_attempt() -> None:
    assert decode(delivered(Message(b"x"), redelivered=True))[1] == 1


@pytest.mark.parametrize("seconds", [0.0001, 0.3, 0.5, 1.0, 1.05, 9.99, 10.0, 10.001, 61.7,
                                     3600.2, 86400.5])
def test_delay_buckets_round_up_never_down(seconds: float) -> None:
    ms = bucket_ms(seconds)
    assert ms >= seconds * 1000
    slack = 100 if seconds <= 10 else seconds * 1000 / 100
    assert ms - seconds * 1000 <= slack


def test_no_delay_has_no_bucket() -> None:
    assert bucket_ms(0) == 0
    assert bucket_ms(-3) == 0


def test_queue_names_of_different_topic_group_pairs_never_collide() -> None:
    assert group_queue("a.b", "c") != group_queue("a", "b.c")


def test_queue_names_rabbitmq_would_refuse_are_made_valid() -> None:
    assert not group_queue("amq.x", "g").startswith("amq.")
    long = group_queue("t" * 200, "g" * 200)
    assert len(long.encode()) <= 255
    assert long != group_queue("t" * 200, "g" * 199 + "h")
