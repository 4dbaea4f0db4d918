"""What ``unibus migrate`` keeps between runs: the checkpoint, the ledgers, the rate.

A checkpoint ``FILE`` is a small JSON document replaced atomically (write a temporary
file, then rename) before every batch is published and after every batch is
confirmed. It holds the cumulative counts (``failed`` and the latest
:data:`KEPT_FAILURES` reasons included) and ``in_flight``: the ids of every batch
published and not yet confirmed by the target (and of those still expected back from a
previous run). The save that takes a confirmed batch out of ``in_flight`` also counts
it in ``acked``, before its acks are sent: a kill in between cannot lose the count.
Beside it, two append-only ledgers of JSON lines ``[id, sha256-of-body]``:

- ``FILE.ledger``: every message read from the source, appended before its batch is
  published and after the checkpoint named the batch in flight. So a message the
  target may hold is always in the ledger, and one in the ledger but not in
  ``in_flight`` is one the target confirmed: read again, it is acked, not published;
- ``FILE.verify``: every message read back from the target's verify group.

Appends are flushed per batch, so they survive the process being killed at any point
(SIGKILL); a line cut short by the kill is ignored on load. The source group is the
durable cursor: the checkpoint makes the counts, the duplicate bound and ``--verify``
survive a restart.

Version 1 files (written before batches were pipelined, when the ledger was appended
before the checkpoint was saved) are still resumed, but re-read messages of such a
migration are always published again (``skips_confirmed`` false): its ledger may list
ids of a batch the checkpoint does not name in flight. Version 2 files lack ``failed``
and ``failures`` (resumed as none) and counted ``acked`` after the acks, so their
``acked`` may miss a batch a kill cut short. Version 3 is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

if sys.platform != "win32":
    import fcntl

__all__ = ["KEPT_FAILURES", "Checkpoint", "CheckpointState", "Ledger", "TokenBucket"]

_VERSION = 3
#: Versions this code resumes; a version 1 migration never skips re-read ids.
_READABLE = (1, 2, 3)
#: The failure reasons a checkpoint keeps (the latest); ``failed`` counts them all.
KEPT_FAILURES = 20


@dataclass
class CheckpointState:
    """The JSON content of a checkpoint file."""

    source: str
    target: str
    topic: str
    to_topic: str
    group: str
    read: int = 0
    written: int = 0
    acked: int = 0
    duplicates: int = 0
    republished: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    runs: int = 0
    in_flight: list[str] = field(default_factory=list)
    #: Whether a re-read id in the ledger and not ``in_flight`` is acked unpublished.
    skips_confirmed: bool = True
    version: int = _VERSION

    def identity(self) -> tuple[str, str, str, str, str]:
        """What must match for a checkpoint to be resumed."""
        return (self.source, self.target, self.topic, self.to_topic, self.group)


class Checkpoint:
    """A checkpoint file, rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._temporary = path.with_name(path.name + ".tmp")
        self._held: IO[bytes] | None = None

    def lock(self) -> None:
        """Hold the checkpoint for this run (``FILE.lock`` beside it, locked exclusively).

        Two runs on one checkpoint would each save their own in-flight ids over the
        other's, and a resume would then take the other's unconfirmed messages for
        confirmed ones — and ack them unpublished. The lock is the kernel's
        (``flock``): a killed run's goes with its process.

        Raises:
            ValueError: Another run holds it.
        """
        if sys.platform == "win32":
            return   # no flock here: one run at a time is on you
        handle = open(self.path.with_name(self.path.name + ".lock"), "ab")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ValueError(f"{self.path} is in use by another migration that is still "
                             "running; wait for it to end, or give another --checkpoint "
                             "file") from None
        self._held = handle

    def unlock(self) -> None:
        """Let the checkpoint go (idempotent)."""
        held, self._held = self._held, None
        if held is not None:
            held.close()   # closing the file releases the lock

    def load(self) -> CheckpointState | None:
        """Return the saved state, or ``None`` when the file does not exist.

        Raises:
            ValueError: The file is not a unibus migrate checkpoint.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data: dict[str, Any] = json.loads(text)
            version = data.get("version")
            if version not in _READABLE:
                raise ValueError(f"version {version!r}; this unibus reads versions "
                                 f"{', '.join(map(str, _READABLE))}")
            if version == 1:
                data.update(skips_confirmed=False)
            # Fields an older version lacks take their defaults (none failed).
            data.update(version=_VERSION)
            return CheckpointState(**data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.path} is not a unibus migrate checkpoint ({exc}); "
                             "give another --checkpoint file") from exc

    def save(self, state: CheckpointState) -> None:
        """Replace the file with ``state``: a reader sees the old or the new, never half."""
        # ASCII escapes: an id decoded with surrogateescape (a Kafka id that is not UTF-8)
        # holds lone surrogates, which no UTF-8 file can hold as they are.
        self._write(json.dumps(asdict(state), ensure_ascii=True), durable=False)

    async def save_durably(self, state: CheckpointState) -> None:
        """:meth:`save`, on disk before this returns (a power loss keeps it).

        The write and its fsyncs run on a worker thread; ``state`` is serialized first.
        Cancelled, it still waits for the write to end before raising.
        """
        text = json.dumps(asdict(state), ensure_ascii=True)
        writing = asyncio.ensure_future(asyncio.to_thread(self._write, text, durable=True))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            # The thread cannot be stopped: let it finish, so that no late write of a
            # cancelled run replaces what a later run saves.
            await writing
            raise

    def _write(self, text: str, *, durable: bool) -> None:
        with self._temporary.open("w", encoding="utf-8") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(self._temporary, self.path)
        if durable:
            # The rename itself is durable once the directory is synced.
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


class Ledger:
    """An append-only file of ``[id, sha256]`` JSON lines, or memory only without a path."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._out: IO[str] | None = None

    def load(self) -> Iterator[tuple[str, str]]:
        """Yield the recorded ``(id, sha256)`` pairs; a torn last line is skipped."""
        if self.path is None or not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.endswith("\n"):
                    return  # cut short by a kill: that batch was never published
                try:
                    message_id, digest = json.loads(line)
                except ValueError:
                    continue
                yield str(message_id), str(digest)

    def append(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record ``entries`` and flush them to the operating system."""
        if self.path is None:
            return
        if self._out is None:
            self._out = self.path.open("a", encoding="utf-8")
        # ASCII escapes, as in the checkpoint: ids may hold lone surrogates.
        self._out.write("".join(json.dumps(entry, ensure_ascii=True) + "\n"
                                for entry in entries))
        self._out.flush()

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._out is not None:
            self._out.close()
            self._out = None


class TokenBucket:
    """Admit at most ``rate`` messages per second, a batch at a time.

    The burst is one batch (and at most one second's worth), so that the pace holds
    from the second batch on rather than after a second of full speed.
    """

    def __init__(self, rate: float, batch: int) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number > 0 of messages per second, "
                             f"got {rate}")
        self.rate = rate
        #: The batch size the bucket admits: ``batch``, capped at one second's worth.
        self.batch = max(1, min(batch, int(rate)))
        self._tokens = float(self.batch)
        self._last = time.monotonic()

    async def take(self, count: int, stop: asyncio.Event) -> bool:
        """Wait until ``count`` messages may pass and take them; ``False`` if ``stop``
        was set first (a low rate's wait can be long: a stop must not sit it out)."""
        now = time.monotonic()
        self._tokens = min(self.batch, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= count
        if self._tokens < 0 and not stop.is_set():
            # Pacing, not a barrier: the debt is paid back at the configured rate.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), -self._tokens / self.rate)
        return not stop.is_set()
