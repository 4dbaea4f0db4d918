"""Broker-free units: import without the driver, error mapping, offsets, the record codec."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaError, KafkaException

from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    InvalidURL,
    PublishFailed,
    UnibusError,
)
from unibus.message import Message
from unibus_kafka._codec import decode, decode_plain, encode_headers, record_id
from unibus_kafka._errors import DriverLog, Scrubber, map_errors, to_unibus
from unibus_kafka._offsets import PartitionState


def test_the_package_imports_without_its_driver() -> None:
    code = ("import sys; sys.modules['confluent_kafka'] = None\n"
            "import unibus_kafka, unibus\n"
            "from unibus.url import make_url\n"
            "adapter = unibus_kafka.KafkaAdapter(make_url('kafka://127.0.0.1:1'))\n"
            "assert adapter.capabilities.name == 'kafka'\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "expected"), [
    (KafkaError._TRANSPORT, BrokerUnavailable),
    (KafkaError._ALL_BROKERS_DOWN, BrokerUnavailable),
    (KafkaError._AUTHENTICATION, AuthenticationFailed),
    (KafkaError.SASL_AUTHENTICATION_FAILED, AuthenticationFailed),
    (KafkaError._TIMED_OUT, BrokerTimeout),
    (KafkaError._INVALID_ARG, InvalidURL),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, BrokerError),
    (KafkaError.UNKNOWN, BrokerError),
])
def test_every_kafka_exception_maps_to_a_unibus_error(code: int,
                                                      expected: type[UnibusError]) -> None:
    with pytest.raises(expected) as caught, map_errors("doing x"):
        raise KafkaException(KafkaError(code, "driver says no"))
    assert "doing x" in str(caught.value)
    assert not isinstance(caught.value, KafkaException)


def test_driver_value_errors_and_full_queues_map_too() -> None:
    with pytest.raises(InvalidURL), map_errors("configuring"):
        raise ValueError("No such configuration property: foo")
    with pytest.raises(PublishFailed), map_errors("producing"):
        raise BufferError("Local: Queue full")


def test_a_failed_delivery_is_publish_failed_with_the_ids() -> None:
    error = to_unibus(KafkaError(KafkaError._MSG_TIMED_OUT), "publishing", message_ids=("m1",))
    assert isinstance(error, PublishFailed)
    assert error.message_ids == ("m1",)


def test_secrets_are_scrubbed_from_driver_texts_and_log_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    scrub = Scrubber("hunter2", None)
    with pytest.raises(BrokerError) as caught, map_errors("connecting", scrub):
        raise KafkaException(KafkaError(KafkaError.UNKNOWN, "bad password hunter2"))
    assert "hunter2" not in str(caught.value)
    with caplog.at_level(logging.DEBUG, logger="unibus.kafka.driver"):
        DriverLog(scrub).log(logging.ERROR, "FAIL %s", "sasl hunter2")
    assert caplog.records
    assert all("hunter2" not in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


# -- offsets ---------------------------------------------------------------------------


def settle(state: PartitionState, offset: int) -> None:
    """Log a settlement and fold it in at once (as a commit does)."""
    state.settled(offset)
    state.advance()


def test_commit_advances_only_over_the_contiguous_settled_prefix() -> None:
    state = PartitionState("t", 0)
    for offset in (10, 11, 12, 15, 16):   # gaps: compaction or transaction markers
        state.fetched(offset)
    settle(state, 12)
    settle(state, 15)
    assert state.commit_to == -1
    settle(state, 10)
    assert state.commit_to == 11
    settle(state, 11)
    assert state.commit_to == 16          # 10, 11, 12 and 15 settled; 16 is next
    assert state.unsettled == 1
    settle(state, 16)
    assert state.commit_to == 17
    assert state.unsettled == 0


def test_settlements_are_folded_into_the_commit_point_by_advance() -> None:
    # The event loop only logs a settlement; whoever commits folds the log in first.
    state = PartitionState("t", 0)
    for offset in range(5):
        state.fetched(offset)
    state.settled(0)
    state.settled(1)
    assert state.commit_to == -1
    state.advance()
    assert state.commit_to == 2
    assert state.unsettled == 3


def test_advance_handles_settlements_out_of_order_across_calls() -> None:
    state = PartitionState("t", 0)
    for offset in (3, 4, 5, 7, 8):        # 6 is a gap (a transaction marker)
        state.fetched(offset)
    for offset in (5, 4):
        state.settled(offset)
    state.advance()
    assert state.commit_to == -1          # 3 is not settled
    assert state.unsettled == 3
    state.settled(8)
    state.settled(3)
    state.advance()
    assert state.commit_to == 6           # 3, 4, 5 settled; 7 is not
    state.settled(7)
    state.advance()
    assert state.commit_to == 9
    assert state.unsettled == 0


def test_advance_drops_what_is_behind_the_commit_point_from_its_log() -> None:
    state = PartitionState("t", 0)
    total = 12_010
    for offset in range(total):
        state.fetched(offset)
        if offset % 1000 == 999:
            for settled in range(offset - 999, offset + 1):
                state.settled(settled)
            state.advance()
    assert state.commit_to == total - 10
    assert state.unsettled == 10
    assert len(state._log) < 4096 + 10   # the settled front was dropped
    for offset in range(total - 10, total):
        state.settled(offset)
    state.advance()
    assert state.commit_to == total


def test_a_stale_settlement_after_the_log_was_dropped_changes_nothing() -> None:
    state = PartitionState("t", 0)
    for offset in range(5000):
        state.fetched(offset)
        state.settled(offset)
    state.advance()                       # all settled: the log's front is dropped
    settle(state, 4999)                   # a stale duplicate
    assert (state.commit_to, state.unsettled) == (5000, 0)
    state.fetched(5000)
    settle(state, 5000)
    assert state.commit_to == 5001


def test_an_untracked_partition_logs_nothing() -> None:
    # An ephemeral subscription's partitions: nothing is ever committed for them.
    state = PartitionState("t", 0, tracked=False)
    state.handed += 10
    for offset in range(10):
        state.fetched(offset)
        state.settled(offset)
    state.advance()
    assert (state.commit_to, state.unsettled, state.dirty) == (-1, 0, False)
    assert state._log == []
    assert state._acked == []


def test_open_counts_handed_out_less_settled_across_advances() -> None:
    state = PartitionState("t", 0)
    for offset in range(6):
        state.fetched(offset)
    state.handed += 6
    state.settled(1)
    state.settled(0)
    assert state.open() == 4
    state.advance()                        # folded: still counted settled
    assert (state.open(), state.commit_to) == (4, 2)
    state.settled(5)
    state.advance()                        # ahead of 2, 3 and 4: not committable yet
    assert (state.open(), state.commit_to) == (3, 2)


def test_an_untracked_partition_counts_its_open_deliveries() -> None:
    state = PartitionState("t", 0, tracked=False)
    state.handed += 3
    state.settled(7)
    assert state.open() == 2
    state.handed += 1
    state.settled(8)
    state.settled(9)
    assert state.open() == 1
    assert state._acked == []              # nobody folds it: open lets the log go


def test_an_alert_stays_set_on_a_revoked_partition() -> None:
    state = PartitionState("t", 0)
    state.alert = True                     # a fetch waits for room
    state.calm()
    assert (state.alert, state.revoked) == (False, False)
    state.alert = True
    state.revoke()
    state.calm()                           # the wait ends after the revocation
    assert (state.alert, state.revoked) == (True, True)


def test_a_kafka_delivery_sets_every_field_a_delivery_has() -> None:
    # KafkaDelivery sets Delivery's fields itself (Delivery._setup written out, for
    # speed): a field added to Delivery must be set there too.
    from unibus.message import Delivery
    from unibus_kafka._consumer import KafkaDelivery

    state = PartitionState("t", 0)
    delivery = KafkaDelivery(FakeRecord(b"v", None, None), state, 41, "t", "g", 1,
                             None, None)  # type: ignore[arg-type]
    for name in (*Delivery.__slots__, *KafkaDelivery.__slots__):
        getattr(delivery, name)   # AttributeError if left unset


def test_dirty_tracks_what_was_sent_in_a_commit() -> None:
    state = PartitionState("t", 3)
    state.fetched(0)
    seen = [state.dirty]
    settle(state, 0)
    seen.append(state.dirty)
    state.committed = state.commit_to
    seen.append(state.dirty)
    assert seen == [False, True, False]
    settle(state, 0)                       # a stale duplicate changes nothing
    assert state.commit_to == 1


# -- codec -----------------------------------------------------------------------------


class FakeRecord:
    """The parts of ``confluent_kafka.Message`` that :func:`decode` reads."""

    def __init__(self, value: bytes | None, key: bytes | None,
                 headers: list[tuple[str, bytes]] | None) -> None:
        self._value, self._key, self._headers = value, key, headers

    def topic(self) -> str:
        return "orders"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_123)

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers


def test_records_round_trip_ids_timestamps_keys_and_reserved_header_names() -> None:
    message = Message(b"\x00\xff", key="cust-7",
                      headers={"unibus.id": "user's own", "é": "", "plain": "v"},
                      timestamp=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    headers = encode_headers(message, [("unibus.attempt", "3")])
    got, topic, attempt, due = decode(FakeRecord(message.body, b"cust-7", headers))
    assert (got.id, got.body, got.key, got.timestamp) == (
        message.id, message.body, message.key, message.timestamp)
    assert dict(got.headers) == dict(message.headers)
    assert (topic, attempt, due) == ("orders", 3, 0.0)


def test_a_record_of_the_topic_itself_decodes_lazily_to_the_same_message() -> None:
    message = Message(b"body", key="k",
                      timestamp=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    record = FakeRecord(message.body, b"k", encode_headers(message))
    assert decode_plain(record) == message == decode(record)[0]
    # With user headers (and bookkeeping, which only a lane's records are read for).
    message = message.replace(headers={"unibus.x": "1", "é": "ü"})
    record = FakeRecord(message.body, b"k", encode_headers(message, [("unibus.due", "9")]))
    assert decode_plain(record) == message == decode(record)[0]


def test_the_id_and_timestamp_travel_in_one_header() -> None:
    message = Message(b"x", timestamp=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    assert encode_headers(message) == [
        ("unibus.msg", b"%d %s" % (message.timestamp_us, message.id.encode()))]
    record = FakeRecord(b"x", None, encode_headers(message))
    assert record_id(record) == message.id


def test_records_with_the_earlier_pair_of_headers_still_decode() -> None:
    headers = [("unibus.id", b"old-1"), ("unibus.ts", b"1767323045678901")]
    for got in (decode_plain(FakeRecord(b"v", None, headers)),
                decode(FakeRecord(b"v", None, headers))[0]):
        assert got.id == "old-1"
        assert got.timestamp == datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert record_id(FakeRecord(b"v", None, headers)) == "old-1"
    # A malformed unibus.msg beside them takes nothing away.
    got = decode(FakeRecord(b"v", None, [*headers, ("unibus.msg", b"junk")]))[0]
    assert got.id == "old-1"


@pytest.mark.parametrize("value", [b"", b"1767323045678901", b"soon id-1", b"1767323045678901 ",
                                   b"9" * 5000 + b" id-1"])
def test_a_malformed_meta_header_is_ignored_not_fatal(value: bytes) -> None:
    got = decode_plain(FakeRecord(b"v", None, [("unibus.msg", value)]))
    assert got.body == b"v"
    if value.startswith((b"soon", b"9")):
        assert got.id == "id-1"
        assert got.timestamp == datetime.fromtimestamp(1_700_000_000.123, UTC)
    else:
        assert got.id == "orders/2/41"


def test_a_plain_record_with_a_corrupt_timestamp_falls_back_to_the_broker_time() -> None:
    record = FakeRecord(b"", None, [("unibus.id", b"id-1"), ("unibus.ts", b"9" * 18)])
    got = decode_plain(record)
    assert got.id == "id-1"
    assert got.timestamp == datetime.fromtimestamp(1_700_000_000.123, UTC)


def test_a_foreign_record_gets_a_positional_id_and_the_broker_timestamp() -> None:
    message, topic, attempt, due = decode(FakeRecord(None, None, None))
    assert message.id == "orders/2/41"
    assert message.body == b""
    assert message.key is None
    assert message.timestamp == datetime.fromtimestamp(1_700_000_000.123, UTC)
    assert (topic, attempt, due) == ("orders", 1, 0.0)


@pytest.mark.parametrize("seal_after", [0, 1, 2_000, 3_999, 4_000])
async def test_a_batch_finishes_once_every_report_came_whichever_threads_serve_them(
        seal_after: int) -> None:
    # Reports served on two threads at once (the loop's poll and the poll thread's,
    # for a moment), the batch sealed on the loop meanwhile: the count must neither
    # lose a report nor finish the batch early.
    import asyncio
    import threading

    from unibus_kafka._producer import _Batch

    total = 4_000
    batch = _Batch(asyncio.get_running_loop())
    served = [0, 0]
    reached = threading.Event()   # seal_after reports served

    def serve(side: int) -> None:
        for i in range(total // 2):
            if sum(served) >= seal_after:
                reached.set()
            batch.report(None, i)
            served[side] += 1
        reached.set()

    threads = [threading.Thread(target=serve, args=(side,)) for side in (0, 1)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(reached.wait)
    batch.seal(total)
    await asyncio.wait_for(batch.future, 10)
    # Finished only after every report and the seal drew their number.
    assert next(batch._count) == total + 2
    for thread in threads:
        thread.join()
    assert not batch.errors


async def test_a_batch_sealed_short_of_its_reports_waits_and_keeps_the_errors() -> None:
    import asyncio

    from unibus_kafka._producer import _Batch

    batch = _Batch(asyncio.get_running_loop())
    batch.report(None, 1)
    batch.seal(3)
    batch.report(None, 2)
    await asyncio.sleep(0.01)
    assert not batch.future.done()
    batch.report(KafkaError(KafkaError._MSG_TIMED_OUT), 3)
    await asyncio.wait_for(batch.future, 5)
    assert [record for _, record in batch.errors] == [3]
