"""``unibus migrate --verify``: read back what was written and compare it by id and hash.

The verify group is declared on the target before the first batch, so it retains every
message written (on Kafka and JetStream a new group replays the topic anyway). Reading
it back acks as it goes and records each message in the ``FILE.verify`` ledger, so a
verification cut short by a kill resumes too.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Collection, Mapping
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
        expected: Distinct message ids read from the source.
        received: Messages read back from the target (copies included).
        lost: Ids read from the source and not found on the target (at most 20 listed).
        lost_count: How many ids were lost.
        pending: Ids read from the source and not found on the target that the source
            still owes: left unconfirmed by an earlier run (its batch failed, or it was
            killed) and not read again since, they are still unacked on the source and
            a later run moves them (at most 20 listed). Not lost, so not against ``ok``.
        pending_count: How many ids are pending.
        mismatched: Ids whose body on the target differs (at most 20 listed).
        mismatched_count: How many ids had a different body.
        duplicates: Extra copies on the target (a message seen 3 times counts 2).
        unexpected: Messages on the target with an id never read from the source.
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
                "duplicates": self.duplicates, "unexpected": self.unexpected}



async def read_back(dst: Bus, topic: str, group: str, batch: int,
                    expected: Mapping[str, str], ledger: Ledger,
                    pending: Collection[str] = ()) -> VerifyReport:
    """Read ``group`` on ``topic`` until the target is idle; compare with ``expected``.

    Args:
        dst: The target bus.
        topic: The target topic.
        group: The verify group.
        batch: Messages per fetch.
        expected: Message id → body hash of everything read from the source.
        ledger: Where what is read back is recorded (and what was, loaded from).
        pending: Ids the source still owes (in flight when an earlier run stopped, not
            read again since): missing on the target, they are pending, not lost.

    Returns:
        The differences.

    Raises:
        BrokerError: The target failed.
    """
    seen: Counter[str] = Counter()
    mismatched: set[str] = set()

    def check(message_id: str, body_hash: str) -> None:
        seen[message_id] += 1
        wanted = expected.get(message_id)
        if wanted is not None and wanted != body_hash:
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
    lost: list[str] = []
    owed: list[str] = []
    for message_id in expected:
        if message_id not in seen:
            (owed if message_id in pending else lost).append(message_id)
    return VerifyReport(
        expected=len(expected), received=sum(seen.values()), lost=lost[:_SHOWN_IDS],
        lost_count=len(lost), pending=owed[:_SHOWN_IDS], pending_count=len(owed),
        mismatched=sorted(mismatched)[:_SHOWN_IDS],
        mismatched_count=len(mismatched),
        duplicates=sum(c - 1 for c in seen.values() if c > 1),
        unexpected=sum(c for i, c in seen.items() if i not in expected))
