"""Offset bookkeeping: commit only up to the highest contiguous settled offset.

Kafka remembers one position per partition and group, so a message may only be
"committed" once it and every message before it in its partition is settled.
Each assigned partition has a :class:`PartitionState`. The event loop appends to
two logs, with a list's own ``append`` and no Python frame per record: the offsets
handed out (``fetched``) and the offsets settled (``settled``). Whoever drives the
consumer (see :mod:`unibus_kafka._poller`) calls :meth:`PartitionState.advance`
before it commits: that folds the settled log into ``commit_to`` — in bulk, with
one slice comparison when messages were settled in the order they came (the usual
case), offset by offset otherwise. The driving side also writes ``committed`` and
``revoked`` (a flag set once, when the partition is taken away; the loop sets it
too when its consumer closes).

The loop only ever appends to the two logs; ``advance`` only removes from their
fronts what it has read, under the driver's lock. Each list operation is atomic
under the GIL, so the two sides need no lock between them.

The same state counts what a subscription's prefetch needs: the deliveries handed
out (``handed``, added per batch) less those settled (``open``), with no counter
touched per settlement. ``alert`` is the one flag a settlement reads before it takes
the short way (see the attribute).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PartitionState"]

# Offsets past the commit point are dropped from the front of the fetched log once
# there are this many and they are more than half of it.
_COMPACT = 4096


def _untracked(offset: int) -> None:
    """An offset nobody will commit: not logged."""


class PartitionState:
    """One assigned partition, from its assignment to its revocation.

    Attributes:
        topic: The topic.
        partition: The partition number.
        plain: Whether this is a partition of a subscribed topic itself (not of a lane):
            its records are delivered as they come, first attempt, never held.
        revoked: Set when the partition was revoked or lost, or its consumer closed;
            its deliveries can no longer be settled, and a new assignment gets a new
            state.
        commit_to: The offset to commit (the next one to read), or -1 for none yet;
            current as of the last :meth:`advance`.
        committed: The last offset sent in a commit, or -1.
        alert: Set while a settlement must take the slow way: the partition was
            revoked, or a fetch waits for room in the prefetch (the settlement wakes
            it). Writers set ``revoked`` before ``alert``; the loop clears ``alert``
            before it reads ``revoked`` (see :meth:`calm`).
        handed: How many of its deliveries the event loop handed out (it alone writes
            this); :meth:`open` subtracts those settled since.
        fetched: Record an offset handed out (offsets come in increasing order); does
            nothing for a partition whose offsets are never committed (an ephemeral
            subscription's).
        settled: Record a settled offset (each handed-out offset at most once).
    """

    __slots__ = (
        "_acked",
        "_ahead",
        "_folded",
        "_head",
        "_log",
        "_tracked",
        "alert",
        "commit_to",
        "committed",
        "fetched",
        "handed",
        "partition",
        "plain",
        "revoked",
        "settled",
        "topic",
    )

    def __init__(self, topic: str, partition: int, *, plain: bool = True,
                 tracked: bool = True) -> None:
        self.topic = topic
        self.partition = partition
        self.plain = plain
        self.revoked = False
        self.alert = False
        self.handed = 0
        # Settled offsets taken off the front of _acked (by advance, or by open for a
        # partition nobody commits).
        self._folded = 0
        self._tracked = tracked
        self.commit_to = -1
        self.committed = -1
        # Offsets handed out, in order; those before _head are behind the commit point.
        self._log: list[int] = []
        self._head = 0
        # Offsets settled since the last advance, in the order they were settled.
        self._acked: list[int] = []
        # Offsets settled ahead of an unsettled one (folded in, not yet committable).
        self._ahead: set[int] = set()
        self.fetched: Callable[[int], None] = self._log.append if tracked else _untracked
        self.settled: Callable[[int], None] = self._acked.append

    def __repr__(self) -> str:
        return (f"<PartitionState {self.topic}[{self.partition}] commit_to={self.commit_to} "
                f"unsettled={self.unsettled}{' revoked' if self.revoked else ''}>")

    def open(self) -> int:
        """How many of its deliveries are handed out and not settled (event loop).

        Read while ``advance`` may run on another thread: that removes offsets from
        the settled log before it counts them folded, so a read in between counts
        too many open, never too few (a prefetch is then briefly stricter, and the
        poller wakes a fetch waiting for room after every fold).
        """
        acked = self._acked
        if not self._tracked and acked:
            # Nobody commits this partition, so nobody folds its log: done here.
            self._folded += len(acked)
            acked.clear()
        return self.handed - self._folded - len(acked)

    def calm(self) -> None:
        """Clear ``alert`` unless the partition is revoked (event loop; see ``alert``)."""
        self.alert = False
        if self.revoked:   # read after the write: a revocation racing this keeps it set
            self.alert = True

    def revoke(self) -> None:
        """Mark the partition revoked (``revoked``, then ``alert``)."""
        self.revoked = True
        self.alert = True

    @property
    def unsettled(self) -> int:
        """How many fetched offsets are not settled yet (for a partition nobody
        commits, how many deliveries are open)."""
        if not self._tracked:
            return self.open()
        return len(self._log) - self._head - len(self._ahead) - len(self._acked)

    def advance(self) -> None:
        """Fold the offsets settled since the last call into ``commit_to`` (nothing for
        a partition nobody commits)."""
        if not self._tracked:
            return
        acked = self._acked
        count = len(acked)
        if not count:
            return
        log, head = self._log, self._head
        batch = acked[:count]
        if not self._ahead and log[head:head + count] == batch:
            head += count   # settled in the order they came: all of them are committable
        else:
            end = len(log)
            # An offset before the first unsettled one is behind the commit point
            # already (a stale duplicate): it is dropped.
            floor = log[head] if head < end else self.commit_to
            ahead = self._ahead
            ahead.update(offset for offset in batch if offset >= floor)
            while head < end and log[head] in ahead:
                ahead.discard(log[head])
                head += 1
        del acked[:count]
        self._folded += count   # after the removal: see open
        if head != self._head:
            self.commit_to = log[head - 1] + 1
            if head >= _COMPACT and 2 * head > len(log):
                del log[:head]
                head = 0
            self._head = head

    @property
    def dirty(self) -> bool:
        """Whether ``commit_to`` moved past what was last sent in a commit."""
        return self.commit_to > self.committed
