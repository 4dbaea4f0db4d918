"""Confirmed publishing with a bounded window of unconfirmed messages.

Maps to
    ``basic.publish`` with the mandatory flag and persistent messages on one channel
    in confirm mode. ``publish_many`` keeps up to ``publish_window`` publishes
    unconfirmed at a time (no round trip per message) and returns when every
    message is confirmed. Outcomes:

    - ``basic.ack`` → confirmed;
    - ``basic.nack`` → :class:`~unibus.errors.PublishFailed` with the ids;
    - ``basic.return`` with NO_ROUTE from the topic exchange → the topic has no
      group: legal, and like every unibus broker RabbitMQ keeps nothing (the
      returned ids are handed back, nothing raises);
    - ``basic.return`` on a path that must route (a delay queue, a group's own
      queue for a nack) or with another reply code → ``PublishFailed``;
    - the broker closes the channel over a publish (e.g. over its ``max_message_size``,
      exchange deleted) → ``PublishFailed``;
    - the connection dies → the unconfirmed messages are published again
      once the connection is back (within ``recovery`` seconds, else
      ``PublishFailed``): at least once, so a retry may duplicate a message the
      broker had stored but not yet confirmed.

URL
    Uses ``publish_window`` and ``recovery`` (see :mod:`unibus_rabbitmq.adapter`).

Driver
    aiormq (aio-pika's protocol layer) for the hot path: its ``basic_publish``
    waits for its own confirmation, so every message in the window is one
    driver coroutine, as with aio-pika's ``Exchange.publish``.

Capabilities
    ``publish_confirms``: True.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from unibus.errors import PublishFailed
from unibus_rabbitmq._connection import Connection
from unibus_rabbitmq._errors import is_driver_error, map_errors, translate

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel
    from pamqp.commands import Basic

__all__ = ["NO_ROUTE", "Outgoing", "Publisher"]

NO_ROUTE = 312

#: One message to send: its unibus id and its AMQP body and properties.
Outgoing = tuple[str, bytes, "Basic.Properties"]


class Publisher:
    """Publishes on the adapter's confirm channel, reopening it when it dies.

    Args:
        connection: The adapter's connection.
        window: The most unconfirmed publishes in flight per call.
    """

    def __init__(self, connection: Connection, window: int) -> None:
        self._connection = connection
        self._window_size = window
        self._channel: AbstractChannel | None = None
        self._raw: Any = None
        self._opening: asyncio.Lock | None = None
        # aiormq matches a basic.return to its publish by message id, so two
        # publishes with one id are never in flight together on this channel.
        self._in_flight: dict[str, asyncio.Task[Any]] = {}
        connection.on_loss(self._abort)

    async def channel(self) -> Any:
        """Return the live aiormq channel in confirm mode, opening one if needed.

        Raises:
            BrokerUnavailable: The connection is not usable.
        """
        channel = self._channel
        if channel is None or channel.is_closed:
            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                channel = self._channel
                if channel is None or channel.is_closed:
                    channel = await self._connection.channel(confirms=True)
                    with map_errors("opening the publish channel"):
                        self._raw = await channel.get_underlay_channel()
                    channel.close_callbacks.add(lambda *_: self._abort())
                    self._channel = channel
        return self._raw

    def _abort(self) -> None:
        # aiormq leaves a publish blocked for ever when its connection dies with the
        # write buffer full: cancel every publish in flight, so that send() sees them
        # lost and publishes them again on the next channel.
        for task in list(self._in_flight.values()):
            task.cancel()

    async def aclose(self) -> None:
        """Close the channel. Idempotent."""
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with map_errors("closing the publish channel"):
                await channel.close()

    async def send(self, exchange: str, routing_key: str, items: Sequence[Outgoing], *,
                   must_route: bool) -> list[int]:
        """Publish ``items`` in order and wait for every confirmation.

        Args:
            exchange: The exchange (``""``: the default exchange).
            routing_key: The routing key of every item.
            items: The messages.
            must_route: Raise when the broker returns a message as unroutable.

        Returns:
            The indexes of the items the broker returned as unroutable (NO_ROUTE).

        Raises:
            PublishFailed: A message was nacked, returned where it must route, or not
                confirmed within ``recovery`` seconds of a connection loss.
            BrokerUnavailable: The connection is not usable.
        """
        loop = asyncio.get_running_loop()
        password = self._connection.settings.password
        pending = list(range(len(items)))
        deadline: float | None = None
        returned: list[int] = []
        while True:
            channel = await self.channel()
            lost, failed, back = await self._window(channel, exchange, routing_key, items,
                                                    pending)
            returned += back
            if failed:
                # Everything not confirmed is named, also what the dying channel lost.
                ids = tuple(items[i][0] for i in sorted([i for i, _ in failed + lost]))
                raise PublishFailed(f"RabbitMQ refused {len(failed)} message(s) published to "
                                    f"{routing_key!r}: {failed[0][1]}", message_ids=ids)
            if must_route and returned:
                ids = tuple(items[i][0] for i in returned)
                raise PublishFailed(f"RabbitMQ could not route {len(ids)} message(s) to "
                                    f"{routing_key!r} via exchange {exchange!r}",
                                    message_ids=ids)
            if not lost:
                return sorted(returned)
            now = loop.time()
            if deadline is None:
                deadline = now + self._connection.settings.recovery
            error = lost[0][1]
            if now > deadline:
                ids = tuple(items[i][0] for i, _ in lost)
                raise PublishFailed(f"{len(ids)} message(s) to {routing_key!r} were not "
                                    f"confirmed: {translate(error, 'publishing', password)}",
                                    message_ids=ids)
            pending = [i for i, _ in lost]
            # The connection (or just this channel) died; channel() waits for the
            # reconnect, then the unconfirmed messages go out again.
            await asyncio.sleep(0.05)

    async def _window(self, channel: Any, exchange: str, routing_key: str,
                      items: Sequence[Outgoing], pending: list[int],
                      ) -> tuple[list[tuple[int, BaseException]], list[tuple[int, str]], list[int]]:
        loop = asyncio.get_running_loop()
        window = self._window_size
        in_flight = self._in_flight
        free = asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []
        count = 0

        def done(message_id: str, task: asyncio.Task[Any]) -> None:
            nonlocal count
            count -= 1
            free.set()
            if in_flight.get(message_id) is task:
                del in_flight[message_id]

        publish = channel.basic_publish
        unsent: list[int] = []
        for n, i in enumerate(pending):
            message_id, body, props = items[i]
            if count >= window:
                while count >= window:
                    free.clear()
                    await free.wait()
                if channel.is_closed:
                    unsent = pending[n:]   # publish them again on the next channel
                    break
            previous = in_flight.get(message_id)
            if previous is not None:
                await asyncio.wait((previous,))
            task = loop.create_task(publish(body, exchange=exchange, routing_key=routing_key,
                                            properties=props, mandatory=True, wait=False))
            count += 1
            in_flight[message_id] = task
            task.add_done_callback(partial(done, message_id))
            tasks.append(task)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        lost: list[tuple[int, BaseException]] = [
            (i, ConnectionError("channel closed before sending")) for i in unsent]
        failed: list[tuple[int, str]] = []
        returned: list[int] = []
        for i, result in zip(pending, results, strict=False):
            if isinstance(result, BaseException):
                kinds = {cls.__name__ for cls in type(result).__mro__}
                if "DeliveryError" in kinds:
                    failed.append((i, "nacked by the broker"))
                elif "AMQPChannelError" in kinds:
                    # The broker closed the channel over this publish (too large, exchange
                    # gone, access refused): publishing it again cannot help.
                    failed.append((i, f"channel closed by the broker: {result}"))
                elif isinstance(result, asyncio.CancelledError | OSError) or is_driver_error(
                        result):
                    lost.append((i, result))
                else:
                    raise result
            elif hasattr(result, "delivery"):
                code = getattr(result.delivery, "reply_code", None)
                if code == NO_ROUTE:
                    returned.append(i)
                else:
                    failed.append((i, f"returned: {code} "
                                      f"{getattr(result.delivery, 'reply_text', '')}"))
        return lost, failed, returned
