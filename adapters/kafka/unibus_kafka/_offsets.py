"""Offset bookkeeping: commit only up to the highest contiguous settled offset.

Kafka remembers one position per partition and group, so a message may only be
"committed" once it and every message before it in its partition is settled.
Each assigned partition has a :class:`PartitionState`: the offsets fetched and not
yet settled, in order, the offsets settled ahead of a gap, and the next offset to
commit. The event loop records fetches and settlements and so advances
``commit_to``; whoever drives the consumer (see :mod:`unibus_kafka._poller`) reads
``commit_to`` for its commits and writes ``committed`` and ``revoked`` (a flag set
once, when the partition is taken away).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["PartitionState"]


class PartitionState:
    """One assigned partition, from its assignment to its revocation.

    Attributes:
        topic: The topic.
        partition: The partition number.
        plain: Whether this is a partition of a subscribed topic itself (not of a lane):
            its records are delivered as they come, first attempt, never held.
        revoked: Set when the partition was revoked or lost; its deliveries can no
            longer be settled, and a new assignment gets a new state.
        commit_to: The offset to commit (the next one to read), or -1 for none yet.
        committed: The last offset sent in a commit, or -1.
    """

    __slots__ = ("_pending", "_settled", "commit_to", "committed", "fetched", "partition",
                 "plain", "revoked", "topic")

    def __init__(self, topic: str, partition: int, *, plain: bool = True) -> None:
        self.topic = topic
        self.partition = partition
        self.plain = plain
        self.revoked = False
        self.commit_to = -1
        self.committed = -1
        self._pending: deque[int] = deque()
        self._settled: set[int] = set()
        # Record an offset handed to unibus (offsets arrive in increasing order): the
        # deque's own append, called once per record without a Python frame.
        self.fetched: Callable[[int], None] = self._pending.append

    def __repr__(self) -> str:
        return (f"<PartitionState {self.topic}[{self.partition}] commit_to={self.commit_to} "
                f"unsettled={len(self._pending)}{' revoked' if self.revoked else ''}>")

    @property
    def unsettled(self) -> int:
        """How many fetched offsets are not settled yet."""
        return len(self._pending) - len(self._settled)

    def settle(self, offset: int) -> None:
        """Record a settled offset and advance ``commit_to`` over the contiguous prefix."""
        pending = self._pending
        if not pending or offset < pending[0]:
            return   # already committed past it (a duplicate settlement)
        if offset != pending[0]:
            self._settled.add(offset)
            return
        pending.popleft()
        last = offset
        settled = self._settled
        while pending and pending[0] in settled:
            last = pending.popleft()
            settled.discard(last)
        self.commit_to = last + 1

    @property
    def dirty(self) -> bool:
        """Whether ``commit_to`` moved past what was last sent in a commit."""
        return self.commit_to > self.committed
