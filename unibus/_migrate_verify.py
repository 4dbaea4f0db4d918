"""``unibus migrate --verify``: read back what was written and compare it by id and hash.

Each message is an ``(id, body hash)`` pair: messages that share an id with different
bodies are each expected on the target.

The verify group is declared on the target before the first batch, so it retains every
message written (on Kafka and JetStream a new group replays the topic anyway). Reading
it back acks as it goes and records each message in the ``FILE.verify`` ledger, so a
verification cut short by a kill resumes too.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from unibus._migrate_state import Ledger
from unibus.bus import Bus
from unibus.errors import DeliveryLost

__all__ = ["VerifyReport", "digest", "read_back"]

#: How many ids a report lists per kind of problem; the counts are always complete.
_SHOWN_IDS = 20


def digest(body: bytes) -> str:
    """The SHA-256 of ``body``, in hex: what the ledgers compare."""
    return hashlib.sha256(body).hexdigest()


@dataclass
class VerifyReport:
    """What the target holds, compared with what was read from the source.

    Attributes:
        expected: Distinct messages read from the source: pairs of id and body hash
            (messages that share an id with different bodies count apart).
        received: Messages read back from the target (copies included).
        lost: Ids of messages read from the source and not found on the target, with
            their body (at most 20 listed).
        lost_count: How many messages were lost.
        pending: Ids read from the source and not found on the target that the source
            still owes: left unconfirmed by an earlier run (its batch failed, or it was
            killed) and not read again since, they are still unacked on the source and
            a later run moves them (at most 20 listed). Not lost, so not against ``ok``.
        pending_count: How many messages are pending.
        mismatched: Ids found on the target with a body never read with them (at most
            20 listed).
        mismatched_count: How many ids had such a body.
        duplicates: Extra copies on the target of a message, same id and same body (a
            message seen 3 times counts 2).
        unexpected: Messages on the target with an id never read from the source.
        notes: Why some differences are expected: a target that deduplicates ids drops
            a later message reusing an id with another body (counted lost).
    """

    expected: int = 0
    received: int = 0
    lost: list[str] = field(default_factory=list)
    lost_count: int = 0
    pending: list[str] = field(default_factory=list)
    pending_count: int = 0
    mismatched: list[str] = field(default_factory=list)
    mismatched_count: int = 0
    duplicates: int = 0
    unexpected: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing was lost and no body differs.

        Duplicates are allowed, and so are pending messages: the source still holds
        them, and a later run of the same checkpoint verifies them.
        """
        return self.lost_count == 0 and self.mismatched_count == 0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"ok": self.ok, "expected": self.expected, "received": self.received,
                "lost": self.lost_count, "lost_ids": self.lost,
                "pending": self.pending_count, "pending_ids": self.pending,
                "mismatched": self.mismatched_count, "mismatched_ids": self.mismatched,
                "duplicates": self.duplicates, "unexpected": self.unexpected,
                "notes": self.notes}


async def read_back(dst: Bus, topic: str, group: str, batch: int,
                    expected: Mapping[str, str], ledger: Ledger,
                    pending: Collection[str] = (),
                    other_bodies: Mapping[str, AbstractSet[str]] | None = None,
                    ) -> VerifyReport:
    """Read ``group`` on ``topic`` until the target is idle; compare with ``expected``.

    Messages are compared as ``(id, body hash)`` pairs, each expected at least once:
    two messages that share an id with different bodies are two messages to find, not a
    message and a mismatched copy.

    Args:
        dst: The target bus.
        topic: The target topic.
        group: The verify group.
        batch: Messages per fetch.
        expected: Message id → body hash of everything read from the source (the
            first body read with each id).
        ledger: Where what is read back is recorded (and what was, loaded from).
        pending: Ids the source still owes (in flight when an earlier run stopped, not
            read again since): missing on the target, they are pending, not lost.
        other_bodies: Message id → hashes of the other bodies read with that id.

    Returns:
        The differences.

    Raises:
        BrokerError: The target failed.
    """
    others = other_bodies or {}
    seen: Counter[tuple[str, str]] = Counter()
    mismatched: set[str] = set()

    def check(message_id: str, body_hash: str) -> None:
        seen[message_id, body_hash] += 1
        wanted = expected.get(message_id)
        if (wanted is not None and wanted != body_hash
                and body_hash not in others.get(message_id, ())):
            mismatched.add(message_id)

    for message_id, body_hash in ledger.load():
        check(message_id, body_hash)
    idle = dst.capabilities.timings.delivery
    async with dst.subscribe(topic, group=group, prefetch=batch) as sub:
        while deliveries := await sub.fetch(batch, idle):
            entries = [(d.message.id, digest(d.message.body)) for d in deliveries]
            ledger.append(entries)
            for message_id, body_hash in entries:
                check(message_id, body_hash)
            for delivery in deliveries:
                with contextlib.suppress(DeliveryLost):
                    await delivery.ack()
    # Ids, each listed once however many of its bodies are missing; counts per message.
    lost: dict[str, None] = {}
    owed: dict[str, None] = {}
    lost_count = owed_count = 0
    reused_lost = 0
    for message_id, body_hash in _pairs(expected, others):
        if (message_id, body_hash) in seen or message_id in mismatched:
            continue   # found, or found with another body: a mismatch, not a loss
        if message_id in pending:
            owed[message_id] = None
            owed_count += 1
        else:
            lost[message_id] = None
            lost_count += 1
            reused_lost += message_id in others
    notes: list[str] = []
    window = dst.capabilities.dedup_window
    if reused_lost and window is not None:
        notes.append(f"{reused_lost} lost message(s) reuse the id of another message with "
                     f"another body: {dst.capabilities.name} deduplicates ids (within "
                     f"{window:g} s) and keeps only the first")
    return VerifyReport(
        expected=len(expected) + sum(len(hashes) for hashes in others.values()),
        received=sum(seen.values()), lost=list(lost)[:_SHOWN_IDS], lost_count=lost_count,
        pending=list(owed)[:_SHOWN_IDS], pending_count=owed_count,
        mismatched=sorted(mismatched)[:_SHOWN_IDS], mismatched_count=len(mismatched),
        duplicates=sum(c - 1 for c in seen.values() if c > 1),
        unexpected=sum(c for (i, _), c in seen.items() if i not in expected),
        notes=notes)


def _pairs(expected: Mapping[str, str],
           others: Mapping[str, AbstractSet[str]]) -> Iterator[tuple[str, str]]:
    """Every ``(id, body hash)`` read from the source, once."""
    yield from expected.items()
    for message_id, hashes in others.items():
        for body_hash in hashes:
            yield message_id, body_hash
