"""The one boundary where aio-pika / aiormq exceptions become unibus errors.

Maps to
    every driver exception → the most specific :class:`~unibus.errors.UnibusError`:
    refused credentials or vhost → ``AuthenticationFailed``; socket errors, timeouts
    and closed connections or channels → ``BrokerUnavailable``; a nacked or returned
    publish → ``PublishFailed``; anything else from aio-pika, aiormq or pamqp →
    ``BrokerError``. unibus errors pass through untouched.

URL
    Not used here; the password is scrubbed from every message this module builds.

Driver
    Not imported: exceptions are recognised by their class names and modules, so
    this module imports without aio-pika.

Capabilities
    None of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    PublishFailed,
    UnibusError,
)

__all__ = ["is_driver_error", "map_errors", "scrub"]

_DRIVER_MODULES = ("aio_pika", "aiormq", "pamqp", "yarl")
# aiormq raises these when a broker refuses the login or the vhost.
_AUTH = frozenset({"AuthenticationError", "ProbableAuthenticationError",
                   "ConnectionNotAllowed"})
_DELIVERY = frozenset({"DeliveryError", "PublishError"})


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the driver stack (aio-pika, aiormq, pamqp, yarl)."""
    return any(cls.__module__.split(".")[0] in _DRIVER_MODULES for cls in type(exc).__mro__)


def scrub(text: str, secret: str | None) -> str:
    """Return ``text`` with ``secret`` (a password) replaced by ``***``."""
    if secret:
        text = text.replace(secret, "***")
    return text


def translate(exc: BaseException, what: str, secret: str | None) -> UnibusError:
    """Return the unibus error for driver or OS exception ``exc`` raised while ``what``."""
    detail = scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, secret)
    names = _names(exc)
    if "InvalidFrameError" in names and "Connection.OpenOk" in str(exc) and (
            "Connection.Close" in str(exc)):
        # The broker answered connection.open with connection.close: RabbitMQ does that
        # only when the user may not use the vhost, or the vhost does not exist.
        return AuthenticationFailed(f"RabbitMQ refused the vhost while {what} (it does not "
                                    "exist or the user has no access to it)")
    if names & _AUTH:
        return AuthenticationFailed(f"RabbitMQ refused the credentials or vhost while {what} "
                                    f"({detail})")
    if names & _DELIVERY:
        return PublishFailed(f"RabbitMQ did not accept a publish while {what} ({detail})")
    if isinstance(exc, TimeoutError):
        return BrokerTimeout(f"RabbitMQ did not answer in time while {what}")
    if isinstance(exc, ConnectionError | OSError) or names & {
            "ConnectionClosed", "ChannelInvalidStateError", "AMQPConnectionError"}:
        return BrokerUnavailable(f"RabbitMQ connection lost while {what} ({detail})")
    return BrokerError(f"RabbitMQ failed while {what} ({detail})")


@contextmanager
def map_errors(what: str, secret: str | None = None) -> Iterator[None]:
    """Map every driver exception raised inside the block to a unibus error.

    Args:
        what: What the block does, for the message ("publishing to 'orders'").
        secret: The password, scrubbed from every message.

    Raises:
        UnibusError: The mapped error. It is not chained to the driver's exception,
            whose text may hold the URL; its type and message are in the new message.
    """
    try:
        yield
    except UnibusError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if is_driver_error(exc) or isinstance(exc, OSError | TimeoutError | EOFError):
            raise translate(exc, what, secret) from None
        raise
