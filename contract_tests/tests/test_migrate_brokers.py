"""``unibus migrate`` between real brokers: nothing lost across a SIGKILL and a resume.

For RabbitMQ → Kafka, Kafka → NATS and NATS → RabbitMQ, the ``unibus migrate`` CLI
runs in a subprocess over 20,000 messages (binary bodies, unicode keys and headers),
is SIGKILLed once the checkpoint shows a quarter of them acked, and is run again with
the same checkpoint; its ``--verify`` must show 0 lost, no body mismatch, and no more
duplicates on the target than the migrator counted as republished — at most
``window`` x ``batch``, however many messages the source delivered again.

``memory://`` lives inside one process, so memory → each broker runs in-process
through :func:`unibus.migrate`, and checks every field of every message on the target.

Every wait derives from a declared timing or the migrator's own report; the kill point
is read from the checkpoint file, which the migrator replaces atomically.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import unibus
from unibus.migrate import DEFAULT_GROUP, ORIGINAL_TIMESTAMP_HEADER
from unibus_contract.broker_fixtures import new_topic_name
from unibus_contract.provision import Broker

pytestmark = pytest.mark.broker

COUNT = 20_000
BATCH = 250
WINDOW = 4
#: The kill lands once this many messages are acked on the source.
KILL_AFTER = COUNT // 4
#: The first run is paced so that the kill lands in the middle, not after the end.
FIRST_RUN_RATE = 5_000
#: The most messages a resumed run may read again: the batches in flight plus acks the
#: source client had not sent yet (allowed: one window more). A Kafka source re-reads
#: what its group had not committed, and its commits lag: in these runs the resumed
#: migration re-read everything the killed one had read (an open question for the
#: Kafka adapter), so there the bound is what the killed run read. What the target
#: may hold twice is bounded by the window either way (``republished``).
RE_READ_BOUND = {"rabbitmq": 2 * WINDOW * BATCH, "nats": 2 * WINDOW * BATCH}
#: Test-friendly timings: a dead Kafka member leaves its group after 2 s, an unacked
#: JetStream message returns after 2 s (as in the contract suite).
URL_OPTIONS = {"rabbitmq": "", "kafka": "?session_timeout=2",
               "nats": "?ack_wait=2&heartbeat=0.5"}


def url_of(request: pytest.FixtureRequest, name: str) -> str:
    broker: Broker = request.getfixturevalue(f"{name}_broker")
    return broker.url + URL_OPTIONS[name]


def sample(count: int) -> list[unibus.Message]:
    """Binary bodies (every byte value), unicode keys and headers, fixed timestamps."""
    return [unibus.Message(os.urandom(24) + bytes(range(n % 256))[:40] + n.to_bytes(4, "big"),
                           key=f"clé-{n % 13}-ключ",
                           headers={"région": "Île-de-France ✓", "n": str(n), "emoji": "🚚"},
                           timestamp=datetime(2024, 1, 2, 3, 4, 5, n % 1_000_000, tzinfo=UTC))
            for n in range(count)]


async def fill(url: str, topic: str, messages: list[unibus.Message]) -> None:
    async with unibus.connect(url) as bus:
        # RabbitMQ keeps messages only for groups that exist when they are published.
        await bus.declare_group(topic, DEFAULT_GROUP)
        for first in range(0, len(messages), 1000):
            await bus.publish_many(topic, messages[first:first + 1000])


def migrate_command(source: str, target: str, topic: str, checkpoint: Path,
                    *extra: str) -> list[str]:
    return [sys.executable, "-c", "from unibus.cli import main; main()", "migrate",
            "--from", source, "--to", target, "--topic", topic, "--batch", str(BATCH),
            "--window", str(WINDOW),
            "--checkpoint", str(checkpoint), "--verify", "--json", *extra]


def wait_for_checkpoint(checkpoint: Path, process: subprocess.Popen[bytes],
                        done: Callable[[dict[str, Any]], bool],
                        deadline: float) -> dict[str, Any]:
    """Poll the (atomically replaced) checkpoint until ``done`` holds for it."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the migrator exited early ({process.returncode}): "
                        f"{process.stderr.read().decode() if process.stderr else ''}")
        try:
            state: dict[str, Any] = json.loads(checkpoint.read_text())
        except FileNotFoundError:
            state = {}
        if state and done(state):
            return state
        time.sleep(0.005)  # a poll interval: the condition itself is the barrier
    pytest.fail(f"the checkpoint did not reach the kill point in time: {checkpoint}")


PAIRS = [("rabbitmq", "kafka"), ("kafka", "nats"), ("nats", "rabbitmq")]


@pytest.mark.parametrize(("source_name", "target_name"), PAIRS,
                         ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_a_sigkilled_migration_resumes_with_nothing_lost_and_duplicates_counted(
        request: pytest.FixtureRequest, tmp_path: Path, source_name: str,
        target_name: str) -> None:
    source, target = url_of(request, source_name), url_of(request, target_name)
    topic = new_topic_name("migrate")
    checkpoint = tmp_path / "migrate.ckpt"
    asyncio.run(fill(source, topic, sample(COUNT)))

    first = subprocess.Popen(
        migrate_command(source, target, topic, checkpoint, "--rate", str(FIRST_RUN_RATE)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Preferably while a batch is in flight (ledgered, maybe published, not acked).
        at_kill = wait_for_checkpoint(
            checkpoint, first,
            lambda s: (s["acked"] >= KILL_AFTER and bool(s["in_flight"]))
            or s["acked"] >= 3 * KILL_AFTER, time.monotonic() + 40)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert at_kill["acked"] < COUNT
    # What the kill left: the checkpoint is replaced atomically, so it is whole.
    killed = json.loads(checkpoint.read_text())

    started = time.monotonic()
    second = subprocess.run(migrate_command(source, target, topic, checkpoint),
                            capture_output=True, timeout=90, check=False)
    elapsed = time.monotonic() - started

    assert second.returncode == 0, second.stderr.decode()
    report = json.loads(second.stdout)
    verify = report["verify"]
    second_rate = ((report["written"] - at_kill["written"])
                   / max(report["seconds"] - at_kill["seconds"], 1e-9))
    print(f"\n{source_name} → {target_name}: second run {elapsed:.1f} s, "
          f"{second_rate:,.0f} msgs/s while moving, "
          f"killed with {len(at_kill['in_flight'])} in flight, re-read "
          f"{report['duplicates']}, republished {report['republished']}, "
          f"duplicates on the target {verify['duplicates']}")
    assert report["runs"] == 2
    assert report["failed"] == 0
    assert verify["ok"] is True
    assert (verify["expected"], verify["lost"], verify["mismatched"]) == (COUNT, 0, 0)
    assert verify["pending"] == 0   # nothing still owed by the source either
    assert verify["unexpected"] == 0
    assert verify["received"] == COUNT + verify["duplicates"]
    # Every extra copy on the target is a message the migrator republished and counted,
    # and it republishes only what was in flight at the kill: at most the window.
    assert verify["duplicates"] <= report["republished"] <= report["duplicates"]
    assert report["republished"] <= len(killed["in_flight"]) <= WINDOW * BATCH
    assert report["read"] == COUNT + report["duplicates"]
    assert report["duplicates"] <= RE_READ_BOUND.get(source_name, at_kill["read"])
    assert "guest:guest" not in second.stdout.decode()


@pytest.mark.parametrize("target_name", ["rabbitmq", "kafka", "nats"])
async def test_memory_to_a_broker_keeps_every_field_of_every_message(
        request: pytest.FixtureRequest, target_name: str) -> None:
    target = url_of(request, target_name)
    topic = new_topic_name("migrate")
    sent = sample(COUNT)
    async with unibus.connect(f"memory://migrate-{uuid.uuid4().hex}") as src:
        await src.declare_group(topic, DEFAULT_GROUP)
        await src.publish_many(topic, sent)

        report = await unibus.migrate(src.url, target, topic, verify=True,
                                      declare_groups=["readers"])

    print(f"\nmemory → {target_name}: {report.rate:,.0f} msgs/s over {report.seconds:.1f} s")
    assert (report.read, report.written, report.acked, report.failed) == (COUNT,) * 3 + (0,)
    assert report.verify is not None
    assert report.verify.ok
    assert (report.verify.lost_count, report.verify.duplicates) == (0, 0)
    by_id = {m.id: m for m in sent}
    async with unibus.connect(target) as dst, dst.subscribe(topic, group="readers",
                                                            prefetch=1000) as sub:
        received = 0
        idle = dst.capabilities.timings.delivery
        while batch := await sub.fetch(1000, idle):
            for delivery in batch:
                original = by_id[delivery.id]
                assert (delivery.body, delivery.key) == (original.body, original.key)
                assert dict(delivery.headers) == {
                    **original.headers,
                    ORIGINAL_TIMESTAMP_HEADER: original.timestamp.isoformat()}
                await delivery.ack()
            received += len(batch)
    assert received == COUNT
