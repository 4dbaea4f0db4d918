"""``unibus.migrate`` between memory brokers: what is moved, kept, counted and verified."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

import unibus
from unibus.cli import cli
from unibus.errors import BrokerUnavailable, PublishFailed
from unibus.memory import MemoryAdapter, _MemoryDelivery
from unibus.message import Message
from unibus.migrate import (
    DEFAULT_GROUP,
    DEFAULT_VERIFY_GROUP,
    ORIGINAL_TIMESTAMP_HEADER,
    _forward,
    _same_broker,
)
from unibus.url import make_url

TOPIC = "orders.eu"
Hook = Callable[[Sequence[unibus.Message]], Awaitable[None]]


class HookedMemoryAdapter(MemoryAdapter):
    """``hooked-memory://NAME``: memory, with a test hook around each publish."""

    before: ClassVar[dict[str, Hook]] = {}
    after: ClassVar[dict[str, Hook]] = {}

    async def publish(self, topic: str, messages: Sequence[unibus.Message], *,
                      not_before: datetime | None = None) -> None:
        if (hook := self.before.get(self.name)) is not None:
            await hook(messages)
        await super().publish(topic, messages, not_before=not_before)
        if (hook := self.after.get(self.name)) is not None:
            await hook(messages)


def down_on_publish(number: int) -> Hook:
    """A target hook: the ``number``-th publish finds the target unreachable."""
    published = 0

    async def hook(messages: Sequence[unibus.Message]) -> None:
        nonlocal published
        published += 1
        if published == number:
            raise BrokerUnavailable("target unreachable (test)")

    return hook


@pytest.fixture(autouse=True)
def hooked_scheme() -> Iterator[None]:
    unibus.register("hooked-memory", HookedMemoryAdapter)
    yield
    unibus.unregister("hooked-memory")
    HookedMemoryAdapter.before.clear()
    HookedMemoryAdapter.after.clear()


def sample(count: int, *, size: int = 64) -> list[unibus.Message]:
    """Binary bodies (every byte value), unicode keys and headers."""
    return [unibus.Message(bytes((n + i) % 256 for i in range(size)) + n.to_bytes(4, "big"),
                           key=f"clé-{n % 7}-ключ",
                           headers={"région": "Île-de-France ✓", "n": str(n), "emoji": "🚚"},
                           timestamp=datetime(2024, 1, 2, 3, 4, 5, n, tzinfo=UTC))
            for n in range(count)]


@asynccontextmanager
async def brokers(source_groups: Sequence[str] = (DEFAULT_GROUP,),
                  target_groups: Sequence[str] = ("readers",),
                  target_options: str = "") -> AsyncIterator[tuple[unibus.Bus, unibus.Bus]]:
    """An open source and target bus (keeping both memory brokers alive)."""
    name = uuid.uuid4().hex
    async with (unibus.connect(f"memory://src-{name}") as src,
                unibus.connect(f"hooked-memory://dst-{name}{target_options}") as dst):
        for group in source_groups:
            await src.declare_group(TOPIC, group)
        for group in target_groups:
            await dst.declare_group(TOPIC, group)
        yield src, dst


async def migrate_until_cut(src: unibus.Bus, dst: unibus.Bus, checkpoint: Path, *,
                            batches: int, window: int) -> dict[str, Any]:
    """Migrate in batches of 100 until the target hangs after its ``batches``-th publish.

    That batch is written on the target and never confirmed back — a crash right there.
    The run is cancelled, leaving ``checkpoint`` as the crash would; returns what it holds.
    """
    published = 0
    cut = asyncio.Event()

    async def hang_after_the_last_batch(messages: Sequence[unibus.Message]) -> None:
        nonlocal published
        published += 1
        if published == batches:
            cut.set()
            await asyncio.Future()

    host = dst.url.host or ""
    HookedMemoryAdapter.after[host] = hang_after_the_last_batch
    try:
        first = asyncio.create_task(unibus.migrate(src.url, dst.url, TOPIC, batch=100,
                                                   window=window, checkpoint=checkpoint,
                                                   verify=True))
        await cut.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        del HookedMemoryAdapter.after[host]
    saved: dict[str, Any] = json.loads(await asyncio.to_thread(checkpoint.read_text))
    return saved


async def drain(bus: unibus.Bus, group: str, topic: str = TOPIC) -> list[unibus.Message]:
    """Everything ``group`` holds, acked."""
    out: list[unibus.Message] = []
    async with bus.subscribe(topic, group=group, prefetch=500) as sub:
        while batch := await sub.fetch(500, bus.capabilities.timings.delivery):
            out.extend(d.message for d in batch)
            for delivery in batch:
                await delivery.ack()
    return out


async def test_every_message_arrives_with_its_id_key_headers_body_and_timestamp() -> None:
    sent = sample(1200)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)

        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=200)

        received = await drain(dst, "readers")
    assert (report.read, report.written, report.acked, report.failed) == (1200, 1200, 1200, 0)
    assert report.duplicates == 0
    assert report.rate > 0
    by_id = {m.id: m for m in received}
    assert len(received) == len(by_id) == 1200
    for original in sent:
        copy = by_id[original.id]
        assert (copy.body, copy.key, copy.timestamp) == (original.body, original.key,
                                                         original.timestamp)
        assert dict(copy.headers) == {**original.headers, ORIGINAL_TIMESTAMP_HEADER:
                                      original.timestamp.isoformat()}


async def test_the_source_group_is_empty_after_a_migration() -> None:
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(300))

        await unibus.migrate(src.url, dst.url, TOPIC, batch=64)

        assert await drain(src, DEFAULT_GROUP) == []


async def test_an_original_timestamp_header_from_an_earlier_hop_is_kept() -> None:
    first_hop = "2020-05-06T07:08:09+00:00"
    async with brokers() as (src, dst):
        await src.publish(TOPIC, b"x", headers={ORIGINAL_TIMESTAMP_HEADER: first_hop})

        await unibus.migrate(src.url, dst.url, TOPIC)

        [copy] = await drain(dst, "readers")
    assert copy.headers[ORIGINAL_TIMESTAMP_HEADER] == first_hop


async def test_to_topic_renames_the_topic_on_the_target() -> None:
    async with brokers() as (src, dst):
        await dst.declare_group("orders.v2", "readers")
        await src.publish_many(TOPIC, sample(10))

        await unibus.migrate(src.url, dst.url, TOPIC, to_topic="orders.v2")

        assert len(await drain(dst, "readers", "orders.v2")) == 10
        assert await drain(dst, "readers") == []


async def test_limit_moves_exactly_that_many_and_leaves_the_rest() -> None:
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(1000))

        report = await unibus.migrate(src.url, dst.url, TOPIC, limit=250, batch=100)

        assert (report.read, report.written, report.acked) == (250, 250, 250)
        assert len(await drain(dst, "readers")) == 250
        assert len(await drain(src, DEFAULT_GROUP)) == 750


async def test_dry_run_publishes_nothing_acks_nothing_and_reports_oversized_messages() -> None:
    async with brokers(target_options="?max_message_size=100") as (src, dst):
        await src.publish_many(TOPIC, [*sample(50), unibus.Message(b"z" * 101)])

        report = await unibus.migrate(src.url, dst.url, TOPIC, dry_run=True)

        assert (report.read, report.written, report.acked) == (51, 0, 0)
        assert report.failed == 1
        assert "101 bytes" in report.failures[0]
        assert await drain(dst, "readers") == []
        assert len(await drain(src, DEFAULT_GROUP)) == 51


async def test_a_message_too_large_for_the_target_stops_with_the_rest_left_on_the_source(
) -> None:
    messages = sample(300)
    messages[130] = unibus.Message(b"z" * 200, key="big")
    async with brokers(target_options="?max_message_size=100") as (src, dst):
        await src.publish_many(TOPIC, messages)

        with pytest.raises(unibus.MigrationFailed, match="200 bytes") as caught:
            await unibus.migrate(src.url, dst.url, TOPIC, batch=100)

        report = caught.value.report
        assert (report.written, report.acked) == (130, 130)
        assert report.failed == 70
        assert isinstance(caught.value.__cause__, unibus.MessageTooLarge)
        written = await drain(dst, "readers")
        left = await drain(src, DEFAULT_GROUP)
    assert [m.id for m in written] == [m.id for m in messages[:130]]
    assert sorted(m.id for m in left) == sorted(m.id for m in messages[130:])


async def test_a_target_that_is_down_stops_the_migration_and_nothing_is_acked() -> None:
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(200))

        async def down(messages: Sequence[unibus.Message]) -> None:
            raise BrokerUnavailable("target unreachable (test)")

        HookedMemoryAdapter.before[dst.url.host or ""] = down
        with pytest.raises(unibus.MigrationFailed, match="BrokerUnavailable") as caught:
            await unibus.migrate(src.url, dst.url, TOPIC, batch=50)

        report = caught.value.report
        assert (report.written, report.acked) == (0, 0)
        # Each batch in flight failed on its own; one line says why.
        assert report.failed == report.read
        assert report.failed in range(50, 201, 50)
        assert len(report.failures) == 1
        assert len(await drain(src, DEFAULT_GROUP)) == 200


async def test_a_message_read_twice_in_one_batch_is_not_acked_before_the_target_confirms(
        ) -> None:
    async with brokers() as (src, dst):
        twice = unibus.Message(b"x", id="read-twice")
        other = unibus.Message(b"y")
        await src.publish_many(TOPIC, [twice, twice, other])

        async def down(messages: Sequence[unibus.Message]) -> None:
            raise BrokerUnavailable("target unreachable (test)")

        HookedMemoryAdapter.before[dst.url.host or ""] = down
        with pytest.raises(unibus.MigrationFailed) as caught:
            await unibus.migrate(src.url, dst.url, TOPIC, batch=50)
        left = await drain(src, DEFAULT_GROUP)
    assert (caught.value.report.written, caught.value.report.acked) == (0, 0)
    assert sorted(m.id for m in left) == sorted([twice.id, twice.id, other.id])


async def test_another_message_reusing_an_id_is_moved_not_taken_for_a_re_read() -> None:
    first, second = (unibus.Message(b"v1", id="order-1"), unibus.Message(b"v2", id="order-1"))
    others = [unibus.Message(b"other") for _ in range(3)]
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, [first, *others, second])
        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=2, window=1)
        written = await drain(dst, "readers")
    assert report.written == 5
    assert [(m.id, m.body) for m in written] == [
        (m.id, m.body) for m in [first, *others, second]]


async def test_a_resumed_re_read_whose_body_differs_from_the_ledger_is_published(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "orders.ckpt"
    first, later = unibus.Message(b"v1", id="order-1"), unibus.Message(b"v2", id="order-1")
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, [first])
        await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint)
        await src.publish_many(TOPIC, [later])
        report = await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint)
        written = await drain(dst, "readers")
    assert [m.body for m in written] == [b"v1", b"v2"]
    assert report.written == 2


async def test_a_migration_cut_after_the_target_confirmed_resumes_with_counted_duplicates(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "orders.ckpt"
    sent = sample(1000)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)
        saved = await migrate_until_cut(src, dst, checkpoint, batches=4, window=1)
        assert (saved["written"], len(saved["in_flight"])) == (300, 100)

        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=100, window=1,
                                      checkpoint=checkpoint, verify=True)

        received = await drain(dst, "readers")
    assert report.runs == 2
    assert (report.read, report.written, report.duplicates) == (1100, 1000, 100)
    assert report.republished == 100
    assert report.verify is not None
    assert report.verify.ok
    assert (report.verify.expected, report.verify.lost_count) == (1000, 0)
    assert (report.verify.duplicates, report.verify.received) == (100, 1100)
    assert {m.id for m in received} == {m.id for m in sent}


async def test_a_second_migration_on_a_checkpoint_in_use_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "orders.ckpt"
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(300))
        publishing = asyncio.Event()

        async def hold(messages: Sequence[unibus.Message]) -> None:
            publishing.set()
            await asyncio.Future()   # the first run is mid-batch while the second starts

        HookedMemoryAdapter.before[dst.url.host or ""] = hold
        first = asyncio.create_task(unibus.migrate(src.url, dst.url, TOPIC, batch=100,
                                                   checkpoint=checkpoint))
        await publishing.wait()
        # Its in-flight ids saved over the first run's would let a resume ack the first
        # run's unconfirmed batch unpublished.
        with pytest.raises(ValueError, match="in use by another migration"):
            await unibus.migrate(src.url, dst.url, TOPIC, batch=100, checkpoint=checkpoint)

        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        del HookedMemoryAdapter.before[dst.url.host or ""]
        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=100,
                                      checkpoint=checkpoint)   # free again
    assert (report.runs, report.written) == (2, 300)


class WindowProbe:
    """A target hook that holds each publish until ``window`` of them run at once.

    The first batch goes alone (it may create the topic on the target), so it is not
    held. If the migrator never has ``window`` batches in flight, the hold ends at a
    deadline (a guard, not a barrier) and ``peak`` says how many there were.
    """

    GUARD = 10.0

    def __init__(self, window: int) -> None:
        self.window = window
        self.active = 0
        self.peak = 0
        self.calls = 0
        self.firsts: list[str] = []
        self.full = asyncio.Event()

    async def hold(self, messages: Sequence[unibus.Message]) -> int:
        """Wait for the window to fill; return this publish's number (1, 2, ...)."""
        self.calls += 1
        number = self.calls
        self.firsts.append(messages[0].id)
        if number == 1:
            return number
        self.active += 1
        self.peak = max(self.peak, self.active)
        if self.active >= self.window:
            self.full.set()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.GUARD):
                    await self.full.wait()
        finally:
            self.active -= 1
        return number


@pytest.mark.parametrize("window", [1, 3])
async def test_up_to_window_batches_are_in_flight_at_once_and_start_in_source_order(
        window: int) -> None:
    sent = sample(1000)
    probe = WindowProbe(window)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)

        async def hold(messages: Sequence[unibus.Message]) -> None:
            await probe.hold(messages)

        HookedMemoryAdapter.before[dst.url.host or ""] = hold
        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=50, window=window)

        received = await drain(dst, "readers")
    assert probe.peak == window
    assert (report.written, report.acked) == (1000, 1000)
    # Each publish call starts with the next batch of the source, in order.
    assert probe.firsts == [m.id for m in sent[::50]]
    assert sorted(m.id for m in received) == sorted(m.id for m in sent)


async def test_a_batch_failing_mid_window_leaves_it_on_the_source_and_acks_the_confirmed(
) -> None:
    sent = sample(1000)
    probe = WindowProbe(4)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)

        async def refuse_the_second(messages: Sequence[unibus.Message]) -> None:
            if await probe.hold(messages) == 2:
                raise PublishFailed("refused (test)")

        HookedMemoryAdapter.before[dst.url.host or ""] = refuse_the_second
        with pytest.raises(unibus.MigrationFailed, match="refused") as caught:
            await unibus.migrate(src.url, dst.url, TOPIC, batch=50, window=4)

        report = caught.value.report
        written = [m.id for m in await drain(dst, "readers")]
        left = {m.id for m in await drain(src, DEFAULT_GROUP)}
    assert probe.peak == 4
    second = {m.id for m in sent[50:100]}
    assert second <= left
    assert second.isdisjoint(written)
    # The batches around it (1, 3 and 4 at least) were confirmed, so acked.
    assert {m.id for m in sent[:50] + sent[100:200]} <= set(written)
    assert report.written == report.acked == len(written)
    assert report.failed == 50
    assert left.isdisjoint(written)
    assert left | set(written) == {m.id for m in sent}


async def test_a_resume_acks_re_read_confirmed_messages_unpublished_and_republishes_in_flight(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "orders.ckpt"
    sent = sample(1000)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)
        saved = await migrate_until_cut(src, dst, checkpoint, batches=5, window=2)
        in_flight = set(saved["in_flight"])
        acked = sent[:saved["acked"]]
        # Window 2: the fifth batch went out once at most two were unconfirmed.
        assert saved["acked"] >= 300
        # A batch leaves in_flight when the checkpoint is saved just before its acks.
        assert in_flight <= {m.id for m in sent[saved["acked"]:]}
        assert len(in_flight) in (100, 200)
        # A source cursor that lags behind its acks (Kafka commits offsets every
        # commit_interval): what the killed run acked comes back.
        await src.publish_many(TOPIC, acked)

        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=100, window=2,
                                      checkpoint=checkpoint, verify=True)

        copies = Counter(m.id for m in await drain(dst, "readers"))
        assert await drain(src, DEFAULT_GROUP) == []
    assert report.duplicates == len(acked) + len(in_flight)
    assert report.republished == len(in_flight)
    assert report.written == 1000
    assert report.read == 1000 + report.duplicates
    # Each message counts once in acked, when its batch was confirmed: the copies the
    # lagging cursor gave back are acked again uncounted (they are duplicates).
    assert report.acked == report.read - report.duplicates == 1000
    assert set(copies) == {m.id for m in sent}
    assert all(copies[m.id] == 1 for m in acked)
    assert all(copies[i] <= 2 for i in in_flight)
    assert report.verify is not None
    assert report.verify.ok
    assert report.verify.duplicates == sum(copies.values()) - 1000 <= report.republished


async def test_a_run_killed_before_its_ledger_line_counts_the_in_flight_re_reads(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "orders.ckpt"
    sent = sample(600)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)
        saved = await migrate_until_cut(src, dst, checkpoint, batches=3, window=2)
        in_flight = set(saved["in_flight"])
        assert in_flight
        # A kill between the checkpoint naming a batch in flight and the ledger
        # listing it: the ledger lacks those ids.
        ledger = checkpoint.with_name(checkpoint.name + ".ledger")
        lines = ledger.read_text().splitlines()
        ledger.write_text("".join(f"{line}\n" for line in lines
                                  if json.loads(line)[0] not in in_flight))

        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=100, window=2,
                                      checkpoint=checkpoint, verify=True)
        copies = Counter(m.id for m in await drain(dst, "readers"))
    assert report.read == 600 + report.duplicates
    assert report.duplicates == report.republished == len(in_flight)
    assert set(copies) == {m.id for m in sent}
    assert report.verify is not None
    assert report.verify.ok
    assert report.verify.unexpected == 0


async def test_a_run_killed_while_acking_a_confirmed_batch_keeps_its_acked_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "orders.ckpt"
    sent = sample(300)
    acks = 0
    killed = asyncio.Event()
    ack = _MemoryDelivery.ack

    async def ack_until_the_150th(delivery: _MemoryDelivery) -> None:
        nonlocal acks
        acks += 1
        if acks == 150:
            killed.set()
            await asyncio.Future()   # the kill lands here, half-way through batch 2
        await ack(delivery)

    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)
        monkeypatch.setattr(_MemoryDelivery, "ack", ack_until_the_150th)
        first = asyncio.create_task(unibus.migrate(src.url, dst.url, TOPIC, batch=100,
                                                   window=1, checkpoint=checkpoint))
        await killed.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        monkeypatch.setattr(_MemoryDelivery, "ack", ack)
        saved = json.loads(checkpoint.read_text())
        # Batch 2 was confirmed: counted before its acks were sent.
        assert (saved["written"], saved["acked"], saved["in_flight"]) == (200, 200, [])

        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=100, window=1,
                                      checkpoint=checkpoint)
        assert await drain(src, DEFAULT_GROUP) == []
    # The 51 deliveries of batch 2 never acked come back: acked now, not counted again.
    assert report.duplicates == 51
    assert (report.written, report.acked) == (300, 300)


async def test_failed_messages_and_their_reasons_add_up_over_the_runs_of_a_checkpoint(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "orders.ckpt"
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(30))
        HookedMemoryAdapter.before[dst.url.host or ""] = down_on_publish(1)
        with pytest.raises(unibus.MigrationFailed) as caught:
            await unibus.migrate(src.url, dst.url, TOPIC, batch=10, window=1,
                                 checkpoint=checkpoint)
        del HookedMemoryAdapter.before[dst.url.host or ""]
        assert caught.value.report.failed == 10
        saved = json.loads(checkpoint.read_text())
        assert (saved["failed"], len(saved["failures"])) == (10, 1)

        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=10, window=1,
                                      checkpoint=checkpoint)
    assert (report.written, report.acked, report.runs) == (30, 30, 2)
    assert report.failed == 10
    assert report.failures == caught.value.report.failures


async def test_a_checkpoint_saved_before_failures_were_kept_resumes_with_none(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "v2.ckpt"
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(10))
        checkpoint.write_text(json.dumps({
            "source": str(src.url), "target": str(dst.url), "topic": TOPIC,
            "to_topic": TOPIC, "group": DEFAULT_GROUP, "read": 5, "written": 5,
            "acked": 5, "duplicates": 0, "republished": 0, "seconds": 0.5, "runs": 1,
            "in_flight": [], "skips_confirmed": True, "version": 2}))

        report = await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint)
    assert (report.read, report.written, report.acked) == (15, 15, 15)
    assert (report.failed, report.failures) == (0, [])
    saved = json.loads(checkpoint.read_text())
    assert (saved["failed"], saved["failures"], saved["version"]) == (0, [], 3)


async def test_a_version_1_checkpoint_resumes_and_republishes_every_re_read_message(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "old.ckpt"
    sent = sample(100)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)
        # Written by the previous format, whose ledger was appended before the
        # checkpoint named the batch in flight: its ledger proves nothing confirmed.
        checkpoint.write_text(json.dumps({
            "source": str(src.url), "target": str(dst.url), "topic": TOPIC,
            "to_topic": TOPIC, "group": DEFAULT_GROUP, "read": 100, "written": 0,
            "acked": 0, "duplicates": 0, "seconds": 0.5, "runs": 1, "in_flight": [],
            "version": 1}))
        ledger = tmp_path / "old.ckpt.ledger"
        ledger.write_text("".join(json.dumps([m.id, ""]) + "\n" for m in sent))

        report = await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint)

        assert len(await drain(dst, "readers")) == 100
    assert (report.duplicates, report.republished, report.written) == (100, 100, 100)
    saved = json.loads(checkpoint.read_text())
    assert (saved["version"], saved["skips_confirmed"]) == (3, False)


async def test_a_window_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="window must be >= 1"):
        await unibus.migrate("memory://a", "memory://b", TOPIC, window=0)


async def test_verify_reports_lost_messages_and_body_mismatches(tmp_path: Path) -> None:
    sent = sample(100)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)

        tampered = False

        async def corrupt_and_drop(messages: Sequence[unibus.Message]) -> None:
            nonlocal tampered
            if tampered:
                return
            tampered = True
            # Behind the migrator's back: drop one copy from the verify group and
            # put a different body under another id.
            async with dst.subscribe(TOPIC, group=DEFAULT_VERIFY_GROUP) as sub:
                for delivery in await sub.fetch(1, 1.0):
                    await delivery.ack()
            await dst.publish(TOPIC, b"tampered", id=sent[5].id)

        HookedMemoryAdapter.after[dst.url.host or ""] = corrupt_and_drop
        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=100,
                                      checkpoint=tmp_path / "c", verify=True)

    assert report.verify is not None
    assert not report.verify.ok
    assert report.verify.lost == [sent[0].id]
    assert report.verify.mismatched == [sent[5].id]
    # The tampered body is a mismatch, not a copy of the message with its id.
    assert report.verify.duplicates == 0


async def run_failing_on_the_second_batch(src: unibus.Bus, dst: unibus.Bus,
                                          checkpoint: Path) -> None:
    """A verified run in batches of 10 whose target refuses the second batch."""
    HookedMemoryAdapter.before[dst.url.host or ""] = down_on_publish(2)
    try:
        with pytest.raises(unibus.MigrationFailed):
            await unibus.migrate(src.url, dst.url, TOPIC, batch=10, window=1,
                                 checkpoint=checkpoint, verify=True)
    finally:
        del HookedMemoryAdapter.before[dst.url.host or ""]


async def test_verify_counts_what_the_source_still_owes_as_pending_not_lost(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    sent = sample(50)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)
        await run_failing_on_the_second_batch(src, dst, checkpoint)
        # The second batch went back to the source, in its place, its ids still in
        # flight; this run reads 5 of them and stops before the other 5.
        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=10, window=1,
                                      checkpoint=checkpoint, verify=True, limit=5)
        left = {m.id for m in await drain(src, DEFAULT_GROUP)}

    verified = report.verify
    assert verified is not None
    owed = {m.id for m in sent[15:20]}
    assert owed <= left
    assert (verified.lost_count, verified.lost) == (0, [])
    assert verified.pending_count == 5
    assert set(verified.pending) == owed
    assert verified.ok
    assert verified.to_dict()["pending"] == 5


async def test_verify_counts_lost_what_an_emptied_source_never_gave_back(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    sent = sample(20)
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sent)
        await run_failing_on_the_second_batch(src, dst, checkpoint)
        # A source that drops what it owed: the second batch is gone from it.
        assert len(await drain(src, DEFAULT_GROUP)) == 10

        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=10, window=1,
                                      checkpoint=checkpoint, verify=True)

    verified = report.verify
    assert verified is not None
    # The run found the source empty after its redelivery time: not pending, lost.
    assert (verified.pending_count, verified.lost_count, verified.ok) == (0, 10, False)
    assert set(verified.lost) == {m.id for m in sent[10:]}
    assert any("never came back" in note for note in verified.notes)


async def test_verify_passes_messages_that_share_an_id_with_different_bodies() -> None:
    first, second = (unibus.Message(b"v1", id="order-1"), unibus.Message(b"v2", id="order-1"))
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, [first, unibus.Message(b"other"), second])
        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=1, window=1,
                                      verify=True)
    assert report.verify is not None
    assert (report.verify.mismatched_count, report.verify.lost_count) == (0, 0)
    # Two messages, not a message and its copy.
    assert (report.verify.expected, report.verify.duplicates) == (3, 0)
    assert report.verify.ok


async def test_verify_reports_lost_a_reused_id_that_a_deduplicating_target_dropped(
        ) -> None:
    first, second = (unibus.Message(b"v1", id="order-1"), unibus.Message(b"v2", id="order-1"))
    async with brokers(target_options="?dedup_window=60") as (src, dst):
        await src.publish_many(TOPIC, [first, second])
        report = await unibus.migrate(src.url, dst.url, TOPIC, verify=True)
        held = await drain(dst, "readers")
    assert [m.body for m in held] == [b"v1"]
    assert report.verify is not None
    assert not report.verify.ok
    assert (report.verify.lost_count, report.verify.lost) == (1, ["order-1"])
    assert report.verify.mismatched_count == 0
    assert any("deduplicates" in note for note in report.verify.notes)


async def test_the_ledger_keeps_every_body_of_a_reused_id_across_runs(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    first, second = (unibus.Message(b"v1", id="order-1"), unibus.Message(b"v2", id="order-1"))
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, [first, second])
        await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint, verify=True)
        # A lagging cursor gives the second message back: it was confirmed, but an id
        # with two bodies is not trusted to say so, and it is published again.
        await src.publish_many(TOPIC, [second])
        report = await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint,
                                      verify=True)
        held = await drain(dst, "readers")
    assert [m.body for m in held] == [b"v1", b"v2", b"v2"]
    # Counted over both runs: the reused id in the first, the copy given back in the
    # second.
    assert (report.duplicates, report.republished) == (2, 2)
    assert report.verify is not None
    assert report.verify.ok
    assert (report.verify.expected, report.verify.mismatched_count) == (2, 0)
    assert report.verify.duplicates == 1
    ledger = checkpoint.with_name(checkpoint.name + ".ledger").read_text().splitlines()
    assert len(ledger) == 2


async def test_a_resume_publishes_every_body_of_an_id_in_flight_when_it_was_cut(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    a, b = unibus.Message(b"A", id="X"), unibus.Message(b"B", id="X")
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, [a, unibus.Message(b"f1"), unibus.Message(b"f2"), b])
        publishing = asyncio.Event()

        async def hang(messages: Sequence[unibus.Message]) -> None:
            publishing.set()
            await asyncio.Future()   # the target never takes the batch

        # One batch of all four, cut before the target wrote any: X in flight.
        HookedMemoryAdapter.before[dst.url.host or ""] = hang
        first = asyncio.create_task(unibus.migrate(src.url, dst.url, TOPIC, batch=4,
                                                   checkpoint=checkpoint, verify=True))
        await publishing.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        del HookedMemoryAdapter.before[dst.url.host or ""]
        assert "X" in json.loads(checkpoint.read_text())["in_flight"]
        # Two at a time: X/A comes back first, and X/B in a later batch, after X/A's
        # batch was confirmed — X is no longer in flight, but X/B never was written.
        report = await unibus.migrate(src.url, dst.url, TOPIC, batch=2, window=1,
                                      checkpoint=checkpoint, verify=True)
        left = await drain(src, DEFAULT_GROUP)
    assert left == []
    assert report.verify is not None
    assert (report.verify.lost_count, report.verify.ok) == (0, True)
    assert report.written == 4


async def test_progress_first_reports_where_earlier_runs_left_the_counts(
        tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    seen: list[int] = []
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(30))
        await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint, limit=20,
                             batch=10)
        await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint, batch=10,
                             progress=lambda report: seen.append(report.written))
    # Before the first batch: the 20 of the first run (a bar counts this run's from it).
    assert seen[0] == 20
    assert seen[-1] == 30


async def test_a_checkpoint_of_another_migration_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "c"
    async with brokers() as (src, dst):
        await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=checkpoint)

        with pytest.raises(ValueError, match="resume it with the same arguments"):
            await unibus.migrate(src.url, dst.url, TOPIC, to_topic="other",
                                 checkpoint=checkpoint)


async def test_follow_keeps_moving_new_messages_until_stopped() -> None:
    stop = asyncio.Event()
    async with brokers() as (src, dst):
        seen = asyncio.Event()

        def progress(report: unibus.MigrationReport) -> None:
            if report.written >= 20:
                seen.set()

        task = asyncio.create_task(unibus.migrate(src.url, dst.url, TOPIC, follow=True,
                                                  stop=stop, progress=progress))
        await src.publish_many(TOPIC, sample(10))
        await src.publish_many(TOPIC, sample(10))
        await seen.wait()
        stop.set()
        report = await task
    assert report.written == 20


async def test_rate_paces_the_migration() -> None:
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(500, size=8))
        started = time.monotonic()

        report = await unibus.migrate(src.url, dst.url, TOPIC, rate=1000, batch=100,
                                      limit=500)

        elapsed = time.monotonic() - started
    # A burst of one batch (100), then 400 more at 1000/s: at least 0.4 s.
    assert report.written == 500
    assert elapsed >= 0.4


async def test_a_stop_while_a_low_rate_paces_returns_at_once_leaving_the_rest() -> None:
    stop = asyncio.Event()
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(10, size=8))

        def progress(report: unibus.MigrationReport) -> None:
            if report.written:
                stop.set()   # as on SIGTERM, during the next batch's 10 s pacing wait

        # One message per 10 s: a stop that sat out the wait took 20 s (two batches).
        report = await asyncio.wait_for(
            unibus.migrate(src.url, dst.url, TOPIC, follow=True, rate=0.1, stop=stop,
                           progress=progress), timeout=5.0)

        assert (report.read, report.written, report.acked) == (1, 1, 1)
        assert len(await drain(src, DEFAULT_GROUP)) == 9   # back on the source, unacked


async def test_an_empty_to_topic_is_an_invalid_name_not_the_same_topic() -> None:
    async with brokers() as (src, dst):
        with pytest.raises(unibus.InvalidName):
            await unibus.migrate(src.url, dst.url, TOPIC, to_topic="")


async def test_a_migration_onto_its_own_topic_is_refused_and_to_topic_allows_it() -> None:
    async with brokers() as (src, _dst):
        await src.publish_many(TOPIC, sample(5))
        with pytest.raises(ValueError, match="same broker and topic"):
            await unibus.migrate(src.url, f"{src.url}", TOPIC)
        await src.declare_group("orders.copy", "readers")

        report = await unibus.migrate(src.url, src.url, TOPIC, to_topic="orders.copy")

        assert report.written == 5
        assert len(await drain(src, "readers", "orders.copy")) == 5


@pytest.mark.parametrize(("a", "b", "same"), [
    ("nats://h:4222", "nats://u:secret@h:4222", False),            # another account
    ("nats://u:one@h:4222", "nats://u:two@h:4222", True),          # the password aside
    ("nats://h?prefix=old", "nats://h?prefix=new", False),          # subjects of its own
    ("amqp://h/?exchange=a", "amqp://h/?exchange=b", False),
    ("amqp://h/vh1", "amqp://h/vh2", False),
    ("kafka://a:9092,b:9092", "kafka://b:9092,a:9092", True),       # hosts in any order
    ("memory://x", "memory://y", False),
])
def test_the_same_broker_is_the_same_url_but_for_the_password(a: str, b: str,
                                                               same: bool) -> None:
    assert _same_broker(make_url(a), make_url(b)) is same


async def test_a_failed_batch_goes_back_to_the_source_in_its_place() -> None:
    async with brokers() as (src, dst):
        sent = sample(50, size=8)
        await src.publish_many(TOPIC, sent)
        HookedMemoryAdapter.before[dst.url.host or ""] = down_on_publish(2)
        with pytest.raises(unibus.MigrationFailed):
            await unibus.migrate(src.url, dst.url, TOPIC, batch=10, window=1)

        # Not nacked to the back of the queue: the source reads on where it stopped.
        left = await drain(src, DEFAULT_GROUP)
        assert [m.id for m in left] == [m.id for m in sent[10:]]


async def test_a_refused_batch_fails_the_migration_before_any_verify() -> None:
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, sample(10))

        async def refuse(messages: Sequence[unibus.Message]) -> None:
            raise PublishFailed("refused (test)")

        HookedMemoryAdapter.before[dst.url.host or ""] = refuse
        with pytest.raises(unibus.MigrationFailed) as caught:
            await unibus.migrate(src.url, dst.url, TOPIC, verify=True)
    assert caught.value.report.verify is None
    assert "PublishFailed: refused (test)" in caught.value.report.failures[0]


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


@pytest.fixture
def held_pair() -> Iterator[tuple[str, str]]:
    """A source and a target memory broker kept alive between CLI invocations.

    The source declares the migrate group on ``orders.eu`` and holds 300 messages;
    the target's limit is 100 bytes and it declares ``readers``.
    """
    name = uuid.uuid4().hex
    src = unibus.connect(f"memory://src-{name}")
    dst = unibus.connect(f"memory://dst-{name}?max_message_size=100")

    async def open_them() -> None:
        await src.open()
        await dst.open()
        await src.declare_group(TOPIC, DEFAULT_GROUP)
        await dst.declare_group(TOPIC, "readers")
        await src.publish_many(TOPIC, sample(300, size=16))

    async def close_them() -> None:
        await src.aclose()
        await dst.aclose()

    asyncio.run(open_them())
    try:
        yield str(src.url), str(dst.url)
    finally:
        asyncio.run(close_them())


def test_cli_migrate_prints_a_json_report_with_verify(held_pair: tuple[str, str],
                                                      tmp_path: Path) -> None:
    source, target = held_pair
    checkpoint = tmp_path / "c.json"

    result = runner.invoke(cli, ["migrate", "--from", source, "--to", target, "--topic", TOPIC,
                                 "--batch", "64", "--checkpoint", str(checkpoint), "--verify",
                                 "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["read"], report["written"], report["acked"]) == (300, 300, 300)
    assert report["error"] is None
    assert report["verify"]["ok"] is True
    assert (report["verify"]["lost"], report["verify"]["duplicates"]) == (0, 0)
    assert (report["verify"]["pending"], report["verify"]["pending_ids"]) == (0, [])
    assert (report["duplicates"], report["republished"]) == (0, 0)
    assert json.loads(checkpoint.read_text())["in_flight"] == []


def test_cli_migrate_and_its_dry_run_exit_1_when_a_message_is_too_large(
        held_pair: tuple[str, str]) -> None:
    source, target = held_pair
    asyncio.run(_publish_one(source, b"z" * 101))
    command = ["migrate", "--from", source, "--to", target, "--topic", TOPIC]

    # A dry run first: it fails too, so `--dry-run && migrate` stops before moving.
    dry = runner.invoke(cli, [*command, "--dry-run"])
    assert dry.exit_code == 1
    assert "would refuse" in dry.stderr

    result = runner.invoke(cli, [*command, "--json"])

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["written"], report["failed"]) == (300, 1)
    assert "101 bytes" in report["error"]
    assert "101 bytes" in result.stderr


def test_cli_migrate_refuses_a_window_of_zero() -> None:
    result = runner.invoke(cli, ["migrate", "--from", "memory://a", "--to", "memory://b",
                                 "--topic", TOPIC, "--window", "0"])

    assert result.exit_code == 2
    assert "--window" in result.stderr


def test_cli_migrate_refuses_until_empty_with_follow() -> None:
    result = runner.invoke(cli, ["migrate", "--from", "memory://a", "--to", "memory://b",
                                 "--topic", TOPIC, "--until-empty", "--follow"])

    assert result.exit_code == 2
    assert "not both" in result.stderr


async def _publish_one(url: str, body: bytes) -> None:
    async with unibus.connect(url) as bus:
        await bus.publish(TOPIC, body)


def sigterm_once_started(command: list[str], checkpoint: Path) -> tuple[int, str, str]:
    """Run ``command`` (a migrate with ``--checkpoint checkpoint``); send it SIGTERM once
    its first checkpoint is written, which happens after its signal handlers are set.
    Returns its exit status, stdout and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 30
        while not checkpoint.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "the migrator never started"
            time.sleep(0.01)  # a poll interval: the file itself is the barrier
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    return process.returncode, out, err


def test_cli_migrate_follow_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    checkpoint = tmp_path / "c.json"
    code, out, err = sigterm_once_started(
        [sys.executable, "-c", "from unibus.cli import main; main()", "migrate",
         "--from", "memory://a", "--to", "memory://b", "--topic", TOPIC, "--follow",
         "--checkpoint", str(checkpoint), "--json"], checkpoint)
    assert code == 0, err
    report = json.loads(out)
    assert (report["read"], report["error"]) == (0, None)


_FILLED_MIGRATE = """
import asyncio, sys
import unibus
from unibus.cli import main

async def fill() -> unibus.Bus:
    bus = unibus.connect("memory://a")   # left open: the broker outlives this loop
    await bus.open()
    await bus.declare_group(sys.argv[1], "unibus-migrate")
    await bus.publish_many(sys.argv[1], [b"x"] * 50)
    return bus

source = asyncio.run(fill())
sys.argv = ["unibus", *sys.argv[2:]]
main()
"""


def test_cli_migrate_cut_short_by_sigterm_exits_143_and_says_so(tmp_path: Path) -> None:
    checkpoint = tmp_path / "c.json"
    # 50 messages at 1 a second: the run is far from done when the signal comes.
    code, out, err = sigterm_once_started(
        [sys.executable, "-c", _FILLED_MIGRATE, TOPIC, "migrate", "--from", "memory://a",
         "--to", "memory://b", "--topic", TOPIC, "--rate", "1", "--checkpoint",
         str(checkpoint), "--json"], checkpoint)
    assert code == 128 + signal.SIGTERM, err
    report = json.loads(out)
    assert (report["interrupted"], report["error"]) == ("SIGTERM", None)
    assert report["read"] < 50
    assert "interrupted by SIGTERM" in err


@pytest.mark.parametrize(("arguments", "code", "said"), [
    (["--rate", "inf"], 2, "finite"),
    (["--checkpoint", ""], 2, "file name"),
    (["--checkpoint", "/nonexistent-dir/c"], 1, "No such file or directory"),
])
def test_cli_migrate_refuses_bad_rates_and_checkpoint_paths_in_one_line(
        held_pair: tuple[str, str], arguments: list[str], code: int, said: str) -> None:
    source, target = held_pair
    result = runner.invoke(cli, ["migrate", "--from", source, "--to", target, "--topic", TOPIC,
                                 *arguments])
    assert result.exit_code == code
    assert said in result.stderr
    assert isinstance(result.exception, SystemExit)   # an exit, not an uncaught error


def test_cli_migrate_json_prints_an_object_when_it_fails_before_moving_anything() -> None:
    result = runner.invoke(cli, ["migrate", "--from", "memory://a", "--to", "bogus://b",
                                 "--topic", TOPIC, "--json"])
    assert result.exit_code == 1
    assert "bogus" in json.loads(result.stdout)["error"]


@pytest.mark.parametrize("stamp", [
    datetime(2026, 11, 27, 10, 54, 11, tzinfo=UTC),                 # a whole second
    datetime(2026, 11, 27, 10, 54, 11, 7, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),        # before the epoch
    datetime(2026, 1, 1, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
])
def test_the_original_timestamp_header_is_the_timestamp_in_iso_8601(stamp: datetime) -> None:
    given = Message(b"x", timestamp=stamp)
    received = Message.trusted(b"x", "id-1", None, None, given.timestamp_us)
    assert _forward(given).headers[ORIGINAL_TIMESTAMP_HEADER] == stamp.isoformat()
    assert (_forward(received).headers[ORIGINAL_TIMESTAMP_HEADER]
            == received.timestamp.isoformat())


async def test_ids_that_are_not_valid_utf_8_survive_the_checkpoint_and_ledger(
        tmp_path: Path) -> None:
    # A Kafka record id that is not UTF-8 is decoded with surrogateescape.
    odd = unibus.Message(b"x", id="id-\udcff-\udc80")
    async with brokers() as (src, dst):
        await src.publish_many(TOPIC, [odd])
        report = await unibus.migrate(src.url, dst.url, TOPIC, checkpoint=tmp_path / "c",
                                      verify=True)
        written = await drain(dst, "readers")
    assert [m.id for m in written] == [odd.id]
    assert report.verify is not None
    assert report.verify.ok
