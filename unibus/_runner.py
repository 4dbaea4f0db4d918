"""How the App runs one handler: its subscription, one fetcher and ``concurrency`` workers.

The App (:mod:`unibus.scheduler`) turns each ``@app.handler(...)`` into a
:class:`Route` and, at run time, a :class:`Runner`. A runner holds one subscription,
one fetcher coroutine that pulls deliveries from it in batches into a local buffer,
and ``concurrency`` long-lived worker coroutines that take deliveries from that
buffer one at a time — the number of workers is the concurrency limit. There is no
task and no broker round trip per message beyond its settlement. Deliveries of one
key are handled one at a time, in the order they arrived, even with several workers,
so the App keeps whatever key order the adapter declares.

A runner settles each delivery by its handler's outcome (ack, retry with
``nack(delay)``, dead letter or reject), as the scheduler's docstring describes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unibus.errors import UnibusError
from unibus.message import Delivery, Message

if TYPE_CHECKING:
    from unibus.bus import Bus, Subscription
    from unibus.scheduler import AppStats, Handler, Retry

__all__ = ["ERROR_HEADERS", "Route", "Runner", "describe"]

log = logging.getLogger("unibus.app")

#: The headers a dead letter carries on top of the original message's headers.
ERROR_HEADERS = ("unibus-error", "unibus-error-type", "unibus-attempts",
                 "unibus-original-topic", "unibus-original-group")

_ERROR_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class Route:
    """One registered handler: what it consumes, and how."""

    topic: str
    group: str
    handler: Handler
    concurrency: int
    prefetch: int
    retry: Retry
    dead_letter: str | None

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", None) or repr(self.handler)


class Runner:
    """One handler at run time: its subscription, fetcher and workers."""

    def __init__(self, bus: Bus, stats: AppStats, route: Route, *,
                 stop: Callable[[], None], fail: Callable[[BaseException], None]) -> None:
        """Prepare the runner; nothing is subscribed before :meth:`open`.

        Args:
            bus: The App's bus.
            stats: The App's counters, updated in place.
            route: The handler and its settings.
            stop: Asks the App to shut down (the subscription was closed under it).
            fail: Stops the App with an error (a fetcher or worker died).
        """
        self.route = route
        self.bus = bus
        self.stats = stats
        self._stop_app = stop
        self._fail_app = fail
        self.sub: Subscription | None = None
        self.buffer: deque[Delivery] = deque()
        self.idle: deque[asyncio.Future[None]] = deque()
        self.fetch_waiter: asyncio.Future[None] | None = None
        self.fetcher: asyncio.Task[None] | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.busy = 0
        # With several workers, deliveries of one key are handled one at a time, in
        # the order received: key → the deliveries waiting for the worker on that key.
        self.lanes: dict[str, deque[Delivery]] | None = ({} if route.concurrency > 1
                                                           else None)
        self.parked = 0
        # Refill when the deliveries held locally fall to half the prefetch, so that
        # each fetch brings a batch rather than the one slot a settlement just freed.
        self.low = route.prefetch // 2
        self.stopping = False
        self.exhausted = False

    async def open(self) -> None:
        route = self.route
        if route.dead_letter is not None:
            await self.bus.declare_group(route.dead_letter, route.group)
        self.sub = await self.bus.subscribe(route.topic, group=route.group,
                                            prefetch=route.prefetch).open()

    def start(self) -> None:
        route = self.route
        self.fetcher = asyncio.create_task(self._fetch_loop(),
                                           name=f"unibus fetch {route.topic}/{route.group}")
        self.fetcher.add_done_callback(self._task_done)
        for i in range(route.concurrency):
            worker = asyncio.create_task(self._work(),
                                         name=f"unibus {route.name} {route.topic}/{route.group}"
                                              f" #{i}")
            worker.add_done_callback(self._task_done)
            self.workers.append(worker)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("unibus app task %s died: %r; shutting down", task.get_name(), exc,
                      exc_info=exc)
            self._fail_app(exc)

    def stop_fetching(self) -> None:
        """Stop fetching and starting deliveries; in-flight handlers go on."""
        self.stopping = True
        # Cancelling the fetch loses nothing: what the consumer handed out but we did
        # not take stays unsettled, and returns to the group when the consumer closes.
        if self.fetcher is not None:
            self.fetcher.cancel()
        self._wake_idle(len(self.idle))

    async def close(self) -> None:
        # What is left in the buffer and lanes was never started: closing the
        # subscription returns it to the group unsettled.
        self.buffer.clear()
        if self.lanes is not None:
            self.lanes.clear()
        if self.sub is not None:
            await self.sub.aclose()

    def _wake_idle(self, count: int) -> None:
        idle = self.idle
        while count and idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _wake_fetcher(self) -> None:
        waiter = self.fetch_waiter
        if waiter is not None:
            # Forget it at once, so that the workers stop trying until it waits again.
            self.fetch_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _fetch_loop(self) -> None:
        sub = self.sub
        assert sub is not None
        loop = asyncio.get_running_loop()
        buffer = self.buffer
        idle = self.idle
        prefetch = self.route.prefetch
        low = self.low
        while not self.stopping:
            held = len(buffer) + self.busy + self.parked
            if held >= prefetch or (held > low and (buffer or not idle)):
                self.fetch_waiter = waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    if self.fetch_waiter is waiter:
                        self.fetch_waiter = None
                continue
            batch = await sub.fetch(prefetch - held, None)
            if not batch:
                # Only a closed consumer returns nothing without a timeout: the bus
                # was closed under the App.
                self.exhausted = True
                self._wake_idle(len(idle))
                if not self.stopping:
                    log.warning("subscription to %r in group %r was closed; stopping the app",
                                self.route.topic, self.route.group)
                    self._stop_app()
                return
            buffer.extend(batch)
            self._wake_idle(len(batch))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = self.buffer
        stats = self.stats
        route = self.route
        handler = route.handler
        lanes = self.lanes
        delivery: Delivery | None = None
        while not self.stopping:
            if delivery is None:
                if not buffer:
                    if self.exhausted:
                        return
                    waiter = loop.create_future()
                    self.idle.append(waiter)
                    self._wake_fetcher()
                    await waiter
                    continue
                delivery = buffer.popleft()
                if lanes is not None and (key := delivery.message.key) is not None:
                    lane = lanes.get(key)
                    if lane is not None:
                        # Another worker handles this key: queue behind it, in order.
                        lane.append(delivery)
                        self.parked += 1
                        delivery = None
                        continue
                    lanes[key] = deque()
            self.busy += 1
            try:
                stats.handled += 1
                await handler(delivery)
            except Exception as exc:
                await self._failed(delivery, exc)
            except asyncio.CancelledError as exc:
                # Our own cancellation (shutdown) settles nothing; a handler that
                # raised CancelledError by itself merely failed.
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                await self._failed(delivery, exc)
            else:
                if delivery.outcome is None:
                    try:
                        await delivery.ack()
                    except UnibusError as exc:
                        self._settle_error(delivery, "ack", exc)
                    else:
                        stats.acked += 1
            finally:
                self.busy -= 1
            if lanes is not None and (key := delivery.message.key) is not None:
                lane = lanes[key]
                if lane:
                    # Keep the key's lane: its next delivery is ours.
                    delivery = lane.popleft()
                    self.parked -= 1
                else:
                    del lanes[key]
                    delivery = None
            else:
                delivery = None
            if self.fetch_waiter is not None and \
                    len(buffer) + self.busy + self.parked <= self.low:
                self._wake_fetcher()

    async def _failed(self, delivery: Delivery, exc: BaseException) -> None:
        stats = self.stats
        stats.failed += 1
        route = self.route
        retry = route.retry
        attempt = delivery.attempt
        if delivery.outcome is not None:
            log.error("handler %s raised on message %s from %r/%r after settling it "
                      "(%s): %s", route.name, delivery.id, delivery.topic, route.group,
                      delivery.outcome.value, describe(exc), exc_info=exc)
            return
        caps = self.bus.capabilities
        if attempt < retry.max_attempts and caps.redelivery:
            delay = retry.delay(attempt) if caps.nack_delay else 0.0
            log.warning("handler %s failed on message %s from %r/%r (attempt %d of %d), "
                        "retrying in %.3fs: %s", route.name, delivery.id, delivery.topic,
                        route.group, attempt, retry.max_attempts, delay, describe(exc),
                        exc_info=exc)
            try:
                await delivery.nack(delay)
            except UnibusError as settle_exc:
                self._settle_error(delivery, "nack", settle_exc)
            else:
                stats.retried += 1
            return
        log.error("handler %s failed on message %s from %r/%r (attempt %d of %d), giving "
                  "up: %s", route.name, delivery.id, delivery.topic, route.group, attempt,
                  retry.max_attempts, describe(exc), exc_info=exc)
        await self._give_up(delivery, exc)

    async def _give_up(self, delivery: Delivery, exc: BaseException) -> None:
        stats = self.stats
        dead_letter = self.route.dead_letter
        try:
            if dead_letter is None:
                await delivery.reject()
                stats.rejected += 1
            elif await self._publish_dead_letter(dead_letter, delivery, exc):
                await delivery.ack()
                stats.dead_lettered += 1
            elif self.bus.capabilities.redelivery:
                # Not dead-lettered, so not done with: it comes back after a pause
                # (where the adapter can delay) and goes through the handler again.
                delay = (self.route.retry.max_backoff if self.bus.capabilities.nack_delay
                         else 0.0)
                await delivery.nack(delay)
            else:
                log.error("message %s from %r/%r is lost: it could not be dead-lettered and "
                          "%s cannot redeliver", delivery.id, delivery.topic, self.route.group,
                          self.bus.capabilities.name)
                await delivery.reject()
                stats.rejected += 1
        except UnibusError as settle_exc:
            self._settle_error(delivery, "settle", settle_exc)

    async def _publish_dead_letter(self, topic: str, delivery: Delivery,
                                   exc: BaseException) -> bool:
        message = delivery.message
        headers = dict(message.headers)
        error_type = type(exc)
        module = error_type.__module__
        headers["unibus-error"] = describe(exc)
        headers["unibus-error-type"] = (error_type.__qualname__ if module == "builtins"
                                        else f"{module}.{error_type.__qualname__}")
        headers["unibus-attempts"] = str(delivery.attempt)
        headers["unibus-original-topic"] = delivery.topic
        headers["unibus-original-group"] = delivery.group or ""
        copy = Message(message.body, id=message.id, key=message.key, headers=headers,
                       timestamp=message.timestamp)
        try:
            await self.bus.publish_many(topic, (copy,))
        except UnibusError as publish_exc:
            log.error("could not dead-letter message %s to %r, returning it to its group: %s",
                      message.id, topic, publish_exc)
            return False
        log.info("message %s from %r/%r dead-lettered to %r", message.id, delivery.topic,
                 self.route.group, topic)
        return True

    def _settle_error(self, delivery: Delivery, what: str, exc: UnibusError) -> None:
        self.stats.settle_errors += 1
        log.error("could not %s message %s from %r/%r: %s", what, delivery.id, delivery.topic,
                  self.route.group, exc)


def describe(exc: BaseException) -> str:
    """Return the error text for a log line or header: one line, at most ~1 KiB."""
    text = str(exc) or repr(exc)
    # Some brokers (NATS) cannot carry line breaks in header values.
    text = " ".join(text.split()) if ("\n" in text or "\r" in text) else text
    if len(text) > _ERROR_LIMIT:
        text = text[:_ERROR_LIMIT - 1] + "…"
    return text
