"""One nats-py connection, shared by the publisher and the consumers of one adapter.

nats-py reconnects by itself; this wrapper makes the first connect fail fast
(``BrokerUnavailable`` within ``connect_timeout``, ``AuthenticationFailed`` at once,
no reconnect loop), then switches to reconnecting forever, tracks whether the
connection is up (publishers wait on it, bounded by ``retry_for``) and tells the
consumers when it came back so that their pull loops re-subscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unibus.errors import AuthenticationFailed, BrokerTimeout, BrokerUnavailable
from unibus_nats import _wire as wire
from unibus_nats._errors import is_auth_error, map_errors
from unibus_nats._url import Settings

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["Connection"]

log = logging.getLogger("unibus.nats")


class Connection:
    """A nats-py client plus its connection state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: Client | None = None
        self.up = asyncio.Event()
        self.closed = False
        self.server_info: dict[str, Any] = {}
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._auth_refused = False

    @property
    def nc(self) -> Client:
        """The connected client.

        Raises:
            BrokerUnavailable: Not connected (never connected, or closed).
        """
        if self._nc is None or self.closed:
            raise BrokerUnavailable(f"not connected to {self.settings.url}")
        return self._nc

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every reconnection; returns the remover."""
        self._reconnect_listeners.append(listener)
        return lambda: self._reconnect_listeners.remove(listener) \
            if listener in self._reconnect_listeners else None

    async def open(self) -> None:
        """Connect, failing fast.

        Raises:
            BrokerUnavailable: No server answered within ``connect_timeout``.
            AuthenticationFailed: The server refused the credentials.
        """
        from nats.aio.client import Client

        settings = self.settings
        timeout: float = settings["connect_timeout"]
        nc = Client()
        url = settings.url
        try:
            async with asyncio.timeout(timeout):
                with map_errors(f"connect to {url}"):
                    await nc.connect(
                        servers=settings.servers(), name=settings["name"],
                        connect_timeout=max(1, round(timeout)), allow_reconnect=False,
                        max_reconnect_attempts=1, reconnect_time_wait=settings["reconnect_wait"],
                        error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected, closed_cb=self._on_closed,
                        **settings.connect_kwargs())
        except (TimeoutError, BrokerTimeout, BrokerUnavailable) as exc:
            await self._discard(nc)
            if self._auth_refused:
                raise AuthenticationFailed(f"{url}: the server refused the credentials") from None
            reason = str(exc) if isinstance(exc, BrokerUnavailable) else \
                f"{url}: no server answered within {timeout:g} s"
            raise BrokerUnavailable(reason) from exc
        except BaseException:
            await self._discard(nc)
            raise
        # Connected: from now on nats-py reconnects forever; publishes wait (bounded).
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self.server_info = dict(nc._server_info)
        self.up.set()

    @staticmethod
    async def _discard(nc: Client) -> None:
        with contextlib.suppress(Exception):
            await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        if is_auth_error(exc):
            self._auth_refused = True
        # The driver's errors never hold credentials; the URL is rendered masked.
        log.warning("nats %s: %s: %s", self.settings.url, type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        self.up.clear()
        if not self.closed:
            log.warning("nats %s: disconnected", self.settings.url)

    async def _on_reconnected(self) -> None:
        self.up.set()
        log.warning("nats %s: reconnected", self.settings.url)
        for listener in list(self._reconnect_listeners):
            listener()

    async def _on_closed(self) -> None:
        self.up.clear()

    async def wait_up(self, deadline: float) -> None:
        """Return once connected; wait for a reconnection until the loop time ``deadline``.

        Raises:
            BrokerUnavailable: Still disconnected at the deadline, or closed.
        """
        nc = self.nc
        if nc.is_connected:
            return
        loop = asyncio.get_running_loop()
        while not nc.is_connected:
            if nc.is_closed or self.closed:
                raise BrokerUnavailable(f"the connection to {self.settings.url} is closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerUnavailable(
                    f"{self.settings.url}: disconnected for longer than retry_for="
                    f"{self.settings['retry_for']:g} s")
            if self.up.is_set():
                # Reconnected a moment ago, but the client is not ready yet.
                await asyncio.sleep(0.05)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.5)):
                    await self.up.wait()

    async def close(self) -> None:
        """Close the connection. Idempotent; never raises a driver error."""
        if self.closed:
            return
        self.closed = True
        self.up.set()       # wakes publishers waiting for a reconnection: they see closed
        nc, self._nc = self._nc, None
        self._reconnect_listeners.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await wire.flush(nc, 1)
            await self._discard(nc)
