"""The NATS codec's fast paths against nats-py's own parser, round trips, and foreign messages.

The core consumer reads header blocks itself (``parse_header_block``, ``decode_plain``)
instead of letting nats-py parse them: these tests pin that the result is what nats-py's
parser (``Client._process_headers``, the path the adapter took before) would have given,
that every message unibus publishes comes back exactly, and that messages other clients
publish still arrive, with the documented fallbacks.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

import unibus
from unibus.message import Message
from unibus_nats._codec import (
    decode,
    decode_block,
    decode_plain,
    encode_headers,
    header_block,
    micros,
    parse_header_block,
)
from unibus_nats._url import token

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STREAM = "unibus.orders"
_SEQUENCE = 7
_SERVER_NS = 1_700_000_000_123_456_789


@pytest.fixture
async def nats_client() -> NatsClient:
    """An unconnected nats-py client: its header parser needs no server."""
    return NatsClient()


async def nats_parse(client: NatsClient, block: bytes) -> dict[str, str] | None:
    """nats-py's parse of a received header block (what ``Msg.headers`` used to hold)."""
    parsed: dict[str, str] | None = await client._process_headers(block)
    return parsed


def _block(*lines: bytes, end: bytes = b"\r\n\r\n") -> bytes:
    return b"NATS/1.0\r\n" + b"\r\n".join(lines) + end


# -- 1. parse_header_block == nats-py's parser -------------------------------------------

HAND_MADE_BLOCKS: list[bytes] = [
    # What unibus itself writes.
    header_block(Message(b"", id="0192b3c4-d5e6-7f00-8123-456789abcdef")),
    header_block(Message(b"", id="id with spaces/and%", key="k ey",
                         headers={"a": "", "ü": "✓ \r\n"})),
    header_block(Message(b"", key="", timestamp=datetime(1, 1, 1, tzinfo=UTC))),
    # Other clients: foreign names, repeated names (the last wins), many headers.
    _block(b"Nats-Msg-Id: abc", b"X-Trace: 1-2-3"),
    _block(b"Nats-Expected-Stream: s", b"Nats-Expected-Last-Sequence: 42"),
    _block(b"X: first", b"X: second", b"x: lower"),
    _block(*[b"H-%d: value %d" % (i, i) for i in range(300)]),
    # Unicode and undecodable values, non-ASCII names (dropped).
    _block("Greeting: héllo wörld ✓ 日本".encode()),
    _block(b"Broken: \xff\xfe\xc3", b"Fine: yes"),
    _block("Nämé: v".encode(), b"Ok: 1"),
    # Empty values, empty names.
    _block(b"Empty:", b"Blank: ", b"Tabs:\t\t"),
    _block(b": no name", b"Ok: 1"),
    # Odd spacing: none, tabs, around the name, inside the name (dropped).
    _block(b"Tight:value", b"Tabbed:\tvalue\t", b"  Padded  :   value  "),
    _block(b"Na me: dropped", b"Na\tme: dropped", b"Na\x0bme: dropped", b"Na\x1cme: dropped"),
    _block(b"Na\x1fme: dropped", b"Na\x0cme: dropped", b"Kept: 1"),
    # Colons in values, lines without a colon.
    _block(b"Url: http://host:4222/a:b", b"garbage line", b"Also: ok"),
    # CR/LF edge cases: bare CR or LF inside a line, no final blank line, blank lines.
    _block(b"Lf: a\nb", b"Cr: a\rb", b"Ok: 1"),
    _block(b"A: 1", end=b""),
    _block(b"A: 1", end=b"\r\n"),
    _block(b"A: 1", b"", b"", b"B: 2"),
    _block(b"Trailing: cr\r", b"Leading: \nlf"),
    _block(b"\r\n\r\nA: 1"),
    b"NATS/1.0\r\n\r\n",
    b"NATS/1.0\r\n",
    b"NATS/1.0\r\n\r\n\r\n\r\n",
    _block(b"only garbage"),
]


@pytest.mark.parametrize("block", HAND_MADE_BLOCKS, ids=range(len(HAND_MADE_BLOCKS)))
async def test_hand_made_blocks_parse_exactly_as_nats_py_parses_them(
        nats_client: NatsClient, block: bytes) -> None:
    assert parse_header_block(block) == await nats_parse(nats_client, block)


_PIECES = [b"A", b"b", b"Z9", b"-", b"_", b".", b":", b": ", b" ", b"  ", b"\t", b"\r", b"\n",
           b"\r\n", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\x00", b"\x7f", "ä".encode(),
           "✓".encode(), b"\xff", b"\xc3", b"%", b"%41", b"~", b"{\"k\":\"v\"}", b"Nats-Msg-Id",
           b"Unibus-Ts", b"Unibus-Key", b"Unibus-Headers"]


def _random_block(rng: random.Random) -> bytes:
    lines = [b"".join(rng.choices(_PIECES, k=rng.randrange(0, 8)))
             for _ in range(rng.randrange(0, 12))]
    return _block(*lines, end=rng.choice([b"\r\n\r\n", b"\r\n", b""]))


async def test_random_blocks_parse_exactly_as_nats_py_parses_them(
        nats_client: NatsClient) -> None:
    rng = random.Random(20261127)
    for _ in range(600):
        block = _random_block(rng)
        assert parse_header_block(block) == await nats_parse(nats_client, block), block


async def test_decoding_a_block_equals_decoding_nats_py_parse_of_it(
        nats_client: NatsClient) -> None:
    # decode_block (and its decode_plain shortcut) replaced decode(nats-py's headers):
    # same Message, or the same kind of error, for every block.
    rng = random.Random(4222)
    blocks = HAND_MADE_BLOCKS + [_random_block(rng) for _ in range(300)] + [
        _block(b"Nats-Msg-Id: %s" % rng.choice([b"x", b"%41", b"a%20b", b"%FF", b"%zz"]),
               b"Unibus-Ts: %s" % rng.choice([b"0", b"-1", b"12", b"x", b"", b" 5 "]),
               *rng.sample([b"Unibus-Key: ~k", b"Unibus-Key: ", b"Unibus-Headers: {}",
                            b'Unibus-Headers: {"a":"b"}', b"Unibus-Headers: []",
                            b"Unibus-Id: sched", b"Other: x"], k=rng.randrange(0, 3)))
        for _ in range(300)]
    for block in blocks:
        old: Message | type[ValueError]
        new: Message | type[ValueError]
        try:
            old = decode(b"body", await nats_parse(nats_client, block), _STREAM, _SEQUENCE,
                         _SERVER_NS)
        except ValueError:
            old = ValueError
        try:
            new = decode_block(b"body", block, _STREAM, _SEQUENCE, _SERVER_NS)
        except ValueError:
            new = ValueError
        assert new == old, block


# -- 2. round trips ----------------------------------------------------------------------

ODD_IDS = ["a", "%", "%%", "%41", "%zz", "100% sure", "with space", " lead and trail ",
           "tab\there", "new\nline", "cr\rlf\n", "ünïcødé", "日本語", "emoji 🚀", "~tilde",
           "a/b:c@d!$&'()*+,;=", "quote\"back\\slash", "plus+sign", "#hash?query", "\x7f\x01"]
ODD_KEYS: list[str | None] = [None, "", "%", "%2F", "k ey", "ключ", " ", "~", "a\r\nb"]
ZONES = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)),
         timezone(timedelta(hours=14)), timezone(timedelta(hours=-12, minutes=-45)),
         timezone(timedelta(seconds=-1, microseconds=-1))]
TIMESTAMPS = [
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(1, 1, 1, 12, tzinfo=ZONES[1]),
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    _EPOCH,
    _EPOCH + timedelta(microseconds=1),
    datetime(2000, 2, 29, 12, 30, 15, 500_000, tzinfo=ZONES[2]),
    datetime(2026, 11, 27, 9, 0, 0, 123_457, tzinfo=ZONES[3]),
    # Around 2**31 s, where the decoder changes from its float to its exact conversion.
    _EPOCH + timedelta(seconds=2**31, microseconds=-1),
    _EPOCH + timedelta(seconds=2**31),
    _EPOCH + timedelta(seconds=2**31, microseconds=1),
    datetime(3000, 6, 15, 1, 2, 3, 999_999, tzinfo=ZONES[4]),
    datetime(9999, 12, 31, 12, tzinfo=ZONES[2]),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
]


def _round_trip(message: Message) -> Message:
    return decode_block(message.body, header_block(message), _STREAM, _SEQUENCE, _SERVER_NS)


def _assert_same(got: Message, sent: Message) -> None:
    assert (got.id, got.key, dict(got.headers), got.body) == (
        sent.id, sent.key, dict(sent.headers), sent.body)
    assert got.timestamp == sent.timestamp
    assert micros(got.timestamp) == micros(sent.timestamp)
    assert got.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize("id", ODD_IDS)
@pytest.mark.parametrize("key", ODD_KEYS)
def test_odd_ids_and_keys_survive_a_round_trip(id: str, key: str | None) -> None:
    sent = Message(b"\x00body\r\n", id=id, key=key)
    _assert_same(_round_trip(sent), sent)


@pytest.mark.parametrize("when", TIMESTAMPS, ids=lambda when: when.isoformat())
def test_timestamps_from_year_1_to_9999_survive_to_the_microsecond(when: datetime) -> None:
    for sent in (Message(b"", id="plain", timestamp=when),
                 Message(b"", id="keyed", key="k", headers={"h": "v"}, timestamp=when)):
        _assert_same(_round_trip(sent), sent)


@pytest.mark.parametrize("headers", [
    {}, {"a": ""}, {"": ""}, {"ü": "✓"}, {"crlf": "a\r\nb", " sp ": " v "},
    {"json": '{"x": [1, "\\u0000"]}'}, {f"h{i}": "v" * i for i in range(200)},
], ids=["none", "empty value", "empty name", "unicode", "whitespace", "json", "many"])
def test_user_headers_survive_a_round_trip_exactly(headers: dict[str, str]) -> None:
    sent = Message(b"x", id="i", headers=headers)
    _assert_same(_round_trip(sent), sent)


def test_random_messages_survive_a_round_trip() -> None:
    rng = random.Random(9999)
    alphabet = "aZ09 %~-_./:@+!\t\r\nü日🚀\x00\x7f"
    first, last = micros(datetime(1, 1, 1, tzinfo=UTC)), micros(
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC))
    for _ in range(500):
        instant = _EPOCH + timedelta(microseconds=rng.randint(first, last))
        zone = rng.choice(ZONES)
        try:
            when = instant.astimezone(zone)
        except OverflowError:
            when = instant                  # that zone cannot show this instant
        sent = Message(
            rng.randbytes(rng.randrange(0, 16)),
            id="".join(rng.choices(alphabet, k=rng.randrange(1, 12))),
            key=rng.choice([None, "".join(rng.choices(alphabet, k=rng.randrange(0, 6)))]),
            headers={"".join(rng.choices(alphabet, k=rng.randrange(0, 4))):
                     "".join(rng.choices(alphabet, k=rng.randrange(0, 4)))
                     for _ in range(rng.randrange(0, 3))},
            timestamp=when)
        _assert_same(_round_trip(sent), sent)


def test_plain_float_conversion_lands_on_the_exact_microsecond() -> None:
    # Below 2**31 s decode_plain converts through a float: it must still be exact.
    rng = random.Random(31)
    values = [0, 1, 999_999, 1_000_000, 2**31 * 1_000_000 - 1, 2**31 * 1_000_000,
              *(rng.randrange(0, 2**31 * 1_000_000) for _ in range(20_000)),
              *(2**31 * 1_000_000 - rng.randrange(1, 10_000) for _ in range(2_000))]
    for value in values:
        block = b"NATS/1.0\r\nNats-Msg-Id: i\r\nUnibus-Ts: %d\r\n\r\n" % value
        message = decode_plain(b"", block)
        assert message is not None
        assert message.timestamp == _EPOCH + timedelta(microseconds=value), value


def test_only_id_and_timestamp_blocks_take_the_plain_path() -> None:
    assert decode_plain(b"", header_block(Message(b"", id="a b%"))) is not None
    assert decode_plain(b"", header_block(Message(b"", key="k"))) is None
    assert decode_plain(b"", header_block(Message(b"", headers={"a": "b"}))) is None
    assert decode_plain(b"", header_block(Message(b"", timestamp=datetime(1, 1, 1, tzinfo=UTC)))
                        ) is None


@pytest.mark.parametrize("message", [
    Message(b""), Message(b"", id="a b%ü", key="", headers={"x": "y\r\n"}),
    Message(b"", key="k", timestamp=datetime(1, 1, 1, tzinfo=UTC)),
], ids=["plain", "all", "year 1"])
async def test_header_block_is_what_nats_py_reads_as_the_encoded_headers(
        nats_client: NatsClient, message: Message) -> None:
    block = header_block(message)
    assert await nats_parse(nats_client, block) == encode_headers(message)
    assert parse_header_block(block) == encode_headers(message)


# -- 2b. malformed and foreign blocks ----------------------------------------------------

def _decode(*lines: bytes) -> Message:
    return decode_block(b"body", _block(*lines), _STREAM, _SEQUENCE, _SERVER_NS)


_SERVER_TIME = _EPOCH + timedelta(microseconds=_SERVER_NS // 1000)


def test_a_block_without_an_id_takes_stream_and_sequence_as_id() -> None:
    got = _decode(b"Unibus-Ts: 5")
    assert (got.id, got.timestamp) == (f"{_STREAM}:{_SEQUENCE}",
                                       _EPOCH + timedelta(microseconds=5))
    assert _decode(b"Nats-Msg-Id:", b"Unibus-Ts: 5").id == f"{_STREAM}:{_SEQUENCE}"


def test_a_block_without_a_timestamp_takes_the_server_time() -> None:
    got = _decode(b"Nats-Msg-Id: m")
    assert (got.id, got.timestamp) == ("m", _SERVER_TIME)


def test_scheduled_id_stands_in_for_a_missing_message_id() -> None:
    assert _decode(b"Unibus-Id: sched", b"Unibus-Ts: 5").id == "sched"
    assert _decode(b"Nats-Msg-Id: m", b"Unibus-Id: sched", b"Unibus-Ts: 5").id == "m"


def test_foreign_headers_are_not_user_headers() -> None:
    got = _decode(b"Nats-Msg-Id: m", b"X-Trace: 1", b"Unibus-Ts: 5")
    assert (got.id, got.key, dict(got.headers)) == ("m", None, {})
    bare = decode_block(b"body", None, _STREAM, _SEQUENCE, _SERVER_NS)
    assert (bare.id, bare.key, dict(bare.headers), bare.timestamp) == (
        f"{_STREAM}:{_SEQUENCE}", None, {}, _SERVER_TIME)


def test_invalid_percent_sequences_are_kept_literally() -> None:
    # unquote leaves what is not a %XX sequence as it is; nothing is lost.
    assert _decode(b"Nats-Msg-Id: %zz%", b"Unibus-Ts: 5").id == "%zz%"
    assert _decode(b"Nats-Msg-Id: m", b"Unibus-Ts: 5", b"Unibus-Key: ~%G1").key == "%G1"


@pytest.mark.parametrize("lines", [
    (b"Nats-Msg-Id: m", b"Unibus-Ts: soon"),
    (b"Nats-Msg-Id: m", b"Unibus-Ts: 1.5"),
    (b"Nats-Msg-Id: m", b"Unibus-Ts:"),
    (b"Nats-Msg-Id: %FF", b"Unibus-Ts: 5"),
    (b"Nats-Msg-Id: %C3", b"Unibus-Ts: 5"),
    (b"Nats-Msg-Id: %FF", b"Unibus-Ts: 5", b"Other: x"),
    (b"Nats-Msg-Id: m", b"Unibus-Ts: 5", b"Unibus-Key: ~%FF"),
    (b"Nats-Msg-Id: m", b"Unibus-Ts: 5", b"Unibus-Headers: {not json"),
    (b"Nats-Msg-Id: m", b"Unibus-Ts: 5", b"Unibus-Headers: []"),
    (b"Nats-Msg-Id: m", b"Unibus-Ts: 5", b'Unibus-Headers: {"a": 1}'),
], ids=["word ts", "fraction ts", "empty ts", "bad utf-8 id", "cut utf-8 id", "bad id slow path",
        "bad key", "bad json", "json list", "json number"])
def test_malformed_unibus_headers_raise_value_error(lines: tuple[bytes, ...]) -> None:
    # ValueError is the documented signal: the consumer then delivers the body as a
    # fresh Message (see the broker test below) instead of failing.
    with pytest.raises(ValueError):
        _decode(*lines)


# -- 3. foreign publishers on a real server ----------------------------------------------

@pytest.mark.broker
async def test_messages_from_raw_nats_py_arrive_in_order_with_the_documented_fallbacks(
        nats_broker: Any, core_url: str, topic: str) -> None:
    import nats

    subject = f"unibus.{token(topic)}"
    unibus_made = Message(b"", id="ü 100%", key="k", headers={"h": "v"},
                          timestamp=datetime(1, 1, 1, 12, tzinfo=ZONES[1]))
    sent: list[dict[str, str] | None] = [
        None,                                                            # 1: no headers
        {"X-Trace": "abc", "Greeting": "héllo ✓"},                       # 2: foreign only
        {"Nats-Msg-Id": "foreign-id", "X-Other": "1"},                   # 3: foreign id
        {"Nats-Msg-Id": "m-4", "Unibus-Ts": "not-a-number"},             # 4: malformed ts
        {"Nats-Msg-Id": "%FF", "Unibus-Ts": "5"},                        # 5: malformed id
        encode_headers(unibus_made),                                     # 6: unibus's own
        {"Nats-Msg-Id": "big", "Unibus-Ts": "999999999999999999"},       # 7: ts out of range
        {"Nats-Msg-Id": "m-8", "Unibus-Ts": "1"},                        # 8: plain unibus
    ]
    async with unibus.connect(core_url) as bus:
        sub = await bus.subscribe(topic).open()
        before = datetime.now(UTC)
        raw = await nats.connect(nats_broker.url)
        try:
            for index, headers in enumerate(sent, 1):
                await raw.publish(subject, b"%d" % index, headers=headers)
            await raw.flush()
        finally:
            await raw.close()
        got: list[Message] = []
        deadline = bus.capabilities.timings.delivery
        while len(got) < len(sent):
            batch = await sub.fetch(len(sent), timeout=deadline)
            assert batch, f"only {len(got)} of {len(sent)} arrived"
            for delivery in batch:
                got.append(delivery.message)
                await delivery.ack()
        after = datetime.now(UTC)
        await sub.aclose()

    assert [m.body for m in got] == [b"%d" % i for i in range(1, len(sent) + 1)]
    no_headers, foreign, foreign_id, bad_ts, bad_id, own, huge_ts, plain = got
    # Without a unibus id: <subject>:<sequence>; without a timestamp: the receipt time.
    assert no_headers.id == f"{subject}:1"
    assert foreign.id == f"{subject}:2"
    assert foreign_id.id == "foreign-id"
    for message in (no_headers, foreign, foreign_id):
        assert before <= message.timestamp <= after
        assert (message.key, dict(message.headers)) == (None, {})
    # Malformed unibus headers: the body alone, as a new message received now.
    # A timestamp out of datetime's range is malformed too, and does not stop the
    # connection: the plain message after it still arrives.
    for message in (bad_ts, bad_id, huge_ts):
        assert message.id not in {"m-4", "%FF", "big", f"{subject}:4", f"{subject}:5"}
        assert uuid.UUID(message.id).version == 7
        assert before <= message.timestamp <= after
        assert (message.key, dict(message.headers)) == (None, {})
    _assert_same(own, unibus_made.replace(body=b"6"))
    assert (plain.id, plain.timestamp) == ("m-8", _EPOCH + timedelta(microseconds=1))


@pytest.mark.parametrize("ts", [b"999999999999999999", b"-99999999999999999999", b"9" * 30])
def test_an_out_of_range_timestamp_is_a_value_error_not_an_overflow(ts: bytes) -> None:
    # An OverflowError escaping the decoder would reach nats-py's read loop and stop
    # the connection from receiving anything more.
    with pytest.raises(ValueError, match="out of range"):
        _decode(b"Nats-Msg-Id: m", b"Unibus-Ts: " + ts)
