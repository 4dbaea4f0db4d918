"""The scheduler: run handlers over a bus with concurrency, retry, dead letters and shutdown.

::

    app = unibus.App("nats://127.0.0.1:4222")

    @app.handler("orders", group="billing", concurrency=8, retry=unibus.Retry(max_attempts=5))
    async def bill(delivery: unibus.Delivery) -> None:
        ...                      # returns ⇒ ack; raises ⇒ retry with backoff, then dead letter

    await app.run()              # until app.stop(), SIGINT or SIGTERM

Each handler gets its own subscription, a fetcher that pulls deliveries in batches
and ``concurrency`` workers (:mod:`unibus._runner`); there is no task and no broker
round trip per message beyond its settlement. Deliveries of one key are handled one
at a time, in the order they arrived, even with several workers, so the App keeps
whatever key order the adapter declares.

What a handler's outcome does:

- it returns ⇒ ``ack()`` (unless the handler settled the delivery itself);
- it raises, ``delivery.attempt < retry.max_attempts`` and the adapter redelivers ⇒
  ``nack(delay=retry.delay(attempt))`` (``nack(0)`` where the adapter cannot delay);
- otherwise, with ``dead_letter`` on, a copy (same id, key, body and headers, plus
  the ``ERROR_HEADERS``) is published to ``<topic>.<group>.dlq`` (or the named topic)
  and, once the broker confirmed it, the original is acked; if that publish fails,
  the original is nacked so it comes back — nothing is lost;
- with ``dead_letter=False`` ⇒ ``reject()``.

``attempt`` counts deliveries, not handler calls: a message fetched but not started
before a shutdown comes back with a higher attempt, so it has fewer retries left.

Shutdown (``app.stop()``, SIGINT or SIGTERM): stop fetching; let in-flight handlers
finish and settle, for at most ``shutdown_timeout`` seconds, then cancel them (a
cancelled handler settles nothing; its message comes back); deliveries fetched but
not started stay unsettled and return to their group when the subscriptions close;
close the subscriptions, then the bus if the App opened it. A second signal cancels
the in-flight handlers at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from unibus._runner import ERROR_HEADERS, Route, Runner
from unibus.bus import DEFAULT_PREFETCH, Bus, check_name
from unibus.errors import UnibusError
from unibus.message import Delivery
from unibus.url import URL

__all__ = [
    "ERROR_HEADERS",
    "App",
    "AppStats",
    "Handler",
    "Retry",
]

log = logging.getLogger("unibus.app")

Handler = Callable[[Delivery], Awaitable[None]]
H = TypeVar("H", bound=Handler)

# 2.0 ** 1000 is still a finite float; beyond it the delay is capped anyway.
_MAX_EXPONENT = 1000


@dataclass(frozen=True, slots=True)
class Retry:
    """How often, and how far apart, a failing handler is retried.

    The n-th attempt that fails waits ``min(max_backoff, backoff * 2 ** (n - 1))``
    seconds before the next, shortened at random by up to the ``jitter`` fraction so
    that failing consumers do not retry in lockstep.

    Attributes:
        max_attempts: Handler calls per message, the first included; after the last
            failure the message is dead-lettered. ``1`` means no retry.
        backoff: Seconds before the first retry.
        max_backoff: The longest wait between two attempts.
        jitter: The fraction (0 to 1) by which a wait may be shortened at random.

    Raises:
        ValueError: An argument is out of range (``max_attempts < 1``, a negative or
            non-finite duration, ``max_backoff < backoff``, ``jitter`` outside 0..1).
    """

    max_attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {attempts!r}")
        for name in ("backoff", "max_backoff", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_backoff < self.backoff:
            raise ValueError(f"max_backoff ({self.max_backoff}) must be >= backoff "
                             f"({self.backoff})")
        if self.jitter > 1:
            raise ValueError(f"jitter must be a fraction between 0 and 1, got {self.jitter}")

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait after failed attempt number ``attempt``.

        Args:
            attempt: The attempt that failed, 1 for the first.

        Returns:
            A delay in ``[(1 - jitter) * d, d]`` where ``d`` is the capped exponential
            backoff; never negative.

        Raises:
            ValueError: ``attempt`` is below 1.
        """
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        exponent = min(attempt - 1, _MAX_EXPONENT)
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** exponent)
        if self.jitter:
            ceiling -= ceiling * self.jitter * random.random()
        return max(0.0, ceiling)


@dataclass(slots=True)
class AppStats:
    """What an App did since it started; the counters only grow.

    Attributes:
        handled: Handler calls.
        acked: Deliveries acked after their handler returned.
        failed: Handler calls that raised.
        retried: Deliveries nacked for a retry.
        dead_lettered: Deliveries published to their dead-letter topic, then acked.
        rejected: Deliveries rejected (``dead_letter=False``, or a dead letter that
            could neither be published nor returned).
        settle_errors: Settlements that failed (``DeliveryLost``, ...); the broker
            redelivers those messages.
    """

    handled: int = 0
    acked: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    rejected: int = 0
    settle_errors: int = 0


class App:
    """Runs handlers over one bus: concurrency, ack on return, retry, dead letters,
    graceful shutdown.

    Register handlers with :meth:`handler`, then ``await app.run()`` — or, to embed
    or test, ``async with app:`` which runs it in the background without touching
    signal handlers. An App runs once.

    Attributes:
        bus: The bus the App consumes from; handlers may publish through it.
        started: Set once every handler is subscribed and receiving.
        stopped: Set once a run ended: handlers drained, subscriptions closed.
        stats: Counters of what the App did.
    """

    def __init__(self, url_or_bus: str | URL | Bus | None = None, *,
                 shutdown_timeout: float = 30.0) -> None:
        """Create an App.

        Args:
            url_or_bus: A broker URL (default ``$UNIBUS_URL``, else ``memory://``):
                the App opens that bus and closes it when it stops. Or an existing
                :class:`Bus`: the App opens it if needed, closes only its own
                subscriptions, and leaves the bus to its owner.
            shutdown_timeout: Seconds in-flight handlers get to finish on shutdown
                before they are cancelled.

        Raises:
            InvalidURL: The URL is malformed or has an unknown option.
            UnknownScheme: No adapter serves the URL's scheme.
            AdapterNotInstalled: The scheme's adapter is not installed.
            ValueError: ``shutdown_timeout`` is negative.
        """
        if not shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout}")
        if isinstance(url_or_bus, Bus):
            self.bus = url_or_bus
            self._owns_bus = False
        else:
            self.bus = Bus(url_or_bus)
            self._owns_bus = True
        self.shutdown_timeout = float(shutdown_timeout)
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stats = AppStats()
        self._routes: list[Route] = []
        self._runners: list[Runner] = []
        self._stop = asyncio.Event()
        self._ran = False
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<App {self.bus.url} handlers={len(self._routes)}>"

    def handler(self, topic: str, *, group: str, concurrency: int = 1,
                prefetch: int | None = None, retry: Retry | None = None,
                dead_letter: bool | str = True) -> Callable[[H], H]:
        """Register ``async def handler(delivery) -> None`` for ``topic`` in ``group``.

        Args:
            topic: The topic to consume.
            group: The durable group the handler consumes through.
            concurrency: How many deliveries the handler processes at once.
            prefetch: The most unsettled deliveries held for this handler; default
                ``max(2 * concurrency, 64)``.
            retry: The retry policy; default ``Retry()``.
            dead_letter: ``True`` for ``<topic>.<group>.dlq``, a topic name, or
                ``False`` to reject exhausted messages instead. The App declares the
                group ``group`` on the dead-letter topic at start, so dead letters
                are retained until read through that group.

        Returns:
            A decorator that registers the handler and returns it unchanged.

        Raises:
            InvalidName: The topic, group or dead-letter topic name is invalid.
            ValueError: ``concurrency`` or ``prefetch`` is below 1, the dead-letter
                topic is ``topic`` itself, or a handler for this topic and group is
                already registered.
            TypeError: ``retry`` is not a :class:`Retry`, or the handler is a plain
                (not ``async``) function.
            RuntimeError: The App is already running.
        """
        check_name("topic", topic)
        check_name("group", group)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int)
                                     or prefetch < 1):
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        retry = Retry() if retry is None else retry
        if not isinstance(retry, Retry):
            raise TypeError(f"retry must be a unibus.Retry, not {type(retry).__name__}")
        if dead_letter is True:
            dlq: str | None = check_name("dead-letter topic", f"{topic}.{group}.dlq")
        elif dead_letter is False:
            dlq = None
        else:
            dlq = check_name("dead-letter topic", dead_letter)
        if dlq == topic:
            raise ValueError(f"the dead-letter topic of {topic!r} cannot be {topic!r} itself")
        if self._ran:
            raise RuntimeError("handlers cannot be added to an App that runs or ran")
        if any(r.topic == topic and r.group == group for r in self._routes):
            raise ValueError(f"a handler for topic {topic!r} in group {group!r} is already "
                             "registered")

        def register(handler: H) -> H:
            if inspect.isfunction(handler) and not inspect.iscoroutinefunction(handler):
                raise TypeError(f"handler {handler.__qualname__} must be an async function "
                                "(async def ...)")
            if not callable(handler):
                raise TypeError(f"handler must be callable, not {type(handler).__name__}")
            self._routes.append(Route(
                topic, group, handler, concurrency,
                prefetch if prefetch is not None else max(2 * concurrency, DEFAULT_PREFETCH),
                retry, dlq))
            return handler

        return register

    def stop(self) -> None:
        """Ask the App to shut down gracefully; ``run()`` returns once it has.

        Safe to call before ``run()``, more than once, and from a handler. Call it
        from the event loop's thread (from another thread, use
        ``loop.call_soon_threadsafe(app.stop)``).
        """
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run the handlers until :meth:`stop`, SIGINT or SIGTERM, then shut down.

        Args:
            handle_signals: Install SIGINT and SIGTERM handlers on the running loop
                for the duration of the run (only possible in the main thread), and
                restore the previous handlers on return.

        Raises:
            RuntimeError: No handler is registered, or the App ran before.
            BusClosed: The bus was closed.
            BrokerUnavailable: The broker cannot be reached.
            AuthenticationFailed: The broker refused the credentials.
            BrokerError: The broker failed while the App ran (it shuts down first).
        """
        if self._ran:
            raise RuntimeError("an App runs once; create a new App to run again")
        if not self._routes:
            raise RuntimeError("the App has no handlers: register one with @app.handler(...)")
        self._ran = True
        loop = asyncio.get_running_loop()
        installed = self._install_signals(loop) if handle_signals else []
        force = False
        try:
            await self.bus.open()
            for route in self._routes:
                runner = Runner(self.bus, self.stats, route, stop=self.stop,
                                fail=self._fail)
                self._runners.append(runner)
                await runner.open()
            for runner in self._runners:
                runner.start()
            log.info("unibus app started on %s with %d handler(s)", self.bus.url,
                     len(self._routes))
            self.started.set()
            await self._stop.wait()
        except asyncio.CancelledError:
            force = True
            raise
        finally:
            try:
                await self._shutdown(force)
            finally:
                self._restore_signals(loop, installed)
                self.stopped.set()
        if self._error is not None:
            raise self._error

    async def _shutdown(self, force: bool) -> None:
        self._stop.set()
        runners = self._runners
        for runner in runners:
            runner.stop_fetching()
        workers = [w for runner in runners for w in runner.workers]
        if workers:
            timeout = 0.0 if force else self.shutdown_timeout
            _, pending = await asyncio.wait(workers, timeout=timeout)
            if pending:
                log.warning("cancelling %d in-flight handler(s) after the %.1fs shutdown "
                            "timeout; their messages return to their groups", len(pending),
                            timeout)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
        fetchers = [runner.fetcher for runner in runners if runner.fetcher is not None]
        if fetchers:
            await asyncio.wait(fetchers)
        for runner in runners:
            try:
                await runner.close()
            except UnibusError as exc:
                # Closing lost the connection: its unsettled messages come back anyway.
                log.warning("closing the subscription to %r in group %r failed: %s",
                            runner.route.topic, runner.route.group, exc)
        if self._owns_bus:
            try:
                await self.bus.aclose()
            except UnibusError as exc:
                log.warning("closing the bus %s failed: %s", self.bus.url, exc)
        log.info("unibus app on %s stopped", self.bus.url)

    def _fail(self, exc: BaseException) -> None:
        """Stop the App because a fetcher or worker died; ``run()`` re-raises ``exc``."""
        if self._error is None:
            self._error = exc
        self.stop()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self._stop.is_set():
            log.info("%s received: shutting down gracefully", name)
            self.stop()
            return
        log.warning("%s received again: cancelling in-flight handlers", name)
        for runner in self._runners:
            for worker in runner.workers:
                worker.cancel()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, Any]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed: list[tuple[int, Any]] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                # No signal support on this loop or platform: stop() still works.
                continue
            installed.append((sig, previous))
        return installed

    @staticmethod
    def _restore_signals(loop: asyncio.AbstractEventLoop,
                         installed: list[tuple[int, Any]]) -> None:
        for sig, previous in installed:
            loop.remove_signal_handler(sig)
            # remove_signal_handler resets to the default, which would drop a handler
            # installed before us (asyncio.run's own SIGINT handler, for one).
            if previous is not None:
                signal.signal(sig, previous)

    async def __aenter__(self) -> Self:
        """Run the App in a background task (no signal handlers) until it started.

        Raises:
            RuntimeError: No handler is registered, or the App ran before.
            BrokerError: The App could not start.
        """
        task = asyncio.create_task(self.run(handle_signals=False))
        self._task = task
        ready = asyncio.ensure_future(self.started.wait())
        try:
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            ready.cancel()
        if task.done():
            task.result()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        if self._task is not None:
            await self._task
