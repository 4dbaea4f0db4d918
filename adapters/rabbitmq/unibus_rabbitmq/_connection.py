"""One AMQP connection that comes back by itself after a loss.

Maps to
    one aio-pika connection per bus. After an unexpected close (broker restart,
    network cut, missed heartbeats) it reconnects in the background, trying every
    host of the URL in turn with a growing pause, for up to ``recovery`` seconds;
    then tells each listener (the publisher, every consumer) to re-declare and
    resume. Refused credentials end the recovery at once (no endless reconnect).
    Every connection gets a new *generation* number: a delivery remembers the
    generation of its channel, so it can never be settled on a later channel.

URL
    Uses ``hosts``, credentials, vhost, TLS, ``heartbeat``, ``connect_timeout`` and
    ``recovery`` (see :mod:`unibus_rabbitmq.adapter`).

Driver
    aio-pika, imported lazily by :meth:`Connection.open`.

Capabilities
    ``timings.recovery``: the ``recovery`` option; ``timings.connect_timeout``: the
    ``connect_timeout`` option times the number of hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from unibus.errors import AuthenticationFailed, BrokerUnavailable, BusClosed, UnibusError
from unibus_rabbitmq._errors import map_errors
from unibus_rabbitmq._url import Settings

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection

__all__ = ["Connection"]

log = logging.getLogger("unibus.rabbitmq")

Listener = Callable[[], Awaitable[None]]


class Connection:
    """The adapter's connection: open, wait until usable, reconnect, close.

    Args:
        settings: The URL settings.
        name: The connection name shown in RabbitMQ's management UI.
    """

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.generation = 0
        self._conn: AbstractConnection | None = None
        self._usable = asyncio.Event()
        self._closed = False
        self._failure: UnibusError | None = None
        self._recovering: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self._loss_hooks: list[Callable[[], None]] = []

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` after every recovery, successful or not (see :attr:`failure`)."""
        self._listeners.append(listener)

    def on_loss(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (synchronously) as soon as the connection is lost."""
        self._loss_hooks.append(hook)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @property
    def is_open(self) -> bool:
        """Whether a connection is up right now."""
        return self._conn is not None and not self._conn.is_closed

    async def open(self) -> None:
        """Connect to the first reachable host.

        Raises:
            BrokerUnavailable: No host reachable within ``connect_timeout`` each.
            AuthenticationFailed: The credentials or the vhost were refused.
        """
        self._conn = await self._connect()
        self.generation += 1
        self._failure = None
        self._usable.set()

    async def _connect(self) -> AbstractConnection:
        import aio_pika

        s = self.settings
        context = s.ssl_context()
        last: UnibusError | None = None
        for host in s.hosts:
            where = f"connecting to {host} (vhost {s.vhost!r})"
            try:
                with map_errors(where, s.password):
                    async with asyncio.timeout(s.connect_timeout):
                        conn = await aio_pika.connect(
                            host=host.host, port=host.port or 5672, login=s.username,
                            password=s.password, virtualhost=s.vhost, ssl=s.tls,
                            ssl_context=context, timeout=s.connect_timeout,
                            heartbeat=s.heartbeat,
                            client_properties={"connection_name": self.name})
            except AuthenticationFailed:
                raise
            except UnibusError as exc:
                last = exc
                continue
            conn.close_callbacks.add(self._on_close)
            return conn
        if isinstance(last, BrokerUnavailable):
            raise last
        raise BrokerUnavailable(f"no RabbitMQ broker reachable at "
                                f"{', '.join(str(h) for h in s.hosts)}: {last}")

    def _on_close(self, _sender: Any, exc: BaseException | None) -> None:
        if self._closed or self._recovering is not None:
            return
        log.warning("RabbitMQ connection %s lost (%s); reconnecting", self.name,
                    type(exc).__name__ if exc else "closed")
        for hook in self._loss_hooks:
            hook()
        self._start_recovery()

    def _start_recovery(self) -> None:
        if self._closed or self._recovering is not None:
            return
        self._usable.clear()
        self._recovering = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.recovery
        pause = 0.1
        try:
            while not self._closed:
                try:
                    self._conn = await self._connect()
                except AuthenticationFailed as exc:
                    self._failure = exc
                    break
                except UnibusError as exc:
                    if loop.time() + pause > deadline:
                        self._failure = BrokerUnavailable(
                            f"RabbitMQ did not come back within {self.settings.recovery:g} s "
                            f"(recovery option): {exc}")
                        break
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                self.generation += 1
                self._failure = None
                log.warning("RabbitMQ connection %s recovered", self.name)
                break
        finally:
            self._recovering = None
            self._usable.set()
        # Listeners resume their consumers (or, on failure, fail them).
        for listener in list(self._listeners):
            if self._closed:
                break
            try:
                await listener()
            except UnibusError as exc:
                # One consumer failing to resume must not stop the others;
                # it reports the failure itself on its next fetch.
                log.warning("resuming after reconnect failed: %s", exc)

    async def usable(self) -> AbstractConnection:
        """Return the open connection, waiting for a reconnect in progress.

        Raises:
            BusClosed: The connection was closed.
            BrokerUnavailable: The broker did not come back within ``recovery``.
            AuthenticationFailed: A reconnect was refused.
        """
        while True:
            if self._closed:
                raise BusClosed("the RabbitMQ connection is closed")
            conn = self._conn
            if conn is not None and not conn.is_closed and self._usable.is_set():
                return conn
            failure = self._failure
            if failure is not None:
                # Fail fast, but keep trying in the background so that the bus
                # works again once the broker is back (never after refused credentials).
                if not isinstance(failure, AuthenticationFailed):
                    self._start_recovery()
                raise failure
            self._start_recovery()
            await self._usable.wait()

    @property
    def failure(self) -> UnibusError | None:
        """Why recovery gave up, or ``None``."""
        return self._failure

    async def channel(self, *, confirms: bool) -> AbstractChannel:
        """Open a channel on the usable connection.

        Raises:
            BrokerUnavailable: No usable connection.
            BrokerError: The broker refused the channel.
        """
        conn = await self.usable()
        with map_errors("opening a channel", self.settings.password):
            return await conn.channel(publisher_confirms=confirms, on_return_raises=False)

    async def aclose(self) -> None:
        """Close for good. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._usable.set()
        if self._recovering is not None:
            self._recovering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovering
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(UnibusError), map_errors("closing", self.settings.password):
                await conn.close()
