"""The driver's consumer, and the thread that waits on it while the event loop cannot.

One confluent-kafka consumer per subscription. Whoever holds :attr:`Poller.driving`
calls it: the event loop itself while it is busy (``drain`` takes exactly the
records it has room for, without waiting, one driver call per fetch), and the
helper thread while the loop waits for records (``poll`` blocks there, never on the
loop). Each batch is appended to :attr:`Poller.inbox` as the driver gave it, with a
copy of the partitions' bookkeeping (:class:`~unibus_kafka._offsets.PartitionState`)
as of that moment, so that a partition revoked and assigned again never binds
records taken before to its new state; the lock keeps the batches in order whichever
side took them. While the loop has no room, nobody takes
records: they stay in librdkafka's bounded queue (pausing partitions would purge it
and refetch), and the thread serves the driver every ``_SERVE`` seconds so that the
group's rebalances and ``max.poll.interval.ms`` are honoured.

Why not the thread alone: every hand-over of the GIL between it and a busy event
loop costs up to a switch interval, and the records it piled up ahead of the loop
were live Python objects every garbage collection walked. Draining on the loop cost
~1.3 µs of CPU per record, in C, on a loop that asked for them.

- **Commits** go up to the highest contiguous settled offset of each partition,
  every ``commit_interval`` (asynchronously, from either side), synchronously on
  revocation when the thread serves it, and on close. The loop only logs
  settlements; each commit first folds the log into ``commit_to``
  (``PartitionState.advance``), under ``driving``.
- **Revocation** commits what is settled, then marks the partition's state revoked:
  the loop drops its undelivered records, and its unsettled deliveries raise
  ``DeliveryLost`` when settled (the new owner gets them). The rebalance callback
  runs on whichever side called the driver; on the event loop the commit is sent
  asynchronously rather than awaited (the loop must not block). That is enough:
  librdkafka queues the commit on the group's op queue ahead of the unassignment
  that follows the callback, and completes the unassignment (so rejoins, or
  acknowledges the revocation under KIP-848) only once no commit is outstanding
  (``rd_kafka_assignment_serve`` waits for ``wait_commit_cnt`` to drop to 0), so the
  partition's next owner reads it. The states are marked revoked before the commit:
  a settlement from then on raises ``DeliveryLost`` (one that read the flag just
  before may be logged too late for the commit: a duplicate for the next owner,
  never a loss). Lost partitions (the group
  moved on without us) are dropped without a commit.
- **Thread safety**: the driver, ``_parts`` and the inbox's producers are used under
  ``driving`` only. The loop only appends to a ``PartitionState``'s two logs and
  writes its ``handed`` count and (while a fetch waits for room) its ``alert`` flag;
  ``advance``, ``commit_to`` and ``committed`` are written under the lock only, and
  ``revoked`` under the lock too, but for the consumer's close (a flag that only ever
  goes from false to true).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from unibus.errors import BrokerError, BrokerUnavailable, UnibusError
from unibus_kafka._errors import DriverLog, Scrubber, map_errors, to_unibus
from unibus_kafka._offsets import PartitionState

if TYPE_CHECKING:
    from unibus_kafka._producer import Producer
    from unibus_kafka._url import Settings

__all__ = ["Poller"]

log = logging.getLogger("unibus.kafka")

_POLL = 0.1
_BATCH = 2000
_SERVE = 0.5
_AUTH_CODES = frozenset({-169, 58, 33, 34})
# Unknown topic or partition, leader not available, not leader, unknown partition (local).
_METADATA_LAG = frozenset({3, 5, 6, -190, -188})


class Poller:
    """The thread side of one subscription's consumer (see the module docstring).

    Attributes:
        inbox: Batches of raw records as the driver gave them, each with the
            partitions' states when it was taken, for the event loop.
        driving: Held by whichever side calls the driver's consumer.
        hungry: Set by the event loop while it waits for records with room for them;
            only then does the thread take records (as many as there is room for).
        revocations: How many times partitions were taken away (loop or thread).
        failure: Set when the consumer failed for good (refused credentials, fatal).
    """

    def __init__(self, *, settings: Settings, scrub: Scrubber, group: str | None,
                 lanes: Sequence[str], waiting: Callable[[], bool], wake: Callable[[], None],
                 forget_revoked: Callable[[], None]) -> None:
        self._settings = settings
        self._scrub = scrub
        self._group = group
        self._lanes = frozenset(lanes)
        self._waiting = waiting          # whether a fetch waits (read from the thread)
        self._wake = wake                # run on the loop: wakes a waiting fetch
        self._forget_revoked = forget_revoked
        self._loop = asyncio.get_running_loop()
        self.inbox: deque[tuple[dict[tuple[str, int], PartitionState], list[Any]]] = deque()
        self.driving = threading.Lock()
        self.hungry = False
        self.revocations = 0
        self._wanted = threading.Event()
        self._loop_thread = threading.get_ident()
        self._last_served = 0.0
        self._room = _BATCH
        self._shut = False
        self._joined = group is None   # a group's first assignment came
        self.failure: UnibusError | None = None
        self._kc: Any = None
        self._parts: dict[tuple[str, int], PartitionState] = {}
        self._last_commit = 0.0
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._assigned: asyncio.Future[None] = self._loop.create_future()
        self._stopped: asyncio.Future[None] = self._loop.create_future()

    async def start(self, topics: Sequence[str], producer: Producer) -> None:
        """Join the group (or assign every partition at its end) and start the thread.

        ``topics`` are the subscribed topics; their lanes (given to the constructor)
        are read along with them.

        Returns once partitions are assigned and positions fixed, so that the consumer
        receives from the moment this returns.

        Raises:
            BrokerError: The broker refused.
        """
        from confluent_kafka import Consumer as DriverConsumer
        from confluent_kafka import TopicPartition

        settings = self._settings
        ephemeral = self._group is None
        group_id = self._group or f"unibus-ephemeral-{id(self):x}-{time.time_ns():x}"
        config = {**settings.consumer(group_id, reset="latest" if ephemeral else "earliest"),
                  "error_cb": self.on_error, "on_commit": self._on_commit,
                  "logger": DriverLog(self._scrub)}
        with map_errors("creating the Kafka consumer", self._scrub):
            self._kc = DriverConsumer(config)
        if ephemeral:
            # Fix every partition's position at the current end before returning, so
            # that this subscription sees exactly what is published from now on.
            assignment = []
            for topic in [*topics, *self._lanes]:
                for partition in await producer.partitions(topic):
                    tp = TopicPartition(topic, partition)
                    low_high = await asyncio.to_thread(self._watermarks, tp)
                    assignment.append(TopicPartition(topic, partition, low_high[1]))
                    self._parts[(topic, partition)] = self._state(topic, partition)
            with map_errors("assigning partitions", self._scrub):
                self._kc.assign(assignment)
            self._assigned.set_result(None)
        else:
            names = [*topics, *self._lanes]
            with map_errors(f"subscribing to {names}", self._scrub):
                self._kc.subscribe(names, on_assign=self._on_assign,
                                   on_revoke=self._on_revoke, on_lost=self._on_lost)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"unibus-kafka-consumer-{self._group or '~'}")
        self._thread.start()
        if not ephemeral:
            # The group retains messages either way; waiting for the first assignment
            # only makes "receiving when this returns" literal.
            wait = settings.session_timeout + settings.connect_timeout + 5.0
            try:
                await asyncio.wait_for(asyncio.shield(self._assigned), wait)
            except TimeoutError:
                log.warning("consumer of group %s got no assignment within %.1fs",
                            self._group, wait)

    def _watermarks(self, tp: Any) -> tuple[int, int]:
        from confluent_kafka import KafkaException

        timeout = self._settings.connect_timeout
        deadline = time.monotonic() + timeout
        with map_errors(f"reading the end of {tp.topic}[{tp.partition}]", self._scrub):
            while True:
                try:
                    with self.driving:   # a stop() racing a cancelled start closes it
                        kc = self._kc
                        if kc is None:
                            raise BrokerUnavailable("the Kafka consumer was closed")
                        low, high = kc.get_watermark_offsets(tp, timeout=timeout,
                                                             cached=False)
                    return int(low), int(high)
                except KafkaException as exc:
                    # A topic created a moment ago: this client's metadata may still
                    # name no leader. Those errors pass; others do not.
                    code = exc.args[0].code() if exc.args else None
                    if code not in _METADATA_LAG or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


    async def stop(self) -> None:
        """Commit what is settled, leave the group and end the thread. Idempotent."""
        self._closing.set()
        self._wanted.set()
        if self._thread is None:
            # Failed or cancelled before its thread started (assigning, subscribing): no
            # thread will close the driver's consumer, so close it here.
            kc, self._kc = self._kc, None
            if kc is not None:
                await asyncio.to_thread(self._close_unstarted, kc)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped),
                                   self._settings.session_timeout + 10.0)
        except TimeoutError:
            log.warning("the Kafka consumer of group %s did not close in time", self._group)

    # -- the thread --------------------------------------------------------------

    def want(self, room: int) -> None:
        """The event loop waits for records and has room for ``room``: let the thread
        take up to that many."""
        self._room = room
        self.hungry = True
        self._wanted.set()

    def drain(self, limit: int) -> None:
        """Take up to ``limit`` records the driver has now, on the event loop.

        Does nothing while the thread holds the driver: it hands its records over itself.
        """
        if not self.driving.acquire(blocking=False):
            return
        try:
            if self._shut or self.failure is not None:
                return
            self._pull(limit, 0.0)
        except Exception as exc:
            # As on the thread: the consumer failed for good; fetch raises it.
            log.exception("unibus kafka consumer failed on the event loop")
            self._fail(BrokerError(self._scrub(f"the Kafka consumer failed: {exc}")))
        finally:
            self.driving.release()

    def _pull(self, limit: int, wait: float) -> None:
        """Take up to ``limit`` records, waiting up to ``wait`` s for a first one, and
        commit what is due. The caller holds ``driving``; callbacks run here."""
        kc = self._kc
        records = kc.consume(num_messages=min(limit, _BATCH), timeout=0)
        if not records and wait:
            first = kc.poll(wait)
            if first is not None:
                records = [first]
        self._last_served = time.monotonic()
        if records:
            self._ingest(records)
        self._commit(sync=False)

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                if not self.hungry and self._joined:
                    # The loop is busy, or has no room: it drains the driver itself
                    # when it fetches. Serve the driver only if nobody did lately.
                    self._wanted.wait(_SERVE)
                    self._wanted.clear()
                    if self.hungry or self._closing.is_set():
                        continue
                    if time.monotonic() - self._last_served >= _SERVE:
                        with self.driving:
                            self._pull(1, 0.0)
                    continue
                # The loop waits for records (or the group's first assignment is
                # pending): wait for them here, off the loop.
                with self.driving:
                    if not self.inbox:
                        self._pull(self._room, _POLL)
                if self.inbox:
                    # Handed over: the loop clears ``hungry`` when it has taken them.
                    self._wanted.wait(_POLL)
                    self._wanted.clear()
        except Exception as exc:
            log.exception("unibus kafka consumer thread failed")
            self._fail(BrokerError(self._scrub(f"the Kafka consumer failed: {exc}")))
        finally:
            self._shutdown()

    def _ingest(self, records: list[Any]) -> None:
        # Bound to the partitions' states *now*: a partition revoked and assigned again
        # gets a new state, and the records taken before die with the old one. The
        # event loop splits the batch by partition as it hands the records out.
        # _parts is replaced, never changed, when partitions come and go.
        self.inbox.append((self._parts, records))
        # Only a waiting fetch needs a wake-up (the loop's own drain has none); fetch
        # re-checks the inbox after publishing its waiter, so no batch is missed.
        if self._waiting():
            self._loop.call_soon_threadsafe(self._wake)

    def _commit(self, *, sync: bool, only: list[PartitionState] | None = None) -> None:
        if self._group is None:
            return
        now = time.monotonic()
        if only is None:
            # The periodic commit of everything; a revocation's commit always goes.
            if not sync and now - self._last_commit < self._settings.commit_interval:
                return
            self._last_commit = now
        from confluent_kafka import TopicPartition

        # The event loop logs settlements; advance folds them into commit_to here. A
        # settlement logged after this goes in the next commit.
        states = list(only if only is not None else self._parts.values())
        for state in states:
            state.advance()
        if self._waiting():
            # A fetch that counted its open deliveries while a fold was half done (the
            # log shortened, the folded count not yet raised) saw too many, and may wait
            # for room it has: it counts again now.
            self._loop.call_soon_threadsafe(self._wake)
        states = [s for s in states if s.dirty]
        if not states:
            return
        targets = [(s, s.commit_to) for s in states]
        offsets = [TopicPartition(s.topic, s.partition, to) for s, to in targets]
        for state, to in targets:
            state.committed = to
        try:
            self._kc.commit(offsets=offsets, asynchronous=not sync)
        except Exception as exc:
            # Not committed: the offsets stay dirty and go in the next commit. A
            # message is then redelivered at worst, never skipped.
            for state in states:
                state.committed = -1
            log.debug("offset commit failed: %s", self._scrub(str(exc)))

    def _on_commit(self, error: Any, partitions: list[Any]) -> None:
        failed = [tp for tp in partitions if tp.error is not None] if error is None \
            else partitions
        for tp in failed:
            state = self._parts.get((tp.topic, tp.partition))
            if state is not None:
                state.committed = -1

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self._joined = True
        # A new mapping, not the old one changed: batches already taken keep theirs.
        parts = dict(self._parts)
        for tp in partitions:
            parts[(tp.topic, tp.partition)] = self._state(tp.topic, tp.partition)
        self._parts = parts
        if not self._assigned.done():
            self._loop.call_soon_threadsafe(self._mark_assigned)

    def _state(self, topic: str, partition: int) -> PartitionState:
        # An ephemeral subscription commits nothing: its states log no offsets.
        return PartitionState(topic, partition, plain=topic not in self._lanes,
                              tracked=self._group is not None)

    def _mark_assigned(self) -> None:
        if not self._assigned.done():
            self._assigned.set_result(None)

    def _states_of(self, partitions: list[Any]) -> list[PartitionState]:
        return [s for tp in partitions
                if (s := self._parts.get((tp.topic, tp.partition))) is not None]

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        states = self._states_of(partitions)
        # Frozen first: a settlement from now on raises DeliveryLost instead of being
        # logged after this commit's fold and never committed (the thread's commit
        # releases the GIL). A settlement that read the flag just before may still be
        # logged too late: its message is redelivered to the next owner, never lost.
        self._freeze(states)
        # On the event loop (its drain served the rebalance) the commit is queued, not
        # awaited: librdkafka rejoins only once it is answered (module docstring).
        self._commit(sync=threading.get_ident() != self._loop_thread, only=states)
        self._drop(states)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        # Lost partitions may belong to another member already: commit nothing.
        states = self._states_of(partitions)
        self._freeze(states)
        self._drop(states)

    def _freeze(self, states: list[PartitionState]) -> None:
        """Mark ``states`` revoked; the count moves at once, so that a fetch running
        meanwhile drops what it took of them."""
        for state in states:
            state.revoke()
        if states:
            self.revocations += 1

    @property
    def parts(self) -> Mapping[tuple[str, int], PartitionState]:
        """The states of the partitions assigned now (a mapping replaced, never changed,
        when partitions come and go)."""
        return self._parts

    def freeze_all(self) -> None:
        """Mark every assigned partition's state revoked (the consumer closes): their
        deliveries can no longer be settled. What is settled is committed at close."""
        for state in self._parts.values():
            state.revoke()

    def _drop(self, states: list[PartitionState]) -> None:
        """Forget frozen ``states``; the loop drops what it holds of them."""
        parts = dict(self._parts)   # a new mapping (see _on_assign)
        for state in states:
            parts.pop((state.topic, state.partition), None)
        self._parts = parts
        if states:
            self._loop.call_soon_threadsafe(self._forget_revoked)

    def on_error(self, error: Any) -> None:
        """An error event from the driver: a refused credential or a fatal error ends
        the consumer (``failure``); any other is logged."""
        code = error.code()
        if code in _AUTH_CODES or error.fatal():
            self._fail(to_unibus(error, "consuming from Kafka", self._scrub))
        log.debug("kafka consumer: %s", self._scrub(error.str()))

    def _fail(self, failure: UnibusError) -> None:
        self.failure = failure
        self._loop.call_soon_threadsafe(self._wake)

    def _shutdown(self) -> None:
        kc = self._kc
        try:
            with self.driving:
                self._shut = True
                self._commit(sync=True)
                kc.close()
        except Exception as exc:
            log.debug("closing the consumer: %s", self._scrub(str(exc)))
        finally:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._mark_stopped)

    def _close_unstarted(self, kc: Any) -> None:
        try:
            with self.driving:
                kc.close()   # nothing was handed out, so nothing to commit
        except Exception as exc:
            log.debug("closing the consumer: %s", self._scrub(str(exc)))

    def _mark_stopped(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)
