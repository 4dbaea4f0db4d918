"""The one error-mapping context manager: no nats-py exception crosses the boundary."""

from __future__ import annotations

import asyncio
import inspect

import nats.errors
import nats.js.errors
import pytest

from unibus.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    MessageTooLarge,
    UnibusError,
)
from unibus_nats._errors import map_errors


def _driver_exceptions() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for module in (nats.errors, nats.js.errors):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == module.__name__:
                found.append(cls)
    return found


def _instance(cls: type[BaseException]) -> BaseException:
    for args in ((), ("boom",)):
        try:
            return cls(*args)
        except TypeError:
            continue
    return cls.__new__(cls)


@pytest.mark.parametrize("cls", _driver_exceptions(), ids=lambda c: c.__name__)
def test_every_driver_exception_becomes_a_unibus_error(cls: type[BaseException]) -> None:
    with pytest.raises(UnibusError), map_errors("test"):
        raise _instance(cls)


@pytest.mark.parametrize(("raised", "expected"), [
    (nats.errors.AuthorizationError(), AuthenticationFailed),
    (nats.errors.NoServersError(), BrokerUnavailable),
    (nats.errors.ConnectionClosedError(), BrokerUnavailable),
    (nats.errors.TimeoutError(), BrokerTimeout),
    (nats.errors.MaxPayloadError(), MessageTooLarge),
    (nats.js.errors.APIError(code=500, description="x"), BrokerError),
    (ConnectionRefusedError(), BrokerUnavailable),
    (TimeoutError(), BrokerTimeout),
])
def test_driver_errors_map_to_the_most_specific_unibus_error(
        raised: BaseException, expected: type[UnibusError]) -> None:
    with pytest.raises(expected), map_errors("test"):
        raise raised


def test_unibus_errors_and_cancellation_pass_through() -> None:
    with pytest.raises(BrokerTimeout, match="mine"), map_errors("test"):
        raise BrokerTimeout("mine")
    with pytest.raises(asyncio.CancelledError), map_errors("test"):
        raise asyncio.CancelledError
